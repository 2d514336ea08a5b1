"""Mixtral and Qwen3-MoE, built as a shard: Llama-family attention (GQA, RoPE; Qwen3-MoE adds the
per-head q/k RMSNorm) with a sparse mixture of SwiGLU experts in place of the MLP. One file for both
because they differ only in small switches: Mixtral's experts live under `block_sparse_moe` as
w1/w3/w2 and always renormalise the top-k weights; Qwen3-MoE's live under `mlp` as
gate/up/down_proj, renormalise when `norm_topk_prob`, and may keep some layers dense
(`mlp_only_layers`, `decoder_sparse_step`). Neither has shared experts.

The attention, RoPE, norms and embedding are `llama.py`'s; `ModelArgs` extends its config with the
MoE keys. Expert parallel works as in `moe.py`: an `ExpertSlice` per rank, one all-reduce per MoE
layer, attention replicated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from shoal.engine.cache import KVCache
from shoal.models import llama
from shoal.models.llama import MLP, Attention, BatchLayout, Embedding, RMSNorm, RotaryEmbedding, ShardSpec, TensorSlice, Weight
from shoal.models.moe import ExpertSlice, RoutedExperts, SoftmaxRouter, SparseMoE, as_tensor, expert_of
from shoal.quant.linear import dense_or_quant_linear

# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class ModelArgs(llama.ModelArgs):
    """llama.ModelArgs plus the MoE keys of config.json (MixtralConfig, Qwen3MoeConfig)."""

    num_experts: int | None = None  # Qwen3-MoE's name
    num_local_experts: int | None = None  # Mixtral's name
    num_experts_per_tok: int = 2
    moe_intermediate_size: int | None = None  # Qwen3-MoE; Mixtral's experts use intermediate_size
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)

    @property
    def qk_norm(self) -> bool:
        return self.model_type == "qwen3_moe"

    @property
    def is_mixtral(self) -> bool:
        return self.model_type == "mixtral"

    @property
    def n_experts(self) -> int:
        return self.num_experts or self.num_local_experts or 0

    @property
    def expert_size(self) -> int:
        return self.moe_intermediate_size or self.intermediate_size

    @property
    def normalize_topk(self) -> bool:
        return True if self.is_mixtral else self.norm_topk_prob

    def is_moe(self, layer: int) -> bool:
        if self.is_mixtral:
            return True
        return layer not in self.mlp_only_layers and self.n_experts > 0 and (layer + 1) % self.decoder_sparse_step == 0

    def moe_prefix(self, layer: int) -> str:
        return f"model.layers.{layer}.{'block_sparse_moe' if self.is_mixtral else 'mlp'}"

    @property
    def expert_names(self) -> tuple[str, str, str]:
        """(gate, up, down) under `{moe_prefix}.experts.{e}.`"""
        return ("w1", "w3", "w2") if self.is_mixtral else ("gate_proj", "up_proj", "down_proj")

    def whole_experts(self) -> ExpertSlice:
        return ExpertSlice.whole(self.n_experts)


# ----------------------------------------------------------------------------- blocks


class Block(nn.Module):
    def __init__(self, args: ModelArgs, w: dict[str, Weight], i: int, experts: ExpertSlice):
        super().__init__()
        p = f"model.layers.{i}"
        self.input_layernorm = RMSNorm(as_tensor(w[f"{p}.input_layernorm.weight"]), args.rms_norm_eps)
        self.self_attn = Attention(args, w, f"{p}.self_attn", TensorSlice.whole(args))
        self.post_attention_layernorm = RMSNorm(as_tensor(w[f"{p}.post_attention_layernorm.weight"]), args.rms_norm_eps)
        if args.is_moe(i):
            m = args.moe_prefix(i)
            router = SoftmaxRouter(w[f"{m}.gate.weight"], args.num_experts_per_tok, args.normalize_topk)
            routed = RoutedExperts(w, f"{m}.experts", args.expert_names, experts.experts, args.n_experts)
            self.mlp = SparseMoE(router, routed)
        else:
            self.mlp = MLP(w, f"{p}.mlp")

    def forward(self, x, cos, sin, layout: BatchLayout, layer: int):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, layout, layer)
        return h + self.mlp(self.post_attention_layernorm(h))


# ----------------------------------------------------------------------------- shard


class MixtralShard(nn.Module):
    """Layers [spec.start, spec.end) of a Mixtral / Qwen3-MoE model; embedding if first, norm+head if
    last; of each MoE layer only the routed experts of `experts` (default: all)."""

    def __init__(self, args: ModelArgs, spec: ShardSpec, weights: dict[str, Weight], experts: ExpertSlice | None = None,
                 vocab: tuple[int, int] | None = None):
        super().__init__()
        self.args, self.spec = args, spec
        self.experts = experts or args.whole_experts()
        self.vocab = vocab  # rows of the embedding and head held here (an expert group's entry ranks split them)
        self.rope = RotaryEmbedding(args)
        self.embed_tokens = Embedding(weights["model.embed_tokens.weight"], vocab) if spec.has_embedding else None
        self.layers = nn.ModuleList(Block(args, weights, i, self.experts) for i in range(spec.start, spec.end))
        self.norm = self.lm_head = None
        if spec.has_head:
            self.norm = RMSNorm(as_tensor(weights["model.norm.weight"]), args.rms_norm_eps)
            head = weights.get("lm_head.weight")
            if head is None or args.tie_word_embeddings:
                head = weights["model.embed_tokens.weight"]
            self.lm_head = dense_or_quant_linear(head)

    def shard(self, group: Any | None) -> "MixtralShard":
        """Join an expert-parallel group: each MoE layer all-reduces its partial output over it."""
        if self.embed_tokens is not None and self.vocab is not None:
            self.embed_tokens.group = group
        if self.experts.size > 1:
            for layer in self.layers:
                if isinstance(layer.mlp, SparseMoE):
                    layer.mlp.group = group
        return self

    def make_cache(self) -> list[KVCache]:
        return [KVCache(self.args.num_key_value_heads, self.args.head_dim) for _ in self.layers]

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(ids)

    def run_layers(self, h: torch.Tensor, layout: BatchLayout) -> torch.Tensor:
        cos, sin = self.rope(layout.positions)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, layout, i)
        return h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(h))

    def forward(self, x: torch.Tensor, layout: BatchLayout, logit_rows: torch.Tensor | None = None) -> torch.Tensor:
        """As `LlamaShard.forward`: ids or hidden states in; hidden states or logits out."""
        h = self.embed(x) if self.embed_tokens is not None else x
        h = self.run_layers(h, layout)
        if self.lm_head is None:
            return h
        if logit_rows is None:
            logit_rows = torch.tensor(np.cumsum(layout.lengths) - 1)
        return self.logits(h[logit_rows])


def required_weights(args: ModelArgs, spec: ShardSpec, available: list[str], experts: ExpertSlice | None = None) -> list[str]:
    """The checkpoint tensors a shard needs: its layers (only the routed experts it holds),
    embedding if first, norm and head if last."""
    mine = None if experts is None else set(experts.experts)
    need = llama.required_weights(args, spec, available)
    return [n for n in need if mine is None or (e := expert_of(n)) is None or e in mine]


__all__ = ["ModelArgs", "MixtralShard", "required_weights"]
