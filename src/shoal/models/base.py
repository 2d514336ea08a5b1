"""What every architecture's shard shares: the part of a model a process holds (`Part`), the flat
batch (`BatchLayout`), the one collective (`all_reduce`), the helpers that cut a checkpoint tensor
to a rank's share, and the shell of a shard (`Shard`: embedding, blocks, final norm and head).

The architecture files (`llama.py`, `mixtral.py`, `deepseek.py`) build their blocks and say how
their tensors are cut; the shell runs them. The forward works on a *flat* batch: the new tokens of
every sequence in the batch are concatenated along one axis, so every linear layer reads its weights
once per step however many sequences are decoding; attention alone loops over sequences (each has
its own cache, so sequences can join and leave between steps — what continuous batching needs).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shoal.kernels import attention, norm
from shoal.kernels.direct import DirectModule
from shoal.quant.formats import QuantizedWeight
from shoal.quant.kernels import dequantize, gather_rows
from shoal.quant.linear import dense_or_quant_linear

Weight = torch.Tensor | np.ndarray | QuantizedWeight


# ----------------------------------------------------------------------------- what a rank holds


@dataclass(frozen=True)
class Part:
    """The part of a model one process holds; a whole model in one process is `Part()`.

    Layers [start, end) of the model's `num_layers`, with the embedding where `embed` and the final
    norm and head where `head`: by default the first stage holds the embedding and the last the
    head; a distributed placement puts both on its entry stage instead, so that only hidden states,
    not logits, travel back to it. Where a stage is a group of `size` ranks, rank `rank` holds of
    each of its layers, with tensor parallelism, the KV heads [kv_heads) with their query heads and
    the MLP columns [ffn); with expert parallelism, the routed experts `experts` (global ids, any
    subset) and the shared experts' columns [shared); with tensor parallelism inside an MoE group
    (`expert_cols`), the KV heads [kv_heads) and the columns [expert_cols) of every routed expert.
    Either way an entry rank holds the rows [vocab) of the embedding and head. None means all of it."""

    start: int = 0
    end: int | None = None  # None: through the last layer
    num_layers: int | None = None  # None: the checkpoint's (`resolve` fills it in)
    embed: bool | None = None  # None: iff start == 0
    head: bool | None = None  # None: iff end == num_layers
    rank: int = 0
    size: int = 1
    kv_heads: tuple[int, int] | None = None
    ffn: tuple[int, int] | None = None
    experts: tuple[int, ...] | None = None
    shared: tuple[int, int] | None = None
    vocab: tuple[int, int] | None = None
    expert_cols: tuple[int, int] | None = None

    @classmethod
    def whole(cls, num_layers: int) -> "Part":
        return cls(0, num_layers, num_layers)

    def resolve(self, num_layers: int, vocab_size: int) -> "Part":
        """This part of a model of `num_layers` layers and `vocab_size` tokens: the layer count
        and range filled in and checked, a vocabulary range that covers every row made None."""
        if self.num_layers is not None and self.num_layers != num_layers:
            raise ValueError(f"the part was planned for {self.num_layers} layers, the checkpoint has {num_layers}")
        end = num_layers if self.end is None else self.end
        if not 0 <= self.start < end <= num_layers:
            raise ValueError(f"layer range [{self.start}, {end}) is outside the model's {num_layers} layers")
        vocab = None if self.vocab is not None and tuple(self.vocab) == (0, vocab_size) else self.vocab
        return replace(self, end=end, num_layers=num_layers, vocab=vocab)

    @property
    def is_first(self) -> bool:
        return self.start == 0

    @property
    def is_last(self) -> bool:
        return self.end is None or self.end == self.num_layers

    @property
    def has_embedding(self) -> bool:
        return self.is_first if self.embed is None else self.embed

    @property
    def has_head(self) -> bool:
        return self.is_last if self.head is None else self.head

    @property
    def layer_prefixes(self) -> tuple[str, ...]:
        """The checkpoint name prefixes of this part's layers (`model.layers.{i}.`)."""
        return tuple(f"model.layers.{i}." for i in range(self.start, self.end))


