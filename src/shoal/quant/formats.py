"""One in-memory representation for every quantized weight, and converters into it.

``QuantizedWeight`` is logically an (N=out_features, K=in_features) float matrix, row-major like
``nn.Linear.weight``, stored as integer codes plus float32 per-group scales (and biases):

* ``q4_affine``: ``codes`` uint8 (N, K//2).  Within each group of G elements of a row, byte j of
  the group holds element j in the low nibble and element j + G/2 in the high nibble (llama.cpp's
  Q4_0/Q4_1 layout generalised to any even G).  value = scale*code + bias, code in 0..15.
* ``q8_sym``: ``codes`` int8 (N, K); value = scale*code.  ``biases`` is None.
* ``q8_affine``: ``codes`` uint8 (N, K); value = scale*code + bias.

``scales``/``biases`` are float32 (N, K//G): the kernels never convert fp16 in their inner loops.

Converters take data already in memory (numpy views of a memory-mapped file) and copy only what
the layout change requires (the codes, once; scales are converted to float32):

* ``from_gguf(raw, ggml_type, shape)``: GGUF tensors (reference: ``gguf/quants.py``).  Dequantising
  the result is bit-identical to ``gguf.quants.dequantize``.
* ``from_mlx(weight_u32, scales, biases, bits, group_size)``: MLX affine quantization.
* ``quantize_affine(w, bits, group_size)``: round-to-nearest affine quantization of a dense matrix.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as _T
from gguf.constants import GGML_QUANT_SIZES

__all__ = ["QuantizedWeight", "KINDS", "from_gguf", "from_mlx", "quantize_affine"]

KINDS = ("q4_affine", "q8_sym", "q8_affine")
_CODE_DTYPE = {"q4_affine": np.uint8, "q8_sym": np.int8, "q8_affine": np.uint8}


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    kind: str                      # "q4_affine" | "q8_sym" | "q8_affine"
    codes: np.ndarray              # see module docstring
    scales: np.ndarray             # float32 (N, K//G)
    biases: np.ndarray | None      # float32 (N, K//G); None for q8_sym
    group_size: int

    def __post_init__(self):
        kind, G = self.kind, int(self.group_size)
        if kind not in KINDS:
            raise ValueError(f"unknown QuantizedWeight kind {kind!r}")
        codes = np.asarray(self.codes)
        if codes.dtype != _CODE_DTYPE[kind] or codes.ndim != 2:
            raise ValueError(f"{kind}: codes must be 2-D {np.dtype(_CODE_DTYPE[kind])}, got {codes.dtype} {codes.shape}")
        N = codes.shape[0]
        K = codes.shape[1] * (2 if kind == "q4_affine" else 1)
        if G <= 0 or K % G or (kind == "q4_affine" and G % 2):
            raise ValueError(f"{kind}: bad group_size {G} for K={K}")
        ng = K // G
        scales = np.ascontiguousarray(self.scales, dtype=np.float32)
        if scales.shape != (N, ng):
            raise ValueError(f"{kind}: scales must be {(N, ng)}, got {scales.shape}")
        biases = self.biases
        if kind == "q8_sym":
            if biases is not None:
                raise ValueError("q8_sym has no biases")
        else:
            if biases is None:
                raise ValueError(f"{kind} needs biases")
            biases = np.ascontiguousarray(biases, dtype=np.float32)
            if biases.shape != (N, ng):
                raise ValueError(f"{kind}: biases must be {(N, ng)}, got {biases.shape}")
        object.__setattr__(self, "codes", np.ascontiguousarray(codes))
        object.__setattr__(self, "scales", scales)
        object.__setattr__(self, "biases", biases)
        object.__setattr__(self, "group_size", G)

    @property
    def shape(self) -> tuple[int, int]:
        n, c = self.codes.shape
        return (n, c * 2 if self.kind == "q4_affine" else c)

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scales.nbytes + (0 if self.biases is None else self.biases.nbytes)

    def __repr__(self) -> str:
        return f"QuantizedWeight({self.kind}, shape={self.shape}, group_size={self.group_size})"


# ----------------------------------------------------------------------------------------------
# GGUF
# ----------------------------------------------------------------------------------------------
def _bytes(raw) -> np.ndarray:
    a = np.asarray(raw)
    if not a.flags.c_contiguous:
        a = np.ascontiguousarray(a)
    return a.reshape(-1).view(np.uint8)


def _f16(b: np.ndarray) -> np.ndarray:
    """(..., 2) uint8 slice (last axis contiguous) -> float32 (...)."""
    return b.view(np.float16)[..., 0].astype(np.float32)


def _nib_pairs(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Pack code arrays (..., H) as low / high nibbles."""
    return (lo & 0x0F) | (hi << 4)


