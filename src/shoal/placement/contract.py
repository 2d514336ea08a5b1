"""What the placement planner is asked and what it answers: `PlacementRequest` in, `Placement`
(one `ShardPlan` per rank) or `PlacementError` out. These travel between the daemon, the nodes and
the runners, which need them without the planner itself (see planner.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Strategy = Literal["auto", "single", "pipeline", "tensor", "hybrid", "expert"]


# How a placement holds a checkpoint's float matrices (bf16, fp16, fp32 linear layers and the
# embedding): "stored" keeps bf16 as bf16 (quant/linear.BF16Linear) and fp16/fp32 as float32; "q8"
# holds them as 8-bit codes with a float32 scale per 32 (quant/formats.quantize_sym8: ~1.125 bytes a
# parameter, half of bf16), for a model that would not fit otherwise. Quantized tensors stay as stored.
HeldAs = Literal["stored", "q8"]
# What a group's all-reduces travel on: "shoal", the runners' own encrypted links (any devices); or,
# for a group of MLX nodes that all offer it (NodeProfile.collectives), MLX's ring over TCP, every
# partial sealed (runner/mlx_group.py).
Collective = Literal["shoal", "mlx-ring"]


class PlacementRequest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    strategy: Literal["auto", "pipeline", "tensor", "hybrid", "expert"] = "auto"
    nodes: list[str] | None = None  # node ids, id prefixes or names, in stage order (the first is the entry)
    node_count: int | None = Field(default=None, ge=1)
    context: int | None = Field(default=None, ge=1)  # tokens of KV cache to provide for (default 2048)
    tp_size: int | None = Field(default=None, ge=1)  # hybrid/tensor/expert: ranks per tensor (or expert) group
    prompt_tokens: int = Field(default=128, ge=1)  # prompt length the TTFT prediction is for
    weights: HeldAs = "stored"  # how float (bf16/fp16/fp32) matrices are held; see HeldAs
    collective: Collective = "shoal"  # what the groups' all-reduces travel on; see Collective


class ShardPlan(BaseModel):
    """One rank of a placement: where it runs, what it holds and the memory that takes. What it
    holds becomes the loader's `models.base.Part` on the rank (runner/stage.py); the fields here
    travel between nodes and appear in the JSON API."""

    model_config = ConfigDict(frozen=True)

    node_id: str
    node_name: str
    address: str
    rank: int
    stage: int
    layers: tuple[int, int]  # [start, end)
    tp_rank: int
    tp_size: int
    kv_heads: tuple[int, int]
    ffn: tuple[int, int]
    vocab: tuple[int, int] | None  # rows of embedding/head held here; None: none (not the entry stage)
    weight_bytes: int
    kv_bytes: int  # KV cache for the whole context, this rank's heads and layers
    overhead_bytes: int
    threads: int
    device: str = "cpu"
    experts: tuple[int, int] | None = None  # expert parallel: the routed experts [a, b) held here
    shared: tuple[int, int] | None = None  # expert parallel: the shared experts' columns [a, b) held here
    # Tensor parallel inside an MoE group (planner.TENSOR_MOE families; any family in a dry run): the
    # columns [a, b) of every routed expert's intermediate held here.
    expert_cols: tuple[int, int] | None = None
    # The node's measured-decode correction this rank was priced with (placement/feedback.py): what
    # a measurement of this placement is corrected from.
    decode_correction: float = 1.0

    @property
    def memory_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes + self.overhead_bytes

    @property
    def holds_entry(self) -> bool:
        return self.vocab is not None


class Prediction(BaseModel):
    model_config = ConfigDict(frozen=True)

    decode_tokens_per_s: float
    ttft_s: float
    prompt_tokens: int
    step_s: float  # one decode step of one sequence
    comm_s: float  # of which messages and collectives
    copy_s: float = 0.0  # before it can load: model files copied to the nodes that lack them


class Placement(BaseModel):
    model_config = ConfigDict(frozen=True)

    model: str
    strategy: Strategy
    context: int
    shards: list[ShardPlan]
    prediction: Prediction
    reason: str
    weights: HeldAs = "stored"  # PlacementRequest.weights, which every rank loads by
    collective: Collective = "shoal"  # PlacementRequest.collective, which every group's ranks join by

    def replan_request(self) -> PlacementRequest:
        """What placing this instance afresh asks for (after a loss, or to move it back): its
        context, and how it holds its weights and sums its groups; strategy and nodes are chosen anew."""
        return PlacementRequest(context=self.context, weights=self.weights, collective=self.collective)

    @property
    def stages(self) -> list[list[ShardPlan]]:
        out: list[list[ShardPlan]] = []
        for s in self.shards:
            if s.stage == len(out):
                out.append([])
            out[s.stage].append(s)
        return out

    def memory_by_node(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.shards:
            out[s.node_id] = out.get(s.node_id, 0) + s.memory_bytes
        return out


class PlacementError(Exception):
    """The model cannot be placed as asked; `missing_bytes` > 0 when memory is what is lacking."""

    def __init__(self, message: str, missing_bytes: int = 0):
        super().__init__(message)
        self.missing_bytes = missing_bytes


__all__ = ["Strategy", "PlacementRequest", "ShardPlan", "Prediction", "Placement", "PlacementError"]
