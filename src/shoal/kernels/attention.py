"""Decode attention for a whole batch in one kernel call per layer.

A decode step gives every running sequence one new token. Attending it with torch means a handful
of ops per sequence per layer (append to the cache, two bmm, softmax, copies): measured ~1 ms per
layer for 8 sequences on 2 cores, most of it dispatch, which made attention as costly as all the
weight reads of a batched step. Here one numba call per layer does, for every (sequence, KV head):
RoPE on the new query and key, the append of key and value to that sequence's `KVCache`, and
softmax(q·Kᵀ·scale)·V for the group's query heads.

Every sequence keeps its own cache (sequences join and leave between steps with nothing to
reshuffle), so the kernel is handed each cache's storage by address — a table of (keys address,
values address, tokens cached, capacity). `DecodeBatch` builds it once per step for every layer,
after growing each cache to hold the new token, so a layer costs one kernel call; the kernel reads
q, k and v straight out of the fused qkv projection (strided views, no copies) and writes its rows
of the output in place. The addresses stay valid for the step: nothing else grows these caches
meanwhile and their tensors are referenced by the caches.

Arithmetic: RoPE is the same two products and a sum per element as `llama.apply_rope` (so a
decoded key equals a prefilled one); the dot products and the softmax run in float32 with
reassociation allowed (fastmath), so the scores are vectorised, and exp is a polynomial within
2 ulp of expf (a libm call per score would not vectorise) — like any two attention
implementations they agree to rounding, not bit for bit.
"""

from __future__ import annotations

import numpy as np
import torch
from llvmlite import ir
from numba import carray, njit, prange, types
from numba.extending import intrinsic

from shoal.kernels.cache import KVCache


@intrinsic
def _f32_at(typingctx, address):
    """The float32 pointer at an integer address (what `Tensor.data_ptr()` returns)."""
    if not isinstance(address, types.Integer):
        return None
    sig = types.CPointer(types.float32)(address)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

    return sig, codegen


@njit(fastmath=False, cache=True)
def _rope(x, cos, sin, out):
    """out = x rotated (rotate-half layout). No fastmath: products and sums rounded one by one,
    exactly as `llama.apply_rope` computes them in torch."""
    half = x.shape[0] // 2
    for i in range(half):
        a, b = x[i], x[i + half]
        out[i] = a * cos[i] + (-b) * sin[i]
        out[i + half] = b * cos[i + half] + a * sin[i + half]


