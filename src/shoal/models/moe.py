"""Mixture-of-experts pieces shared by the MoE families (`deepseek.py`: DeepSeek-V3 / Kimi-K2,
`mixtral.py`: Mixtral / Qwen3-MoE): the routers, the routed experts a shard holds, the sparse MoE
layer, and expert parallelism.

Expert parallel: every rank of an expert group holds the whole attention (and the dense layers, the
router, the embedding and head of its pipeline stage) but only some of the routed experts — its
`Part.experts` — plus a column slice of the shared experts (`Part.shared`). Every rank routes every
token (the router is tiny and replicated), computes only the (token, expert) pairs of its own
experts, and the MoE layer's output is the *sum* of the ranks' partial outputs: exactly one
all-reduce per MoE layer, in `SparseMoE.forward`, and nothing else crosses the network. With no
group (one process) the layer is the whole model's.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shoal.kernels.activation import silu_mul
from shoal.models.base import Part, Weight, all_reduce, as_tensor
from shoal.quant.linear import dense_or_quant_linear, fuse_rows

# ----------------------------------------------------------------------------- expert placement


def split_experts(num_experts: int, shares: list[float], shared_size: int = 0, align: int = 1) -> list[Part]:
    """The expert group's ranks' parts of every layer (all layers; set `start`/`end` for a stage):
    the routed experts in contiguous runs proportional to `shares` (a rank's memory or speed
    weight), every rank getting at least one; the shared experts' columns likewise, cut at
    multiples of `align` (a quantized checkpoint's group size, so down_proj's column cut keeps whole
    groups)."""
    n = len(shares)
    if n > num_experts:
        raise ValueError(f"{n} ranks for {num_experts} experts: every rank needs at least one")
    total = float(sum(shares))
    cuts = [0]
    for i in range(1, n):
        want = round(num_experts * sum(shares[:i]) / total)
        cuts.append(min(max(want, cuts[-1] + 1), num_experts - (n - i)))
    cuts.append(num_experts)
    units = shared_size // align if align > 0 else 0
    scut = [0] + [round(units * sum(shares[:i]) / total) * align for i in range(1, n)] + [shared_size]
    return [Part(rank=r, size=n, experts=tuple(range(cuts[r], cuts[r + 1])), shared=(scut[r], scut[r + 1])) for r in range(n)]


# ----------------------------------------------------------------------------- routers


class SoftmaxRouter(nn.Module):
    """Mixtral / Qwen3-MoE: softmax over all experts, the top k, optionally renormalised to sum 1."""

    def __init__(self, weight: Weight, top_k: int, normalize: bool):
        super().__init__()
        self.weight = as_tensor(weight)  # (experts, hidden)
        self.top_k, self.normalize = top_k, normalize

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (T, hidden) -> weights (T, k), expert ids (T, k)."""
        probs = torch.softmax(F.linear(x, self.weight).float(), dim=-1)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, ids


