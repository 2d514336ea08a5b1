"""DeepSeek-V3 and Kimi-K2 (the same architecture), built as a shard: multi-head latent attention
with a compressed KV cache, YaRN RoPE, dense first layers, then mixture-of-experts layers with
shared experts and DeepSeek's group-limited sigmoid routing. Reads top to bottom: config -> RoPE ->
attention -> MoE block -> shard -> loading.

MLA: a token's keys and values for all heads are rebuilt from a 512-value latent (after
kv_a_layernorm) and one 64-value rotary key shared by the heads, so the cache (`MLACache`) holds
only those kv_lora_rank + qk_rope_head_dim values per token per layer. Attention runs in one of two
exact forms, chosen per sequence by cost: *absorbed* (kv_b_proj's key half folded into the query
and its value half applied after the softmax — the scores of all heads are one matmul against the
cache; best for decode and short chunks) or *expanded* (kv_b_proj applied to the cached latents to
make per-head keys and values; best for long prefill chunks).

Expert parallel: a rank's `Part` names the routed experts (and shared-expert columns) it holds;
`required_weights` lists only those, `slice_weight` cuts the shared experts to their columns, and
`shard(group)` gives each MoE layer the group whose one all-reduce sums the ranks' partial outputs
(see `moe.py`). Attention, dense layers and router are replicated on every rank of the group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from shoal.kernels.mla_cache import MLACache
from shoal.models import base
from shoal.models.base import BatchLayout, Part, RMSNorm, Weight, all_reduce, as_tensor
from shoal.models.llama import MLP
from shoal.models.moe import (
    GroupedSigmoidRouter,
    RoutedExperts,
    SparseMoE,
    expert_of,
    join_moe_group,
)
from shoal.quant.linear import can_fuse_rows, dense_or_quant_linear, fuse_rows

# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class ModelArgs:
    """Field names are the checkpoint's config.json keys (DeepseekV3Config; Kimi-K2 uses the same)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # the dense layers' MLP
    num_hidden_layers: int
    num_attention_heads: int
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int = 64
    qk_nope_head_dim: int = 128
    v_head_dim: int = 128
    moe_intermediate_size: int = 2048
    n_routed_experts: int | None = None
    n_shared_experts: int | None = None
    num_experts_per_tok: int = 8
    n_group: int | None = 1
    topk_group: int | None = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rope_interleave: bool = True  # DeepSeek's rotary dims are interleaved pairs (x0, x1), (x2, x3)...
    max_position_embeddings: int = 4096
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "ModelArgs":
        names = {f.name for f in fields(cls)}
        args = {k: v for k, v in config.items() if k in names}
        # transformers 5 moved rope_theta and the scaling into rope_parameters.
        params = config.get("rope_parameters") or {}
        if "rope_theta" not in args and "rope_theta" in params:
            args["rope_theta"] = params["rope_theta"]
        if args.get("rope_scaling") is None and params.get("rope_type", "default") != "default":
            args["rope_scaling"] = params
        return cls(**args)

    def __post_init__(self):
        if self.scoring_func != "sigmoid" or self.topk_method != "noaux_tc":
            raise ValueError(f"unsupported routing {self.scoring_func}/{self.topk_method} (DeepSeek-V3 uses sigmoid/noaux_tc)")
        for key in ("n_group", "topk_group"):
            if getattr(self, key) is None:
                object.__setattr__(self, key, 1)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def max_context(self) -> int:
        return self.max_position_embeddings

    @property
    def shared_size(self) -> int:
        """Intermediate width of the shared experts (one fused MLP)."""
        return self.moe_intermediate_size * (self.n_shared_experts or 0)

    def is_moe(self, layer: int) -> bool:
        return bool(self.n_routed_experts) and layer >= self.first_k_dense_replace and layer % self.moe_layer_freq == 0

    @property
    def cache_values_per_token(self) -> int:
        """Values the MLA cache keeps per token per layer."""
        return self.kv_lora_rank + self.qk_rope_head_dim


