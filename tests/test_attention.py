"""The batched decode-attention kernel against torch's own attention (a reference no one here wrote):
sequences of different lengths, GQA groups, caches that must grow, and keys written exactly as the
prefill path's RoPE writes them."""

import pytest
import torch
import torch.nn.functional as F

from shoal.kernels.attention import DecodeBatch
from shoal.kernels.cache import KVCache
from shoal.models.llama import apply_rope


def decode_attention(q, k, v, cos, sin, caches, scale, lead=2):
    """The kernel as the model calls it: q/k/v strided views of one fused qkv tensor, the decoding
    rows after `lead` rows of other sequences (a prefill chunk in a mixed batch). Returns (S, H, D)."""
    S, H, D = q.shape
    Hkv = k.shape[1]
    qkv = torch.randn(lead + S, (H + 2 * Hkv) * D)
    qkv[lead:] = torch.cat([q.reshape(S, -1), k.reshape(S, -1), v.reshape(S, -1)], dim=1)
    T = lead + S
    qv = qkv[:, : H * D].view(T, H, D)
    kv = qkv[:, H * D : (H + Hkv) * D].view(T, Hkv, D)
    vv = qkv[:, (H + Hkv) * D :].view(T, Hkv, D)
    cos_t, sin_t = torch.cat([torch.zeros(lead, D), cos]), torch.cat([torch.zeros(lead, D), sin])
    out = torch.full((T, H, D), float("nan"))
    DecodeBatch(list(range(lead, T)), [[c] for c in caches]).attend(0, qv, kv, vv, cos_t, sin_t, out, scale)
    assert out[:lead].isnan().all(), "rows of other sequences are left alone"
    return out[lead:]


def rope_tables(positions: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (10000.0 ** (torch.arange(0, dim, 2).float() / dim))
    freqs = torch.outer(positions.float(), inv)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (4, 4), (8, 1)])
def test_decode_attention_equals_torch_sdpa(heads, kv_heads):
    D = 64
    g = torch.Generator().manual_seed(heads * 10 + kv_heads)
    pasts = [0, 1, 17, 255, 256, 300]  # 256: the cache is full and must grow for the new token
    caches = []
    for past in pasts:
        c = KVCache(kv_heads, D)
        if past:
            c.update_and_fetch(torch.randn(past, kv_heads, D, generator=g), torch.randn(past, kv_heads, D, generator=g))
        caches.append(c)
    S = len(pasts)
    q, k, v = (torch.randn(S, h, D, generator=g) for h in (heads, kv_heads, kv_heads))
    cos, sin = rope_tables(torch.tensor(pasts), D)
    history = [(c.keys[:, : c.offset].clone(), c.values[:, : c.offset].clone()) for c in caches]

    out = decode_attention(q, k, v, cos, sin, caches, D**-0.5)

    k_roped, q_roped = apply_rope(k, cos, sin), apply_rope(q, cos, sin)
    for s, (c, (old_k, old_v)) in enumerate(zip(caches, history)):
        assert c.offset == pasts[s] + 1
        assert torch.equal(c.keys[:, : pasts[s]], old_k), "the history must be untouched"
        assert torch.equal(c.keys[:, pasts[s]], k_roped[s]), "the new key is RoPE'd exactly as in prefill"
        assert torch.equal(c.values[:, pasts[s]], v[s])
        keys = c.keys[:, : c.offset].repeat_interleave(heads // kv_heads, dim=0)  # (H, L, D)
        values = c.values[:, : c.offset].repeat_interleave(heads // kv_heads, dim=0)
        ref = F.scaled_dot_product_attention(q_roped[s][:, None, :].double(), keys.double(), values.double())[:, 0]
        torch.testing.assert_close(out[s].double(), ref, rtol=0, atol=2e-6)


def test_decode_attention_appends_step_after_step():
    """Several decode steps in a row equal one causal attention over the whole sequence."""
    D, H, Hkv, steps = 32, 4, 2, 40
    g = torch.Generator().manual_seed(7)
    cache = KVCache(Hkv, D, capacity=8)
    q, k, v = torch.randn(steps, H, D, generator=g), torch.randn(steps, Hkv, D, generator=g), torch.randn(steps, Hkv, D, generator=g)
    cos, sin = rope_tables(torch.arange(steps), D)
    outs = [decode_attention(q[t : t + 1], k[t : t + 1], v[t : t + 1], cos[t : t + 1], sin[t : t + 1], [cache], D**-0.5)[0] for t in range(steps)]
    qr, kr = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    keys, values = kr.transpose(0, 1).repeat_interleave(2, dim=0), v.transpose(0, 1).repeat_interleave(2, dim=0)
    ref = F.scaled_dot_product_attention(qr.transpose(0, 1).double(), keys.double(), values.double(), is_causal=True)
    torch.testing.assert_close(torch.stack(outs).double(), ref.transpose(0, 1), rtol=0, atol=2e-6)


def test_softmax_exp_is_within_two_ulp_of_expf():
    """The kernel's own exp (a polynomial, so that the softmax loop vectorises) against numpy's."""
    import numpy as np
    from numba import njit

    from shoal.kernels.attention import _exp_nonpositive

    @njit
    def many(xs):
        return np.array([_exp_nonpositive(x) for x in xs], dtype=np.float32)

    xs = np.concatenate([-np.logspace(-8, np.log10(87.0), 200_000), [0.0, -np.log(2.0), -86.99]]).astype(np.float32)
    got, ref = many(xs), np.exp(xs.astype(np.float64))
    ulp = np.spacing(ref.astype(np.float32)).astype(np.float64)
    assert np.max(np.abs(got - ref) / ulp) <= 2.0
    assert many(np.array([-200.0, -1e30], dtype=np.float32)).max() < 1e-37  # far below the max: ~0, never inf or nan