class GroupedSigmoidRouter(nn.Module):
    """DeepSeek-V3 / Kimi-K2 ("noaux_tc"): sigmoid scores; the choice adds a per-expert correction
    bias and is limited to the `topk_group` best of `n_group` expert groups (a group scores the sum
    of its two best); the weights are the unbiased scores of the chosen experts, renormalised if
    `normalize`, times `scale` (routed_scaling_factor)."""

    def __init__(self, weight: Weight, bias: Weight, top_k: int, n_group: int, topk_group: int, normalize: bool, scale: float):
        super().__init__()
        self.weight = as_tensor(weight)  # (experts, hidden)
        self.bias = as_tensor(bias)  # (experts,) e_score_correction_bias
        self.top_k, self.n_group, self.topk_group = top_k, n_group, topk_group
        self.normalize, self.scale = normalize, scale

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (T, hidden) -> weights (T, k), expert ids (T, k)."""
        scores = torch.sigmoid(F.linear(x.float(), self.weight))  # (T, E)
        choice = scores + self.bias
        if self.n_group > 1 and self.topk_group < self.n_group:
            T, E = choice.shape
            grouped = choice.view(T, self.n_group, E // self.n_group)
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # (T, n_group)
            keep = torch.zeros_like(group_scores, dtype=torch.bool)
            keep.scatter_(1, group_scores.topk(self.topk_group, dim=-1).indices, True)
            choice = grouped.masked_fill(~keep[..., None], float("-inf")).view(T, E)
        ids = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, ids)
        if self.normalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.scale, ids


# ----------------------------------------------------------------------------- experts


class RoutedExperts(nn.Module):
    """The routed experts held by this shard (SwiGLU MLPs), each with gate and up fused.

    `names` are the checkpoint's (gate, up, down) names under `{prefix}.{expert}.`: gate_proj,
    up_proj, down_proj for DeepSeek and Qwen; w1, w3, w2 for Mixtral."""

    kernels = True  # silu·up by the numba kernel on float32 CPU rows; False: torch ops (engine/device.py)

    def __init__(self, w: dict[str, Weight], prefix: str, names: tuple[str, str, str], expert_ids: tuple[int, ...], num_experts: int):
        super().__init__()
        gate, up, down = names
        self.ids = tuple(expert_ids)
        self.lookup = torch.full((num_experts,), -1, dtype=torch.long)  # global id -> local index, -1: elsewhere
        self.lookup[list(self.ids)] = torch.arange(len(self.ids))
        self.gate_up = nn.ModuleList()
        self.down = nn.ModuleList()
        self.hidden = 0
        for e in self.ids:
            g, u = w[f"{prefix}.{e}.{gate}.weight"], w[f"{prefix}.{e}.{up}.weight"]
            self.hidden = g.shape[0]
            self.gate_up.append(dense_or_quant_linear(fuse_rows([g, u])))
            self.down.append(dense_or_quant_linear(w[f"{prefix}.{e}.{down}.weight"]))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x (T, hidden), routing weights and ids (T, k) -> the sum over this shard's experts (T, hidden)."""
        out = torch.zeros_like(x)
        local = self.lookup[ids]  # (T, k)
        h = self.hidden
        for j in torch.unique(local[local >= 0]).tolist():  # ascending expert order, like transformers
            tok, slot = torch.where(local == j)
            gu = self.gate_up[j](x[tok])
            y = self.down[j](silu_mul(gu, h, self.kernels))
            out.index_add_(0, tok, y * weights[tok, slot, None].to(y.dtype))
        return out


class SparseMoE(nn.Module):
    """Router + this shard's routed experts (+ its slice of the shared experts, if the family has them)."""

    def __init__(self, router: nn.Module, experts: RoutedExperts, shared: nn.Module | None = None):
        super().__init__()
        self.router, self.experts, self.shared = router, experts, shared
        self.group = None  # expert-parallel process group, set by the shard's `shard(group)`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.router(x)
        y = self.experts(x, weights, ids)
        if self.shared is not None:
            y = y + self.shared(x)
        # Expert parallel: this rank's experts (and shared columns) give a partial sum of the layer.
        return all_reduce(y, self.group)


def join_moe_group(block: nn.Module, group: Any) -> None:
    """An MoE family's block joining its stage's group. Expert parallel: an MoE layer sums its
    ranks' partial outputs; attention and dense MLPs are whole on every rank. Tensor parallel inside
    the group (`block.tensor`): attention and the MLP (MoE or dense) each sum their ranks' partial
    outputs."""
    if block.tensor:
        block.self_attn.group = group
        block.mlp.group = group
    elif isinstance(block.mlp, SparseMoE):
        block.mlp.group = group


def expert_of(name: str, marker: str = ".experts.") -> int | None:
    """The routed expert id in a tensor name (`...mlp.experts.17.up_proj.weight` -> 17), else None."""
    i = name.find(marker)
    if i < 0:
        return None
    rest = name[i + len(marker) :]
    num = rest.split(".", 1)[0]
    return int(num) if num.isdigit() else None


__all__ = ["split_experts", "SoftmaxRouter", "GroupedSigmoidRouter", "RoutedExperts", "SparseMoE", "expert_of", "join_moe_group"]
