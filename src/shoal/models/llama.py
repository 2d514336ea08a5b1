"""Llama family, built as a shard: Llama 2/3/3.1, Mistral, Qwen2/2.5, Qwen3 and SmolLM.

One file for the family because these models differ only in small switches: Qwen2 adds a bias to
q/k/v, Qwen3 adds an RMSNorm on q and k per head, Llama 3.1 rescales RoPE frequencies. Reads top to
bottom: config -> RoPE -> attention -> MLP -> block -> shard -> loading.

A shard owns layers [start, end) and, when it is the first or last stage, the embedding or the
final norm and head. The forward works on a *flat* batch: the new tokens of every sequence in the
batch are concatenated along one axis, so every linear layer reads its weights once per step
however many sequences are decoding; attention alone loops over sequences (each has its own KV
cache, so sequences can join and leave between steps — what continuous batching needs).

Tensor parallelism: a `TensorSlice` names this rank's KV heads (with their query heads), MLP
columns and vocabulary rows; `slice_weight` cuts a checkpoint tensor to it as it is read (q/k/v and
gate/up by rows, o and down by columns, embedding and head by rows), so a rank never holds more
than its share. `LlamaShard.shard(group)` then names the process group, and the collectives are in
plain sight: one all-reduce after attention and one after the MLP (in their `forward`), one after
a vocabulary-split embedding lookup. Splits may be uneven (3 KV heads over 2 ranks). With no group
the model is exactly the single-process one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from functools import cached_property
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shoal.engine import attention, norm
from shoal.engine.activation import silu_mul
from shoal.engine.cache import KVCache
from shoal.engine.direct import DirectModule
from shoal.quant.formats import QuantizedWeight
from shoal.quant.kernels import dequantize, gather_rows
from shoal.quant.linear import QuantLinear, dense_or_quant_linear, fuse_rows

Weight = torch.Tensor | np.ndarray | QuantizedWeight


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


@dataclass(frozen=True)
class ShardSpec:
    """Which part of the model a process holds: layers [start, end), plus embedding and head.

    By default the first stage holds the embedding and the last the final norm and head; a
    distributed placement may put the head on the entry stage instead (`head=True` there,
    `head=False` on the last), so that only hidden states, not logits, travel back to it."""

    start: int
    end: int
    num_layers: int
    embed: bool | None = None  # None: iff start == 0
    head: bool | None = None  # None: iff end == num_layers

    @property
    def is_first(self) -> bool:
        return self.start == 0

    @property
    def is_last(self) -> bool:
        return self.end == self.num_layers

    @property
    def has_embedding(self) -> bool:
        return self.is_first if self.embed is None else self.embed

    @property
    def has_head(self) -> bool:
        return self.is_last if self.head is None else self.head

    @classmethod
    def whole(cls, num_layers: int) -> "ShardSpec":
        return cls(0, num_layers, num_layers)


@dataclass(frozen=True)
class TensorSlice:
    """One rank's part of every layer of its stage in a tensor-parallel group of `size` ranks.

    KV heads [kv_heads) bring their query heads with them (GQA groups are never cut); `ffn` is a
    range of MLP intermediate columns; `vocab` the rows of the embedding and head held here (None:
    all). Ranges may be uneven; for a quantized checkpoint the column cuts of o_proj and down_proj
    should fall on quantization-group boundaries (otherwise that slice is dequantized)."""

    rank: int
    size: int
    kv_heads: tuple[int, int]
    ffn: tuple[int, int]
    vocab: tuple[int, int] | None = None

    @classmethod
    def whole(cls, args: ModelArgs) -> "TensorSlice":
        return cls(0, 1, (0, args.num_key_value_heads), (0, args.intermediate_size), None)


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


class RMSNorm(DirectModule):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps
        self._weight = weight.float().contiguous().numpy()  # the kernel's view of it (same memory when float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or x.device.type != "cpu":
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return norm.rms_norm(x, self._weight, self.eps)


@dataclass
class BatchLayout:
    """How the flat batch splits into sequences: `lengths[i]` new tokens of sequence i, in order."""

    lengths: list[int]
    positions: torch.Tensor  # (T,) absolute position of every token in the flat batch
    caches: list[list[KVCache]] = field(default_factory=list)  # [sequence][layer of this shard]

    @property
    def total(self) -> int:
        return int(self.positions.shape[0])

    @cached_property
    def decoding(self) -> list[int]:
        """The sequences with exactly one new token (decode); the rest bring a prefill chunk."""
        return [i for i, n in enumerate(self.lengths) if n == 1]

    @cached_property
    def decode_batch(self) -> attention.DecodeBatch | None:
        """The decoding sequences made ready, once per step, for the decode-attention kernel (their
        caches grown for the new token); None when no sequence decodes or the caches are not the
        kernel's (see attention.supports)."""
        d = self.decoding
        if not d or not attention.supports(self.caches[d[0]][0]):
            return None
        rows = np.cumsum([0] + self.lengths[:-1])[d]
        return attention.DecodeBatch(rows.tolist(), [self.caches[i] for i in d])


