"""A Llama-family block's decode step as one native call.

`llama.Block.forward` says what a block computes, one torch-level op after another. On the CPU
engine each of those ops is already a numba kernel (the norms, the quantized projections, decode
attention, silu·up), but calling ten of them from Python for each of 30 layers costs more than
the arithmetic between the weight reads: measured on the bundled model (2 cores), the layers of one
decode step took 7.3 ms through the modules against 4.5 ms as one call per layer, and 3.0 ms of
either is the matmuls themselves. So where every sequence in the step decodes one token, a block
whose projections are all quantized runs `_block` below: the same kernels, called in the same
order on the same values, so its output equals the module path bit for bit (a test holds it to
that); only the Python between them is gone.

`_block` is compiled once for each combination of the four projections' formats (the matmul of
each format is its own compiled function, named at compile time). A block that is not the
engine's (dense weights, a torch device, a tensor-parallel group with its all-reduces) keeps the
module path.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
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

# numba caches a compiled function under its own file's name and timestamp, but `_block` carries
# the machine code of the kernels it calls from other files: their sources go into its name.
_HERE = Path(__file__).resolve().parent
_SOURCES = [_HERE / f for f in ("decode_layer.py", "attention.py", "norm.py", "activation.py")]
_SOURCES += [_HERE.parent / "quant" / f for f in ("kernels.py", "codegen.py")]
DIGEST = hashlib.sha256(b"".join(p.read_bytes() for p in _SOURCES)).hexdigest()[:12]

_NO_BIAS = np.zeros(0, np.float32)
_NO_NORM = np.zeros(0, np.float32)


@lru_cache(maxsize=None)
def _block_kernel(kinds: tuple[str, str, str, str]):
    """The compiled block for projections (qkv, o, gate_up, down) in these formats."""
    mm_qkv, mm_o, mm_gate_up, mm_down = (quant_kernels.MATMUL[k] for k in kinds)

    def block(x, norm1, norm2, eps, qkv_w, qkv_s, qkv_b, qkv_bias, q_norm, k_norm, o_w, o_s, o_b,
              gu_w, gu_s, gu_b, down_w, down_s, down_b, hidden, H, Hkv, D, scale, cos, sin, rows, table):
        """x (T, E): one row per decoding sequence. The steps of `llama.Block.forward`, in order."""
        T, E = x.shape
        xn = np.empty((T, E), np.float32)
        _rms_norm(x, norm1, eps, xn)
        qkv = np.empty((T, qkv_w.shape[0]), np.float32)  # (T, (H + 2 Hkv) D)
        mm_qkv(xn, qkv_w, qkv_s, qkv_b, qkv)
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
        mm_o(attn.reshape((T, H * D)), o_w, o_s, o_b, o)
        h = x + o
        hn = np.empty((T, E), np.float32)
        _rms_norm(h, norm2, eps, hn)
        gate_up = np.empty((T, 2 * hidden), np.float32)
        mm_gate_up(hn, gu_w, gu_s, gu_b, gate_up)
        act = np.empty((T, hidden), np.float32)
        _silu_mul(gate_up, hidden, act)
        down = np.empty((T, E), np.float32)
        mm_down(act, down_w, down_s, down_b, down)
        return h + down

    # nogil: a server's event loop streams the last token while the next one computes (the block
    # touches only arrays its step owns).
    block.__qualname__ = f"block_{'_'.join(str(KINDS.index(k)) for k in kinds)}_{DIGEST}"
    return njit(fastmath=False, cache=True, nogil=True)(block)


class NativeBlock:
    """A Llama block's weights as `_block` takes them, and the call for one decode step."""

    def __init__(self, block: Any):
        attn, mlp = block.self_attn, block.mlp
        projections = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
        self.kernel = _block_kernel(tuple(p.qweight.kind for p in projections))
        qkv, o, gate_up, down = (quant_kernels.operands(p.qweight) for p in projections)
        norm1, norm2 = block.input_layernorm, block.post_attention_layernorm
        qk = (attn.q_norm._weight, attn.k_norm._weight) if attn.q_norm is not None else (_NO_NORM, _NO_NORM)
        bias = attn.qkv_proj._bias_np if attn.qkv_proj._bias_np is not None else _NO_BIAS
        self.before = (norm1._weight, norm2._weight, np.float32(norm1.eps), *qkv, bias, *qk, *o, *gate_up, *down,
                       mlp.hidden, attn.n_heads, attn.n_kv_heads, attn.head_dim, np.float32(attn.scale))

    @staticmethod
    def of(block: Any) -> "NativeBlock | None":
        """The native step of `block`, or None where it keeps the module path."""
        attn, mlp = block.self_attn, block.mlp
        projections = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
        if not all(isinstance(p, QuantLinear) for p in projections):
            return None
        if attn.group is not None or mlp.group is not None or not mlp.kernels:
            return None
        norms = [block.input_layernorm, block.post_attention_layernorm] + ([attn.q_norm, attn.k_norm] if attn.q_norm is not None else [])
        if not all(n.kernels and n.eps == norms[0].eps for n in norms):
            return None
        return NativeBlock(block)

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: DecodeBatch, layer: int) -> torch.Tensor:
        out = self.kernel(np.ascontiguousarray(x.numpy()), *self.before, cos.numpy(), sin.numpy(), batch.rows, batch.table[layer])
        batch.appended(layer)
        return torch.from_numpy(out)


__all__ = ["NativeBlock"]
