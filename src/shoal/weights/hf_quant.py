"""The quantized safetensors formats that mixture-of-experts models ship in, decoded into the
engine's weights (float32 arrays or `QuantizedWeight`s), and the name mapping that lets a model see
every one of them under its plain Hugging Face names (`...proj.weight`, one tensor per expert):

* **FP8 with block scales** (DeepSeek-V3's release): `X.weight` is float8_e4m3fn (N, K) and
  `X.weight_scale_inv` float32 (ceil(N/bn), ceil(K/bk)); value = fp8 · scale of its (bn × bk)
  block (`quantization_config.weight_block_size`, [128, 128]). Decoded exactly, then held as 8-bit
  codes with a scale per 32 (`fp8_to_q8`): 1.125 bytes per parameter instead of float32's 4.
* **compressed-tensors pack-quantized INT4** (Kimi-K2-Thinking's routed experts):
  `X.weight_packed` int32 (N, K/8) with element k of a row in bits [4k mod 32, +4) of word k/8,
  stored as q + 8; `X.weight_scale` (N, K/G); `X.weight_shape` [N, K]; asymmetric variants add a
  `X.weight_zero_point` packed along rows. value = (q − zero) · scale. Becomes a `q4_affine`
  QuantizedWeight exactly (codes q + 8, bias −8 · scale): nothing is dequantized.
* compressed-tensors *float-quantized* (FP8 `X.weight` with `X.weight_scale` per tensor, channel or
  group): decoded to float32.
* **MLX-community** (`quantization: {bits, group_size}` and per-module overrides): plain MLX
  quantized linears, plus what mlx-lm's converters stack — the routed experts of a layer as one
  (E, N, ·) tensor under `switch_mlp` (each expert is read on its own, as a row slice of the
  memory-mapped tensor) and DeepSeek's kv_b_proj pre-split into 3-D `embed_q` / `unembed_out`.

`logical_index` turns the stored names into the logical ones, `read_tensor` reads one logical
tensor; `HFCheckpoint` (hf.py) calls both.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shoal.quant.formats import QuantizedWeight, from_mlx, quantize_sym8
from shoal.quant.kernels import dequantize

# Stored beside a weight and read with it; never a tensor of their own.
_CT_PARTS = (".weight_packed", ".weight_scale", ".weight_shape", ".weight_zero_point", ".weight_g_idx")
_FP8_PARTS = (".weight_scale_inv",)
_MLX_PARTS = (".scales", ".biases")
_SWITCH = re.compile(r"^(?P<pre>.*)\.switch_mlp\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")
_MIXTRAL_NAMES = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
_EXPERT = re.compile(r"^(?P<pre>.*)\.experts\.(?P<e>\d+)\.(?P<proj>\w+)\.weight$")

# ----------------------------------------------------------------------------- decoders


def fp8_block_dequantize(weight: torch.Tensor | np.ndarray, scale_inv: torch.Tensor | np.ndarray, block: tuple[int, int] = (128, 128)) -> np.ndarray:
    """float8_e4m3fn (N, K) and per-block scales (ceil(N/bn), ceil(K/bk)) -> float32 (N, K).

    The product of an fp8 value (4 significant bits) and a float32 scale is exact in float32."""
    w = _f8_to_f32(weight)
    s = scale_inv.float().numpy() if isinstance(scale_inv, torch.Tensor) else np.asarray(scale_inv, dtype=np.float32)
    N, K = w.shape
    bn, bk = block
    if s.shape != (-(-N // bn), -(-K // bk)):
        raise ValueError(f"fp8 scales {s.shape} do not fit weight {(N, K)} in blocks of {block}")
    for i in range(s.shape[0]):  # one band of rows at a time: no weight-sized scale matrix
        band = w[i * bn : (i + 1) * bn]
        band *= np.repeat(s[i], bk)[:K]
    return w


FP8_HOLDING_GROUP = 32


def fp8_to_q8(w: np.ndarray) -> QuantizedWeight | torch.Tensor:
    """How an FP8 weight is held: 8-bit codes with a float32 scale per 32 values (1.125 bytes per
    parameter). Widening to float32 would make DeepSeek-V3 2.7 TB; this keeps it at ~750 GB. The
    error, at most half a step of 1/127 of each group's largest value, is smaller than the FP8
    rounding already in the weights (4 significant bits). Widths that are not a multiple of 32
    stay float32."""
    if w.ndim != 2 or w.shape[1] % FP8_HOLDING_GROUP:
        return torch.from_numpy(w)
    return quantize_sym8(w, FP8_HOLDING_GROUP)


def pack_quantized_to_weight(
    packed: torch.Tensor | np.ndarray, scale: torch.Tensor | np.ndarray, shape: tuple[int, int] | None = None,
    num_bits: int = 4, zero_point: torch.Tensor | np.ndarray | None = None,
) -> QuantizedWeight:
    """compressed-tensors pack-quantized int4/int8 (group strategy) -> q4_affine / q8_affine.

    `packed` int32 (N, K·bits/32), element k of a row in bits [(k·bits) mod 32, +bits) of word
    k·bits/32, holding q + 2^(bits−1); `scale` (N, K/G); `zero_point` (asymmetric only) int32
    packed the same way along rows, shape (N·bits/32, K/G). value = (q − zero) · scale."""
    p = packed.numpy() if isinstance(packed, torch.Tensor) else np.asarray(packed)
    N = p.shape[0]
    K = int(shape[1]) if shape is not None else p.shape[1] * 32 // num_bits
    s = scale.float().numpy() if isinstance(scale, torch.Tensor) else np.asarray(scale, dtype=np.float32)
    if num_bits not in (4, 8) or p.dtype not in (np.int32, np.uint32) or p.shape[1] * 32 != K * num_bits:
        raise ValueError(f"pack-quantized: unsupported {num_bits}-bit weight {p.dtype} {p.shape} for K={K}")
    G = K // s.shape[1]
    offset = 1 << (num_bits - 1)
    if zero_point is None:  # symmetric: stored codes are q + offset, so value = scale·code − offset·scale
        biases = -offset * s
    else:
        zp = zero_point.numpy() if isinstance(zero_point, torch.Tensor) else np.asarray(zero_point)
        zcodes = _unpack_bits(np.ascontiguousarray(zp.T), num_bits)[:, :N].T.astype(np.float32)  # (N, K/G), stored + offset
        biases = -zcodes * s
    # The packing is MLX's (little-endian words, first element in the low bits): reuse its converter.
    return from_mlx(np.ascontiguousarray(p).view(np.uint32), s, biases, bits=num_bits, group_size=G)


def _unpack_bits(words: np.ndarray, bits: int) -> np.ndarray:
    """int32 (R, W) -> uint8 (R, W·32/bits), element k in bits [(k·bits) mod 32, +bits) of word k·bits/32."""
    by = np.ascontiguousarray(words).view("<u4").view(np.uint8)
    if bits == 8:
        return by.copy()
    out = np.empty((by.shape[0], by.shape[1], 2), np.uint8)
    out[..., 0], out[..., 1] = by & 0x0F, by >> 4
    return out.reshape(by.shape[0], -1)


def _f8_to_f32(weight: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(weight, torch.Tensor):
        return weight.float().numpy()
    return torch.from_numpy(np.ascontiguousarray(weight).view(np.uint8)).view(torch.float8_e4m3fn).float().numpy()


# ----------------------------------------------------------------------------- the checkpoint view


class TensorStore:
    """Stored tensors of a safetensors directory, by name (files memory-mapped, opened once)."""

    def __init__(self, files: dict[str, Path]):
        self.files = files
        self._open: dict[Path, Any] = {}

    def has(self, name: str) -> bool:
        return name in self.files

    def _handle(self, name: str):
        from safetensors import safe_open

        f = self.files[name]
        if f not in self._open:
            self._open[f] = safe_open(f, framework="pt")
        return self._open[f]

    def get(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(name)

    def get_row(self, name: str, i: int) -> torch.Tensor:
        """Index i of the first axis, reading only its bytes."""
        return self._handle(name).get_slice(name)[i : i + 1][0]

    def shape(self, name: str) -> list[int]:
        return list(self._handle(name).get_slice(name).get_shape())

    def close(self) -> None:
        self._open.clear()


def logical_index(stored: dict[str, Path], config: dict[str, Any]) -> dict[str, Path]:
    """stored tensor name -> file  ==>  logical name -> file: companions (scales, shapes, ...) hidden,
    `X.weight_packed` shown as `X.weight`, MLX-stacked experts shown one per expert."""
    mlx = _mlx_quantization(config)
    n_experts = int(config.get("n_routed_experts") or config.get("num_experts") or config.get("num_local_experts") or 0)
    hidden = _CT_PARTS + _FP8_PARTS + (_MLX_PARTS if mlx else ())
    out: dict[str, Path] = {}
    for name, f in stored.items():
        if name.endswith(".weight_packed"):
            out[name.removesuffix("_packed")] = f
            continue
        if name.endswith(hidden):
            continue
        m = _SWITCH.match(name)
        if m and n_experts:
            for e in range(n_experts):
                out[_expert_name(m["pre"], e, m["proj"])] = f
            continue
        out[name] = f
    return out


def read_tensor(store: TensorStore, name: str, config: dict[str, Any]) -> torch.Tensor | QuantizedWeight | None:
    """A logical tensor in one of the formats above; None when it is a plain stored tensor."""
    base = name.removesuffix(".weight")
    if not name.endswith(".weight"):
        return None
    if store.has(f"{base}.weight_packed"):
        shape = store.get(f"{base}.weight_shape").tolist() if store.has(f"{base}.weight_shape") else None
        zp = store.get(f"{base}.weight_zero_point") if store.has(f"{base}.weight_zero_point") else None
        return pack_quantized_to_weight(store.get(f"{base}.weight_packed"), store.get(f"{base}.weight_scale"), shape, _ct_bits(config), zp)
    if store.has(f"{base}.weight_scale_inv"):
        block = tuple((config.get("quantization_config") or {}).get("weight_block_size") or (128, 128))
        return fp8_to_q8(fp8_block_dequantize(store.get(name), store.get(f"{base}.weight_scale_inv"), block))
    if store.has(f"{base}.weight_scale") and store.has(name):
        # compressed-tensors float-quantized (FP8 with a per-tensor, per-channel or per-group scale)
        w, scale = store.get(name).float(), store.get(f"{base}.weight_scale").float()
        if scale.dim() == 2 and scale.shape[1] > 1:
            scale = scale.repeat_interleave(w.shape[1] // scale.shape[1], dim=1)
        return w * scale
    mlx = _mlx_quantization(config)
    if not mlx:
        return None
    if not store.has(name):  # one expert of an MLX-stacked switch_mlp tensor
        m = _EXPERT.match(name)
        if m is None:
            return None
        proj = {v: k for k, v in _MIXTRAL_NAMES.items()}.get(m["proj"], m["proj"])
        stacked = f"{m['pre']}.switch_mlp.{proj}"
        e = int(m["e"])
        if not store.has(f"{stacked}.scales"):
            row = store.get_row(f"{stacked}.weight", e)
            return row if row.dtype == torch.bfloat16 else row.float()  # bf16 held as stored
        w, s, b = (store.get_row(f"{stacked}.{part}", e) for part in ("weight", "scales", "biases"))
        bits = _mlx_bits(mlx, stacked)
        return from_mlx(w, s, b, bits, _group(w, s, bits))
    if not store.has(f"{base}.scales"):
        return None
    w, s, b = store.get(name), store.get(f"{base}.scales"), store.get(f"{base}.biases")
    bits = _mlx_bits(mlx, base)
    group = _group(w, s, bits)
    if w.dim() == 2:
        return from_mlx(w, s, b, bits, group)
    # A 3-D quantized tensor (mlx-lm's MultiLinear: embed_q / unembed_out): dense float32.
    lead = w.shape[:-1]
    q = from_mlx(w.reshape(-1, w.shape[-1]).numpy(), s.reshape(-1, s.shape[-1]), b.reshape(-1, b.shape[-1]), bits, group)
    return torch.from_numpy(dequantize(q)).reshape(*lead, -1)


def stored_nbytes(store: TensorStore, name: str) -> int | None:
    """Bytes on disk of a logical tensor that is not stored under its own name (None otherwise)."""
    if store.has(name):
        return None
    parts = [p for p in (name.removesuffix(".weight") + s for s in _CT_PARTS) if store.has(p)]
    if parts:
        return sum(_nbytes(store, p) for p in parts)
    m = _EXPERT.match(name)
    if m is None:
        return None
    proj = {v: k for k, v in _MIXTRAL_NAMES.items()}.get(m["proj"], m["proj"])
    stacked = f"{m['pre']}.switch_mlp.{proj}"
    parts = [p for p in (f"{stacked}.weight", f"{stacked}.scales", f"{stacked}.biases") if store.has(p)]
    return sum(_nbytes(store, p) // store.shape(p)[0] for p in parts)


def _nbytes(store: TensorStore, name: str) -> int:
    sl = store._handle(name).get_slice(name)
    size = {"F32": 4, "F16": 2, "BF16": 2, "U32": 4, "I32": 4, "I64": 8, "U8": 1, "I8": 1, "F8_E4M3": 1}.get(sl.get_dtype(), 4)
    return int(np.prod(sl.get_shape())) * size


def _expert_name(pre: str, e: int, proj: str) -> str:
    if pre.endswith("block_sparse_moe"):
        proj = _MIXTRAL_NAMES[proj]
    return f"{pre}.experts.{e}.{proj}.weight"


def _mlx_quantization(config: dict[str, Any]) -> dict[str, Any] | None:
    q = config.get("quantization") or config.get("quantization_config")
    return q if q and "bits" in q else None


def _mlx_bits(q: dict[str, Any], module: str) -> int:
    """A module's bits: mlx-lm writes per-module overrides beside the default."""
    over = q.get(module)
    return int(over.get("bits", q["bits"])) if isinstance(over, dict) else int(q["bits"])


def _group(w: torch.Tensor, scales: torch.Tensor, bits: int) -> int:
    """The group size, from the shapes (mixed conversions keep experts at their own group size)."""
    return w.shape[-1] * 32 // bits // scales.shape[-1]


def _ct_bits(config: dict[str, Any]) -> int:
    groups = ((config.get("quantization_config") or {}).get("config_groups") or {}).values()
    for g in groups:
        bits = (g.get("weights") or {}).get("num_bits")
        if bits:
            return int(bits)
    return 4


__all__ = ["fp8_block_dequantize", "pack_quantized_to_weight", "TensorStore", "logical_index", "read_tensor", "stored_nbytes"]
