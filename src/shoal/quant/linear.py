"""torch modules over quantized weights.

``QuantLinear(weight, bias=None)``: ``y = x @ W.T + bias`` for float32 CPU ``x`` of shape (..., K).
  * M = prod(x.shape[:-1]) <= ``QuantLinear.small_m`` (decode, decode batches, short prefills):
    the numba kernel is called directly on ``x.numpy()`` / ``out.numpy()`` views (no copies).
  * larger M (prefill): the weight is dequantized into a scratch float32 buffer shared by all
    QuantLinears of the thread (at most ``SCRATCH_FLOATS`` floats; bigger weights are done in row
    chunks) and multiplied with ``torch.nn.functional.linear`` (BLAS).
  No autograd: use under ``torch.inference_mode()`` / ``torch.no_grad()``.

``BF16Linear(weight, bias=None)``: the same for a bf16 weight held as bf16 (half the memory and
the bytes read of float32): few rows by the numba kernel ``matmul_bf16``, more by BLAS over the
weight widened a block of rows at a time into the shared scratch buffer.

``dense_or_quant_linear(w, bias=None)``: QuantLinear for a QuantizedWeight, BF16Linear for a bf16
tensor, else an ``nn.Linear`` holding the float32 weight (shared with ``w``, not copied, when ``w``
already is float32 and C-contiguous).

``fuse_rows(ws)``: concatenate weights along N (fused q/k/v or gate/up projections).
"""
from __future__ import annotations

import threading
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from shoal.kernels.direct import DirectModule

from . import kernels as _k
from .formats import QuantizedWeight

__all__ = ["QuantLinear", "BF16Linear", "dense_or_quant_linear", "fuse_rows", "can_fuse_rows", "SCRATCH_FLOATS"]

SCRATCH_FLOATS = 8 * 1024 * 1024      # 32 MiB of float32 per thread for prefill dequantization
_tls = threading.local()
_F32 = torch.float32


def _scratch(n: int) -> np.ndarray:
    buf = getattr(_tls, "buf", None)
    if buf is None or buf.size < n:
        buf = np.empty(n, np.float32)
        _tls.buf = buf
    return buf[:n]


def _as_f32_tensor(a) -> torch.Tensor:
    """float32 CPU tensor sharing memory with ``a`` when ``a`` already is C-contiguous float32."""
    if isinstance(a, torch.Tensor):
        return a.detach().to(device="cpu", dtype=torch.float32).contiguous()
    a = np.asarray(a)
    if a.dtype != np.float32 or not a.flags.c_contiguous:
        a = np.ascontiguousarray(a, dtype=np.float32)
    with warnings.catch_warnings():       # read-only memmaps: we never write into weights
        warnings.simplefilter("ignore")
        return torch.from_numpy(a)


