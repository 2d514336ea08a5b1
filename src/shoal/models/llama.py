"""Llama family, built as a shard: Llama 2/3/3.1, Mistral, Qwen2/2.5, Qwen3 and SmolLM.

One file for the family because these models differ only in small switches: Qwen2 adds a bias to
q/k/v, Qwen3 adds an RMSNorm on q and k per head, Llama 3.1 rescales RoPE frequencies. Reads top to
bottom: config -> RoPE -> attention -> MLP -> block -> shard -> loading. The shard's shell (the
embedding, the final norm and head, the flat-batch forward) is `base.Shard`.

Tensor parallelism: a `Part` names this rank's KV heads (with their query heads), MLP columns and
vocabulary rows; `slice_weight` cuts a checkpoint tensor to it as it is read (q/k/v and gate/up by
rows, o and down by columns, embedding and head by rows), so a rank never holds more than its
share. `LlamaShard.shard(group)` then names the process group, and the collectives are in plain
sight: one all-reduce after attention and one after the MLP (in their `forward`), one after a
vocabulary-split embedding lookup. Splits may be uneven (3 KV heads over 2 ranks). With no group
the model is exactly the single-process one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from functools import cached_property
from typing import Any

import torch
from torch import nn

from shoal.kernels.activation import silu_mul
from shoal.kernels.cache import KVCache
from shoal.kernels.decode_layer import NativeBlock
from shoal.kernels.direct import DirectModule
from shoal.models import base
from shoal.models.base import BatchLayout, Part, RMSNorm, Weight, all_reduce, as_tensor, slice_cols, slice_rows
from shoal.quant.linear import dense_or_quant_linear, fuse_rows

# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class ModelArgs:
    """Field names are the checkpoint's config.json keys."""

    model_type: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    vocab_size: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    sliding_window: int | None = None  # Mistral; contexts beyond it are refused rather than silently wrong
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "ModelArgs":
        names = {f.name for f in fields(cls)}
        args = {k: v for k, v in config.items() if k in names}
        # Qwen2 checkpoints carry q/k/v biases without saying so in config.json.
        if config.get("model_type") == "qwen2":
            args.setdefault("attention_bias", True)
        # transformers 5 moved rope_theta into rope_parameters.
        params = config.get("rope_parameters") or {}
        if "rope_theta" not in args and "rope_theta" in params:
            args["rope_theta"] = params["rope_theta"]
        if args.get("rope_scaling") is None and params.get("rope_type", "default") != "default":
            args["rope_scaling"] = params
        return cls(**args)

    def __post_init__(self):
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)

    @property
    def qk_norm(self) -> bool:
        return self.model_type == "qwen3"

    @property
    def max_context(self) -> int:
        if self.sliding_window:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings


# ----------------------------------------------------------------------------- RoPE


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    dim = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = args.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "llama3":
        # Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a smooth ramp between.
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    elif kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind not in ("default", None):
        raise ValueError(f"unsupported rope scaling {kind!r}")
    return inv_freq


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position up to the context, computed once like transformers does."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        inv_freq = rope_inv_freq(args)
        self.inv_freq = inv_freq
        pos = torch.arange(args.max_position_embeddings, dtype=torch.float32)
        freqs = torch.outer(pos, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)  # (max_pos, head_dim)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[positions], self.sin[positions]

    def rescale(self, divisors: torch.Tensor) -> None:
        """GGUF files of Llama 3.1 store RoPE scaling as per-frequency divisors (`rope_freqs`)."""
        pos = torch.arange(self.cos.shape[0], dtype=torch.float32)
        inv_freq = self.inv_freq / divisors.float()
        freqs = torch.outer(pos, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos, self.sin = emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x (T, heads, head_dim); cos/sin (T, head_dim); rotate-half layout, as in the HF checkpoints.
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


# ----------------------------------------------------------------------------- layers


class Attention(DirectModule):
    def __init__(self, args: ModelArgs, w: dict[str, Weight], prefix: str, kv_heads: tuple[int, int]):
        super().__init__()
        kv0, kv1 = kv_heads
        group = args.num_attention_heads // args.num_key_value_heads
        # This rank's heads: KV heads [kv0, kv1) and their query heads.
        self.n_heads, self.n_kv_heads, self.head_dim = (kv1 - kv0) * group, kv1 - kv0, args.head_dim
        self.q_size, self.kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.group = None  # tensor-parallel process group, set by Block.shard
        # q, k and v in one matmul: one pass over the input, one kernel call.
        names = [f"{prefix}.{p}_proj" for p in "qkv"]
        bias = None
        if args.attention_bias:
            bias = torch.cat([as_tensor(w[f"{n}.bias"]) for n in names])
        self.qkv_proj = dense_or_quant_linear(fuse_rows([w[f"{n}.weight"] for n in names]), bias)
        self.o_proj = dense_or_quant_linear(w[f"{prefix}.o_proj.weight"])
        self.q_norm = self.k_norm = None
        if args.qk_norm:
            self.q_norm = RMSNorm(as_tensor(w[f"{prefix}.q_norm.weight"]), args.rms_norm_eps)
            self.k_norm = RMSNorm(as_tensor(w[f"{prefix}.k_norm.weight"]), args.rms_norm_eps)
        self.scale = self.head_dim**-0.5

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: BatchLayout, layer: int):
        T = x.shape[0]
        qkv = self.qkv_proj(x)
        q = qkv[:, : self.q_size].view(T, self.n_heads, self.head_dim)
        k = qkv[:, self.q_size : self.q_size + self.kv_size].view(T, self.n_kv_heads, self.head_dim)
        v = qkv[:, self.q_size + self.kv_size :].view(T, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)

        out = torch.empty(T, self.n_heads, self.head_dim, dtype=x.dtype, device=x.device)
        done: set[int] = set()
        if layout.decode_batch is not None:
            # One kernel call for every decoding sequence (RoPE, cache append and attention).
            layout.decode_batch.attend(layer, q, k, v, cos, sin, out, self.scale)
            if layout.decode_only is not None:
                return all_reduce(self.o_proj(out.view(T, self.q_size)), self.group)
            done = set(layout.decoding)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        group = self.n_heads // self.n_kv_heads
        start = 0
        for seq, n in enumerate(layout.lengths):
            if seq in done:
                start += n
                continue
            cache = layout.caches[seq][layer]
            past = cache.offset
            keys, values = cache.update_and_fetch(k[start : start + n], v[start : start + n])  # (Hkv, L, D)
            # GQA without copying K/V: the `group` query heads of one KV head become rows of one matmul.
            qs = q[start : start + n].view(n, self.n_kv_heads, group, self.head_dim).permute(1, 2, 0, 3)
            qs = qs.reshape(self.n_kv_heads, group * n, self.head_dim)  # (Hkv, group*n, D)
            scores = torch.bmm(qs, keys.transpose(1, 2)).mul_(self.scale)  # (Hkv, group*n, L)
            if n > 1:  # causal within the chunk, full view of the past: lower-right aligned
                mask = torch.ones(n, past + n, dtype=torch.bool, device=x.device).tril(diagonal=past)
                scores.masked_fill_(~mask.repeat(group, 1), float("-inf"))
            o = torch.bmm(torch.softmax(scores, dim=-1), values)  # (Hkv, group*n, D)
            out[start : start + n] = o.view(self.n_kv_heads, group, n, self.head_dim).permute(2, 0, 1, 3).reshape(n, self.n_heads, self.head_dim)
            start += n
        # With tensor parallelism each rank's o_proj holds the columns of its heads: a partial sum.
        return all_reduce(self.o_proj(out.view(T, self.q_size)), self.group)


class MLP(DirectModule):
    kernels = True  # silu·up by the numba kernel on float32 CPU rows; False: torch ops (engine/device.py)

    def __init__(self, w: dict[str, Weight], prefix: str):
        super().__init__()
        gate, up = w[f"{prefix}.gate_proj.weight"], w[f"{prefix}.up_proj.weight"]
        self.hidden = gate.shape[0]  # this rank's intermediate columns
        self.gate_up_proj = dense_or_quant_linear(fuse_rows([gate, up]))
        self.down_proj = dense_or_quant_linear(w[f"{prefix}.down_proj.weight"])
        self.group = None  # tensor-parallel process group, set by the block's `shard`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        # down_proj holds this rank's input columns: a partial sum, completed over the group.
        return all_reduce(self.down_proj(silu_mul(gate_up, self.hidden, self.kernels)), self.group)


