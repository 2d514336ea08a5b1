"""Link measurement: round-trip time and throughput between every pair of up nodes.

Each pair is measured by its lower node id only (one author per link, half the probe traffic) and
the result travels to the other nodes with gossip. A measurement is:

- RTT: the median of `pings` small signed /peer/probe-ping round trips after one warm-up (so
  connection set-up is not counted);
- throughput: one timed, signed bulk POST to /peer/probe, sized to take about `bulk_target_s` at
  the link's last known speed (a 64 KiB pilot first when none is known), at most `bulk_max_bytes`,
  with the round trip subtracted so a long link is not reported as a slow one.

Bounded so it never competes with inference traffic for long: one probe at a time per node, each
well under two seconds, refreshed every ~45 s and when a node joins or restarts.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web

from shoal.cluster.messages import LinkRecord, Message, Ping, Pong, ProbeReply
from shoal.cluster.peer import PEER_BODY, PeerClient, PeerError, peer_handler, spawn

if TYPE_CHECKING:
    from shoal.cluster.membership import Membership

log = logging.getLogger("shoal.links")


class LinkTable:
    """The cluster's measured links, keyed by the sorted pair of node ids."""

    def __init__(self) -> None:
        self._links: dict[tuple[str, str], LinkRecord] = {}

    def __len__(self) -> int:
        return len(self._links)

    def merge(self, rec: LinkRecord) -> bool:
        """Keep rec if it is newer than what we have for its pair. True if taken."""
        if rec.a >= rec.b:
            return False  # not canonical: every honest author sends a < b
        old = self._links.get((rec.a, rec.b))
        if old is not None and old.measured_at >= rec.measured_at:
            return False
        self._links[(rec.a, rec.b)] = rec
        return True

    def get(self, a: str, b: str) -> LinkRecord | None:
        return self._links.get((min(a, b), max(a, b)))

    def forget(self, node_id: str) -> None:
        for key in [k for k in self._links if node_id in k]:
            del self._links[key]

    def records(self) -> list[LinkRecord]:
        return list(self._links.values())


@dataclass(frozen=True)
class ProbeSettings:
    pings: int = 5
    ping_timeout_s: float = 1.0
    pilot_bytes: int = 64 << 10  # ~0.5 s even on a 1 Mbit/s link
    bulk_min_bytes: int = 64 << 10
    bulk_max_bytes: int = 4 << 20
    bulk_target_s: float = 0.5
    bulk_timeout_s: float = 2.0
    refresh_s: float = 45.0
    settle_s: float = 0.5  # after a join, let the hello/gossip burst pass before probing
    retry_s: float = 5.0