class QuantLinear(DirectModule):
    # M <= small_m -> numba kernel; larger -> dequantize + BLAS.  Chosen by measurement with
    # scripts/bench_kernels.py --threshold on the 2-core reference machine: since the batch tiles
    # (kernels.py) the kernel is faster up to M ~ 48 and even with BLAS at 64 (3072x576: M=48
    # 794 vs 870 us, M=64 1064 vs 1223 us; 576x576: M=48 152 vs 136 us).
    small_m = 48

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None = None):
        super().__init__()
        if not isinstance(weight, QuantizedWeight):
            raise TypeError("QuantLinear needs a QuantizedWeight")
        self.qweight = weight
        self.out_features, self.in_features = weight.shape
        k = _k.MATMUL[weight.kind]
        c, s, b = _k.operands(weight)
        self._mm = lambda x, o: k(x, c, s, b, o)
        if bias is not None:
            bias = _as_f32_tensor(bias).reshape(self.out_features)
            self.register_buffer("bias", bias, persistent=False)
            self._bias_np = bias.numpy()
        else:
            self.bias = None
            self._bias_np = None

    def extra_repr(self) -> str:
        w = self.qweight
        return (f"in_features={self.in_features}, out_features={self.out_features}, kind={w.kind}, "
                f"group_size={w.group_size}, bias={self._bias_np is not None}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # hot path (decode): 2-D contiguous float32 x with few rows; ~2 us of Python per call
        if x.dim() != 2:
            return self._forward_nd(x)
        M = x.shape[0]
        if M > self.small_m or x.dtype != _F32 or not x.is_contiguous() or x.requires_grad:
            return self._forward_other(x)
        yn = np.empty((M, self.out_features), np.float32)
        self._mm(x.numpy(), yn)
        if self._bias_np is not None:
            np.add(yn, self._bias_np, out=yn)
        return torch.from_numpy(yn)

    def _forward_nd(self, x: torch.Tensor) -> torch.Tensor:
        shp = x.shape
        y = self.forward(x.reshape(-1, self.in_features))
        return y.view(*shp[:-1], self.out_features)

    def _forward_other(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.small_m:
            return self._forward_dense(x)
        if x.requires_grad:
            x = x.detach()
        return self.forward(x.contiguous().float())

    def _forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous().float()
        N, K = self.out_features, self.in_features
        w = self.qweight
        rows = max(1, min(N, SCRATCH_FLOATS // K))
        buf = _scratch(rows * K)
        if rows == N:
            wt = torch.from_numpy(_k.dequantize(w, buf.reshape(N, K)))
            return F.linear(x, wt, self.bias)
        y = torch.empty((x.shape[0], N), dtype=torch.float32)
        b = self.bias
        for n0 in range(0, N, rows):
            n1 = min(N, n0 + rows)
            part = QuantizedWeight(w.kind, w.codes[n0:n1], w.scales[n0:n1],
                                   None if w.biases is None else w.biases[n0:n1], w.group_size)
            wt = torch.from_numpy(_k.dequantize(part, buf[: (n1 - n0) * K].reshape(n1 - n0, K)))
            y[:, n0:n1] = F.linear(x, wt, None if b is None else b[n0:n1])
        return y


class BF16Linear(DirectModule):
    """``y = x @ W.T + bias`` for a bf16 weight held as bf16 and float32 ``x`` (output float32)."""

    small_m = QuantLinear.small_m  # up to this many rows the kernel, beyond it BLAS

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        if weight.dtype != torch.bfloat16 or weight.dim() != 2:
            raise TypeError("BF16Linear needs a 2-D bf16 weight")
        self.weight = weight.contiguous()
        self.out_features, self.in_features = weight.shape
        self._bits = self.weight.view(torch.int16).numpy().view(np.uint16)
        self.bias = None if bias is None else _as_f32_tensor(bias).reshape(self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bf16, bias={self.bias is not None}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, self.in_features).detach().to(torch.float32).contiguous()
        M, N, K = x.shape[0], self.out_features, self.in_features
        if M <= self.small_m:
            y = torch.from_numpy(np.empty((M, N), np.float32))
            _k.matmul_bf16(x.numpy(), self._bits, y.numpy())
            if self.bias is not None:
                y += self.bias
        else:
            rows = max(1, min(N, SCRATCH_FLOATS // K))
            y = torch.empty((M, N), dtype=torch.float32)
            for n0 in range(0, N, rows):
                n1 = min(N, n0 + rows)
                wt = torch.from_numpy(_scratch((n1 - n0) * K).reshape(n1 - n0, K))
                wt.copy_(self.weight[n0:n1])
                y[:, n0:n1] = F.linear(x, wt, None if self.bias is None else self.bias[n0:n1])
        return y.view(*shape[:-1], N)


def dense_or_quant_linear(w, bias=None) -> torch.nn.Module:
    """A module computing ``x @ w.T + bias``: QuantLinear for a QuantizedWeight, BF16Linear for a
    bf16 tensor (held as bf16), otherwise an ``nn.Linear`` whose float32 weight shares memory with
    ``w`` when it can (float32, contiguous)."""
    if isinstance(w, QuantizedWeight):
        return QuantLinear(w, bias)
    if isinstance(w, torch.Tensor) and w.dtype == torch.bfloat16 and w.dim() == 2:
        return BF16Linear(w, bias)
    wt = _as_f32_tensor(w)
    if wt.dim() != 2:
        raise ValueError(f"weight must be 2-D, got shape {tuple(wt.shape)}")
    N, K = wt.shape
    lin = torch.nn.Linear(K, N, bias=bias is not None, device="meta")
    lin.weight = torch.nn.Parameter(wt, requires_grad=False)
    if bias is not None:
        lin.bias = torch.nn.Parameter(_as_f32_tensor(bias).reshape(N), requires_grad=False)
    return lin


def can_fuse_rows(ws) -> bool:
    """True when ``fuse_rows(ws)`` is a plain concatenation: all dense with the same K, or all
    quantized with the same kind, group size and K.  (``fuse_rows`` also accepts other mixes but
    has to convert them, see there; callers may prefer separate modules then.)"""
    ws = list(ws)
    if not ws:
        return False
    if all(isinstance(w, QuantizedWeight) for w in ws):
        w0 = ws[0]
        return all(w.kind == w0.kind and w.group_size == w0.group_size and w.shape[1] == w0.shape[1] for w in ws)
    if any(isinstance(w, QuantizedWeight) for w in ws):
        return False
    return len({tuple(np.shape(w))[1:] for w in ws}) == 1 and all(np.ndim(w) == 2 for w in ws)


def _codes_full(w: QuantizedWeight) -> np.ndarray:
    """Unpacked codes (N, K): uint8 for the affine kinds, int8 for q8_sym."""
    if w.kind != "q4_affine":
        return w.codes
    N, K = w.shape
    G = w.group_size
    c = w.codes.reshape(N, K // G, G // 2)
    return np.concatenate([c & 0x0F, c >> 4], axis=-1).reshape(N, K)


def _regroup(w: QuantizedWeight, kind: str, G: int) -> QuantizedWeight:
    """Same matrix as ``kind`` with group size ``G`` (a divisor of w.group_size).  Exact except
    q8_sym -> q8_affine (code + 128, bias = -128*scale: one float32 rounding per value)."""
    if w.kind == kind and w.group_size == G:
        return w
    N, K = w.shape
    rep = w.group_size // G
    scales = np.repeat(w.scales, rep, axis=1)
    codes = _codes_full(w)
    if kind == "q8_sym":
        return QuantizedWeight(kind, codes, scales, None, G)
    if w.kind == "q8_sym":
        codes = (codes.astype(np.int16) + 128).astype(np.uint8)
        biases = scales * np.float32(-128.0)
    else:
        biases = np.repeat(w.biases, rep, axis=1)
    if kind == "q8_affine":
        return QuantizedWeight(kind, np.ascontiguousarray(codes), scales, biases, G)
    q = codes.reshape(N, K // G, 2, G // 2)
    return QuantizedWeight(kind, ((q[:, :, 0] & 0x0F) | (q[:, :, 1] << 4)).reshape(N, K // 2), scales, biases, G)


def fuse_rows(ws):
    """Concatenate weights along N (rows), e.g. q/k/v or gate/up into one matmul.

    * all QuantizedWeight with the same kind and group size -> QuantizedWeight (concatenation);
    * QuantizedWeights of different kinds / group sizes (e.g. Q4_K q/k with a Q6_K v) -> one
      QuantizedWeight in a common form with group size = gcd of the group sizes: q8_sym if all
      are q8_sym, q4_affine if all are q4_affine, else q8_affine (q4 codes widened to bytes, so
      the fused weight reads more bytes than the parts did);
    * all bf16 torch tensors -> one bf16 tensor (held as stored);
    * other dense (numpy / torch) -> float32 numpy (N_total, K);
    * dense mixed with quantized -> float32 numpy of the dequantized values.
    All parts must have the same K (ValueError otherwise)."""
    ws = list(ws)
    if not ws:
        raise ValueError("fuse_rows needs at least one weight")
    if not all(isinstance(w, QuantizedWeight) or len(w.shape) == 2 for w in ws) or len({w.shape[1] for w in ws}) != 1:
        raise ValueError(f"cannot fuse weights of shapes {[tuple(w.shape) for w in ws]}")
    quant = [isinstance(w, QuantizedWeight) for w in ws]
    if all(quant):
        kinds = {w.kind for w in ws}
        G = int(np.gcd.reduce([w.group_size for w in ws]))
        kind = kinds.pop() if len(kinds) == 1 else "q8_affine"
        if kind == "q4_affine" and G % 2:
            kind = "q8_affine"
        ws = [_regroup(w, kind, G) for w in ws]
        return QuantizedWeight(
            kind,
            np.concatenate([w.codes for w in ws], axis=0),
            np.concatenate([w.scales for w in ws], axis=0),
            None if kind == "q8_sym" else np.concatenate([w.biases for w in ws], axis=0),
            G,
        )
    if all(isinstance(w, torch.Tensor) and w.dtype == torch.bfloat16 for w in ws):
        return torch.cat(ws, dim=0)
    return np.concatenate([_k.dequantize(w) if isinstance(w, QuantizedWeight)
                           else w.detach().cpu().float().numpy() if isinstance(w, torch.Tensor)
                           else np.asarray(w, dtype=np.float32) for w in ws], axis=0)
