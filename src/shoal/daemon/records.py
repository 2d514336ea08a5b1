"""The state an instances component keeps: memory reservations, the shards a node runs, the
instances it coordinates, and — at an instance's entry — each request with its prompt and tokens.
Plus the public shape of an instance (GET /v1/instances)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

from shoal.daemon.messages import HostedShard, InstanceEvent, InstanceRecord, Status
from shoal.daemon.process import RunnerProcess
from shoal.placement.contract import Placement
from shoal.runner.contract import Failure, SeqStats, Submit, Token


class InstanceError(Exception):
    def __init__(self, status: int, message: str, **extra: Any):
        super().__init__(message)
        self.status, self.extra = status, extra


# -------------------------------------------------------------------------------------------- state
@dataclass
class Reservation:
    instance_id: str
    bytes: int
    coordinator: str
    expires_at: float | None  # None once its runner has started


class RequestLog:
    """One request as its entry node keeps it: the prompt as the entry tokenized it, every token
    streamed so far (what a replay on another placement would need), and how it ended."""

    def __init__(self, rid: str, instance_id: str, request: Submit):
        self.rid, self.instance_id, self.request = rid, instance_id, request
        self.prompt_ids: list[int] | None = None
        self.tokens: list[Token] = []
        self.error: Failure | None = None
        self.stats: SeqStats | None = None
        self.done = False
        self.created_at = time.time()
        self.alone = True  # no other request of its instance ran at the entry while it did
        loop = asyncio.get_running_loop()
        self.answered: asyncio.Future[Failure | None] = loop.create_future()  # None: accepted
        self._changed: asyncio.Future[None] = loop.create_future()

    @property
    def output_ids(self) -> list[int]:
        return [t.token for t in self.tokens if t.token is not None]

    def accepted(self, prompt_ids: list[int]) -> None:
        self.prompt_ids = prompt_ids
        if not self.answered.done():
            self.answered.set_result(None)

    def add(self, tokens: list[Token], stats: SeqStats | None = None) -> None:
        if self.done:
            return
        self.tokens.extend(tokens)
        if stats is not None:
            self.stats = stats
        if tokens and tokens[-1].finish is not None:
            self.done = True
        self._notify()

    def fail(self, error: Failure) -> None:
        """The request ended without finishing (refused before it ran, or failed while running)."""
        if self.done:
            return
        if not self.answered.done():
            self.answered.set_result(error)
        self.error, self.done = error, True
        self._notify()

    def _notify(self) -> None:
        fut, self._changed = self._changed, asyncio.get_running_loop().create_future()
        fut.set_result(None)

    async def wait_after(self, n: int, timeout_s: float) -> None:
        """Until there are more than n tokens, the request is done, or timeout_s passed."""
        if len(self.tokens) > n or self.done:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._changed), timeout_s)


@dataclass
class Hosted:
    """A shard running on this node."""

    instance_id: str
    rank: int
    placement: Placement
    coordinator: str
    runner: RunnerProcess
    epoch: int = 0
    status: Status = "loading"
    error: str = ""
    stopping: bool = False


@dataclass
class Coordinated:
    """An instance this node placed."""

    id: str
    model: str
    placement: Placement
    created_at: float
    status: Status = "loading"
    error: str = ""
    ended_at: float | None = None
    epoch: int = 0
    events: list[InstanceEvent] = field(default_factory=list)
    shard_status: dict[int, Status] = field(default_factory=dict)
    recovering: bool = False  # a recovery task runs
    recover_again: bool = False  # a node was lost while it ran
    replacing: int = -1  # the epoch the running recovery replaces
    planned_on: set[str] | None = None  # the nodes the running recovery plans on (None: not planned yet)
    recovery_started: float = 0.0  # monotonic
    recoveries_in_row: int = 0  # since it was last ready
    exclude: set[str] = field(default_factory=set)  # nodes that are leaving: never placed on again
    degraded: bool = False
    # Placed by the planner's own choice (strategy auto, no nodes named), or re-placed by a recovery:
    # only then may a better plan replace it. A placement someone asked for stays as asked.
    planner_chose: bool = True

    KEEP_EVENTS = 32

    @property
    def ended(self) -> bool:
        return self.status in ("failed", "stopped")

    def end(self, status: Status, error: str = "") -> None:
        self.status, self.error, self.ended_at = status, error or self.error, time.time()

    def event(self, text: str) -> None:
        self.events = [*self.events, InstanceEvent(at=time.time(), text=text[:512])][-self.KEEP_EVENTS :]

    def record(self, node_id: str) -> InstanceRecord:
        entry = self.placement.shards[0]
        return InstanceRecord(id=self.id, model=self.model, strategy=self.placement.strategy, status=self.status,
                              coordinator=node_id, entry=entry.node_id, entry_address=entry.address,
                              created_at=self.created_at, ended_at=self.ended_at, error=self.error[:1024],
                              placement=self.placement, epoch=self.epoch, events=self.events, degraded=self.degraded)

    @classmethod
    def adopt(cls, rec: InstanceRecord) -> Coordinated:
        """The instance of a lost coordinator, taken over (it is re-placed under a new epoch, so
        with a new secret)."""
        return cls(rec.id, rec.model, rec.placement, rec.created_at, rec.status, rec.error, None, rec.epoch,
                   list(rec.events))


def public_instance(rec: InstanceRecord, shards: dict[tuple[str, int], HostedShard] | None = None) -> dict[str, Any]:
    """The shape GET /v1/instances promises, plus the plan's details."""
    shards = shards or {}
    out_shards = []
    for s in rec.placement.shards:
        live = shards.get((rec.id, s.rank))
        out_shards.append({
            "node_id": s.node_id, "node_name": s.node_name, "rank": s.rank, "stage": s.stage,
            "layers": list(s.layers), "tp_rank": s.tp_rank, "tp_size": s.tp_size,
            "kv_heads": list(s.kv_heads), "ffn": list(s.ffn), "planned_bytes": s.memory_bytes,
            "weight_bytes": s.weight_bytes,
            "experts": list(s.experts) if s.experts else None, "shared": list(s.shared) if s.shared else None,
            "expert_cols": list(s.expert_cols) if s.expert_cols else None,
            "status": live.status if live else None, "rss_bytes": live.rss_bytes if live else None,
            "stats": live.stats.model_dump(exclude={"kind"}) if live and live.stats else {},
        })
    return {
        "id": rec.id, "model": rec.model, "strategy": rec.strategy, "status": rec.status, "shards": out_shards,
        "error": rec.error or None, "entry": rec.entry, "coordinator": rec.coordinator, "created_at": rec.created_at,
        "ended_at": rec.ended_at, "epoch": rec.epoch, "degraded": rec.degraded, "events": [e.model_dump() for e in rec.events],
        "context": rec.placement.context, "prediction": rec.placement.prediction.model_dump(), "reason": rec.placement.reason,
        "weights": rec.placement.weights, "collective": rec.placement.collective,
    }