def ends_required(args: Any, part: Part, available: list[str]) -> list[str]:
    """The tensors of the embedding and the final norm and head that a part holds (a tied head
    is the embedding)."""
    need = []
    if part.has_embedding:
        need.append("model.embed_tokens.weight")
    if part.has_head:
        need.append("model.norm.weight")
        if "lm_head.weight" in available and not args.tie_word_embeddings:
            need.append("lm_head.weight")
        else:
            need.append("model.embed_tokens.weight")
    return need


def slice_mlp(name: str, w: Weight, a: int, b: int) -> Weight:
    """A gated MLP's tensor cut to the intermediate columns [a, b): gate and up by rows (output
    features), down by columns (input features)."""
    if name.endswith(("gate_proj.weight", "up_proj.weight")):
        return slice_rows(w, a, b)
    if name.endswith("down_proj.weight"):
        return slice_cols(w, a, b)
    return w


def slice_ends(part: Part, name: str, w: Weight) -> Weight:
    """The embedding and head cut to the part's vocabulary rows; any other tensor as it is."""
    if part.vocab is not None and name in ("model.embed_tokens.weight", "lm_head.weight"):
        return slice_rows(w, *part.vocab)
    return w


# ----------------------------------------------------------------------------- the flat batch


@dataclass
class BatchLayout:
    """How the flat batch splits into sequences: `lengths[i]` new tokens of sequence i, in order."""

    lengths: list[int]
    positions: torch.Tensor  # (T,) absolute position of every token in the flat batch
    caches: list[list[Any]] = field(default_factory=list)  # [sequence][layer of this shard]: KVCache or MLACache

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

    @cached_property
    def decode_only(self) -> attention.DecodeBatch | None:
        """The decode batch when every sequence of the step decodes (one new token each), else None."""
        return self.decode_batch if len(self.decoding) == len(self.lengths) else None


def all_reduce(x: torch.Tensor, group: Any | None) -> torch.Tensor:
    """Sum x in place over a parallel group (a torch.distributed backend); no-op without one."""
    if group is not None:
        group.allreduce([x]).wait()
    return x


# ----------------------------------------------------------------------------- cutting weights


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
        return torch.from_numpy(dequantize(w))
    if isinstance(w, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))
    return w.float()


# ----------------------------------------------------------------------------- shared layers


class RMSNorm(DirectModule):
    kernels = True  # the numba kernel for float32 CPU rows; False: torch's op (engine/device.py)

    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps
        self._weight = weight.float().contiguous().numpy()  # the kernel's view of it (same memory when float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.kernels or x.dtype != torch.float32 or x.device.type != "cpu":
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return norm.rms_norm(x, self._weight, self.eps)


class Embedding(nn.Module):
    """Token embedding; with a vocabulary slice [v0, v1) it returns zeros for tokens outside it,
    and the group's all-reduce assembles the full rows."""

    def __init__(self, weight: Weight, vocab: tuple[int, int] | None = None):
        super().__init__()
        self.quantized = weight if isinstance(weight, QuantizedWeight) else None
        # bf16 rows stay bf16 (widened as they are looked up), like the linear layers' weights.
        bf16 = isinstance(weight, torch.Tensor) and weight.dtype == torch.bfloat16
        self.weight = None if self.quantized is not None else weight if bf16 else as_tensor(weight)
        self.vocab = vocab
        self.group = None  # set by Shard.shard

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
        rows = F.embedding(ids, self.weight)
        return rows.float() if rows.device.type == "cpu" else rows  # the CPU engine computes in float32


class Block(DirectModule):
    """A pre-norm decoder block: attention and MLP, each added to the residual stream. An
    architecture's block builds `input_layernorm`, `self_attn`, `post_attention_layernorm` and
    `mlp`, and says in `shard(group)` which of them end in an all-reduce over the stage's group."""

    input_layernorm: RMSNorm
    self_attn: nn.Module
    post_attention_layernorm: RMSNorm
    mlp: nn.Module

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: BatchLayout, layer: int) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, layout, layer)
        return h + self.mlp(self.post_attention_layernorm(h))

    def shard(self, group: Any) -> None:
        raise NotImplementedError


# ----------------------------------------------------------------------------- the shell


