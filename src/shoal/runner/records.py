"""The state an instances component keeps: memory reservations, the shards a node runs, the
instances it coordinates, and — at an instance's entry — each request with its prompt and tokens.
Plus the public shape of an instance (GET /v1/instances)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

from shoal.placement.planner import Placement
from shoal.runner.messages import HostedShard, InstanceRecord, Status
from shoal.runner.process import RunnerProcess


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
    """One request as its entry node keeps it: prompt, tokens so far, and the events to stream."""

    def __init__(self, rid: str, instance_id: str, params: dict[str, Any]):
        self.rid, self.instance_id, self.params = rid, instance_id, params
        self.prompt_ids: list[int] | None = None
        self.output_ids: list[int] = []
        self.events: list[dict[str, Any]] = []
        self.done = False
        self.created_at = time.time()
        self._changed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def add(self, ev: dict[str, Any]) -> None:
        if self.done:
            return
        kind = ev.get("t")
        if kind == "accepted":
            self.prompt_ids = ev.get("prompt_ids")
            return
        if kind == "ev" and ev.get("token") is not None:
            self.output_ids.append(int(ev["token"]))
        self.events.append({k: v for k, v in ev.items() if k not in ("t", "rid")} if kind == "ev" else
                           {"error": ev.get("message", "failed")})
        if kind != "ev" or ev.get("finish") is not None:
            self.done = True
        self._notify()

    def fail(self, message: str) -> None:
        self.add({"t": "error", "message": message})

    def _notify(self) -> None:
        fut, self._changed = self._changed, asyncio.get_running_loop().create_future()
        fut.set_result(None)

    async def wait_after(self, n: int, timeout_s: float) -> None:
        """Until there are more than n events, the request is done, or timeout_s passed."""
        if len(self.events) > n or self.done:
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
    status: Status = "loading"
    error: str = ""
    stopping: bool = False
    requests: dict[str, RequestLog] = field(default_factory=dict)  # rank 0 only


@dataclass
class Coordinated:
    """An instance this node placed."""

    id: str
    model: str
    placement: Placement
    token: str
    created_at: float
    status: Status = "loading"
    error: str = ""
    shard_status: dict[int, Status] = field(default_factory=dict)

    def record(self, node_id: str) -> InstanceRecord:
        entry = self.placement.shards[0]
        return InstanceRecord(id=self.id, model=self.model, strategy=self.placement.strategy, status=self.status,
                              coordinator=node_id, entry=entry.node_id, entry_address=entry.address,
                              created_at=self.created_at, error=self.error[:256], placement=self.placement)


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
            "status": live.status if live else None, "rss_bytes": live.rss_bytes if live else None,
            "stats": live.stats if live else {},
        })
    return {
        "id": rec.id, "model": rec.model, "strategy": rec.strategy, "status": rec.status, "shards": out_shards,
        "error": rec.error or None, "entry": rec.entry, "coordinator": rec.coordinator, "created_at": rec.created_at,
        "context": rec.placement.context, "prediction": rec.placement.prediction.model_dump(), "reason": rec.placement.reason,
    }
