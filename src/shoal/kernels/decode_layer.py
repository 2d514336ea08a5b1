"""A Llama-family block's decode step as one native call.

`llama.Block.forward` says what a block computes, one torch-level op after another. On the CPU
engine each of those ops is already a numba kernel (the norms, the quantized projections, decode
attention, silu·up), but calling ten of them from Python for each of 30 layers costs more than
the arithmetic between the weight reads: measured on the bundled model (2 cores), the layers of one
decode step took 7.3 ms through the modules against 4.5 ms as one call per layer, and 3.0 ms of
either is the matmuls themselves. So where every sequence in the step decodes one token, a block
whose projections are all quantized runs `block` below: the same kernels, called in the same
order on the same values, so its output equals the module path bit for bit (a test holds it to
that); only the Python between them is gone.

The projections' formats are arguments (each format's matmul is its own compiled function, chosen
by a branch), so one compiled block serves every model and numba's cache keeps it. With tensor
parallelism the block runs as two native halves, attention and MLP, and its forward all-reduces
each half's partial sum in between, where the collectives stay in sight. A block that is not the
engine's (dense weights, a torch device) keeps the module path.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numba import njit

from shoal.kernels.activation import _silu_mul
from shoal.kernels.attention import DecodeBatch, _decode_attention
from shoal.kernels.norm import _rms_norm
from shoal.quant import kernels as quant_kernels
from shoal.quant.formats import KINDS
from shoal.quant.linear import QuantLinear

# numba caches a compiled function under its own file's name and timestamp, but these carry the
# machine code of the kernels they call from other files: those sources go into their names too.
_HERE = Path(__file__).resolve().parent
_SOURCES = [_HERE / f for f in ("decode_layer.py", "attention.py", "norm.py", "activation.py")]
_SOURCES += [_HERE.parent / "quant" / f for f in ("kernels.py", "codegen.py")]
DIGEST = hashlib.sha256(b"".join(p.read_bytes() for p in _SOURCES)).hexdigest()[:12]

_ABSENT = np.zeros(0, np.float32)  # a block without q/k/v biases or q/k norms
_MM_Q4, _MM_S8, _MM_A8 = (quant_kernels.MATMUL[k] for k in KINDS)


def _jit(fn):
    """njit, cached under a name carrying `DIGEST` (see there); nogil: a server's event loop
    streams the last token while the next one computes (these touch only arrays their step owns)."""
    fn.__qualname__ = f"{fn.__name__}_{DIGEST}"
    return njit(fastmath=False, cache=True, nogil=True)(fn)


@_jit
def _matmul(kind, x, w, s, b, out):
    """out = x @ W.T for a weight of format KINDS[kind] (a branch, not a compiled function per
    format: a function handed another as a value would not be found in numba's cache)."""
    if kind == 0:
        _MM_Q4(x, w, s, b, out)
    elif kind == 1:
        _MM_S8(x, w, s, b, out)
    else:
        _MM_A8(x, w, s, b, out)


@_jit
def _attention(x, cos, sin, rows, table, norm1, eps, kinds, qkv_w, qkv_s, qkv_b, qkv_bias, q_norm, k_norm, o_w, o_s, o_b,
               H, Hkv, D, scale):
    """x (T, E), one row per decoding sequence -> o_proj's output (T, E), before the residual."""
    T, E = x.shape
    xn = np.empty((T, E), np.float32)
    _rms_norm(x, norm1, eps, xn)
    qkv = np.empty((T, qkv_w.shape[0]), np.float32)  # (T, (H + 2 Hkv) D)
    _matmul(kinds[0], xn, qkv_w, qkv_s, qkv_b, qkv)
    if qkv_bias.shape[0]:
        qkv += qkv_bias
    q = np.ascontiguousarray(qkv[:, : H * D]).reshape((T, H, D))
    k = np.ascontiguousarray(qkv[:, H * D : (H + Hkv) * D]).reshape((T, Hkv, D))
    v = np.ascontiguousarray(qkv[:, (H + Hkv) * D :]).reshape((T, Hkv, D))
    if q_norm.shape[0]:  # Qwen3: an RMSNorm over each head's query and key
        qn = np.empty((T * H, D), np.float32)
        _rms_norm(q.reshape((T * H, D)), q_norm, eps, qn)
        kn = np.empty((T * Hkv, D), np.float32)
        _rms_norm(k.reshape((T * Hkv, D)), k_norm, eps, kn)
        q, k = qn.reshape((T, H, D)), kn.reshape((T, Hkv, D))
    attn = np.empty((T, H, D), np.float32)
    _decode_attention(q, k, v, cos, sin, rows, table, attn, scale)
    o = np.empty((T, E), np.float32)
    _matmul(kinds[1], attn.reshape((T, H * D)), o_w, o_s, o_b, o)
    return o


@_jit
def _mlp(h, norm2, eps, kinds, gu_w, gu_s, gu_b, down_w, down_s, down_b, hidden):
    """h (T, E), the residual stream after attention -> down_proj's output (T, E)."""
    T, E = h.shape
    hn = np.empty((T, E), np.float32)
    _rms_norm(h, norm2, eps, hn)
    gate_up = np.empty((T, 2 * hidden), np.float32)
    _matmul(kinds[2], hn, gu_w, gu_s, gu_b, gate_up)
    act = np.empty((T, hidden), np.float32)
    _silu_mul(gate_up, hidden, act)
    down = np.empty((T, E), np.float32)
    _matmul(kinds[3], act, down_w, down_s, down_b, down)
    return down


@_jit
def _block(x, cos, sin, rows, table, norm1, eps, kinds, qkv_w, qkv_s, qkv_b, qkv_bias, q_norm, k_norm, o_w, o_s, o_b,
           H, Hkv, D, scale, norm2, eps2, kinds2, gu_w, gu_s, gu_b, down_w, down_s, down_b, hidden):
    """The steps of `llama.Block.forward`, in order: the arguments of `_attention`, then `_mlp`'s."""
    h = x + _attention(x, cos, sin, rows, table, norm1, eps, kinds, qkv_w, qkv_s, qkv_b, qkv_bias, q_norm, k_norm,
                       o_w, o_s, o_b, H, Hkv, D, scale)
    return h + _mlp(h, norm2, eps2, kinds2, gu_w, gu_s, gu_b, down_w, down_s, down_b, hidden)


class NativeBlock:
    """A Llama block's weights as the kernels take them, and the calls for one decode step: the
    whole block, or (tensor parallel) its two halves, each ending in the partial sum the block's
    forward all-reduces."""

    def __init__(self, block: Any):
        attn, mlp = block.self_attn, block.mlp
        projections = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
        kinds = np.array([KINDS.index(p.qweight.kind) for p in projections], np.int64)  # qkv, o, gate_up, down
        qkv, o, gate_up, down = (quant_kernels.operands(p.qweight) for p in projections)
        norm1, norm2, eps = block.input_layernorm._weight, block.post_attention_layernorm._weight, np.float32(block.input_layernorm.eps)
        qk = (attn.q_norm._weight, attn.k_norm._weight) if attn.q_norm is not None else (_ABSENT, _ABSENT)
        bias = attn.qkv_proj._bias_np if attn.qkv_proj._bias_np is not None else _ABSENT
        heads = (attn.n_heads, attn.n_kv_heads, attn.head_dim, np.float32(attn.scale))
        self.attention_args = (norm1, eps, kinds, *qkv, bias, *qk, *o, *heads)
        self.mlp_args = (norm2, eps, kinds, *gate_up, *down, mlp.hidden)

    @staticmethod
    def of(block: Any) -> "NativeBlock | None":
        """The native step of `block`, or None where it keeps the module path."""
        attn, mlp = block.self_attn, block.mlp
        projections = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
        if not all(isinstance(p, QuantLinear) for p in projections) or not mlp.kernels:
            return None
        norms = [block.input_layernorm, block.post_attention_layernorm] + ([attn.q_norm, attn.k_norm] if attn.q_norm is not None else [])
        if not all(n.kernels and n.eps == norms[0].eps for n in norms):
            return None
        return NativeBlock(block)

    def block(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: DecodeBatch, layer: int) -> torch.Tensor:
        out = _block(_rows(x), cos.numpy(), sin.numpy(), batch.rows, batch.table[layer], *self.attention_args, *self.mlp_args)
        batch.appended(layer)
        return torch.from_numpy(out)

    def attention(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: DecodeBatch, layer: int) -> torch.Tensor:
        out = _attention(_rows(x), cos.numpy(), sin.numpy(), batch.rows, batch.table[layer], *self.attention_args)
        batch.appended(layer)
        return torch.from_numpy(out)

    def mlp(self, h: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(_mlp(_rows(h), *self.mlp_args))


def _rows(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.numpy())


__all__ = ["NativeBlock"]