class Shard(nn.Module):
    """Layers [part.start, part.end) of a model; the embedding if the part holds it, the final norm
    and head if it holds them.

    An architecture's shard builds, after this constructor, `rope` (a module: positions (T,) ->
    cos, sin) and `layers` (`Block`s, called as `block(h, cos, sin, layout, i)`), and makes the
    caches (`make_cache`). The weights come already cut to the part (see each architecture's
    `slice_weight`)."""

    layers: nn.ModuleList
    rope: nn.Module
    # Where it computes (engine/device.py): None is the numba engine on the host's CPU cores.
    torch_device: torch.device | None = None
    compute_dtype: torch.dtype = torch.float32

    def __init__(self, args: Any, part: Part, weights: dict[str, Weight]):
        super().__init__()
        self.args = args
        self.part = part = part.resolve(args.num_hidden_layers, args.vocab_size)
        self.embed_tokens = Embedding(weights["model.embed_tokens.weight"], part.vocab) if part.has_embedding else None
        self.norm = self.lm_head = None
        if part.has_head:
            self.norm = RMSNorm(as_tensor(weights["model.norm.weight"]), args.rms_norm_eps)
            head = weights.get("lm_head.weight")
            if head is None or args.tie_word_embeddings:
                head = weights["model.embed_tokens.weight"]
            self.lm_head = dense_or_quant_linear(head)

    def shard(self, group: Any | None) -> "Shard":
        """Join the stage's group (a torch.distributed backend over its ranks, in `Part.rank`
        order): a vocabulary-split embedding sums its rows over it, and each block names the
        layers that end in an all-reduce (`Block.shard`). With one rank there is nothing to join."""
        if self.part.size == 1:
            return self
        if self.embed_tokens is not None:
            self.embed_tokens.group = group
        for layer in self.layers:
            layer.shard(group)
        return self

    def make_cache(self) -> list[Any]:
        """One cache per layer of this shard, for one sequence."""
        raise NotImplementedError

    def cache_options(self) -> dict[str, Any]:
        """The dtype and device of this shard's caches (a torch device's caches are torch's alone)."""
        return {} if self.torch_device is None else {"dtype": self.compute_dtype, "device": self.torch_device}

    # Each step of the forward takes its input from the host and gives its output to the host in
    # float32, whatever device computes it (engine/device.py): the sampler, the runner and the wire
    # between stages see one format. `forward` chains the steps on the device.

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (T,) -> hidden states (T, hidden)."""
        return self._to_host(self._embed(ids))

    def run_layers(self, h: torch.Tensor, layout: BatchLayout) -> torch.Tensor:
        """Hidden states (T, hidden) through this shard's layers."""
        return self._to_host(self._run_layers(self._in(h), layout))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and head of some rows (R, hidden) -> logits (R, vocab rows held here)."""
        return self._to_host(self.lm_head(self.norm(self._in(h))))

    def forward(self, x: torch.Tensor, layout: BatchLayout, logit_rows: torch.Tensor | None = None) -> torch.Tensor:
        """x: token ids (T,) on the first shard, hidden states (T, hidden) otherwise.

        Returns hidden states (T, hidden) on a middle shard; on the last shard, logits (R, vocab)
        for the rows `logit_rows` of the flat batch (default: each sequence's last token)."""
        h = self._embed(x) if self.embed_tokens is not None else self._in(x)
        h = self._run_layers(h, layout)
        if self.lm_head is None:
            return self._to_host(h)
        if logit_rows is None:
            logit_rows = torch.tensor(np.cumsum(layout.lengths) - 1)
        return self._to_host(self.lm_head(self.norm(h[logit_rows.to(h.device)])))

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(ids if self.torch_device is None else ids.to(self.torch_device))

    def _run_layers(self, h: torch.Tensor, layout: BatchLayout) -> torch.Tensor:
        positions = layout.positions if self.torch_device is None else layout.positions.to(self.torch_device)
        cos, sin = self.rope(positions)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, layout, i)
        return h

    def _in(self, h: torch.Tensor) -> torch.Tensor:
        return h if self.torch_device is None else h.to(self.torch_device, self.compute_dtype)

    def _to_host(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.torch_device is None else t.to("cpu", torch.float32)


__all__ = [
    "Weight", "Part", "ends_required", "slice_mlp", "slice_ends", "BatchLayout", "all_reduce", "slice_rows", "slice_cols",
    "as_tensor", "RMSNorm", "Embedding", "Block", "Shard",
]