class Block(base.Block):
    kernels = True  # the numba engine's block; False on a torch device (engine/device.py)

    def __init__(self, args: ModelArgs, w: dict[str, Weight], i: int, kv_heads: tuple[int, int]):
        super().__init__()
        p = f"model.layers.{i}"
        self.input_layernorm = RMSNorm(as_tensor(w[f"{p}.input_layernorm.weight"]), args.rms_norm_eps)
        self.self_attn = Attention(args, w, f"{p}.self_attn", kv_heads)
        self.post_attention_layernorm = RMSNorm(as_tensor(w[f"{p}.post_attention_layernorm.weight"]), args.rms_norm_eps)
        self.mlp = MLP(w, f"{p}.mlp")

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: BatchLayout, layer: int) -> torch.Tensor:
        # A step where every sequence decodes runs the same kernels as one native call
        # (kernels/decode_layer.py): equal output, without the Python between the ops.
        native, batch = self.native, layout.decode_only
        if native is None or batch is None:
            return super().forward(x, cos, sin, layout, layer)
        if self.self_attn.group is None:
            return native.block(x, cos, sin, batch, layer)
        h = x + all_reduce(native.attention(x, cos, sin, batch, layer), self.self_attn.group)
        return h + all_reduce(native.mlp(h), self.mlp.group)

    @cached_property
    def native(self) -> NativeBlock | None:
        return NativeBlock.of(self) if self.kernels else None

    def shard(self, group: Any) -> None:
        """Tensor parallel: attention and MLP each end in an all-reduce of their partial sums."""
        self.self_attn.group = group
        self.mlp.group = group


# ----------------------------------------------------------------------------- shard


class LlamaShard(base.Shard):
    """Layers [part.start, part.end) of a Llama-family model, of each only the KV heads and MLP
    columns of `part` (the weights come already cut, see `slice_weight`)."""

    def __init__(self, args: ModelArgs, part: Part, weights: dict[str, Weight]):
        super().__init__(args, part, weights)
        self.kv_heads = self.part.kv_heads or (0, args.num_key_value_heads)
        self.rope = RotaryEmbedding(args)
        self.layers = nn.ModuleList(Block(args, weights, i, self.kv_heads) for i in range(self.part.start, self.part.end))

    def make_cache(self) -> list[KVCache]:
        """One cache per layer of this shard, for one sequence (this rank's KV heads only)."""
        kv0, kv1 = self.kv_heads
        return [KVCache(kv1 - kv0, self.args.head_dim, **self.cache_options()) for _ in self.layers]


# ----------------------------------------------------------------------------- loading


def required_weights(args: ModelArgs, part: Part, available: list[str]) -> list[str]:
    """The checkpoint tensors a part needs, so a loader reads only those."""
    need = [n for n in available if n.startswith(part.layer_prefixes)] + base.ends_required(args, part, available)
    return [n for n in dict.fromkeys(need) if n in available]


def slice_weight(args: ModelArgs, part: Part, name: str, w: Weight) -> Weight:
    """A checkpoint tensor cut to a tensor-parallel rank's share (a copy, so the whole can be freed).

    Column-parallel (output rows cut): q/k/v (weights and biases), gate/up. Row-parallel (input
    columns cut): o_proj, down_proj. Vocabulary rows: embedding and head. Norms stay whole."""
    d = args.head_dim
    group = args.num_attention_heads // args.num_key_value_heads
    if part.kv_heads is not None:
        kv0, kv1 = part.kv_heads
        if name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
            return slice_rows(w, kv0 * group * d, kv1 * group * d)
        if name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias", "self_attn.v_proj.weight", "self_attn.v_proj.bias")):
            return slice_rows(w, kv0 * d, kv1 * d)
        if name.endswith("self_attn.o_proj.weight"):
            return slice_cols(w, kv0 * group * d, kv1 * group * d)
    if part.ffn is not None and ".mlp." in name:
        return base.slice_mlp(name, w, *part.ffn)
    return base.slice_ends(part, name, w)


__all__ = ["ModelArgs", "LlamaShard", "Attention", "MLP", "RotaryEmbedding", "apply_rope", "required_weights", "slice_weight"]
