"""Membership: who is in the cluster and who is up, by heartbeat gossip.

Every node keeps a table of members. Each node's record carries a version (incarnation, heartbeat):
the incarnation is fixed for one run of the node (a restart gets a larger one), the heartbeat
grows by one every gossip round. Every `gossip_interval_s` a node bumps its heartbeat and does a
push-pull exchange of its whole table with up to `fanout` random up members (plus one down member,
so a recovered node is noticed). A receiver keeps whichever version of each record is newer.

A member whose heartbeat has not advanced for `down_after_s` is marked down (heartbeats arrive
both directly and relayed, so a node that only one link cannot reach stays up); after
`drop_after_s` it is dropped and a tombstone stops older gossip from bringing it back. A restarted
node has a larger incarnation, so it passes the tombstone and rejoins as itself.

New nodes come in through seeds (--peer, and addresses found by mDNS): a Hello to the address
carries only the sender's own record, the seed's sealed reply carries its table (the hello proved
the key), and gossip does the rest, so one seed is enough to learn the whole cluster.

Records are signed by their node (cluster/identity.py: the node id is derived from the key the
record carries), and a record is taken only if it verifies, so a peer can relay records but not
make or alter one: no node can be pointed at another address, revived, or given a newer
incarnation by anyone but itself, and a leave counts only when the leaving node signed it. A node
learns its own address (when it binds every interface and advertises none) from what its peers
say they see, and only if that is one of its own addresses; nobody fills another node's address
in from where a message came from. The one exception is an address this node dialled itself and
got a sealed reply from, which may stand in for the replier's empty host.

With the default timings: join ≤ 1 s after the hello, down 3–3.5 s after the last heartbeat.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Literal

import psutil
from aiohttp import web

from shoal import __version__
from shoal.cluster.auth import host_port, normal_host
from shoal.cluster.identity import NodeIdentity, load_or_create_identity, node_id_of, verify
from shoal.cluster.invite import remember_address
from shoal.cluster.links import LinkTable
from shoal.cluster.messages import (
    Ack,
    Gossip,
    Hello,
    HelloReply,
    Leave,
    MemberRecord,
    Message,
    NodeProfile,
)
from shoal.cluster.peer import (
    PEER_ID,
    PeerClient,
    PeerError,
    RefusalLog,
    is_loopback,
    local_addresses,
    peer_handler,
    refuse,
    spawn,
)
from shoal.cluster.topology import NodeView, SeedView
from shoal.config import NodeConfig

log = logging.getLogger("shoal.membership")

WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})
LEFT = 1 << 62  # tombstone heartbeat of a node that announced its leave: newer than any it sent
WRONG_KEY = "the cluster key does not match"
SEED_WARN_EVERY_S = 60.0  # a seed that keeps refusing us is said once a minute, not every retry

Status = Literal["up", "down"]
EventKind = Literal["join", "down", "drop", "leave"]
Listener = Callable[[EventKind, str], None]  # (event, node id); must not block


@dataclass(frozen=True)
class Timings:
    gossip_interval_s: float = 0.5
    fanout: int = 4
    down_after_s: float = 3.0
    drop_after_s: float = 30.0
    tombstone_s: float = 120.0  # longer than any record can circulate after its drop
    detector_interval_s: float = 0.2
    seed_retry_s: float = 1.0
    seed_retry_max_s: float = 5.0
    call_timeout_s: float = 1.5
    memory_refresh_s: float = 2.0


def record_bytes(rec: MemberRecord) -> bytes:
    """What a node signs of its record: every field but the signature and `age_s` (which each
    relaying node rewrites), as canonical JSON."""
    fields = rec.model_dump(mode="json", exclude={"signature", "age_s"})
    return b"shoal member record v1\0" + json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


def leave_bytes(node_id: str, incarnation: int) -> bytes:
    return f"shoal leave v1\0{node_id}\0{incarnation}".encode()


def record_problem(rec: MemberRecord) -> str | None:
    """Why a record cannot be taken (its id is not its key's, or its signature fails), or None."""
    if node_id_of(rec.public_key) != rec.node_id:
        return "node id does not match the record's key"
    if not verify(rec.public_key, rec.signature, record_bytes(rec)):
        return "bad record signature"
    return None


@dataclass
class Member:
    record: MemberRecord  # as last received, host filled in, age_s meaningless
    wire: MemberRecord  # as its node signed it: what gossip relays
    last_advance: float  # local monotonic time its heartbeat last advanced (as far as we know)
    status: Status = "up"

    @property
    def version(self) -> tuple[int, int]:
        return (self.record.incarnation, self.record.heartbeat)


@dataclass
class _Seed:
    host: str
    port: int
    permanent: bool  # --peer seeds stay; discovered ones go when mDNS says the service left
    next_try: float = 0.0
    backoff_s: float = 0.0
    node_id: str | None = None  # who answered at this address last time
    busy: bool = False
    problem: str | None = None  # why the last hello failed; None once one was answered
    warned: tuple[str, float] | None = None  # (problem, when) last said at WARNING


@dataclass
class Membership:
    """The member table and the tasks that keep it current. A node component: `routes()`,
    `start()`, `stop()`."""

    config: NodeConfig
    links: LinkTable
    timings: Timings = field(default_factory=Timings)
    clock: Callable[[], float] = time.monotonic
    identity: NodeIdentity | None = None  # None: the one in config.home
    name = "membership"

    def __post_init__(self) -> None:
        if self.identity is None:
            self.identity = load_or_create_identity(self.config.home)[0]
        if self.identity.node_id != self.config.node_id:
            raise ValueError(f"the node key in {self.config.home} is not node {self.config.node_id}'s")
        self.client: PeerClient | None = None  # set by the node once its HTTP session exists
        self.profile: NodeProfile | None = None
        self.incarnation = 0
        self.heartbeat = 0
        self.members: dict[str, Member] = {}
        self.tombstones: dict[str, tuple[tuple[int, int], float]] = {}  # id -> (version, when)
        self.observed_host: str | None = None  # how peers see us, when we bind a wildcard
        self._not_mine: set[str] = set()  # addresses peers saw us at that are not ours (NAT)
        self._signed: tuple[bytes, MemberRecord] | None = None  # our last record, signed
        self._refusals = RefusalLog(log)
        self.memory_available = 0
        self.memory_offered = 0
        self._memory_at = float("-inf")
        self._listeners: list[Listener] = []
        self._seeds: dict[tuple[str, int], _Seed] = {}
        self._inflight: set[str] = set()  # member ids with a gossip call under way
        self._tasks: set[asyncio.Task[None]] = set()
        for host, port in self.config.peers:
            self.add_seed(host, port, permanent=True)

    @property
    def node_id(self) -> str:
        return self.config.node_id

    # -- public API -------------------------------------------------------------------------------
    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def add_seed(self, host: str, port: int, permanent: bool = False) -> None:
        """An address to say hello to (from --peer or discovery): tried at once, then again
        whenever the node that answered there is not up (so a healed partition or a restarted
        node is found again even after it was dropped)."""
        seed = self._seeds.get((host, port))
        if seed is None:
            self._seeds[(host, port)] = _Seed(host, port, permanent)
        else:
            seed.next_try = 0.0
            seed.permanent = seed.permanent or permanent

    def remove_seed(self, host: str, port: int) -> None:
        """Forget a discovered address (its service said goodbye); --peer seeds stay."""
        seed = self._seeds.get((host, port))
        if seed is not None and not seed.permanent:
            del self._seeds[(host, port)]

    def knows(self, node_id: str) -> bool:
        return node_id == self.node_id or node_id in self.members

    def up_members(self) -> list[Member]:
        return [m for m in self.members.values() if m.status == "up"]

    def self_record(self) -> MemberRecord:
        """This node's record, signed (again only when a field changed)."""
        assert self.identity is not None
        self._refresh_memory()
        host = self.config.advertise_host or (
            self.config.host if self.config.host not in WILDCARD_HOSTS else (self.observed_host or "")
        )
        unsigned = MemberRecord(
            node_id=self.node_id,
            public_key=self.identity.public_key,
            name=self.config.name[:256],
            host=host,
            port=self.config.port,
            incarnation=self.incarnation,
            heartbeat=self.heartbeat,
            memory_available_bytes=self.memory_available,
            memory_offered_bytes=self.memory_offered,
            profile=self.profile,
            version=__version__,
            signature="0" * 128,
        )
        data = record_bytes(unsigned)
        if self._signed is None or self._signed[0] != data:
            self._signed = (data, unsigned.model_copy(update={"signature": self.identity.sign(data)}))
        return self._signed[1]

    def self_address(self) -> str:
        rec_host = self.config.advertise_host or (
            self.config.host if self.config.host not in WILDCARD_HOSTS else (self.observed_host or self.config.host)
        )
        return f"{rec_host}:{self.config.port}"

    def seed_views(self) -> list[SeedView]:
        """The addresses this node says hello to, and whether the last hello was answered."""
        return [
            SeedView(address=host_port(s.host, s.port), node_id=s.node_id, from_peer=s.permanent,
                     status="answered" if s.problem is None and s.node_id else
                     "unreachable" if s.problem is not None else "pending",
                     problem=s.problem)
            for s in self._seeds.values()
        ]

    def views(self) -> list[NodeView]:
        """This node first, then the members by name."""
        now = self.clock()
        me = self.self_record()
        out = [_view(me, self.self_address(), "up", 0.0, is_self=True)]
        for m in sorted(self.members.values(), key=lambda m: (m.record.name, m.record.node_id)):
            addr = f"{m.record.host}:{m.record.port}"
            out.append(_view(m.record, addr, m.status, now - m.last_advance))
        return out

    def gossip_message(self, cls: type[Gossip] = Gossip, **extra: object) -> Gossip:
        now = self.clock()
        wire = [
            m.wire.model_copy(update={"age_s": round(max(0.0, now - m.last_advance), 3)})
            for m in self.members.values()
        ]
        return cls(sender=self.node_id, members=[self.self_record(), *wire], links=self.links.records(), **extra)

    def hello_message(self) -> Hello:
        """To an address that has not proven the key yet: our own record, not the table."""
        return Hello(sender=self.node_id, members=[self.self_record()])

    # -- merging --------------------------------------------------------------------------------------
    def merge(self, msg: Gossip, dialled_host: str | None = None, source: str = "?") -> None:
        """Fold a received table into ours. dialled_host: when msg is the sealed reply to a request
        of ours, the address we sent it to, which stands in for the replier's empty host.
        source: who sent it, for the log of refused records."""
        now = self.clock()
        for rec in msg.members:
            self._merge_record(rec, now, dialled_host if rec.node_id == msg.sender else None, source)
        for lk in msg.links:
            # Links of nodes we do not know (dropped, or not yet heard of) are not ours to keep.
            if self.knows(lk.a) and self.knows(lk.b):
                self.links.merge(lk)

    def _verified(self, rec: MemberRecord, source: str) -> bool:
        why = record_problem(rec)
        if why is not None:
            self._refusals(source, why, f"member record of {rec.node_id[:8]} ({rec.host or '?'}:{rec.port})")
        return why is None

    def _merge_record(self, rec: MemberRecord, now: float, dialled_host: str | None, source: str) -> None:
        # The cheap checks (is it newer than what we have?) first; a signature is verified only
        # for a record that would change something.
        nid = rec.node_id
        if nid == self.node_id:
            if rec.incarnation > self.incarnation and self._verified(rec, source):
                # A newer "us" signed by our key (a clock stepped back across a restart): outbid it.
                log.warning("a peer holds a newer incarnation of this node; moving past it")
                self.incarnation = rec.incarnation + 1
            return
        version = (rec.incarnation, rec.heartbeat)
        tomb = self.tombstones.get(nid)
        if tomb is not None and version <= tomb[0]:
            return
        age = rec.age_s
        m = self.members.get(nid)
        if m is None and age >= self.timings.drop_after_s:
            return
        if m is not None and version <= m.version:
            return
        if not self._verified(rec, source):
            return
        wire = rec.model_copy(update={"age_s": 0.0})
        host = rec.host or dialled_host or (m.record.host if m is not None else "")
        local = wire if host == rec.host else wire.model_copy(update={"host": host})
        if m is None:
            status: Status = "up" if age < self.timings.down_after_s else "down"
            self.members[nid] = Member(local, wire, now - age, status)
            self.tombstones.pop(nid, None)
            log.info("node %s (%s, %s:%d) joined, %s", rec.name, nid[:8], rec.host or "?", rec.port, status)
            if status == "up":
                self._emit("join", nid)
            return
        restarted = rec.incarnation != m.record.incarnation
        m.record, m.wire = local, wire
        m.last_advance = now - age if restarted else max(m.last_advance, now - age)
        if now - m.last_advance < self.timings.down_after_s and (m.status == "down" or restarted):
            if m.status == "down":
                log.info("node %s (%s) is up again%s", rec.name, nid[:8], " (restarted)" if restarted else "")
            m.status = "up"
            self._emit("join", nid)

    def _emit(self, kind: EventKind, node_id: str) -> None:
        for listener in self._listeners:
            try:
                listener(kind, node_id)
            except Exception:  # a listener's bug must not break membership
                log.exception("membership listener failed on %s %s", kind, node_id)

    def detect(self) -> None:
        """Mark members down / drop them by heartbeat age; expire tombstones."""
        now = self.clock()
        t = self.timings
        for nid, m in list(self.members.items()):
            age = now - m.last_advance
            if m.status == "up" and age > t.down_after_s:
                m.status = "down"
                log.warning("node %s (%s) is down: no heartbeat for %.1f s", m.record.name, nid[:8], age)
                self._emit("down", nid)
            if age > t.drop_after_s:
                del self.members[nid]
                self.tombstones[nid] = (m.version, now)
                self.links.forget(nid)
                log.info("node %s (%s) dropped after %.0f s down", m.record.name, nid[:8], age)
                self._emit("drop", nid)
        for nid, (_, when) in list(self.tombstones.items()):
            if now - when > t.tombstone_s:
                del self.tombstones[nid]

    def _refresh_memory(self) -> None:
        now = self.clock()
        if now - self._memory_at < self.timings.memory_refresh_s:
            return
        self._memory_at = now
        avail = psutil.virtual_memory().available
        limit = self.config.memory_limit_bytes
        self.memory_available = avail
        self.memory_offered = avail if limit is None else min(avail, limit)

    # -- peer endpoints ----------------------------------------------------------------------------
    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/peer/hello", peer_handler(Hello, self._on_hello)),
            web.post("/peer/gossip", peer_handler(Gossip, self._on_gossip)),
            web.post("/peer/leave", peer_handler(Leave, self._on_leave)),
        ]

    def _sender_ok(self, request: web.Request, sender: str, members: list[MemberRecord] | None) -> str | None:
        """Why a message's claimed sender does not hold up, or None."""
        if sender != request[PEER_ID]:
            return "sender does not match the signing node"
        if sender == self.node_id:
            return "sender claims this node's own id (two nodes sharing one --home?)"
        if members is not None and not any(r.node_id == sender for r in members):
            return "sender's own record missing"
        return None

    async def _on_hello(self, request: web.Request, msg: Hello) -> Message | web.Response:
        # The hello proved the key, so its (sealed) reply may carry our whole table.
        if msg.sender == self.node_id == request[PEER_ID]:
            # A --peer that points at this very node: answer, so the caller sees it is itself.
            return self.gossip_message(HelloReply, observed_host=request.remote or "")
        if why := self._sender_ok(request, msg.sender, msg.members):
            return refuse(request, 400, why)
        self.merge(msg, None, request.remote or "?")
        return self.gossip_message(HelloReply, observed_host=request.remote or "")

    async def _on_gossip(self, request: web.Request, msg: Gossip) -> Message | web.Response:
        if why := self._sender_ok(request, msg.sender, msg.members):
            return refuse(request, 400, why)
        self.merge(msg, None, request.remote or "?")
        return self.gossip_message(observed_host=request.remote or "")

    async def _on_leave(self, request: web.Request, msg: Leave) -> Message | web.Response:
        if why := self._sender_ok(request, msg.sender, None):
            return refuse(request, 400, why)
        m = self.members.get(msg.sender)
        if m is not None and msg.incarnation >= m.record.incarnation:
            if not verify(m.wire.public_key, msg.signature, leave_bytes(msg.sender, msg.incarnation)):
                return refuse(request, 400, "leave not signed by the leaving node")
            del self.members[msg.sender]
            self.tombstones[msg.sender] = ((msg.incarnation, LEFT), self.clock())
            self.links.forget(msg.sender)
            log.info("node %s (%s) left", m.record.name, msg.sender[:8])
            self._emit("leave", msg.sender)
        return Ack()

    # -- tasks --------------------------------------------------------------------------------------
    async def start(self) -> None:
        assert self.client is not None, "the node sets membership.client before start()"
        self.incarnation = _next_incarnation(self.config)
        try:
            # `shoal invite`, which reads only the home, names where this node listens.
            remember_address(self.config.home, self.config.host, self.config.advertise_host, self.config.port)
        except OSError as e:
            log.warning("could not note this node's address in %s: %s", self.config.home, e)
        self._refresh_memory()
        for coro in (self._gossip_loop(), self._detector_loop(), self._seed_loop()):
            self._spawn(coro)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def leave(self, timeout_s: float = 1.0) -> None:
        """Tell every member we are going, so they drop us now rather than after a timeout."""
        if self.client is None:
            return
        assert self.identity is not None
        sig = self.identity.sign(leave_bytes(self.node_id, self.incarnation))
        msg = Leave(sender=self.node_id, incarnation=self.incarnation, signature=sig)
        targets = [m.record for m in self.members.values() if m.record.host and m.status == "up"]
        calls = [
            self.client.call(r.host, r.port, "/peer/leave", msg, Ack, timeout_s, node_id=r.node_id) for r in targets
        ]
        results = await asyncio.gather(*calls, return_exceptions=True)
        told = sum(not isinstance(r, BaseException) for r in results)
        log.info("announced leave to %d of %d members", told, len(targets))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        spawn(coro, self._tasks, log)

    async def _gossip_loop(self) -> None:
        t = self.timings
        while True:
            self.heartbeat += 1
            up = [m for m in self.members.values() if m.status == "up" and m.record.host]
            down = [m for m in self.members.values() if m.status == "down" and m.record.host]
            targets = random.sample(up, min(t.fanout, len(up)))
            if down:
                targets.append(random.choice(down))
            if targets:
                msg = self.gossip_message()
                for m in targets:
                    if m.record.node_id not in self._inflight:
                        self._spawn(self._gossip_to(m.record, msg))
            await asyncio.sleep(t.gossip_interval_s * random.uniform(0.9, 1.1))

    async def _gossip_to(self, rec: MemberRecord, msg: Gossip) -> None:
        assert self.client is not None
        self._inflight.add(rec.node_id)
        try:
            reply, _ = await self.client.call(
                rec.host, rec.port, "/peer/gossip", msg, Gossip, self.timings.call_timeout_s, node_id=rec.node_id
            )
            self.merge(reply, rec.host, f"{rec.name} ({rec.node_id[:8]})")
            self._learn_host(reply.observed_host)
        except PeerError as e:
            log.debug("gossip to %s failed: %s", rec.name, e)
        finally:
            self._inflight.discard(rec.node_id)

    async def _detector_loop(self) -> None:
        while True:
            self.detect()
            await asyncio.sleep(self.timings.detector_interval_s)

    async def _seed_loop(self) -> None:
        while True:
            now = self.clock()
            for seed in list(self._seeds.values()):
                if seed.busy or now < seed.next_try:
                    continue
                if seed.node_id == self.node_id:
                    continue  # the seed is this node itself
                known = self.members.get(seed.node_id or "")
                if known is not None and known.status == "up":
                    seed.next_try = now + self.timings.seed_retry_max_s
                    continue
                seed.busy = True
                self._spawn(self._hello(seed))
            await asyncio.sleep(0.1)

    async def _hello(self, seed: _Seed) -> None:
        assert self.client is not None
        t = self.timings
        try:
            reply, replier = await self.client.call(
                seed.host, seed.port, "/peer/hello", self.hello_message(), HelloReply, t.call_timeout_s
            )
        except PeerError as e:
            now = self.clock()
            seed.backoff_s = min(t.seed_retry_max_s, max(t.seed_retry_s, seed.backoff_s * 2))
            seed.next_try = now + seed.backoff_s
            self._hello_failed(seed, str(e), now)
            return
        finally:
            seed.busy = False
        if replier == self.node_id:
            log.info("seed %s:%d is this node itself; ignoring it", seed.host, seed.port)
        elif reply.sender != replier:
            log.warning("seed %s:%d replied with a mismatched sender", seed.host, seed.port)
        else:
            self.merge(reply, seed.host, f"seed {seed.host}:{seed.port}")
        self._learn_host(reply.observed_host)
        seed.node_id = replier
        seed.backoff_s = 0.0
        seed.next_try = self.clock() + t.seed_retry_max_s
        seed.problem = seed.warned = None

    def _hello_failed(self, seed: _Seed, error: str, now: float) -> None:
        """Note why; say it on the console (once a minute per seed and reason) when the seed refused
        us, which retrying alone will not fix. An absent seed is normal while it boots: debug only."""
        # What PeerClient reports when the seed's tag check fails (auth.py: "bad tag (wrong
        # cluster key, ...)"), answered before our request proved anything, so in plaintext.
        wrong_key = "HTTP 401" in error and "bad tag" in error
        refused = wrong_key or any(w in error for w in ("HTTP 4", "unsigned", "tag"))
        seed.problem = WRONG_KEY if wrong_key else error
        warned = seed.warned
        if not refused or (warned is not None and warned[0] == seed.problem and now - warned[1] < SEED_WARN_EVERY_S):
            log.debug("hello to %s:%d failed: %s", seed.host, seed.port, error)
            return
        seed.warned = (seed.problem, now)
        if wrong_key:
            log.warning("seed %s:%d refuses this node: %s (join with --join TOKEN from `shoal invite` on a member, "
                        "or give its key); retrying", seed.host, seed.port, WRONG_KEY)
        else:
            log.warning("hello to %s:%d refused: %s; retrying", seed.host, seed.port, error)

    def _learn_host(self, observed: str) -> None:
        """How peers see us, for our record when we bind every interface and advertise nothing.
        Taken only if it is one of this machine's addresses, so a peer cannot have us sign
        someone else's; a non-loopback address replaces a loopback one."""
        if not observed or self.config.advertise_host or self.config.host not in WILDCARD_HOSTS:
            return
        host = normal_host(observed)
        current = self.observed_host
        if host == current or host in self._not_mine:
            return
        if current is not None and not (is_loopback(current) and not is_loopback(host)):
            return
        if host not in local_addresses():
            self._not_mine.add(host)
            log.info("peers see this node at %s, not one of its addresses (NAT?): use --advertise to be found", host)
            return
        self.observed_host = host


def _view(rec: MemberRecord, address: str, status: Status, last_seen_s: float, is_self: bool = False) -> NodeView:
    return NodeView(
        id=rec.node_id,
        name=rec.name,
        address=address,
        status=status,
        is_self=is_self,
        last_seen_s=round(last_seen_s, 2),
        incarnation=rec.incarnation,
        memory_available_bytes=rec.memory_available_bytes,
        memory_offered_bytes=rec.memory_offered_bytes,
        profile=rec.profile,
    )


def _next_incarnation(config: NodeConfig) -> int:
    """Milliseconds since the epoch, but always above the last run's (persisted), so a clock that
    stepped back across a restart still gives a newer incarnation."""
    path = config.home / "incarnation"
    try:
        last = int(path.read_text().strip())
    except (OSError, ValueError):
        last = 0
    inc = max(time.time_ns() // 1_000_000, last + 1)
    try:
        path.write_text(f"{inc}\n")
    except OSError as e:
        log.warning("could not persist the incarnation in %s: %s", path, e)
    return inc
