"""Mixtral and Qwen3-MoE, built as a shard: Llama-family attention (GQA, RoPE; Qwen3-MoE adds the
per-head q/k RMSNorm) with a sparse mixture of SwiGLU experts in place of the MLP. One file for both
because they differ only in small switches: Mixtral's experts live under `block_sparse_moe` as
w1/w3/w2 and always renormalise the top-k weights; Qwen3-MoE's live under `mlp` as
gate/up/down_proj, renormalise when `norm_topk_prob`, and may keep some layers dense
(`mlp_only_layers`, `decoder_sparse_step`). Neither has shared experts.

The attention, RoPE and dense MLP are `llama.py`'s; `ModelArgs` extends its config with the MoE
keys. Two ways to split a layer over a group:
- expert parallel, as in `moe.py`: each rank's `Part` names its routed experts; one all-reduce per
  MoE layer; attention replicated;
- tensor parallel inside the group, as exo runs MoE models (`Part.expert_cols`): each rank holds its
  KV heads (with their query heads), the columns [expert_cols) of every routed expert and its
  columns of the dense MLPs; the router whole. Every rank computes its slice of each expert a token
  picks, so no rank waits on an unlucky draw; one all-reduce after attention and one after the MLP.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from shoal.kernels.cache import KVCache
from shoal.models import base, llama
from shoal.models.base import Part, RMSNorm, Weight, as_tensor
from shoal.models.llama import MLP, Attention, RotaryEmbedding
from shoal.models.moe import (
    RoutedExperts,
    SoftmaxRouter,
    SparseMoE,
    expert_of,
    join_moe_group,
)

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


# ----------------------------------------------------------------------------- blocks


class Block(base.Block):
    def __init__(self, args: ModelArgs, w: dict[str, Weight], i: int, experts: tuple[int, ...], kv_heads: tuple[int, int],
                 tensor: bool):
        super().__init__()
        p = f"model.layers.{i}"
        self.tensor = tensor  # tensor parallel inside the group (else expert parallel, or one rank)
        self.input_layernorm = RMSNorm(as_tensor(w[f"{p}.input_layernorm.weight"]), args.rms_norm_eps)
        self.self_attn = Attention(args, w, f"{p}.self_attn", kv_heads)
        self.post_attention_layernorm = RMSNorm(as_tensor(w[f"{p}.post_attention_layernorm.weight"]), args.rms_norm_eps)
        if args.is_moe(i):
            m = args.moe_prefix(i)
            router = SoftmaxRouter(w[f"{m}.gate.weight"], args.num_experts_per_tok, args.normalize_topk)
            routed = RoutedExperts(w, f"{m}.experts", args.expert_names, experts, args.n_experts)
            self.mlp = SparseMoE(router, routed)
        else:
            self.mlp = MLP(w, f"{p}.mlp")

    def shard(self, group: Any) -> None:
        join_moe_group(self, group)


# ----------------------------------------------------------------------------- shard


class MixtralShard(base.Shard):
    """Layers [part.start, part.end) of a Mixtral / Qwen3-MoE model; of each MoE layer only the
    routed experts of `part` (default: all)."""

    def __init__(self, args: ModelArgs, part: Part, weights: dict[str, Weight]):
        super().__init__(args, part, weights)
        self.experts = self.part.experts if self.part.experts is not None else tuple(range(args.n_experts))
        self.kv_heads = self.part.kv_heads or (0, args.num_key_value_heads)
        self.rope = RotaryEmbedding(args)
        tensor = self.part.expert_cols is not None
        self.layers = nn.ModuleList(Block(args, weights, i, self.experts, self.kv_heads, tensor)
                                    for i in range(self.part.start, self.part.end))

    def make_cache(self) -> list[KVCache]:
        kv0, kv1 = self.kv_heads
        return [KVCache(kv1 - kv0, self.args.head_dim, **self.cache_options()) for _ in self.layers]


# ----------------------------------------------------------------------------- loading


def required_weights(args: ModelArgs, part: Part, available: list[str]) -> list[str]:
    """The checkpoint tensors a part needs: its layers (only the routed experts it holds),
    embedding and head where it holds them."""
    mine = None if part.experts is None else set(part.experts)
    need = llama.required_weights(args, part, available)
    return [n for n in need if mine is None or (e := expert_of(n)) is None or e in mine]


def slice_weight(args: ModelArgs, part: Part, name: str, w: Weight) -> Weight:
    """Expert parallel: only the embedding and head are cut (to the part's vocabulary rows), a
    rank's experts are whole tensors, chosen by `required_weights`. Tensor parallel inside the
    group: every routed expert cut to the columns [expert_cols) (gate and up by rows, down by
    columns), and attention, dense MLPs and the ends cut as llama.py cuts them."""
    if part.expert_cols is None:
        return base.slice_ends(part, name, w)
    if expert_of(name) is not None:
        gate, up, down = args.expert_names
        c0, c1 = part.expert_cols
        if name.endswith((f".{gate}.weight", f".{up}.weight")):
            return base.slice_rows(w, c0, c1)
        if name.endswith(f".{down}.weight"):
            return base.slice_cols(w, c0, c1)
        return w
    return llama.slice_weight(args, part, name, w)


__all__ = ["ModelArgs", "MixtralShard", "required_weights", "slice_weight"]