@intrinsic
def _f32_from_bits(typingctx, bits):
    """The float32 whose bit pattern is the low 32 bits of the integer `bits`."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        low = builder.trunc(args[0], ir.IntType(32)) if bits.bitwidth > 32 else args[0]
        return builder.bitcast(low, context.get_value_type(types.float32))

    return types.float32(bits), codegen


@njit(fastmath=True, inline="always")
def _exp_nonpositive(x):
    """exp(x) for x <= 0 (softmax scores less their maximum), within 2 ulp of expf; unlike a call
    to libm's expf, a loop of these vectorises. x = n·ln2 + r with |r| <= ln2/2; exp(r) by its
    degree-7 minimax polynomial (Cephes' expf), 2^n by building the float's exponent bits."""
    x = max(x, np.float32(-87.0))  # exp(-87) ~ 1.6e-38, still a normal float: n + 127 >= 1
    n = np.floor(x * np.float32(1.44269504088896341) + np.float32(0.5))
    r = x - n * np.float32(0.693359375) + n * np.float32(2.12194440e-4)  # ln2 in two parts: r exact
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * r * r + r + np.float32(1.0)
    return p * _f32_from_bits((np.int32(n) + np.int32(127)) << np.int32(23))


@njit(parallel=True, fastmath=True, cache=True)
def _decode_attention(q, k, v, cos, sin, rows, table, out, scale):
    """For the S decoding sequences: q (T, H, D), k and v (T, Hkv, D) and cos/sin (T, D) are the
    whole flat batch (views, any strides) and `rows` (S,) the rows of the decoding sequences in it;
    table (S, 4) int64 rows (keys address, values address, tokens cached, capacity) of caches
    shaped (Hkv, capacity, D). Writes the rows `rows` of out (T, H, D)."""
    H, D = q.shape[1], q.shape[2]
    Hkv = k.shape[1]
    S = rows.shape[0]
    group = H // Hkv
    for task in prange(S * Hkv):
        s, g = task // Hkv, task % Hkv
        r = rows[s]
        past, cap = table[s, 2], table[s, 3]
        keys = carray(_f32_at(table[s, 0]), (Hkv, cap, D))[g]
        values = carray(_f32_at(table[s, 1]), (Hkv, cap, D))[g]
        # RoPE (rotate-half) on the new key, appended with its value at position `past`.
        _rope(k[r, g], cos[r], sin[r], keys[past])
        for i in range(D):
            values[past, i] = v[r, g, i]
        L = past + 1
        qr = np.empty((group, D), np.float32)
        for j in range(group):
            _rope(q[r, g * group + j], cos[r], sin[r], qr[j])
        scores = np.empty((group, L), np.float32)
        for j in range(group):
            qj = qr[j]
            for t in range(L):
                kt = keys[t]
                acc = np.float32(0.0)
                for i in range(D):
                    acc += qj[i] * kt[i]
                scores[j, t] = acc * scale
        acc = np.empty(D, np.float32)
        for j in range(group):
            sj = scores[j]
            top = sj[0]
            for t in range(1, L):
                top = max(top, sj[t])
            total = np.float32(0.0)
            for t in range(L):
                e = _exp_nonpositive(sj[t] - top)
                sj[t] = e
                total += e
            acc[:] = 0.0
            for t in range(L):
                p = sj[t]
                vt = values[t]
                for i in range(D):
                    acc[i] += p * vt[i]
            inv = np.float32(1.0) / total
            o = out[r, g * group + j]
            for i in range(D):
                o[i] = acc[i] * inv


class DecodeBatch:
    """The decoding sequences of one step, made ready for the kernel once per step: their rows in
    the flat batch and, for every layer, the table of their caches, grown beforehand to hold the
    new token. `attend` then costs one kernel call and S counter increments per layer."""

    def __init__(self, rows: list[int], caches: list[list[KVCache]]):
        self.rows = np.asarray(rows, dtype=np.int64)
        self.caches = caches  # [sequence][layer]
        for seq in caches:
            for c in seq:
                c.reserve(1)
        S, L = len(caches), len(caches[0])
        flat = [(c.keys.data_ptr(), c.values.data_ptr(), c.offset, c.capacity) for seq in caches for c in seq]
        self.table = np.ascontiguousarray(np.array(flat, dtype=np.int64).reshape(S, L, 4).transpose(1, 0, 2))

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               out: torch.Tensor, scale: float) -> None:
        """Attention of the new token of every decoding sequence at `layer`: q (T, H, D), k and v
        (T, Hkv, D) of the whole flat batch before RoPE, cos/sin (T, D); appends k (roped) and v to
        each sequence's cache and writes their rows of out (T, H, D)."""
        _decode_attention(q.numpy(), k.numpy(), v.numpy(), _f32(cos), _f32(sin), self.rows, self.table[layer], out.numpy(),
                          np.float32(scale))
        self.appended(layer)

    def appended(self, layer: int) -> None:
        """Count the token the kernel appended to each sequence's cache at `layer`."""
        for seq in self.caches:
            seq[layer].offset += 1


def supports(cache: KVCache) -> bool:
    """The kernel reads float32 caches on the CPU, the numba engine's."""
    return not cache.torch_only and cache.keys.dtype == torch.float32 and cache.keys.device.type == "cpu"


def _f32(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.numpy(), dtype=np.float32)


__all__ = ["DecodeBatch", "supports"]