def _k_scale_min(sc12: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K 6-bit scales and mins: (..., 12) uint8 -> two (..., 8) uint8 (see gguf Q4_K)."""
    d, m, md = sc12[..., 0:4], sc12[..., 4:8], sc12[..., 8:12]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def from_gguf(raw: np.ndarray, ggml_type, shape) -> "QuantizedWeight | np.ndarray":
    """Convert one GGUF tensor.

    ``raw``: the tensor's data as ``gguf.GGUFReader`` gives it (uint8 bytes, or float16/float32 for
    F16/F32), any shape; only its bytes are used.  ``shape``: the logical numpy-order shape, e.g.
    (N, K) for a matrix (``tuple(reversed(tensor.shape))``).  Leading dims of a >2-D quantized
    tensor are flattened into N.

    F32 -> float32 array of ``shape`` (a view of ``raw``, no copy); F16/BF16 -> float32 copy.
    Q8_0 -> q8_sym G=32; Q4_0, Q4_1, Q4_K -> q4_affine G=32; Q5_0, Q5_1, Q5_K -> q8_affine G=32
    (codes 0..31); Q6_K -> q8_sym G=16 (code = q-32); Q8_K -> q8_sym G=256.
    Anything else raises ValueError naming the type.
    """
    t = _T(ggml_type)
    shape = tuple(int(s) for s in shape)
    if t == _T.F32:
        return _bytes(raw).view(np.float32).reshape(shape)
    if t == _T.F16:
        return _bytes(raw).view(np.float16).reshape(shape).astype(np.float32)
    if t == _T.BF16:
        return (_bytes(raw).view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
    if t not in _CONVERTERS:
        raise ValueError(f"unsupported GGUF tensor type {t.name}")
    if len(shape) < 1:
        raise ValueError("quantized tensor needs a shape")
    K = shape[-1]
    N = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    bs, ts = GGML_QUANT_SIZES[t]
    if K % bs:
        raise ValueError(f"{t.name}: row length {K} is not a multiple of the block size {bs}")
    b = _bytes(raw)
    nb = K // bs
    if b.size != N * nb * ts:
        raise ValueError(f"{t.name}: expected {N * nb * ts} bytes for shape {shape}, got {b.size}")
    return _CONVERTERS[t](b.reshape(N, nb, ts), N, K)


def _q8_0(b, N, K):
    d = _f16(b[..., 0:2])
    codes = np.ascontiguousarray(b[..., 2:34]).view(np.int8).reshape(N, K)
    return QuantizedWeight("q8_sym", codes, d, None, 32)


def _q4_0(b, N, K):
    d = _f16(b[..., 0:2])
    codes = np.ascontiguousarray(b[..., 2:18]).reshape(N, K // 2)
    return QuantizedWeight("q4_affine", codes, d, d * np.float32(-8.0), 32)


def _q4_1(b, N, K):
    d = _f16(b[..., 0:2])
    m = _f16(b[..., 2:4])
    codes = np.ascontiguousarray(b[..., 4:20]).reshape(N, K // 2)
    return QuantizedWeight("q4_affine", codes, d, m, 32)


def _q4_k(b, N, K):
    nb = b.shape[1]
    d = _f16(b[..., 0:2])[..., None]
    dmin = _f16(b[..., 2:4])[..., None]
    sc, mn = _k_scale_min(b[..., 4:16])
    scales = (d * sc.astype(np.float32)).reshape(N, nb * 8)
    biases = -(dmin * mn.astype(np.float32)).reshape(N, nb * 8)
    # qs: 4 chunks of 32 bytes; chunk c = sub-blocks 2c (low nibbles) and 2c+1 (high nibbles),
    # element j of a sub-block in byte j.  Repack each sub-block as byte j = e[j] | e[j+16] << 4.
    qs = b[..., 16:144].reshape(N, nb, 4, 32)
    a, c = qs[..., :16], qs[..., 16:]
    codes = np.empty((N, nb, 4, 2, 16), np.uint8)
    codes[..., 0, :] = _nib_pairs(a, c)
    codes[..., 1, :] = (a >> 4) | (c & 0xF0)
    return QuantizedWeight("q4_affine", codes.reshape(N, K // 2), scales, biases, 32)


def _q5_bits(qh4: np.ndarray) -> np.ndarray:
    """(..., 4) uint8 little-endian 32-bit mask -> (..., 32) high bits (bit i = element i)."""
    return np.unpackbits(qh4, axis=-1, bitorder="little")


def _q5_codes(qs16, qh4):
    codes = np.concatenate([qs16 & 0x0F, qs16 >> 4], axis=-1)
    codes |= _q5_bits(qh4) << 4
    return codes


def _q5_0(b, N, K):
    d = _f16(b[..., 0:2])
    codes = _q5_codes(b[..., 6:22], b[..., 2:6]).reshape(N, K)
    return QuantizedWeight("q8_affine", codes, d, d * np.float32(-16.0), 32)


def _q5_1(b, N, K):
    d = _f16(b[..., 0:2])
    m = _f16(b[..., 2:4])
    codes = _q5_codes(b[..., 8:24], b[..., 4:8]).reshape(N, K)
    return QuantizedWeight("q8_affine", codes, d, m, 32)


def _q5_k(b, N, K):
    nb = b.shape[1]
    d = _f16(b[..., 0:2])[..., None]
    dmin = _f16(b[..., 2:4])[..., None]
    sc, mn = _k_scale_min(b[..., 4:16])
    scales = (d * sc.astype(np.float32)).reshape(N, nb * 8)
    biases = -(dmin * mn.astype(np.float32)).reshape(N, nb * 8)
    qh = b[..., 16:48]                                   # (N, nb, 32): bit i -> sub-block i
    qs = b[..., 48:176].reshape(N, nb, 4, 32)            # chunk c: sub-blocks 2c (lo), 2c+1 (hi)
    codes = np.empty((N, nb, 4, 2, 32), np.uint8)
    codes[..., 0, :] = qs & 0x0F
    codes[..., 1, :] = qs >> 4
    codes = codes.reshape(N, nb, 8, 32)
    codes |= ((qh[:, :, None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1) << 4
    return QuantizedWeight("q8_affine", codes.reshape(N, K), scales, biases, 32)


def _q6_k(b, N, K):
    nb = b.shape[1]
    ql = b[..., 0:128].reshape(N, nb, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(2, 1)
    ql = (ql & 0x0F).reshape(N, nb, 8, 32)
    qh = b[..., 128:192].reshape(N, nb, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)
    qh = (qh & 0x03).reshape(N, nb, 8, 32)
    codes = ((ql | (qh << 4)).view(np.int8) - np.int8(32)).reshape(N, K)
    sc = b[..., 192:208].view(np.int8).astype(np.float32)  # (N, nb, 16)
    d = _f16(b[..., 208:210])[..., None]
    return QuantizedWeight("q8_sym", codes, (d * sc).reshape(N, nb * 16), None, 16)


def _q8_k(b, N, K):
    d = b[..., 0:4].view(np.float32)[..., 0].astype(np.float32)
    codes = np.ascontiguousarray(b[..., 4:260]).view(np.int8).reshape(N, K)
    return QuantizedWeight("q8_sym", codes, d, None, 256)


_CONVERTERS = {
    _T.Q8_0: _q8_0, _T.Q4_0: _q4_0, _T.Q4_1: _q4_1, _T.Q4_K: _q4_k,
    _T.Q5_0: _q5_0, _T.Q5_1: _q5_1, _T.Q5_K: _q5_k, _T.Q6_K: _q6_k, _T.Q8_K: _q8_k,
}


# ----------------------------------------------------------------------------------------------
# MLX
# ----------------------------------------------------------------------------------------------
def _as_f32(a) -> np.ndarray:
    if hasattr(a, "detach"):                       # torch.Tensor (fp16 / bf16 / fp32)
        a = a.detach().to("cpu").float().numpy()
    return np.ascontiguousarray(a, dtype=np.float32)


def from_mlx(weight_u32, scales, biases, bits: int, group_size: int) -> QuantizedWeight:
    """Convert an MLX-community affine-quantized linear weight.

    ``weight_u32``: uint32 (N, K*bits/32) (numpy or torch; int32 is reinterpreted); element k of a
    word sits at bits [k*bits, (k+1)*bits), first element in the least significant bits.
    ``scales``/``biases``: (N, K/group_size), given either as numpy arrays of any float dtype
    (float16 / float32; bf16 must be widened by the caller) or as torch tensors of any float dtype
    (bf16 included); both are converted to float32.  value = scale*q + bias.
    4 bit -> q4_affine (nibbles repacked into the group layout), 8 bit -> q8_affine, 2 bit -> q8_affine.
    """
    bits, G = int(bits), int(group_size)
    if bits not in (2, 4, 8):
        raise ValueError(f"MLX {bits}-bit weights are not supported (2, 4 or 8)")
    w = weight_u32
    if hasattr(w, "detach"):
        w = w.detach().to("cpu").numpy()
    w = np.asarray(w)
    if w.dtype not in (np.uint32, np.int32) or w.ndim != 2:
        raise ValueError(f"MLX weight must be a 2-D uint32 array, got {w.dtype} {w.shape}")
    w = np.ascontiguousarray(w).view("<u4")
    N = w.shape[0]
    K = w.shape[1] * (32 // bits)
    by = w.view(np.uint8)                               # (N, K*bits/8), little-endian bytes
    s, bi = _as_f32(scales), _as_f32(biases)
    if K % G or s.shape != (N, K // G) or bi.shape != (N, K // G):
        raise ValueError(f"MLX scales/biases must be {(N, K // G)} for group_size {G}, got {s.shape} {bi.shape}")
    if bits == 8:
        return QuantizedWeight("q8_affine", by, s, bi, G)
    if bits == 2:
        e = (by[..., None] >> np.array([0, 2, 4, 6], np.uint8)) & 3
        return QuantizedWeight("q8_affine", e.reshape(N, K), s, bi, G)
    if G % 2:
        raise ValueError("4-bit MLX weights need an even group_size")
    # byte i holds elements 2i (low nibble) and 2i+1 (high nibble)
    e = np.empty((N, K // 2, 2), np.uint8)
    np.bitwise_and(by, 0x0F, out=e[..., 0])
    np.right_shift(by, 4, out=e[..., 1])
    e = e.reshape(N, K // G, 2, G // 2)
    codes = _nib_pairs(e[:, :, 0, :], e[:, :, 1, :]).reshape(N, K // 2)
    return QuantizedWeight("q4_affine", codes, s, bi, G)


# ----------------------------------------------------------------------------------------------
# dense -> quantized
# ----------------------------------------------------------------------------------------------
def quantize_sym8(w: np.ndarray, group_size: int = 32) -> QuantizedWeight:
    """Round-to-nearest symmetric 8-bit quantization of a float (N, K) matrix per group of
    ``group_size`` elements of a row: scale = max|w|/127, code = rint(w/scale) -> q8_sym.
    |w - dequantized| <= scale/2 (plus float32 rounding)."""
    G = int(group_size)
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2 or w.shape[1] % G:
        raise ValueError(f"cannot quantize shape {w.shape} with group_size {G}")
    N, K = w.shape
    g = w.reshape(N, K // G, G)
    scale = (np.abs(g).max(axis=-1) / np.float32(127)).astype(np.float32)
    scale[scale == 0] = 1.0
    q = np.clip(np.rint(g / scale[..., None]), -127, 127).astype(np.int8)
    return QuantizedWeight("q8_sym", q.reshape(N, K), scale, None, G)


def quantize_affine(w: np.ndarray, bits: int = 4, group_size: int = 32) -> QuantizedWeight:
    """Round-to-nearest asymmetric quantization of a float (N, K) matrix, per group of
    ``group_size`` consecutive elements of a row: bias = group min, scale = (max - min)/(2^bits - 1),
    code = rint((w - bias)/scale).  |w - dequantized| <= scale/2 (plus float32 rounding).
    bits=4 -> q4_affine, bits=8 -> q8_affine."""
    bits, G = int(bits), int(group_size)
    if bits not in (4, 8):
        raise ValueError("quantize_affine supports bits=4 or 8")
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2 or w.shape[1] % G or (bits == 4 and G % 2):
        raise ValueError(f"cannot quantize shape {w.shape} with group_size {G}")
    N, K = w.shape
    g = w.reshape(N, K // G, G)
    lo = g.min(axis=-1)
    hi = g.max(axis=-1)
    qmax = (1 << bits) - 1
    scale = ((hi - lo) / np.float32(qmax)).astype(np.float32)
    scale[scale == 0] = 1.0
    q = np.rint((g - lo[..., None]) / scale[..., None])
    q = np.clip(q, 0, qmax).astype(np.uint8)
    if bits == 8:
        return QuantizedWeight("q8_affine", q.reshape(N, K), scale, lo, G)
    codes = _nib_pairs(q[..., : G // 2], q[..., G // 2:]).reshape(N, K // 2)
    return QuantizedWeight("q4_affine", codes, scale, lo, G)
