"""Messages about instances: the runner's start configuration and the signed node-to-node control
messages (all pydantic, JSON on the wire, strict like the cluster's own messages)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from shoal.cluster.messages import Message, NodeId, NonNeg, ShortStr
from shoal.placement.planner import Placement, PlacementRequest, ShardPlan

InstanceId = Annotated[str, Field(pattern=r"^[0-9a-f]{16}$")]
RequestId = Annotated[str, Field(pattern=r"^[0-9A-Za-z_-]{1,64}$")]
Status = Literal["reserving", "loading", "ready", "failed", "stopped"]


class RunnerConfig(BaseModel):
    """The first line a runner reads on stdin."""

    model_config = ConfigDict(extra="forbid")

    instance_id: str
    model: str
    rank: int
    shards: list[ShardPlan]
    num_layers: int
    context: int
    master_port: int | None  # rank 0 binds its own; the others are told it
    token: str  # the instance's rendezvous secret
    threads: int
    timeout_s: float = 120.0  # a collective that waits longer than this fails the instance
    rendezvous_timeout_s: float = 600.0  # loading every rank's weights included


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
    token: Annotated[str, Field(min_length=32, max_length=128)]
    coordinator: NodeId


class StartReply(Message):
    ok: bool = True
    port: int | None = None  # rank 0: the rendezvous port


class InstanceRef(Message):
    instance_id: InstanceId


class ShardState(Message):
    """A node tells the coordinator how its shard is doing."""

    instance_id: InstanceId
    rank: NonNeg
    status: Status
    error: ShortStr = ""
    rss_bytes: NonNeg = 0


class ListInstances(Message):
    pass


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
    error: ShortStr = ""
    placement: Placement


class HostedShard(Message):
    instance_id: InstanceId
    rank: NonNeg
    status: Status
    reserved_bytes: NonNeg
    rss_bytes: NonNeg = 0
    stats: dict[str, float] = {}


class ListReply(Message):
    node_id: NodeId
    free_bytes: int  # memory this node can still promise
    reserved_bytes: NonNeg
    instances: Annotated[list[InstanceRecord], Field(max_length=256)]  # the ones it coordinates
    shards: Annotated[list[HostedShard], Field(max_length=256)]  # the ones it runs


class Submit(Message):
    instance_id: InstanceId
    rid: RequestId
    prompt_ids: Annotated[list[int], Field(max_length=1 << 17)] | None = None
    text: Annotated[str, Field(max_length=1 << 20)] | None = None
    messages: Annotated[list[dict[str, Any]], Field(max_length=4096)] | None = None
    params: dict[str, Any] = {}


class Poll(Message):
    instance_id: InstanceId
    rid: RequestId
    after: NonNeg  # events already seen
    wait_s: Annotated[float, Field(ge=0.0, le=30.0)] = 10.0


class PollReply(Message):
    events: list[dict[str, Any]]
    done: bool


class Cancel(Message):
    instance_id: InstanceId
    rid: RequestId


class CreateInstance(BaseModel):
    """Body of POST /v1/instances."""

    model_config = ConfigDict(extra="forbid")

    model: str
    strategy: Literal["auto", "pipeline", "tensor", "hybrid", "expert"] = "auto"
    nodes: list[str] | int | None = None  # names/ids in stage order, or how many
    context: int | None = Field(default=None, ge=1)
    tp_size: int | None = Field(default=None, ge=1)

    def request(self) -> PlacementRequest:
        names = self.nodes if isinstance(self.nodes, list) else None
        count = self.nodes if isinstance(self.nodes, int) else None
        return PlacementRequest(strategy=self.strategy, nodes=names, node_count=count, context=self.context, tp_size=self.tp_size)
