"""Decode attention for a whole batch in one kernel call per layer.

A decode step gives every running sequence one new token. Attending it with torch means a handful
of ops per sequence per layer (append to the cache, two bmm, softmax, copies): measured ~1 ms per
layer for 8 sequences on 2 cores, most of it dispatch, which made attention as costly as all the
weight reads of a batched step. Here one numba call per layer does, for every (sequence, KV head):
RoPE on the new query and key, the append of key and value to that sequence's `KVCache`, and
softmax(q·Kᵀ·scale)·V for the group's query heads.

Every sequence keeps its own cache (sequences join and leave between steps with nothing to
reshuffle), so the kernel is handed each cache's storage by address — a table of (keys address,
values address, tokens cached, capacity) built right before the call, after the caches were
grown to hold the new token. The addresses stay valid for the call: nothing else runs on these
caches meanwhile and their tensors are referenced by the caches.

Arithmetic: RoPE is the same two products and a sum per element as `llama.apply_rope` (so a
decoded key equals a prefilled one); the dot products and the softmax run in float32 with
reassociation allowed (fastmath), so the scores are vectorised — like any two attention
implementations they agree to rounding, not bit for bit.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import carray, njit, prange, types
from numba.extending import intrinsic

from shoal.engine.cache import KVCache


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


@njit(parallel=True, fastmath=True, cache=True)
def _decode_attention(q, k, v, cos, sin, table, out, scale):
    """q (S, H, D), k and v (S, Hkv, D): the new token of each of S sequences, before RoPE;
    cos/sin (S, D) at each sequence's position; table (S, 4) int64 rows (keys address, values
    address, tokens cached, capacity) of caches shaped (Hkv, capacity, D). Writes out (S, H, D)."""
    S, H, D = q.shape
    Hkv = k.shape[1]
    group = H // Hkv
    for task in prange(S * Hkv):
        s, g = task // Hkv, task % Hkv
        past, cap = table[s, 2], table[s, 3]
        keys = carray(_f32_at(table[s, 0]), (Hkv, cap, D))
        values = carray(_f32_at(table[s, 1]), (Hkv, cap, D))
        # RoPE (rotate-half) on the new key, appended with its value at position `past`.
        _rope(k[s, g], cos[s], sin[s], keys[g, past])
        for i in range(D):
            values[g, past, i] = v[s, g, i]
        L = past + 1
        qr = np.empty((group, D), np.float32)
        for j in range(group):
            _rope(q[s, g * group + j], cos[s], sin[s], qr[j])
        scores = np.empty((group, L), np.float32)
        for t in range(L):
            for j in range(group):
                acc = np.float32(0.0)
                for i in range(D):
                    acc += qr[j, i] * keys[g, t, i]
                scores[j, t] = acc * scale
        for j in range(group):
            top = scores[j, 0]
            for t in range(1, L):
                top = max(top, scores[j, t])
            total = np.float32(0.0)
            for t in range(L):
                e = np.exp(scores[j, t] - top)
                scores[j, t] = e
                total += e
            o = out[s, g * group + j]
            o[:] = 0.0
            for t in range(L):
                p = scores[j, t] / total
                for i in range(D):
                    o[i] += p * values[g, t, i]


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, caches: list[KVCache], scale: float
) -> torch.Tensor:
    """Attention of one new token per sequence: q (S, H, D), k and v (S, Hkv, D) before RoPE,
    cos/sin (S, D); appends k (roped) and v to each sequence's cache. Returns (S, H, D)."""
    for c in caches:
        c.reserve(1)
    table = np.array([(c.keys.data_ptr(), c.values.data_ptr(), c.offset, c.capacity) for c in caches], dtype=np.int64)
    out = np.empty(tuple(q.shape), dtype=np.float32)
    _decode_attention(_f32(q), _f32(k), _f32(v), _f32(cos), _f32(sin), table, out, np.float32(scale))
    for c in caches:
        c.offset += 1
    return torch.from_numpy(out)


def supports(cache: KVCache) -> bool:
    """The kernel reads float32 caches on the CPU."""
    return cache.keys.dtype == torch.float32 and cache.keys.device.type == "cpu"


def _f32(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.numpy(), dtype=np.float32)


__all__ = ["decode_attention", "supports"]
