"""Instances on a node: a node component with three roles.

* Coordinator (the node that got POST /v1/instances): plans, reserves memory on every chosen node,
  starts the entry rank, then the others with its rendezvous port, and keeps the instance's record
  and status (loading -> ready -> failed/stopped).
* Host (every node with a shard): holds memory reservations — the check-and-reserve runs on the
  node's one event loop, so two coordinators placing at the same moment can never both get the
  same bytes — and supervises its runner processes, reporting their state to the coordinator.
* Entry host (the node with rank 0): forwards requests to the entry runner and keeps, per request,
  the prompt and every token generated so far (what a replay on a new placement would need).

Between nodes everything goes through the signed peer client (/peer/instances/*). Clients use the
public routes of http.py on any node; the state lives in records.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, TypeVar

import psutil
from aiohttp import web

from shoal.cluster.messages import Ack, Message
from shoal.cluster.peer import PEER_ID, PeerClient, PeerError, peer_handler, refuse, spawn
from shoal.config import parse_hostport
from shoal.placement.planner import Placement, plan
from shoal.runner.http import PublicRoutes
from shoal.runner.messages import (
    Cancel,
    CreateInstance,
    HostedShard,
    InstanceRecord,
    InstanceRef,
    ListInstances,
    ListReply,
    Poll,
    PollReply,
    Reserve,
    ReserveReply,
    RunnerConfig,
    ShardState,
    StartReply,
    StartShard,
    Submit,
)
from shoal.runner.process import RunnerProcess
from shoal.runner.records import Coordinated, Hosted, InstanceError, RequestLog, Reservation, public_instance

if TYPE_CHECKING:
    from shoal.cluster.node import Node
    from shoal.placement.spec import ModelSpec

log = logging.getLogger("shoal.instances")
R = TypeVar("R", bound=Message)

RESERVATION_TTL_S = 120.0  # a reservation whose runner never starts is given back after this
PORT_TIMEOUT_S = 30.0
LIST_TIMEOUT_S = 2.0
CALL_TIMEOUT_S = 5.0
PLACE_ATTEMPTS = 3
KEEP_FINISHED_REQUESTS = 256
KEEP_ENDED_INSTANCES = 32


# ---------------------------------------------------------------------------------------- component
class InstancesComponent:
    name = "instances"

    def __init__(self, node: Node, runner_env: dict[str, str] | None = None):
        self.node = node
        self.config = node.config
        self.runner_env = runner_env or {}
        self.coordinated: dict[str, Coordinated] = {}
        self.hosted: dict[tuple[str, int], Hosted] = {}
        self.reservations: dict[str, Reservation] = {}
        self._cluster: list[InstanceRecord] = []  # last cluster-wide listing (for /v1/cluster)
        self._specs: dict[str, ModelSpec] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._refresher: asyncio.Task[None] | None = None

    # -- life
    def routes(self) -> list[web.RouteDef]:
        return [
            *PublicRoutes(self).routes(),
            web.post("/peer/instances/reserve", peer_handler(Reserve, self._on_reserve)),
            web.post("/peer/instances/release", peer_handler(InstanceRef, self._on_release)),
            web.post("/peer/instances/start", peer_handler(StartShard, self._on_start)),
            web.post("/peer/instances/stop", peer_handler(InstanceRef, self._on_stop)),
            web.post("/peer/instances/delete", peer_handler(InstanceRef, self._on_delete)),
            web.post("/peer/instances/state", peer_handler(ShardState, self._on_state)),
            web.post("/peer/instances/list", peer_handler(ListInstances, self._on_list)),
            web.post("/peer/instances/submit", peer_handler(Submit, self._on_submit)),
            web.post("/peer/instances/poll", peer_handler(Poll, self._on_poll)),
            web.post("/peer/instances/cancel", peer_handler(Cancel, self._on_cancel)),
        ]

    async def start(self) -> None:
        self.node.membership.subscribe(self._on_member)
        self._refresher = spawn(self._refresh_loop(), self._tasks, log)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        # Runners go with the node: stop the entries first (they stop their groups), then the rest.
        hosted = sorted(self.hosted.values(), key=lambda h: h.rank)
        for h in hosted:
            h.stopping = True
        await asyncio.gather(*(h.runner.stop(grace_s=0.5) for h in hosted), return_exceptions=True)

    @property
    def client(self) -> PeerClient:
        client = self.node.membership.client
        if client is None:
            raise InstanceError(503, "the node is still starting")
        return client

    def cluster_instances(self) -> list[dict[str, Any]]:
        """For /v1/cluster: the last cluster-wide listing, with this node's own records fresher."""
        mine = {c.id: c.record(self.config.node_id) for c in self.coordinated.values()}
        recs = {r.id: r for r in self._cluster}
        recs.update(mine)
        local = {(h.instance_id, h.rank): self._hosted_shard(h) for h in self.hosted.values()}
        return [public_instance(r, local) for r in sorted(recs.values(), key=lambda r: r.created_at)]

    # -- memory
    def free_bytes(self) -> int:
        """What this node can still promise: its offer (RAM available, capped by --memory-limit)
        less its reservations. Runners' resident memory is added back to what is available, since
        their reservations already count it."""
        self._expire_reservations()
        avail = psutil.virtual_memory().available + sum(h.runner.rss for h in self.hosted.values() if h.runner.running)
        cap = avail if self.config.memory_limit_bytes is None else min(avail, self.config.memory_limit_bytes)
        return cap - self.reserved_bytes()

    def reserved_bytes(self) -> int:
        return sum(r.bytes for r in self.reservations.values())

    def _expire_reservations(self) -> None:
        now = time.monotonic()
        for iid, r in list(self.reservations.items()):
            if r.expires_at is not None and now > r.expires_at:
                log.info("reservation of %s for %s expired unused", _mib(r.bytes), iid)
                del self.reservations[iid]

    # -- peer calls
    def _address_of(self, node_id: str) -> tuple[str, int]:
        view = self.node.cluster_view()
        n = view.node(node_id)
        if n is None:
            raise InstanceError(503, f"node {node_id[:8]} is not known here")
        return parse_hostport(n.address)

    async def call(self, node_id: str, path: str, msg: Message, reply: type[R], timeout_s: float = CALL_TIMEOUT_S) -> R:
        host, port = self._address_of(node_id)
        got, replier = await self.client.call(host, port, path, msg, reply, timeout_s)
        if replier != node_id:
            raise PeerError(f"{host}:{port} answered as {replier[:8]}, not {node_id[:8]}")
        return got

    async def gather_lists(self) -> dict[str, ListReply]:
        view = self.node.cluster_view()
        out = {self.config.node_id: self._list_reply()}
        others = [n for n in view.up_nodes() if not n.is_self]
        results = await asyncio.gather(
            *(self.call(n.id, "/peer/instances/list", ListInstances(), ListReply, LIST_TIMEOUT_S) for n in others),
            return_exceptions=True,
        )
        for n, r in zip(others, results):
            if isinstance(r, ListReply):
                out[n.id] = r
            else:
                log.debug("listing instances of %s: %s", n.name, r)
        self._cluster = [rec for reply in out.values() for rec in reply.instances]
        return out

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(10.0)
            with contextlib.suppress(Exception):
                if len(self.node.cluster_view().up_nodes()) > 1:
                    await self.gather_lists()

    # -- coordinator: placing ---------------------------------------------------------------------
    async def spec_of(self, model: str) -> ModelSpec:
        spec = self._specs.get(model)
        if spec is None:
            from shoal.engine.loader import ModelNotFound
            from shoal.placement.spec import spec_for
            from shoal.weights.errors import ModelFileError

            try:
                spec = await asyncio.to_thread(spec_for, model)
            except (ModelNotFound, ModelFileError) as e:
                raise InstanceError(404, str(e)) from None
            self._specs[model] = spec
        return spec

    def reserved_by_node(self, lists: dict[str, ListReply]) -> dict[str, int]:
        """Bytes to subtract from each node's offer so the planner sees what each can still promise."""
        out = {}
        for n in self.node.cluster_view().up_nodes():
            reply = lists.get(n.id)
            out[n.id] = n.memory_offered_bytes - reply.free_bytes if reply is not None else n.memory_offered_bytes
        return out

    async def create(self, body: CreateInstance) -> Coordinated:
        spec = await self.spec_of(body.model)
        request = body.request()
        last_error = ""
        for _ in range(PLACE_ATTEMPTS):
            lists = await self.gather_lists()
            placement = plan(spec, self.node.cluster_view(), request, self.reserved_by_node(lists))
            iid = secrets.token_hex(8)
            refused = await self._reserve_all(iid, placement)
            if not refused:
                inst = Coordinated(iid, body.model, placement, secrets.token_hex(32), time.time())
                self.coordinated[iid] = inst
                self._trim_ended()
                spawn(self._launch(inst), self._tasks, log)
                log.info("placing %s as %s: %s", body.model, iid, placement.reason)
                return inst
            last_error = refused
            log.info("placing %s: %s; planning again", body.model, refused)
            await asyncio.sleep(0.05 + 0.2 * secrets.randbelow(100) / 100)
        raise InstanceError(409, f"could not reserve memory for {body.model}: {last_error}")

    async def _reserve_all(self, iid: str, placement: Placement) -> str:
        """Reserve on every node of the placement; '' if all agreed, else why not (and none is kept).

        One node at a time, in node-id order — like taking locks in a fixed order: two coordinators
        racing for the same nodes meet at the first one they share, and the loser holds nothing
        the winner needs (reserving everywhere at once can make both lose, again and again)."""
        need = placement.memory_by_node()
        taken: list[str] = []
        refused = ""
        for nid in sorted(need):
            msg = Reserve(instance_id=iid, model=placement.model[:256], bytes=need[nid], coordinator=self.config.node_id)
            try:
                reply = await self._reserve_on(nid, msg)
            except (PeerError, InstanceError) as e:
                refused = f"{nid[:8]}: {e}"
                break
            if not reply.ok:
                refused = f"{nid[:8]}: {reply.error}"
                break
            taken.append(nid)
        if refused:
            await asyncio.gather(*(self._release_on(nid, iid) for nid in taken), return_exceptions=True)
        return refused

    async def _reserve_on(self, node_id: str, msg: Reserve) -> ReserveReply:
        if node_id == self.config.node_id:
            return self._reserve(msg)
        return await self.call(node_id, "/peer/instances/reserve", msg, ReserveReply)

    async def _release_on(self, node_id: str, iid: str) -> None:
        if node_id == self.config.node_id:
            self.reservations.pop(iid, None)
        else:
            await self.call(node_id, "/peer/instances/release", InstanceRef(instance_id=iid), Ack)

    async def _launch(self, inst: Coordinated) -> None:
        """Start the entry rank, learn its rendezvous port, start the others."""
        shards = inst.placement.shards
        try:
            first = await self._start_on(inst, 0, None)
            if first.port is None:
                raise RuntimeError("the entry runner reported no rendezvous port")
            replies = await asyncio.gather(*(self._start_on(inst, s.rank, first.port) for s in shards[1:]), return_exceptions=True)
            for r in replies:
                if isinstance(r, Exception):
                    raise r
        except Exception as e:  # noqa: BLE001 - any failure to start fails the instance
            await self._fail(inst, f"starting the runners failed: {e}")

    async def _start_on(self, inst: Coordinated, rank: int, port: int | None) -> StartReply:
        msg = StartShard(instance_id=inst.id, model=inst.model[:256], rank=rank, placement=inst.placement,
                         master_port=port, token=inst.token, coordinator=self.config.node_id)
        node_id = inst.placement.shards[rank].node_id
        if node_id == self.config.node_id:
            return await self._start_local(msg)
        return await self.call(node_id, "/peer/instances/start", msg, StartReply, PORT_TIMEOUT_S + 5)

    async def _fail(self, inst: Coordinated, why: str) -> None:
        if inst.status in ("failed", "stopped"):
            return
        log.warning("instance %s (%s) failed: %s", inst.id, inst.model, why)
        inst.status, inst.error = "failed", why
        await self._stop_everywhere(inst)

    async def _stop_everywhere(self, inst: Coordinated) -> None:
        nodes = list(dict.fromkeys(s.node_id for s in inst.placement.shards))
        ref = InstanceRef(instance_id=inst.id)

        async def stop_on(nid: str) -> None:
            if nid == self.config.node_id:
                await self._stop_local(inst.id)
            else:
                await self.call(nid, "/peer/instances/stop", ref, Ack, CALL_TIMEOUT_S + 5)

        results = await asyncio.gather(*(stop_on(n) for n in nodes), return_exceptions=True)
        for nid, r in zip(nodes, results):
            if isinstance(r, Exception):
                log.warning("stopping %s on %s: %s", inst.id, nid[:8], r)

    async def delete(self, iid: str) -> Coordinated:
        inst = self.coordinated.get(iid)
        if inst is None:
            raise InstanceError(404, f"no instance {iid} coordinated here")
        if inst.status not in ("failed", "stopped"):
            inst.status = "stopped"
            await self._stop_everywhere(inst)
        return inst

    def _trim_ended(self) -> None:
        ended = [c for c in self.coordinated.values() if c.status in ("failed", "stopped")]
        for c in sorted(ended, key=lambda c: c.created_at)[:-KEEP_ENDED_INSTANCES]:
            del self.coordinated[c.id]

    def _on_shard_state(self, msg: ShardState) -> None:
        inst = self.coordinated.get(msg.instance_id)
        if inst is None:
            return
        inst.shard_status[msg.rank] = msg.status
        if msg.status == "failed":
            spawn(self._fail(inst, f"rank {msg.rank}: {msg.error or 'runner failed'}"), self._tasks, log)
        elif msg.status == "ready" and msg.rank == 0 and inst.status == "loading":
            # The entry is ready only once every rank joined the group: the instance is.
            inst.status = "ready"
            log.info("instance %s (%s) ready", inst.id, inst.model)
        elif msg.status == "stopped" and inst.status in ("loading", "ready"):
            spawn(self._fail(inst, f"rank {msg.rank} stopped unexpectedly"), self._tasks, log)

    def _on_member(self, kind: str, node_id: str) -> None:
        if kind not in ("down", "leave", "drop"):
            return
        for inst in list(self.coordinated.values()):
            if inst.status in ("loading", "ready") and any(s.node_id == node_id for s in inst.placement.shards):
                spawn(self._fail(inst, f"node {node_id[:8]} is {kind}"), self._tasks, log)

    # -- host: reservations and runners -----------------------------------------------------------
    def _reserve(self, msg: Reserve) -> ReserveReply:
        free = self.free_bytes()
        if msg.instance_id in self.reservations:
            return ReserveReply(ok=True, free_bytes=free)
        if msg.bytes > free:
            return ReserveReply(ok=False, free_bytes=free, error=f"needs {_mib(msg.bytes)}, {_mib(max(free, 0))} free")
        self.reservations[msg.instance_id] = Reservation(msg.instance_id, msg.bytes, msg.coordinator,
                                                         time.monotonic() + RESERVATION_TTL_S)
        return ReserveReply(ok=True, free_bytes=free)

    async def _start_local(self, msg: StartShard) -> StartReply:
        key = (msg.instance_id, msg.rank)
        res = self.reservations.get(msg.instance_id)
        if res is None:
            raise InstanceError(409, "no memory is reserved here for this instance (expired?)")
        if key in self.hosted:
            raise InstanceError(409, "this shard is already running")
        res.expires_at = None
        shard = msg.placement.shards[msg.rank]
        cfg = RunnerConfig(instance_id=msg.instance_id, model=msg.model, rank=msg.rank, shards=msg.placement.shards,
                           num_layers=max(s.layers[1] for s in msg.placement.shards), context=msg.placement.context,
                           master_port=msg.master_port, token=msg.token, threads=shard.threads)
        log_path = self.config.home / "runners" / f"{msg.instance_id}-{msg.rank}.log"
        hosted: Hosted | None = None

        def on_event(ev: dict[str, Any]) -> None:
            assert hosted is not None
            self._on_runner_event(hosted, ev)

        def on_exit(code: int | None) -> None:
            assert hosted is not None
            self._on_runner_exit(hosted, code)

        runner = RunnerProcess(cfg, log_path, on_event, on_exit, self.runner_env)
        hosted = Hosted(msg.instance_id, msg.rank, msg.placement, msg.coordinator, runner)
        self.hosted[key] = hosted
        await runner.start()
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

    def _on_runner_event(self, h: Hosted, ev: dict[str, Any]) -> None:
        kind = ev.get("t")
        if kind in ("accepted", "ev", "error"):
            req = h.requests.get(ev.get("rid", ""))
            if req is not None:
                req.add(ev)
                if req.done:
                    self._trim_requests(h)
        elif kind == "ready":
            h.status = "ready"
            self._report(h)
        elif kind == "fatal":
            h.error = str(ev.get("message", ""))[:256]

    def _on_runner_exit(self, h: Hosted, code: int | None) -> None:
        self.hosted.pop((h.instance_id, h.rank), None)
        if not any(o.instance_id == h.instance_id for o in self.hosted.values()):
            self.reservations.pop(h.instance_id, None)  # the node's last shard of it: memory is free
        if h.stopping:
            h.status = "stopped"
        else:
            h.status = "failed"
            h.error = h.error or f"runner exited with code {code}"
            log.warning("rank %d of %s: %s", h.rank, h.instance_id, h.error)
        for req in h.requests.values():
            req.fail(f"the instance's entry runner {'stopped' if h.stopping else 'failed'}")
        self._report(h)

    def _report(self, h: Hosted) -> None:
        msg = ShardState(instance_id=h.instance_id, rank=h.rank, status=h.status, error=h.error[:256], rss_bytes=h.runner.rss)
        if h.coordinator == self.config.node_id:
            self._on_shard_state(msg)
            return

        async def send() -> None:
            try:
                await self.call(h.coordinator, "/peer/instances/state", msg, Ack)
            except (PeerError, InstanceError) as e:
                log.warning("telling the coordinator of %s about rank %d: %s", h.instance_id, h.rank, e)

        spawn(send(), self._tasks, log)

    async def _stop_local(self, iid: str) -> None:
        mine = sorted((h for h in self.hosted.values() if h.instance_id == iid), key=lambda h: h.rank)
        for h in mine:
            h.stopping = True
        await asyncio.gather(*(h.runner.stop() for h in mine), return_exceptions=True)
        self.reservations.pop(iid, None)

    def _hosted_shard(self, h: Hosted) -> HostedShard:
        res = self.reservations.get(h.instance_id)
        stats = {k: float(v) for k, v in h.runner.stats.items() if isinstance(v, (int, float))}
        return HostedShard(instance_id=h.instance_id, rank=h.rank, status=h.status,
                           reserved_bytes=res.bytes if res else 0, rss_bytes=h.runner.rss, stats=stats)

    def _list_reply(self) -> ListReply:
        for h in self.hosted.values():  # fresh counters for the next listing
            if h.status == "ready":
                h.runner.send({"op": "stats"})
        return ListReply(
            node_id=self.config.node_id, free_bytes=self.free_bytes(), reserved_bytes=self.reserved_bytes(),
            instances=[c.record(self.config.node_id) for c in self.coordinated.values()],
            shards=[self._hosted_shard(h) for h in self.hosted.values()],
        )

    # -- entry host: requests ---------------------------------------------------------------------
    def _entry(self, iid: str) -> Hosted:
        h = self.hosted.get((iid, 0))
        if h is None:
            raise InstanceError(404, f"the entry of instance {iid} does not run here")
        if h.status != "ready":
            raise InstanceError(409, f"instance {iid} is {h.status}")
        return h

    def submit_local(self, msg: Submit) -> RequestLog:
        h = self._entry(msg.instance_id)
        if msg.rid in h.requests:
            raise InstanceError(409, f"request {msg.rid} exists")
        req = RequestLog(msg.rid, msg.instance_id, msg.params)
        h.requests[msg.rid] = req
        cmd: dict[str, Any] = {"op": "submit", "rid": msg.rid, "params": msg.params}
        if msg.prompt_ids is not None:
            cmd["prompt_ids"] = msg.prompt_ids
        elif msg.messages is not None:
            cmd["messages"] = msg.messages
        else:
            cmd["text"] = msg.text or ""
        if not h.runner.send(cmd):
            req.fail("the entry runner is gone")
        return req

    def cancel_local(self, iid: str, rid: str) -> None:
        h = self.hosted.get((iid, 0))
        if h is not None and rid in h.requests and not h.requests[rid].done:
            h.runner.send({"op": "cancel", "rid": rid})
            h.requests[rid].add({"t": "ev", "token": None, "text": "", "finish": "cancelled"})

    def _trim_requests(self, h: Hosted) -> None:
        done = [r for r in h.requests.values() if r.done]
        for r in sorted(done, key=lambda r: r.created_at)[:-KEEP_FINISHED_REQUESTS]:
            del h.requests[r.rid]

    async def stream_events(self, rec: InstanceRecord, msg: Submit) -> AsyncIterator[list[dict[str, Any]]]:
        """Events of one request, from the entry (this node's runner, or another node's by
        polling), in batches: whatever arrived since the last one."""
        if rec.entry == self.config.node_id:
            req = self.submit_local(msg)
            n = 0
            try:
                while True:
                    await req.wait_after(n, 30.0)
                    if n < len(req.events):
                        batch = req.events[n:]
                        n += len(batch)
                        yield batch
                    if req.done and n == len(req.events):
                        return
            finally:
                if not req.done:
                    self.cancel_local(rec.id, msg.rid)
            return
        await self.call(rec.entry, "/peer/instances/submit", msg, Ack)
        after, done = 0, False
        try:
            while not done:
                reply = await self.call(rec.entry, "/peer/instances/poll",
                                        Poll(instance_id=rec.id, rid=msg.rid, after=after, wait_s=10.0), PollReply, 20.0)
                after += len(reply.events)
                done = reply.done
                if reply.events:
                    yield reply.events
        finally:
            if not done:
                with contextlib.suppress(Exception):
                    await self.call(rec.entry, "/peer/instances/cancel", Cancel(instance_id=rec.id, rid=msg.rid), Ack)

    async def find(self, iid: str) -> InstanceRecord:
        inst = self.coordinated.get(iid)
        if inst is not None:
            return inst.record(self.config.node_id)
        cached = next((r for r in self._cluster if r.id == iid), None)
        if cached is not None and cached.status == "ready":
            return cached  # a ready instance's entry does not move; a request to a dead one fails there
        for reply in (await self.gather_lists()).values():
            for rec in reply.instances:
                if rec.id == iid:
                    return rec
        raise InstanceError(404, f"no instance {iid}")

    async def instances(self) -> list[dict[str, Any]]:
        lists = await self.gather_lists()
        shards = {(s.instance_id, s.rank): s for reply in lists.values() for s in reply.shards}
        recs = sorted((r for reply in lists.values() for r in reply.instances), key=lambda r: r.created_at)
        return [public_instance(r, shards) for r in recs]

    # -- peer routes ------------------------------------------------------------------------------
    async def _on_reserve(self, request: web.Request, msg: Reserve) -> Message:
        return self._reserve(msg)

    async def _on_release(self, request: web.Request, msg: InstanceRef) -> Message:
        if not any(h.instance_id == msg.instance_id for h in self.hosted.values()):
            self.reservations.pop(msg.instance_id, None)
        return Ack()

    async def _on_start(self, request: web.Request, msg: StartShard) -> Message | web.Response:
        if request[PEER_ID] != msg.coordinator:
            return refuse(request, 403, "only the coordinator starts its shards")
        try:
            return await self._start_local(msg)
        except InstanceError as e:
            return refuse(request, e.status, str(e))

    async def _on_stop(self, request: web.Request, msg: InstanceRef) -> Message:
        await self._stop_local(msg.instance_id)
        return Ack()

    async def _on_delete(self, request: web.Request, msg: InstanceRef) -> Message | web.Response:
        try:
            await self.delete(msg.instance_id)
        except InstanceError as e:
            return refuse(request, e.status, str(e))
        return Ack()

    async def _on_state(self, request: web.Request, msg: ShardState) -> Message:
        inst = self.coordinated.get(msg.instance_id)
        shards = inst.placement.shards if inst is not None else []
        # Only the node that runs a shard may say how it is doing.
        if msg.rank < len(shards) and request[PEER_ID] == shards[msg.rank].node_id:
            self._on_shard_state(msg)
        return Ack()

    async def _on_list(self, request: web.Request, msg: ListInstances) -> Message:
        return self._list_reply()

    async def _on_submit(self, request: web.Request, msg: Submit) -> Message | web.Response:
        try:
            self.submit_local(msg)
        except InstanceError as e:
            return refuse(request, e.status, str(e))
        return Ack()

    async def _on_poll(self, request: web.Request, msg: Poll) -> Message | web.Response:
        h = self.hosted.get((msg.instance_id, 0))
        req = h.requests.get(msg.rid) if h is not None else None
        if req is None:
            return refuse(request, 404, f"no request {msg.rid} at this entry")
        await req.wait_after(msg.after, msg.wait_s)
        return PollReply(events=req.events[msg.after :], done=req.done)

    async def _on_cancel(self, request: web.Request, msg: Cancel) -> Message:
        self.cancel_local(msg.instance_id, msg.rid)
        return Ack()


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


__all__ = ["InstancesComponent", "InstanceError", "RequestLog", "public_instance"]
