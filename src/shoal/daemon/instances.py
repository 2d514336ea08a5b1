"""Instances on a node: the component that joins the three roles and serves their routes.

* `Coordinator` (coordinator.py): places instances and keeps their records.
* `Host` (host.py): memory reservations and runner processes for every shard on this node.
* `EntryHost` (entry_host.py): requests of the instances whose entry runs here.

Their inputs are narrow: the node's id and home, a cluster-view callable and a peer client getter
(through `Peers`), and a membership subscription. Between nodes everything goes through the signed
peer routes below; clients use the public routes (routes.py) on any node.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web

from shoal.api.metrics import Metrics
from shoal.cluster.messages import Ack, Message, NodeProfile
from shoal.cluster.peer import (
    PEER_ID,
    PeerClient,
    PeerError,
    peer_handler,
    refuse,
    spawn,
)
from shoal.cluster.topology import ClusterView
from shoal.config import NodeConfig
from shoal.daemon.coordinator import Coordinator
from shoal.daemon.entry_host import EntryHost
from shoal.daemon.host import RESERVATION_TTL_S, Host
from shoal.daemon.messages import (
    Cancel,
    CopyWeights,
    DrainNode,
    HandOver,
    HasWeights,
    InstanceRecord,
    InstanceRef,
    Leave,
    ListInstances,
    ListReply,
    Poll,
    PollReply,
    Reserve,
    ShardState,
    StartShard,
    SubmitReply,
    SubmitRequest,
    WeightsManifest,
    WeightsManifestReply,
    WeightsRead,
)
from shoal.daemon.peers import Peers
from shoal.daemon.records import Hosted, InstanceError, RequestLog, public_instance
from shoal.daemon.routes import PublicRoutes
from shoal.daemon.weights import WeightsCopier, WeightsError, WeightsSource, has_weights
from shoal.placement.feedback import MIN_TOKENS, DecodeFeedback, target_correction
from shoal.runner.contract import Failure, Submit

log = logging.getLogger("shoal.instances")

MANIFEST_TIMEOUT_S = 120.0  # the source hashes files it has not hashed yet (~1 s a GB)
READ_TIMEOUT_S = 30.0
HAND_OVER_WAIT_S = 20.0  # for an instance still moving before its coordinator hands it over
REFRESH_EVERY_S = 3.0  # the cluster-wide listing a coordinator's successor adopts from
# A poll returns as soon as there are new tokens, else after this: short, so that a node that
# silently went away is noticed by the requests waiting on it within seconds.
POLL_WAIT_S = 2.0


class InstancesComponent:
    name = "instances"

    def __init__(self, config: NodeConfig, cluster_view: Callable[[], ClusterView],
                 client: Callable[[], PeerClient | None], metrics: Metrics, runner_env: dict[str, str] | None = None):
        self.node_id = config.node_id
        self.peers = Peers(config.node_id, cluster_view, client)
        self.host = Host(config.node_id, config.home, config.memory_limit_bytes, runner_env or {}, self._report,
                         config.kv_budget_bytes, cluster_key=config.cluster_key, device=config.device)
        self.entries = EntryHost(self.host.hosted)
        self.host.on_request_event = self.entries.on_event
        self.host.on_runner_gone = self.entries.on_runner_gone
        self.host.on_instance_stopped = self.entries.forget
        self.entries.on_finished = self._learn_decode
        self.feedback = DecodeFeedback(config.decode_correction_file)
        self.coordinator = Coordinator(config.node_id, self.peers, self.host, self._list_reply, metrics)
        self.weights_source = WeightsSource()
        self.copier = WeightsCopier(
            lambda src, msg: self.peers.call(src, "/peer/weights/manifest", msg, WeightsManifestReply, MANIFEST_TIMEOUT_S),
            lambda src, msg: self.peers.fetch(src, "/peer/weights/read", msg, READ_TIMEOUT_S))
        self._tasks: set[asyncio.Task[None]] = set()
        self.request_leave: Callable[[], None] = lambda: None  # the node's own stop (drain, then leave)
        self.set_profile: Callable[[NodeProfile], None] = lambda p: None  # the node's, with a new decode correction

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
            web.post("/peer/instances/submit", peer_handler(SubmitRequest, self._on_submit)),
            web.post("/peer/instances/poll", peer_handler(Poll, self._on_poll)),
            web.post("/peer/instances/cancel", peer_handler(Cancel, self._on_cancel)),
            web.post("/peer/instances/drain", peer_handler(DrainNode, self._on_drain)),
            web.post("/peer/node/leave", peer_handler(Leave, self._on_leave)),
            web.post("/peer/instances/handover", peer_handler(HandOver, self._on_hand_over)),
            web.post("/peer/weights/has", peer_handler(HasWeights, self._on_has_weights)),
            web.post("/peer/weights/manifest", peer_handler(WeightsManifest, self._on_manifest)),
            web.post("/peer/weights/read", peer_handler(WeightsRead, self._on_read)),
            web.post("/peer/weights/copy", peer_handler(CopyWeights, self._on_copy_weights)),
        ]

    def on_member(self, kind: str, node_id: str) -> None:
        self.coordinator.on_member(kind, node_id)

    async def start(self) -> None:
        prof = self._own_profile()
        if prof is not None and self.feedback.load(prof) != prof.decode_correction:
            self.set_profile(prof.model_copy(update={"decode_correction": self.feedback.value}))
        spawn(self._refresh_loop(), self._tasks, log)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await self.coordinator.stop()
        await self.host.stop_all()  # runners go with the node

    def _own_profile(self) -> NodeProfile | None:
        me = self.peers.cluster_view().node(self.node_id)
        return me.profile if me is not None else None

    def _learn_decode(self, h: Hosted, req: RequestLog) -> None:
        """A request finished at an entry here: if it timed this node's decode alone, correct the
        node's speed for the plans to come (placement/feedback.py)."""
        stats, prof = req.stats, self._own_profile()
        if stats is None or prof is None or not req.alone or stats.generation_tokens < MIN_TOKENS:
            return
        if any(iid != h.instance_id for iid, _ in self.host.hosted):
            return  # another instance's runner shares the cores
        target = target_correction(h.placement, self.node_id, stats.decode_tps)
        if target is None:
            return
        c = self.feedback.add(prof, target)
        log.info("decoded %.1f tok/s where %.1f was predicted: this node's decode speed is corrected x%.2f from now on",
                 stats.decode_tps, h.placement.prediction.decode_tokens_per_s, c)
        self.set_profile(prof.model_copy(update={"decode_correction": c}))

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_EVERY_S)
            try:
                if len(self.peers.cluster_view().up_nodes()) > 1:
                    await self.coordinator.rebalance(await self.coordinator.gather_lists())
            except Exception:  # noqa: BLE001 - the next round tries again
                log.exception("refreshing the cluster's instances")

    async def drain(self) -> None:
        """Before this node leaves: have the coordinators of the instances it hosts re-place them
        elsewhere (their streams resume there), and wait until its runners are stopped."""
        self.host.draining = True
        coordinators = {h.coordinator for h in self.host.hosted.values()}
        if coordinators:
            log.info("leaving: moving %d shard(s) elsewhere first", len(self.host.hosted))
        for nid in coordinators:
            try:
                if nid == self.node_id:
                    self.coordinator.drain(self.node_id)
                else:
                    await self.peers.call(nid, "/peer/instances/drain", DrainNode(node_id=self.node_id), Ack)
            except (PeerError, InstanceError) as e:
                log.warning("asking %s to move its instances: %s", self.peers.name(nid), e)
        while self.host.hosted:
            await asyncio.sleep(0.2)
        if coordinators:
            log.info("leaving: every shard moved")
        await self.coordinator.hand_over(HAND_OVER_WAIT_S)

    # -- views
    def cluster_instances(self) -> list[dict[str, Any]]:
        """For /v1/cluster: the live instances of the last cluster-wide listing, this node's fresher."""
        recs = {r.id: r for r in self.coordinator.cluster}
        recs.update({r.id: r for r in self.coordinator.records()})
        local = {(h.instance_id, h.rank): self.host.shard(h) for h in self.host.hosted.values()}
        live = (r for r in recs.values() if r.ended_at is None)
        return [public_instance(r, local) for r in sorted(live, key=lambda r: r.created_at)]

    async def instances(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(live instances, recently ended ones), cluster-wide."""
        lists = await self.coordinator.gather_lists()
        shards = {(s.instance_id, s.rank): s for reply in lists.values() for s in reply.shards}
        recs = sorted((r for reply in lists.values() for r in reply.instances), key=lambda r: r.created_at)
        live = [public_instance(r, shards) for r in recs if r.ended_at is None]
        for inst in live:  # model files on their way to a node of the instance
            nodes = {s["node_id"]: s["node_name"] for s in inst["shards"]}
            inst["copying"] = [{"node_name": nodes[nid], "source": c.source, "done_bytes": c.done_bytes,
                                "total_bytes": c.total_bytes}
                               for nid, reply in lists.items() if nid in nodes for c in reply.copies if c.model == inst["model"]]
        ended = [public_instance(r) for r in sorted((r for r in recs if r.ended_at is not None),
                                                    key=lambda r: r.ended_at or 0, reverse=True)]
        return live, ended

    def _list_reply(self) -> ListReply:
        shards = []
        for s in self.host.shards():
            if s.rank == 0:
                active, idle = self.entries.activity(s.instance_id)
                s = s.model_copy(update={"active_requests": active, "idle_s": idle})
            shards.append(s)
        return ListReply(node_id=self.node_id, free_bytes=self.host.free_bytes(), reserved_bytes=self.host.reserved_bytes(),
                         instances=self.coordinator.records(), shards=shards, copies=self.copier.states())

    def _report(self, h: Hosted, msg: ShardState) -> None:
        """A shard's state, to its instance's coordinator."""
        if h.coordinator == self.node_id:
            self.coordinator.on_shard_state(msg)
            return

        async def send() -> None:
            try:
                await self.peers.call(h.coordinator, "/peer/instances/state", msg, Ack)
            except (PeerError, InstanceError) as e:
                log.warning("telling the coordinator of %s about rank %d: %s", h.instance_id, h.rank, e)

        spawn(send(), self._tasks, log)

    # -- requests, from any node ------------------------------------------------------------------
    async def submit(self, rec: InstanceRecord, request: Submit) -> tuple[SubmitReply, AsyncIterator[PollReply] | None]:
        """Hand a request to the instance's entry (here, or on another node). The reply says
        whether its scheduler took it; if it did, the iterator yields what it streams until done
        (closing the iterator early cancels the request)."""
        if rec.entry == self.node_id:
            req = await self.entries.submit(rec.id, request)
            if req.error is not None:
                return SubmitReply(accepted=False, error=req.error), None
            reply = SubmitReply(accepted=True, prompt_tokens=len(req.prompt_ids or []))

            async def poll_here(after: int) -> PollReply:
                return await self.entries.poll(rec.id, request.rid, after, POLL_WAIT_S)

            async def cancel_here() -> None:
                self.entries.cancel(rec.id, request.rid)

            return reply, _follow(poll_here, cancel_here)
        reply = await self.peers.call(rec.entry, "/peer/instances/submit", SubmitRequest(instance_id=rec.id, request=request),
                                      SubmitReply, 40.0)
        if not reply.accepted:
            return reply, None

        async def poll_there(after: int) -> PollReply:
            return await self.peers.call(rec.entry, "/peer/instances/poll",
                                         Poll(instance_id=rec.id, rid=request.rid, after=after, wait_s=POLL_WAIT_S),
                                         PollReply, POLL_WAIT_S + 3)

        async def cancel_there() -> None:
            await self.peers.call(rec.entry, "/peer/instances/cancel", Cancel(instance_id=rec.id, rid=request.rid), Ack)

        return reply, _follow(poll_there, cancel_there)

    # -- peer routes ------------------------------------------------------------------------------
    async def _on_reserve(self, request: web.Request, msg: Reserve) -> Message:
        return self.host.reserve(msg)

    async def _on_release(self, request: web.Request, msg: InstanceRef) -> Message:
        self.host.release(msg.instance_id)
        return Ack()

    async def _on_start(self, request: web.Request, msg: StartShard) -> Message | web.Response:
        if request[PEER_ID] != msg.coordinator:
            return refuse(request, 403, "only the coordinator starts its shards")
        try:
            return await self.host.start(msg)
        except InstanceError as e:
            return refuse(request, e.status, str(e))

    async def _on_stop(self, request: web.Request, msg: InstanceRef) -> Message:
        await self.host.stop(msg.instance_id, msg.epoch, msg.keep_reservation)
        return Ack()

    async def _on_delete(self, request: web.Request, msg: InstanceRef) -> Message | web.Response:
        try:
            await self.coordinator.delete(msg.instance_id)
        except InstanceError as e:
            return refuse(request, e.status, str(e))
        return Ack()

    async def _on_state(self, request: web.Request, msg: ShardState) -> Message:
        # Only the node that runs a shard may say how it is doing.
        if request[PEER_ID] == self.coordinator.shard_owner(msg.instance_id, msg.rank):
            self.coordinator.on_shard_state(msg)
        return Ack()

    async def _on_list(self, request: web.Request, msg: ListInstances) -> Message:
        return self._list_reply()

    async def _on_submit(self, request: web.Request, msg: SubmitRequest) -> Message | web.Response:
        try:
            req = await self.entries.submit(msg.instance_id, msg.request)
        except InstanceError as e:  # its entry is not (or no longer) here: it may be moving
            return SubmitReply(accepted=False, error=Failure(status=503, message=str(e), code="model_unavailable",
                                                             retry_after=1.0))
        if req.error is not None:
            return SubmitReply(accepted=False, error=req.error)
        return SubmitReply(accepted=True, prompt_tokens=len(req.prompt_ids or []))

    async def _on_poll(self, request: web.Request, msg: Poll) -> Message | web.Response:
        try:
            return await self.entries.poll(msg.instance_id, msg.rid, msg.after, msg.wait_s)
        except InstanceError as e:
            return refuse(request, e.status, str(e))

    async def _on_hand_over(self, request: web.Request, msg: HandOver) -> Message | web.Response:
        try:
            await self.coordinator.take_over(msg.record, request[PEER_ID])
        except InstanceError as e:
            return refuse(request, e.status, str(e))
        return Ack()

    # -- model files between nodes (weights.py)
    async def _on_has_weights(self, request: web.Request, msg: HasWeights) -> Message:
        return await asyncio.to_thread(has_weights, msg.model)

    async def _on_manifest(self, request: web.Request, msg: WeightsManifest) -> Message | web.Response:
        try:
            return await self.weights_source.manifest(msg)
        except InstanceError as e:
            return refuse(request, e.status, str(e))

    async def _on_read(self, request: web.Request, msg: WeightsRead) -> web.Response:
        try:
            data = await self.weights_source.read(msg)
        except InstanceError as e:
            return refuse(request, e.status, str(e))
        return web.Response(body=data, content_type="application/octet-stream")

    async def _on_copy_weights(self, request: web.Request, msg: CopyWeights) -> Message | web.Response:
        # Only for a shard about to start here: the coordinator that reserved its memory asks.
        res = self.host.reservations.get(msg.instance_id)
        if res is None or res.coordinator != request[PEER_ID]:
            return refuse(request, 403, "no reservation of that coordinator here for this instance")
        expires, res.expires_at = res.expires_at, None  # held while the copy runs, however long
        try:
            await self.copier.copy(msg.model, msg.sources, self.peers.name)
        except (WeightsError, OSError) as e:
            return refuse(request, 502, str(e))
        finally:
            started = any(h.instance_id == msg.instance_id for h in self.host.hosted.values())
            if not started and expires is not None:
                res.expires_at = max(expires, time.monotonic() + RESERVATION_TTL_S)
        return Ack()

    async def _on_drain(self, request: web.Request, msg: DrainNode) -> Message | web.Response:
        if request[PEER_ID] != msg.node_id:
            return refuse(request, 403, "only a node itself may say it is leaving")
        self.coordinator.drain(msg.node_id)
        return Ack()

    async def _on_leave(self, request: web.Request, msg: Leave) -> Message:
        log.info("asked by %s to leave: draining, then stopping", self.peers.name(request[PEER_ID]))
        self.request_leave()
        return Ack()

    async def leave(self, node_id: str) -> None:
        """Have a node (this one or another) drain and leave the cluster."""
        if node_id == self.node_id:
            self.request_leave()
        else:
            await self.peers.call(node_id, "/peer/node/leave", Leave(), Ack)

    async def _on_cancel(self, request: web.Request, msg: Cancel) -> Message:
        self.entries.cancel(msg.instance_id, msg.rid)
        return Ack()


async def _follow(poll: Callable[[int], Any], cancel: Callable[[], Any]) -> AsyncIterator[PollReply]:
    """Poll a request until it is done; cancel it if the consumer stops early."""
    after, done = 0, False
    try:
        while not done:
            reply: PollReply = await poll(after)
            after += len(reply.tokens)
            done = reply.done
            yield reply
    finally:
        if not done:
            with contextlib.suppress(Exception):
                await cancel()
