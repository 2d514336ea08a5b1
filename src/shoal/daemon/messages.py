"""The signed node-to-node messages about instances (pydantic, JSON on the wire, strict like the
cluster's own messages). A request travels inside them as the runner contract's own types, so it is
one typed object from the API node to the entry runner and back."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from shoal.cluster.messages import Message, NodeId, NonNeg, ShortStr
from shoal.placement.contract import Collective, HeldAs, Placement, PlacementRequest
from shoal.runner.contract import (
    Failure,
    RequestId,
    SeqStats,
    StageStats,
    Submit,
    Token,
)

InstanceId = Annotated[str, Field(pattern=r"^[0-9a-f]{16}$")]
Status = Literal["reserving", "loading", "ready", "recovering", "failed", "stopped"]
Epoch = Annotated[int, Field(ge=0, le=1 << 30)]  # an instance's placement generation: +1 each recovery


# -- peer messages -----------------------------------------------------------------------------------
class Reserve(Message):
    instance_id: InstanceId
    model: ShortStr
    bytes: NonNeg
    coordinator: NodeId


class ReserveReply(Message):
    ok: bool
    free_bytes: int  # what was free before this reservation
    error: ShortStr = ""


class StartShard(Message):
    instance_id: InstanceId
    model: ShortStr
    rank: NonNeg
    placement: Placement
    master_port: int | None = None
    coordinator: NodeId  # with the id and epoch, names the placement's wire secret (derived here, never sent)
    epoch: Epoch = 0


class StartReply(Message):
    ok: bool = True
    port: int | None = None  # rank 0: the rendezvous port


class InstanceRef(Message):
    instance_id: InstanceId
    # With a stop: the placement it is about. Shards of a newer one (a successor coordinator's,
    # after a partition healed) are not the sender's to stop.
    epoch: Epoch | None = None
    keep_reservation: bool = False  # a stop for a move whose new shard here already has its memory


class ShardState(Message):
    """A node tells the coordinator how its shard is doing."""

    instance_id: InstanceId
    rank: NonNeg
    status: Status
    error: ShortStr = ""
    rss_bytes: NonNeg = 0
    epoch: Epoch = 0  # the placement the shard belongs to: reports about an older one are stale


class ListInstances(Message):
    pass


class InstanceEvent(Message):
    at: float  # unix time
    text: Annotated[str, Field(max_length=512)]


class InstanceRecord(Message):
    """An instance as its coordinator knows it (and as GET /v1/instances shows it)."""

    id: InstanceId
    model: ShortStr
    strategy: ShortStr
    status: Status
    coordinator: NodeId
    entry: NodeId
    entry_address: ShortStr
    created_at: float
    ended_at: float | None = None  # when it stopped or failed
    error: Annotated[str, Field(max_length=1024)] = ""
    placement: Placement
    epoch: Epoch = 0
    events: Annotated[list[InstanceEvent], Field(max_length=64)] = []  # what happened to it, oldest first
    degraded: bool = False  # runs on a plan predicted much slower than the best the cluster now allows


class HostedShard(Message):
    instance_id: InstanceId
    rank: NonNeg
    status: Status
    reserved_bytes: NonNeg
    rss_bytes: NonNeg = 0
    stats: StageStats | None = None
    active_requests: NonNeg = 0  # rank 0: requests its entry is serving now
    idle_s: float = 0.0  # rank 0: seconds since its last request ended (0 while one runs)


class CopyState(Message):
    """A copy of model files under way on a node (weights.py)."""

    model: ShortStr
    source: ShortStr  # the node it copies from, by name
    done_bytes: NonNeg
    total_bytes: NonNeg


class ListReply(Message):
    node_id: NodeId
    free_bytes: int  # memory this node can still promise
    reserved_bytes: NonNeg
    instances: Annotated[list[InstanceRecord], Field(max_length=256)]  # the ones it coordinates
    shards: Annotated[list[HostedShard], Field(max_length=256)]  # the ones it runs
    copies: Annotated[list[CopyState], Field(max_length=64)] = []  # model files it is fetching now


class SubmitRequest(Message):
    """A request for the entry of an instance on another node."""

    instance_id: InstanceId
    request: Submit


class SubmitReply(Message):
    """Whether the entry's scheduler took the request (else why not: a 4xx, or 429 with Retry-After)."""

    accepted: bool
    prompt_tokens: NonNeg = 0
    error: Failure | None = None


class Poll(Message):
    instance_id: InstanceId
    rid: RequestId
    after: NonNeg  # tokens already seen
    wait_s: Annotated[float, Field(ge=0.0, le=30.0)] = 10.0


class PollReply(Message):
    tokens: list[Token]
    done: bool
    error: Failure | None = None  # the request ended without finishing
    stats: SeqStats | None = None  # once done


class Leave(Message):
    """Asks a node to drain (move the shards it hosts elsewhere) and exit, as SIGTERM would."""


class DrainNode(Message):
    """A node that is leaving asks the coordinators of the instances it hosts to move them."""

    node_id: NodeId


class Cancel(Message):
    instance_id: InstanceId
    rid: RequestId


class HandOver(Message):
    """A coordinator that is leaving gives an instance, as it runs, to the node that takes its place."""

    record: InstanceRecord


class WeightsManifest(Message):
    """Which files make up a model, on a node that has them."""

    model: ShortStr


class WeightFile(Message):
    name: Annotated[str, Field(min_length=1, max_length=255, pattern=r"^[^./\\\x00][^/\\\x00]*$")]  # a name, never a path
    size: NonNeg
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class WeightsManifestReply(Message):
    folder: bool  # the model is a folder of these files (else the one file)
    files: Annotated[list[WeightFile], Field(max_length=256)]


class WeightsRead(Message):
    """A slice of one of a model's files (answered with the bytes themselves)."""

    model: ShortStr
    file: Annotated[str, Field(min_length=1, max_length=255)]
    offset: NonNeg
    length: Annotated[int, Field(ge=1, le=1 << 20)]


class HasWeights(Message):
    model: ShortStr


class HasWeightsReply(Message):
    has: bool
    bytes: NonNeg = 0


class CopyWeights(Message):
    """Get a model's files from one of `sources` before a shard of it starts here."""

    instance_id: InstanceId  # whose reservation here the copy is for
    model: ShortStr
    sources: Annotated[list[NodeId], Field(max_length=64)]


class CreateInstance(BaseModel):
    """Body of POST /v1/instances."""

    model_config = ConfigDict(extra="forbid")

    model: str
    strategy: Literal["auto", "pipeline", "tensor", "hybrid", "expert"] = "auto"
    nodes: list[str] | int | None = None  # names/ids in stage order, or how many
    context: int | None = Field(default=None, ge=1)
    tp_size: int | None = Field(default=None, ge=1)
    replica: bool = False  # place another instance even if the model already has a ready one
    weights: HeldAs = "stored"  # "q8": float matrices held as 8-bit (placement/contract.HeldAs)
    collective: Collective = "shoal"  # what the groups' all-reduces travel on (placement/contract.Collective)

    def request(self) -> PlacementRequest:
        names = self.nodes if isinstance(self.nodes, list) else None
        count = self.nodes if isinstance(self.nodes, int) else None
        return PlacementRequest(strategy=self.strategy, nodes=names, node_count=count, context=self.context, tp_size=self.tp_size,
                                weights=self.weights, collective=self.collective)