@dataclass
class LinkProber:
    """Measures the links this node authors. A node component (`routes`, `start`, `stop`); the
    membership feeds it join events and tells it which members are up."""

    node_id: str
    table: LinkTable
    settings: ProbeSettings = field(default_factory=ProbeSettings)
    name = "links"

    def __post_init__(self) -> None:
        self.client: PeerClient | None = None
        self.membership: Membership | None = None
        self._due: dict[str, float] = {}  # peer id -> monotonic time its link is next due
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._payload = b""

    # -- events -----------------------------------------------------------------------------------
    def on_membership(self, kind: str, node_id: str) -> None:
        if kind == "join":
            self._due[node_id] = time.monotonic() + self.settings.settle_s
            self._wake.set()
        elif kind in ("drop", "leave"):
            self._due.pop(node_id, None)

    # -- endpoints --------------------------------------------------------------------------------
    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/peer/ping", peer_handler(Ping, self._on_ping)),
            web.post("/peer/probe", self._on_probe),
        ]

    async def _on_ping(self, request: web.Request, msg: Ping) -> Message:
        return Pong(seq=msg.seq)

    async def _on_probe(self, request: web.Request) -> web.Response:
        # The body was read, size-checked and authenticated by the peer middleware; just count it.
        reply = ProbeReply(received_bytes=len(request[PEER_BODY]))
        return web.Response(body=reply.model_dump_json().encode(), content_type="application/json")

    # -- measuring --------------------------------------------------------------------------------
    async def measure(self, host: str, port: int, peer_id: str) -> LinkRecord:
        """Measure the link to one peer now. Raises PeerError."""
        assert self.client is not None
        s = self.settings
        rtts = []
        for seq in range(s.pings + 1):
            t = time.perf_counter()
            await self.client.call(host, port, "/peer/ping", Ping(seq=seq), Pong, s.ping_timeout_s)
            if seq:  # the first opens (or re-checks) the connection
                rtts.append(time.perf_counter() - t)
        rtt = statistics.median(rtts)
        old = self.table.get(self.node_id, peer_id)
        if old is not None and old.bandwidth_mbps:
            size = int(old.bandwidth_mbps * 1e6 / 8 * s.bulk_target_s)
        else:
            pilot_s = await self._bulk(host, port, s.pilot_bytes)
            size = int(s.pilot_bytes / max(pilot_s - rtt, 1e-4) * s.bulk_target_s)
        size = max(s.bulk_min_bytes, min(s.bulk_max_bytes, size))
        elapsed = await self._bulk(host, port, size)
        # The bulk call also pays one request/response turnaround; take it off so the figure
        # is the link's throughput, not throughput diluted by latency.
        transfer_s = max(elapsed - rtt, elapsed * 0.05)
        a, b = sorted((self.node_id, peer_id))
        return LinkRecord(
            a=a,
            b=b,
            rtt_ms=round(rtt * 1000, 3),
            bandwidth_mbps=round(size * 8 / transfer_s / 1e6, 1),
            measured_at=time.time(),
            probe_bytes=size,
        )

    async def _bulk(self, host: str, port: int, size: int) -> float:
        assert self.client is not None
        if len(self._payload) < size:
            # Random bytes, so no layer on the way can compress the probe; made once, reused.
            self._payload = os.urandom(self.settings.bulk_max_bytes)
        body = self._payload[:size]
        t = time.perf_counter()
        out, _ = await self.client.post(host, port, "/peer/probe", body, self.settings.bulk_timeout_s)
        elapsed = time.perf_counter() - t
        try:
            reply = ProbeReply.model_validate_json(out)
        except ValueError:  # pydantic's ValidationError is a ValueError
            raise PeerError("probe: malformed reply") from None
        if reply.received_bytes != size:
            raise PeerError(f"probe: peer got {reply.received_bytes} of {size} bytes")
        return elapsed

    # -- loop --------------------------------------------------------------------------------------
    async def start(self) -> None:
        assert self.client is not None and self.membership is not None
        self._task = spawn(self._loop(), set(), log)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _loop(self) -> None:
        assert self.membership is not None
        s = self.settings
        while True:
            now = time.monotonic()
            for m in self.membership.up_members():
                pid = m.record.node_id
                if self.node_id < pid and m.record.host and pid not in self._due:
                    lk = self.table.get(self.node_id, pid)
                    age = time.time() - lk.measured_at if lk else float("inf")
                    self._due[pid] = now + max(0.0, s.refresh_s - age) + random.uniform(0, 5)
            due = sorted((t, pid) for pid, t in self._due.items() if t <= now)
            for _, pid in due[:1]:  # one probe at a time, then look again
                member = self.membership.members.get(pid)
                if member is None or member.status != "up" or not member.record.host or self.node_id > pid:
                    del self._due[pid]
                    continue
                try:
                    rec = await self.measure(member.record.host, member.record.port, pid)
                except PeerError as e:
                    log.info("link probe to %s failed: %s", member.record.name, e)
                    self._due[pid] = time.monotonic() + s.retry_s
                    continue
                self.table.merge(rec)
                self._due[pid] = time.monotonic() + s.refresh_s + random.uniform(-5, 5)
                log.info(
                    "link to %s: rtt %.2f ms, %.0f Mbit/s (%d KiB probe)",
                    member.record.name,
                    rec.rtt_ms,
                    rec.bandwidth_mbps or 0,
                    rec.probe_bytes >> 10,
                )
            if not due:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=0.5)
                except TimeoutError:
                    pass