# ----------------------------------------------------------------------------- RoPE (YaRN)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_parameters(args: ModelArgs) -> tuple[torch.Tensor, float]:
    """Inverse frequencies of the rotary dims and the factor on cos/sin (YaRN's attention factor)."""
    dim, base = args.qk_rope_head_dim, args.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    sc = args.rope_scaling or {}
    kind = sc.get("rope_type", sc.get("type", "default"))
    if kind in ("default", None):
        return inv_freq, 1.0
    if kind != "yarn":
        raise ValueError(f"unsupported rope scaling {kind!r}")
    # YaRN: interpolate the long wavelengths by `factor`, keep the short ones, ramp between.
    old_ctx = sc["original_max_position_embeddings"]
    factor = sc.get("factor") or args.max_position_embeddings / old_ctx
    attn_factor = sc.get("attention_factor")
    mscale, mscale_all = sc.get("mscale"), sc.get("mscale_all_dim")
    if attn_factor is None:
        attn_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all) if mscale and mscale_all else _yarn_mscale(factor)
    beta_fast, beta_slow = sc.get("beta_fast") or 32, sc.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(old_ctx / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if sc.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (keep the frequency), 0: interpolate (divide by factor)
    inv_freq = inv_freq / factor * (1 - keep) + inv_freq * keep
    return inv_freq, float(attn_factor)


class YarnRope(nn.Module):
    """positions (T,) -> cos, sin (T, rope/2) of the rotary dims, times YaRN's attention factor."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.inv_freq, self.factor = rope_parameters(args)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = torch.outer(positions.float(), self.inv_freq)
        return freqs.cos() * self.factor, freqs.sin() * self.factor


def softmax_scale(args: ModelArgs) -> float:
    scale = args.qk_head_dim**-0.5
    sc = args.rope_scaling or {}
    if sc.get("rope_type", sc.get("type", "default")) != "default" and sc.get("mscale_all_dim"):
        scale *= _yarn_mscale(sc["factor"], sc["mscale_all_dim"]) ** 2
    return scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """x (T, heads, d); cos/sin (T, d/2). Interleaved: pairs (x0, x1), (x2, x3)... rotate, and the
    result comes out de-interleaved (first halves, then second halves) — as in transformers; q and k
    get the same layout, so their dot products are unchanged."""
    c, s = cos[:, None, :], sin[:, None, :]
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


# ----------------------------------------------------------------------------- attention


class MLAttention(nn.Module):
    """Multi-head latent attention over each sequence's `MLACache`. A tensor-parallel rank holds the
    heads of its `Part.kv_heads` (q_b/q rows, kv_b rows and o_proj columns of those heads, cut by
    `slice_weight`) and the latent projections whole: every rank keeps the whole compressed cache,
    and its o_proj gives a partial sum, completed by the all-reduce over `group`."""

    def __init__(self, args: ModelArgs, w: dict[str, Weight], prefix: str, heads: tuple[int, int] | None = None):
        super().__init__()
        h0, h1 = heads or (0, args.num_attention_heads)
        H, r = h1 - h0, args.kv_lora_rank
        self.group = None  # tensor-parallel process group, set by Block.shard
        self.n_heads, self.kv_lora_rank = H, r
        self.nope, self.rope, self.v_dim = args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim
        self.q_lora_rank = args.q_lora_rank
        self.interleaved = args.rope_interleave
        self.scale = softmax_scale(args)
        # q_a and kv_a both read the layer input: one matmul when the formats allow it.
        down = [f"{prefix}.kv_a_proj_with_mqa"]
        if self.q_lora_rank:
            down.insert(0, f"{prefix}.q_a_proj")
            self.q_a_layernorm = RMSNorm(as_tensor(w[f"{prefix}.q_a_layernorm.weight"]), 1e-6)
            self.q_b_proj = dense_or_quant_linear(w[f"{prefix}.q_b_proj.weight"])
        else:
            self.q_proj = dense_or_quant_linear(w[f"{prefix}.q_proj.weight"])
        mats = [w[f"{n}.weight"] for n in down]
        biases = [w[f"{n}.bias"] for n in down] if args.attention_bias else None
        self.a_sizes = [m.shape[0] for m in mats]
        if can_fuse_rows(mats):
            bias = torch.cat([as_tensor(b) for b in biases]) if biases else None
            self.a_proj = nn.ModuleList([dense_or_quant_linear(fuse_rows(mats), bias)])
        else:
            self.a_proj = nn.ModuleList(dense_or_quant_linear(m, biases[i] if biases else None) for i, m in enumerate(mats))
        self.kv_a_layernorm = RMSNorm(as_tensor(w[f"{prefix}.kv_a_layernorm.weight"]), 1e-6)
        # kv_b_proj (H*(nope+v), r), per head: the key rows (W_uk) and the value rows (W_uv).
        # Both forms of attention use it as a dense matrix (it is small: 32 MiB in DeepSeek-V3).
        if f"{prefix}.kv_b_proj.weight" in w:
            kv_b = as_tensor(w[f"{prefix}.kv_b_proj.weight"]).reshape(H, self.nope + self.v_dim, r)
        else:  # MLX conversions store it pre-split: embed_q (H, r, nope), unembed_out (H, v, r)
            w_uk = as_tensor(w[f"{prefix}.embed_q.weight"]).transpose(1, 2)
            kv_b = torch.cat([w_uk, as_tensor(w[f"{prefix}.unembed_out.weight"])], dim=1)
        self.kv_b = kv_b.contiguous()  # (H, nope + v, r)
        self.w_uk = self.kv_b[:, : self.nope]  # (H, nope, r)
        self.w_uv = self.kv_b[:, self.nope :]  # (H, v, r)
        o_bias = w.get(f"{prefix}.o_proj.bias") if args.attention_bias else None
        self.o_proj = dense_or_quant_linear(w[f"{prefix}.o_proj.weight"], o_bias)
        # Absorbed costs ~n*(2r + rope) per cached token, expanded ~r*(nope+v) + n*(nope+rope+v):
        # absorb while the chunk is shorter than the break-even length (170 tokens in DeepSeek-V3).
        gain = 2 * r - self.nope - self.v_dim
        self.absorb_max_tokens = r * (self.nope + self.v_dim) // gain if gain > 0 else 1 << 62

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: BatchLayout, layer: int) -> torch.Tensor:
        T, H, r = x.shape[0], self.n_heads, self.kv_lora_rank
        if len(self.a_proj) == 1:
            a = self.a_proj[0](x)
        else:
            a = torch.cat([p(x) for p in self.a_proj], dim=-1)
        if self.q_lora_rank:
            q = self.q_b_proj(self.q_a_layernorm(a[:, : self.q_lora_rank]))
            ckv = a[:, self.q_lora_rank :]
        else:
            q = self.q_proj(x)
            ckv = a
        q = q.view(T, H, self.nope + self.rope)
        q_nope = q[..., : self.nope].transpose(0, 1)  # (H, T, nope)
        q_rope = apply_rope(q[..., self.nope :], cos, sin, self.interleaved).transpose(0, 1)  # (H, T, rope)
        latent = self.kv_a_layernorm(ckv[:, :r])  # (T, r)
        k_rope = apply_rope(ckv[:, None, r:], cos, sin, self.interleaved)[:, 0]  # (T, rope), shared by heads

        out = torch.empty(H, T, self.v_dim, dtype=x.dtype, device=x.device)
        start = 0
        for seq, n in enumerate(layout.lengths):
            cache: MLACache = layout.caches[seq][layer]
            past = cache.offset
            kv = cache.update_and_fetch(latent[start : start + n], k_rope[start : start + n])  # (L, r + rope)
            qn, qr = q_nope[:, start : start + n], q_rope[:, start : start + n]
            if n <= self.absorb_max_tokens:
                out[:, start : start + n] = self._absorbed(qn, qr, kv, past)
            else:
                out[:, start : start + n] = self._expanded(qn, qr, kv, past)
            start += n
        # With tensor parallelism o_proj holds this rank's heads' columns: a partial sum.
        return all_reduce(self.o_proj(out.transpose(0, 1).reshape(T, H * self.v_dim)), self.group)

    def _absorbed(self, qn: torch.Tensor, qr: torch.Tensor, kv: torch.Tensor, past: int) -> torch.Tensor:
        H, n, L, r = qn.shape[0], qn.shape[1], kv.shape[0], self.kv_lora_rank
        q_lat = torch.bmm(qn, self.w_uk)  # (H, n, r): the query in latent space
        qq = torch.cat([q_lat, qr], dim=-1).reshape(H * n, r + self.rope)
        scores = (qq @ kv.T).mul_(self.scale).view(H, n, L)  # every head in one matmul against the cache
        probs = torch.softmax(_mask(scores, n, past), dim=-1)
        o_lat = (probs.view(H * n, L) @ kv[:, :r]).view(H, n, r)
        return torch.bmm(o_lat, self.w_uv.transpose(1, 2))  # (H, n, v)

    def _expanded(self, qn: torch.Tensor, qr: torch.Tensor, kv: torch.Tensor, past: int) -> torch.Tensor:
        H, n, L, r = qn.shape[0], qn.shape[1], kv.shape[0], self.kv_lora_rank
        kvb = torch.matmul(kv[:, :r], self.kv_b.view(-1, r).T).view(L, H, -1).transpose(0, 1)  # (H, L, nope+v)
        k_nope, values = kvb[..., : self.nope], kvb[..., self.nope :]
        scores = torch.bmm(qn, k_nope.transpose(1, 2)) + qr @ kv[:, r:].T  # (H, n, L)
        probs = torch.softmax(_mask(scores.mul_(self.scale), n, past), dim=-1)
        return torch.bmm(probs, values)  # (H, n, v)


def _mask(scores: torch.Tensor, n: int, past: int) -> torch.Tensor:
    if n > 1:  # causal within the chunk, full view of the past: lower-right aligned
        mask = torch.ones(n, past + n, dtype=torch.bool, device=scores.device).tril(diagonal=past)
        scores.masked_fill_(~mask, float("-inf"))
    return scores


# ----------------------------------------------------------------------------- blocks


def moe_layer(args: ModelArgs, w: dict[str, Weight], prefix: str, experts: tuple[int, ...], shared: tuple[int, int]) -> SparseMoE:
    """The routed experts `experts` and, where this rank computes some of their columns (`shared`,
    the weights already cut to them), the shared experts."""
    router = GroupedSigmoidRouter(
        w[f"{prefix}.gate.weight"], w[f"{prefix}.gate.e_score_correction_bias"], args.num_experts_per_tok,
        args.n_group, args.topk_group, args.norm_topk_prob, args.routed_scaling_factor,
    )
    routed = RoutedExperts(w, f"{prefix}.experts", ("gate_proj", "up_proj", "down_proj"), experts, args.n_routed_experts)
    has_shared = args.n_shared_experts and shared[1] > shared[0]
    return SparseMoE(router, routed, MLP(w, f"{prefix}.shared_experts") if has_shared else None)


class Block(base.Block):
    def __init__(self, args: ModelArgs, w: dict[str, Weight], i: int, experts: tuple[int, ...], shared: tuple[int, int],
                 heads: tuple[int, int] | None = None, tensor: bool = False):
        super().__init__()
        p = f"model.layers.{i}"
        self.tensor = tensor  # tensor parallel inside the group (else expert parallel, or one rank)
        self.input_layernorm = RMSNorm(as_tensor(w[f"{p}.input_layernorm.weight"]), args.rms_norm_eps)
        self.self_attn = MLAttention(args, w, f"{p}.self_attn", heads)
        self.post_attention_layernorm = RMSNorm(as_tensor(w[f"{p}.post_attention_layernorm.weight"]), args.rms_norm_eps)
        self.mlp = moe_layer(args, w, f"{p}.mlp", experts, shared) if args.is_moe(i) else MLP(w, f"{p}.mlp")

    def shard(self, group: Any) -> None:
        join_moe_group(self, group)


# ----------------------------------------------------------------------------- shard


class DeepseekShard(base.Shard):
    """Layers [part.start, part.end) of a DeepSeek-V3 / Kimi-K2 model; of each MoE layer only the
    routed experts and shared-expert columns of `part` (default: all)."""

    def __init__(self, args: ModelArgs, part: Part, weights: dict[str, Weight]):
        super().__init__(args, part, weights)
        self.experts = self.part.experts if self.part.experts is not None else tuple(range(args.n_routed_experts or 0))
        self.shared = shared_columns(args, self.part)
        self.rope = YarnRope(args)
        tensor = self.part.expert_cols is not None
        self.layers = nn.ModuleList(Block(args, weights, i, self.experts, self.shared, self.part.kv_heads, tensor)
                                    for i in range(self.part.start, self.part.end))

    def make_cache(self) -> list[MLACache]:
        """One compressed cache per layer of this shard, for one sequence."""
        return [MLACache(self.args.kv_lora_rank, self.args.qk_rope_head_dim, **self.cache_options()) for _ in self.layers]


# ----------------------------------------------------------------------------- loading


def shared_columns(args: ModelArgs, part: Part) -> tuple[int, int]:
    """The shared experts' intermediate columns [a, b) a part computes."""
    return tuple(part.shared) if part.shared is not None else (0, args.shared_size)


def required_weights(args: ModelArgs, part: Part, available: list[str]) -> list[str]:
    """The checkpoint tensors a part needs: its layers (only the routed experts it holds, the
    shared experts only where it computes some of their columns, and no multi-token-prediction
    layer past num_hidden_layers), embedding and head where it holds them."""
    mine = None if part.experts is None else set(part.experts)
    a, b = shared_columns(args, part)
    need = []
    for n in available:
        if not n.startswith(part.layer_prefixes) or (".shared_experts." in n and b <= a):
            continue
        e = expert_of(n)
        if e is None or mine is None or e in mine:
            need.append(n)
    need += base.ends_required(args, part, available)
    return [n for n in dict.fromkeys(need) if n in available]


def slice_weight(args: ModelArgs, part: Part, name: str, w: Weight) -> Weight:
    """The shared experts cut to the part's columns (gate/up rows, down columns), so their partial
    sums ride the MoE layer's all-reduce; the embedding and head to its vocabulary rows. Tensor
    parallel inside the group (`expert_cols`) also cuts the attention to the part's heads (q_b or q
    and kv_b by rows, o_proj by columns; the latent projections stay whole), every routed expert
    to its columns, and the dense MLPs to `ffn`."""
    a, b = shared_columns(args, part)
    if ".shared_experts." in name and (a, b) != (0, args.shared_size):
        return base.slice_mlp(name, w, a, b)
    if part.expert_cols is not None:
        h0, h1 = part.kv_heads or (0, args.num_attention_heads)
        q_rows, kv_rows = args.qk_nope_head_dim + args.qk_rope_head_dim, args.qk_nope_head_dim + args.v_head_dim
        if name.endswith(("self_attn.q_b_proj.weight", "self_attn.q_proj.weight")):
            return base.slice_rows(w, h0 * q_rows, h1 * q_rows)
        if name.endswith("self_attn.kv_b_proj.weight"):
            return base.slice_rows(w, h0 * kv_rows, h1 * kv_rows)
        if name.endswith(("self_attn.embed_q.weight", "self_attn.unembed_out.weight")):
            if not isinstance(w, torch.Tensor):
                raise ValueError(f"{name}: an MLX conversion's per-head projections cannot be cut to a tensor rank's heads")
            return w[h0:h1].clone()
        if name.endswith("self_attn.o_proj.weight"):
            return base.slice_cols(w, h0 * args.v_head_dim, h1 * args.v_head_dim)
        if expert_of(name) is not None:
            c0, c1 = part.expert_cols
            if name.endswith(("gate_proj.weight", "up_proj.weight")):
                return base.slice_rows(w, c0, c1)
            if name.endswith("down_proj.weight"):
                return base.slice_cols(w, c0, c1)
            return w
        if part.ffn is not None and ".mlp." in name and ".shared_experts." not in name:
            return base.slice_mlp(name, w, *part.ffn)
    return base.slice_ends(part, name, w)


__all__ = ["ModelArgs", "DeepseekShard", "MLAttention", "YarnRope", "required_weights", "slice_weight", "rope_parameters", "softmax_scale"]
