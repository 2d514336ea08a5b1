"""The host role: what a node does for every instance that has a shard on it.

It holds memory reservations — checked and taken on the node's one event loop, so two coordinators
placing at the same moment can never both get the same bytes — starts and supervises the runner
processes, and reports each shard's state to the instance's coordinator (`report`). Events about
requests go to whoever `on_request_event` names (the entry host).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from shoal.cluster.auth import subkey
from shoal.daemon.messages import (
    HostedShard,
    Reserve,
    ReserveReply,
    ShardState,
    StartReply,
    StartShard,
)
from shoal.daemon.process import RunnerProcess
from shoal.daemon.records import Hosted, InstanceError, Reservation
from shoal.runner.contract import (
    Accepted,
    Failed,
    Fatal,
    GetStats,
    Ready,
    Refused,
    RunnerConfig,
    RunnerEvent,
    Tokens,
)
from shoal.runner.wire import instance_secret

log = logging.getLogger("shoal.instances")

RESERVATION_TTL_S = 120.0  # a reservation whose runner never starts is given back after this
PORT_TIMEOUT_S = 30.0

RequestEvent = Accepted | Refused | Tokens | Failed


class Host:
    def __init__(self, node_id: str, home: Path, memory_limit_bytes: int | None, runner_env: dict[str, str],
                 report: Callable[[Hosted, ShardState], None], kv_budget_bytes: int | None = None, *, cluster_key: str,
                 device: str = "cpu"):
        self.node_id, self.home, self.memory_limit_bytes = node_id, home, memory_limit_bytes
        # Each placement's wire secret is derived from this here, never received (runner/wire.py).
        self._wire_root = subkey(cluster_key, "instance wire")
        self.kv_budget_bytes = kv_budget_bytes  # for the entries that run here
        self.device = device  # where the shards hosted here compute (engine/device.py)
        self.card_bytes = None  # a card's memory is what shards on it use, not the host's
        if device.startswith("cuda"):
            from shoal.engine.device import card_memory

            self.card_bytes = card_memory(device)
        self.runner_env = runner_env
        self.report_to_coordinator = report
        self.hosted: dict[tuple[str, int], Hosted] = {}
        self.reservations: dict[str, Reservation] = {}
        self.on_request_event: Callable[[Hosted, RequestEvent], None] = lambda h, ev: None
        self.on_runner_gone: Callable[[Hosted], None] = lambda h: None
        self.on_instance_stopped: Callable[[str], None] = lambda iid: None
        self.draining = False  # leaving: no new shards here

    # -- memory
    def free_bytes(self) -> int:
        """What this node can still promise: its offer (RAM available, capped by --memory-limit)
        less its reservations. Runners' resident memory is added back to what is available, since
        their reservations already count it."""
        self._expire_reservations()
        if self.card_bytes is not None:
            return self.card_bytes - self.reserved_bytes()
        avail = psutil.virtual_memory().available + sum(h.runner.rss for h in self.hosted.values() if h.runner.running)
        cap = avail if self.memory_limit_bytes is None else min(avail, self.memory_limit_bytes)
        return cap - self.reserved_bytes()

    def reserved_bytes(self) -> int:
        return sum(r.bytes for r in self.reservations.values())

    def _expire_reservations(self) -> None:
        now = time.monotonic()
        for iid, r in list(self.reservations.items()):
            if r.expires_at is not None and now > r.expires_at:
                log.info("reservation of %s for %s expired unused", mib(r.bytes), iid)
                del self.reservations[iid]

    def reserve(self, msg: Reserve) -> ReserveReply:
        free = self.free_bytes()
        if self.draining:
            return ReserveReply(ok=False, free_bytes=0, error="this node is leaving")
        held = self.reservations.get(msg.instance_id)
        if held is not None:  # a re-placement of the same instance: its new share replaces the old
            free += held.bytes
            if msg.bytes > free:
                return ReserveReply(ok=False, free_bytes=free, error=f"needs {mib(msg.bytes)}, {mib(max(free, 0))} free")
            held.bytes, held.coordinator = msg.bytes, msg.coordinator
            for h in self.hosted.values():  # a hand-over: its shards here report to the new coordinator
                if h.instance_id == msg.instance_id:
                    h.coordinator = msg.coordinator
            return ReserveReply(ok=True, free_bytes=free)
        if msg.bytes > free:
            return ReserveReply(ok=False, free_bytes=free, error=f"needs {mib(msg.bytes)}, {mib(max(free, 0))} free")
        self.reservations[msg.instance_id] = Reservation(msg.instance_id, msg.bytes, msg.coordinator,
                                                         time.monotonic() + RESERVATION_TTL_S)
        return ReserveReply(ok=True, free_bytes=free)

    def release(self, iid: str) -> None:
        if not any(h.instance_id == iid for h in self.hosted.values()):
            self.reservations.pop(iid, None)

    # -- runners
    async def start(self, msg: StartShard) -> StartReply:
        key = (msg.instance_id, msg.rank)
        res = self.reservations.get(msg.instance_id)
        if res is None:
            raise InstanceError(409, "no memory is reserved here for this instance (expired?)")
        from shoal.engine.loader import ModelNotFound, check_network_reference

        try:  # a peer, too, names only models this node would serve to a client
            check_network_reference(msg.model)
        except ModelNotFound as e:
            raise InstanceError(404, str(e)) from None
        if res.coordinator != msg.coordinator:
            raise InstanceError(403, "this instance's memory was reserved by another coordinator")
        old = self.hosted.get(key)
        if old is not None and old.epoch < msg.epoch:  # a recovery's new placement: the old shard goes first
            old.stopping = True
            await old.runner.stop(grace_s=0.5)
            self.hosted.pop(key, None)
        if key in self.hosted:
            raise InstanceError(409, "this shard is already running")
        res.expires_at = None
        shard = msg.placement.shards[msg.rank]
        cfg = RunnerConfig(instance_id=msg.instance_id, model=msg.model, rank=msg.rank, shards=msg.placement.shards,
                           num_layers=max(s.layers[1] for s in msg.placement.shards), context=msg.placement.context,
                           master_port=msg.master_port, threads=shard.threads,
                           secret=instance_secret(self._wire_root, msg.instance_id, msg.epoch, msg.coordinator).hex(),
                           kv_budget_bytes=self.kv_budget_bytes if msg.rank == 0 else None, device=self.device,
                           weights=msg.placement.weights, collective=msg.placement.collective)
        log_path = self.home / "runners" / f"{msg.instance_id}-{msg.rank}.log"
        hosted: Hosted | None = None

        def on_event(ev: RunnerEvent) -> None:
            assert hosted is not None
            self._on_runner_event(hosted, ev)

        def on_exit(code: int | None) -> None:
            assert hosted is not None
            self._on_runner_exit(hosted, code)

        runner = RunnerProcess(cfg, log_path, on_event, on_exit, self.runner_env)
        hosted = Hosted(msg.instance_id, msg.rank, msg.placement, msg.coordinator, runner, msg.epoch)
        self.hosted[key] = hosted
        try:
            await runner.start()
        except OSError as e:
            self.hosted.pop(key, None)
            raise InstanceError(500, f"the runner could not be started: {e}") from None
        log.info("started rank %d of %s (%s, layers %s, tp %d/%d), pid %s", msg.rank, msg.instance_id, msg.model,
                 shard.layers, shard.tp_rank, shard.tp_size, runner.pid)
        if msg.rank != 0:
            return StartReply()
        assert runner.port is not None
        try:
            port = await asyncio.wait_for(asyncio.shield(runner.port), PORT_TIMEOUT_S)
        except (TimeoutError, RuntimeError) as e:
            await runner.stop(grace_s=0.5)
            raise InstanceError(500, f"the entry runner did not start: {e or 'timeout'}") from None
        return StartReply(port=port)

    def _on_runner_event(self, h: Hosted, ev: RunnerEvent) -> None:
        if isinstance(ev, (Accepted, Refused, Tokens, Failed)):
            self.on_request_event(h, ev)
        elif isinstance(ev, Ready):
            h.status = "ready"
            self._report(h)
        elif isinstance(ev, Fatal):
            h.error = ev.message[:256]

    def _on_runner_exit(self, h: Hosted, code: int | None) -> None:
        if self.hosted.get((h.instance_id, h.rank)) is h:
            self.hosted.pop((h.instance_id, h.rank))
        if not any(o.instance_id == h.instance_id for o in self.hosted.values()) and not h.stopping:
            self.reservations.pop(h.instance_id, None)  # the node's last shard of it: memory is free
        if h.stopping:
            h.status = "stopped"
        else:
            h.status = "failed"
            h.error = h.error or f"runner exited with code {code}"
            log.warning("rank %d of %s: %s", h.rank, h.instance_id, h.error)
        self.on_runner_gone(h)
        self._report(h)

    def _report(self, h: Hosted) -> None:
        self.report_to_coordinator(h, ShardState(instance_id=h.instance_id, rank=h.rank, status=h.status,
                                                 error=h.error[:256], rss_bytes=h.runner.rss, epoch=h.epoch))

    async def stop(self, iid: str, epoch: int | None = None, keep_reservation: bool = False) -> None:
        """Stop this node's shards of an instance (the entry first: it stops its group) and free its
        memory; with `epoch`, only the shards of that placement or older ones. `keep_reservation`:
        the memory stays reserved for the instance's next placement (a move reserved it already)."""
        mine = sorted((h for h in self.hosted.values() if h.instance_id == iid), key=lambda h: h.rank)
        if epoch is not None and any(h.epoch > epoch for h in mine):
            log.warning("not stopping instance %s: this node runs a newer placement of it (epoch %d > %d)", iid,
                        max(h.epoch for h in mine), epoch)
            return
        for h in mine:
            h.stopping = True
        await asyncio.gather(*(h.runner.stop() for h in mine), return_exceptions=True)
        held = self.reservations.get(iid)
        if keep_reservation and held is not None:
            held.expires_at = time.monotonic() + RESERVATION_TTL_S  # given back if the new shard never starts
        else:
            self.reservations.pop(iid, None)
        self.on_instance_stopped(iid)

    async def stop_all(self) -> None:
        hosted = sorted(self.hosted.values(), key=lambda h: h.rank)
        for h in hosted:
            h.stopping = True
        await asyncio.gather(*(h.runner.stop(grace_s=0.5) for h in hosted), return_exceptions=True)

    # -- listing
    def shard(self, h: Hosted) -> HostedShard:
        res = self.reservations.get(h.instance_id)
        return HostedShard(instance_id=h.instance_id, rank=h.rank, status=h.status,
                           reserved_bytes=res.bytes if res else 0, rss_bytes=h.runner.rss, stats=h.runner.stats)

    def shards(self) -> list[HostedShard]:
        for h in self.hosted.values():  # fresh counters for the next listing
            if h.status == "ready":
                h.runner.send(GetStats())
        return [self.shard(h) for h in self.hosted.values()]


def mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"