def all_reduce(x: torch.Tensor, group: Any | None) -> torch.Tensor:
    """Sum x in place over a tensor-parallel group (a torch.distributed backend); no-op without one."""
    if group is not None:
        group.allreduce([x]).wait()
    return x


class Attention(DirectModule):
    def __init__(self, args: ModelArgs, w: dict[str, Weight], prefix: str, tp: TensorSlice):
        super().__init__()
        kv0, kv1 = tp.kv_heads
        group = args.num_attention_heads // args.num_key_value_heads
        # This rank's heads: KV heads [kv0, kv1) and their query heads.
        self.n_heads, self.n_kv_heads, self.head_dim = (kv1 - kv0) * group, kv1 - kv0, args.head_dim
        self.q_size, self.kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.group = None  # tensor-parallel process group, set by LlamaShard.shard
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

        out = torch.empty(T, self.n_heads, self.head_dim, dtype=x.dtype)
        done: set[int] = set()
        if layout.decode_batch is not None:
            # One kernel call for every decoding sequence (RoPE, cache append and attention).
            layout.decode_batch.attend(layer, q, k, v, cos, sin, out, self.scale)
            if len(layout.decoding) == len(layout.lengths):
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
                mask = torch.ones(n, past + n, dtype=torch.bool).tril(diagonal=past)
                scores.masked_fill_(~mask.repeat(group, 1), float("-inf"))
            o = torch.bmm(torch.softmax(scores, dim=-1), values)  # (Hkv, group*n, D)
            out[start : start + n] = o.view(self.n_kv_heads, group, n, self.head_dim).permute(2, 0, 1, 3).reshape(n, self.n_heads, self.head_dim)
            start += n
        # With tensor parallelism each rank's o_proj holds the columns of its heads: a partial sum.
        return all_reduce(self.o_proj(out.view(T, self.q_size)), self.group)


class MLP(DirectModule):
    def __init__(self, w: dict[str, Weight], prefix: str):
        super().__init__()
        gate, up = w[f"{prefix}.gate_proj.weight"], w[f"{prefix}.up_proj.weight"]
        self.hidden = gate.shape[0]  # this rank's intermediate columns
        self.gate_up_proj = dense_or_quant_linear(fuse_rows([gate, up]))
        self.down_proj = dense_or_quant_linear(w[f"{prefix}.down_proj.weight"])
        self.group = None  # tensor-parallel process group, set by LlamaShard.shard

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        # down_proj holds this rank's input columns: a partial sum, completed over the group.
        return all_reduce(self.down_proj(silu_mul(gate_up, self.hidden)), self.group)


class Block(DirectModule):
    def __init__(self, args: ModelArgs, w: dict[str, Weight], i: int, tp: TensorSlice):
        super().__init__()
        p = f"model.layers.{i}"
        self.input_layernorm = RMSNorm(as_tensor(w[f"{p}.input_layernorm.weight"]), args.rms_norm_eps)
        self.self_attn = Attention(args, w, f"{p}.self_attn", tp)
        self.post_attention_layernorm = RMSNorm(as_tensor(w[f"{p}.post_attention_layernorm.weight"]), args.rms_norm_eps)
        self.mlp = MLP(w, f"{p}.mlp")

    def forward(self, x, cos, sin, layout: BatchLayout, layer: int):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, layout, layer)
        return h + self.mlp(self.post_attention_layernorm(h))


# ----------------------------------------------------------------------------- shard


class Embedding(nn.Module):
    """Token embedding; with a vocabulary slice [v0, v1) it returns zeros for tokens outside it,
    and the group's all-reduce assembles the full rows."""

    def __init__(self, weight: Weight, vocab: tuple[int, int] | None = None):
        super().__init__()
        self.quantized = weight if isinstance(weight, QuantizedWeight) else None
        self.weight = None if self.quantized is not None else as_tensor(weight)
        self.vocab = vocab
        self.group = None  # set by LlamaShard.shard

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.vocab is None:
            return self._lookup(ids)
        v0, v1 = self.vocab
        mine = (ids >= v0) & (ids < v1)
        h = self._lookup(torch.where(mine, ids - v0, 0))
        h[~mine] = 0.0
        return all_reduce(h, self.group)

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        if self.quantized is not None:
            return torch.from_numpy(gather_rows(self.quantized, ids.numpy()))
        return F.embedding(ids, self.weight)


class LlamaShard(nn.Module):
    """Layers [spec.start, spec.end) of a Llama-family model; embedding if first, norm+head if last.

    `tp` says which slice of each layer the (already sliced, see `slice_weight`) weights are."""

    def __init__(self, args: ModelArgs, spec: ShardSpec, weights: dict[str, Weight], tp: TensorSlice | None = None):
        super().__init__()
        self.args, self.spec = args, spec
        self.tp = tp or TensorSlice.whole(args)
        self.rope = RotaryEmbedding(args)
        self.embed_tokens = None
        if spec.has_embedding:
            self.embed_tokens = Embedding(weights["model.embed_tokens.weight"], self.tp.vocab)
        self.layers = nn.ModuleList(Block(args, weights, i, self.tp) for i in range(spec.start, spec.end))
        self.norm = self.lm_head = None
        if spec.has_head:
            self.norm = RMSNorm(as_tensor(weights["model.norm.weight"]), args.rms_norm_eps)
            head = weights.get("lm_head.weight")
            if head is None or args.tie_word_embeddings:
                head = weights["model.embed_tokens.weight"]
            self.lm_head = dense_or_quant_linear(head)

    def shard(self, group: Any | None) -> "LlamaShard":
        """Join a tensor-parallel group (a torch.distributed backend over this stage's ranks, in
        TensorSlice.rank order): the all-reduce points of the embedding, attention and MLP use it."""
        if self.tp.size == 1:
            return self
        if self.embed_tokens is not None:
            self.embed_tokens.group = group
        for layer in self.layers:
            layer.self_attn.group = group
            layer.mlp.group = group
        return self

    def make_cache(self) -> list[KVCache]:
        """One cache per layer of this shard, for one sequence (this rank's KV heads only)."""
        kv0, kv1 = self.tp.kv_heads
        return [KVCache(kv1 - kv0, self.args.head_dim) for _ in self.layers]

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (T,) -> hidden states (T, hidden)."""
        return self.embed_tokens(ids)

    def run_layers(self, h: torch.Tensor, layout: BatchLayout) -> torch.Tensor:
        """Hidden states (T, hidden) through this shard's layers."""
        cos, sin = self.rope(layout.positions)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, layout, i)
        return h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and head of some rows (R, hidden) -> logits (R, vocab rows held here)."""
        return self.lm_head(self.norm(h))

    def forward(self, x: torch.Tensor, layout: BatchLayout, logit_rows: torch.Tensor | None = None) -> torch.Tensor:
        """x: token ids (T,) on the first shard, hidden states (T, hidden) otherwise.

        Returns hidden states (T, hidden) on a middle shard; on the last shard, logits (R, vocab)
        for the rows `logit_rows` of the flat batch (default: each sequence's last token)."""
        h = self.embed(x) if self.embed_tokens is not None else x
        h = self.run_layers(h, layout)
        if self.lm_head is None:
            return h
        if logit_rows is None:
            logit_rows = torch.tensor(np.cumsum(layout.lengths) - 1)
        return self.logits(h[logit_rows])


def required_weights(args: ModelArgs, spec: ShardSpec, available: list[str]) -> list[str]:
    """The checkpoint tensors a shard needs, so a loader reads only those."""
    layer_prefixes = tuple(f"model.layers.{i}." for i in range(spec.start, spec.end))
    need = [n for n in available if n.startswith(layer_prefixes)]
    if spec.has_embedding:
        need.append("model.embed_tokens.weight")
    if spec.has_head:
        need.append("model.norm.weight")
        if "lm_head.weight" in available and not args.tie_word_embeddings:
            need.append("lm_head.weight")
        elif "model.embed_tokens.weight" not in need:
            need.append("model.embed_tokens.weight")
    return [n for n in dict.fromkeys(need) if n in available]


def slice_weight(args: ModelArgs, tp: TensorSlice, name: str, w: Weight) -> Weight:
    """A checkpoint tensor cut to a tensor-parallel rank's share (a copy, so the whole can be freed).

    Column-parallel (output rows cut): q/k/v (weights and biases), gate/up. Row-parallel (input
    columns cut): o_proj, down_proj. Vocabulary rows: embedding and head. Norms stay whole."""
    if tp.size == 1 and tp.vocab is None:
        return w
    d = args.head_dim
    group = args.num_attention_heads // args.num_key_value_heads
    (kv0, kv1), (f0, f1) = tp.kv_heads, tp.ffn
    if name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
        return slice_rows(w, kv0 * group * d, kv1 * group * d)
    if name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias", "self_attn.v_proj.weight", "self_attn.v_proj.bias")):
        return slice_rows(w, kv0 * d, kv1 * d)
    if name.endswith("self_attn.o_proj.weight"):
        return slice_cols(w, kv0 * group * d, kv1 * group * d)
    if name.endswith(("mlp.gate_proj.weight", "mlp.up_proj.weight")):
        return slice_rows(w, f0, f1)
    if name.endswith("mlp.down_proj.weight"):
        return slice_cols(w, f0, f1)
    if name in ("model.embed_tokens.weight", "lm_head.weight") and tp.vocab is not None:
        return slice_rows(w, *tp.vocab)
    return w


def slice_rows(w: Weight, a: int, b: int) -> Weight:
    """Rows [a, b) of a weight (output features), quantized or not, as a copy."""
    if isinstance(w, QuantizedWeight):
        biases = None if w.biases is None else w.biases[a:b].copy()
        return QuantizedWeight(w.kind, w.codes[a:b].copy(), w.scales[a:b].copy(), biases, w.group_size)
    return w[a:b].clone() if isinstance(w, torch.Tensor) else np.array(w[a:b], dtype=np.float32)


def slice_cols(w: Weight, a: int, b: int) -> Weight:
    """Columns [a, b) of a weight (input features); a cut inside a quantization group keeps that slice dense."""
    if isinstance(w, QuantizedWeight):
        G = w.group_size
        if a % G or b % G:  # the cut splits a quantization group: keep this slice dense
            return np.ascontiguousarray(dequantize(w)[:, a:b])
        per_byte = 2 if w.kind == "q4_affine" else 1  # q4: a group's G codes are G/2 whole bytes
        biases = None if w.biases is None else w.biases[:, a // G : b // G].copy()
        return QuantizedWeight(w.kind, w.codes[:, a // per_byte : b // per_byte].copy(), w.scales[:, a // G : b // G].copy(), biases, G)
    return w[:, a:b].contiguous().clone() if isinstance(w, torch.Tensor) else np.array(w[:, a:b], dtype=np.float32)


def as_tensor(w: Weight) -> torch.Tensor:
    """A float32 tensor of any weight (quantized ones dequantized: only for small ones, norms and biases)."""
    if isinstance(w, QuantizedWeight):
        return torch.from_numpy(w.dequantize())
    if isinstance(w, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))
    return w.float()


__all__ = ["ModelArgs", "ShardSpec", "TensorSlice", "LlamaShard", "BatchLayout", "required_weights", "slice_weight", "slice_rows", "slice_cols", "as_tensor", "QuantLinear"]
