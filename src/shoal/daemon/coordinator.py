"""The coordinator role: the node that got POST /v1/instances places the instance and keeps its record.

It plans, reserves memory on every chosen node (one at a time, in node-id order), starts the entry
rank and then the others with its rendezvous port, and follows the instance through its life
(loading -> ready -> stopped | failed). Ended instances leave the list of instances and stay in a
short "recently ended" history. It also answers the cluster-wide questions: which instances exist,
where a given one is, and what each node can still promise.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from shoal.cluster.messages import Ack
from shoal.cluster.peer import PeerError, spawn
from shoal.cluster.topology import ClusterView
from shoal.daemon.host import PORT_TIMEOUT_S, Host
from shoal.daemon.messages import (
    CopyWeights,
    CreateInstance,
    HandOver,
    HasWeights,
    HasWeightsReply,
    InstanceRecord,
    InstanceRef,
    ListInstances,
    ListReply,
    Reserve,
    ReserveReply,
    ShardState,
    StartReply,
    StartShard,
)
from shoal.daemon.peers import CALL_TIMEOUT_S, Peers
from shoal.daemon.records import Coordinated, InstanceError
from shoal.placement.contract import Placement, PlacementError
from shoal.placement.planner import plan

if TYPE_CHECKING:
    from shoal.api.metrics import Metrics
    from shoal.placement.spec import ModelSpec

log = logging.getLogger("shoal.instances")


class StaleLaunch(Exception):
    """The placement being started was stopped or replaced meanwhile."""

LIST_TIMEOUT_S = 2.0
PLACE_ATTEMPTS = 3
KEEP_ENDED_INSTANCES = 16
MAX_RECOVERIES_IN_ROW = 3  # re-placements that failed again before becoming ready: then the instance fails
REBALANCE_GAIN = 1.2  # a plan predicted this much faster makes a running instance degraded
IDLE_BEFORE_REBALANCE_S = 2.0
COPY_TIMEOUT_S = 120.0  # a copy of model files between nodes: this, plus the time at the slowest rate
COPY_SLOWEST_BYTES_PER_S = 2e6
UNMEASURED_LINK_MBPS = 100.0  # the guess for a link not probed yet


class Coordinator:
    def __init__(self, node_id: str, peers: Peers, host: Host, list_reply: Callable[[], ListReply], metrics: Metrics):
        self.node_id, self.peers, self.host, self.metrics = node_id, peers, host, metrics
        self._list_reply = list_reply  # this node's own answer to /peer/instances/list
        self.coordinated: dict[str, Coordinated] = {}  # live instances placed here
        self.ended: collections.deque[Coordinated] = collections.deque(maxlen=KEEP_ENDED_INSTANCES)
        self.cluster: list[InstanceRecord] = []  # the last cluster-wide listing
        self._heard: dict[str, list[InstanceRecord]] = {}  # node id -> what it coordinates, as last heard
        self._specs: dict[tuple[str, str], ModelSpec] = {}  # by (model, weights)
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def view(self) -> ClusterView:
        return self.peers.cluster_view()

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    def records(self) -> list[InstanceRecord]:
        """The instances placed here, live and recently ended."""
        return [c.record(self.node_id) for c in [*self.coordinated.values(), *self.ended]]

    # -- listing ----------------------------------------------------------------------------------
    async def gather_lists(self) -> dict[str, ListReply]:
        out = {self.node_id: self._list_reply()}
        others = [n for n in self.view.up_nodes() if not n.is_self]
        results = await asyncio.gather(
            *(self.peers.call(n.id, "/peer/instances/list", ListInstances(), ListReply, LIST_TIMEOUT_S) for n in others),
            return_exceptions=True,
        )
        for n, r in zip(others, results):
            if isinstance(r, ListReply):
                out[n.id] = r
            else:
                log.debug("listing instances of %s: %s", n.name, r)
        # What each node coordinates, as last heard: a node that stopped answering keeps its records
        # here (a successor adopts them when it is found down) until it leaves the view.
        members = {n.id for n in self.view.nodes}
        self._heard = {nid: recs for nid, recs in self._heard.items() if nid in members}
        self._heard.update({nid: reply.instances for nid, reply in out.items()})
        newest: dict[str, InstanceRecord] = {}
        for rec in (r for recs in self._heard.values() for r in recs):
            if rec.id not in newest or rec.epoch > newest[rec.id].epoch:
                newest[rec.id] = rec
        self.cluster = list(newest.values())
        for rec in self.cluster:
            mine = self.coordinated.get(rec.id)
            if mine is not None and rec.coordinator != self.node_id and rec.epoch > mine.epoch:
                log.warning("instance %s (%s) is coordinated by %s now (epoch %d): letting go of it", rec.id, rec.model,
                            self.peers.name(rec.coordinator), rec.epoch)
                mine.event(f"taken over by {self.peers.name(rec.coordinator)}")
                self._end(mine, "stopped", f"taken over by {self.peers.name(rec.coordinator)}")
                spawn(self._stop_everywhere(mine), self._tasks, log)  # its older shards only: see Host.stop
        return out

    async def find(self, iid: str, fresh: bool = False) -> InstanceRecord:
        """An instance's record, live or recently ended (`fresh`: asked of every node now)."""
        inst = self.coordinated.get(iid) or next((c for c in self.ended if c.id == iid), None)
        if inst is not None:
            return inst.record(self.node_id)
        cached = next((r for r in self.cluster if r.id == iid), None)
        if cached is not None and cached.status == "ready" and not fresh:
            return cached  # a request to an entry that moved fails there, and is retried with a fresh record
        for reply in (await self.gather_lists()).values():
            for rec in reply.instances:
                if rec.id == iid:
                    return rec
        raise InstanceError(404, f"no instance {iid}")

    def reserved_by_node(self, lists: dict[str, ListReply]) -> dict[str, int]:
        """Bytes to subtract from each node's offer so the planner sees what each can still promise."""
        out = {}
        for n in self.view.up_nodes():
            reply = lists.get(n.id)
            out[n.id] = n.memory_offered_bytes - reply.free_bytes if reply is not None else n.memory_offered_bytes
        return out

    # -- placing ----------------------------------------------------------------------------------
    async def spec_of(self, model: str, weights: str = "stored") -> ModelSpec:
        spec = self._specs.get((model, weights))
        if spec is None:
            from shoal.engine.loader import ModelNotFound, check_network_reference
            from shoal.placement.spec import spec_for
            from shoal.weights.errors import ModelFileError

            try:
                check_network_reference(model)
                spec = await asyncio.to_thread(spec_for, model, weights)
            except (ModelNotFound, ModelFileError) as e:
                raise InstanceError(404, str(e)) from None
            self._specs[(model, weights)] = spec
        return spec

    async def create(self, body: CreateInstance) -> tuple[InstanceRecord, bool]:
        """(the instance, whether it is new): a model that already has a live instance gets that one
        back unless a replica is asked for."""
        spec = await self.spec_of(body.model, body.weights)
        request = body.request()
        last_error = ""
        for _ in range(PLACE_ATTEMPTS):
            lists = await self.gather_lists()
            if not body.replica:
                live = [r for reply in lists.values() for r in reply.instances
                        if r.model == body.model and r.ended_at is None]
                if live:
                    return min(live, key=lambda r: (r.status != "ready", r.created_at)), False
            placement = plan(spec, self.view, request, self.reserved_by_node(lists))
            iid = secrets.token_hex(8)
            refused = await self._reserve_all(iid, placement)
            if not refused:
                inst = Coordinated(iid, body.model, placement, time.time())
                inst.planner_chose = request.strategy == "auto" and not request.nodes and not request.node_count
                self.coordinated[iid] = inst
                spawn(self._launch(inst), self._tasks, log)
                log.info("placing %s as %s: %s", body.model, iid, placement.reason)
                return inst.record(self.node_id), True
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
            msg = Reserve(instance_id=iid, model=placement.model[:256], bytes=need[nid], coordinator=self.node_id)
            try:
                reply = await self._reserve_on(nid, msg)
            except (PeerError, InstanceError) as e:
                refused = f"{self.peers.name(nid)}: {e}"
                break
            if not reply.ok:
                refused = f"{self.peers.name(nid)}: {reply.error}"
                break
            taken.append(nid)
        if refused:
            await asyncio.gather(*(self._release_on(nid, iid) for nid in taken), return_exceptions=True)
        return refused

    async def _reserve_on(self, node_id: str, msg: Reserve) -> ReserveReply:
        if node_id == self.node_id:
            return self.host.reserve(msg)
        return await self.peers.call(node_id, "/peer/instances/reserve", msg, ReserveReply)

    async def _release_on(self, node_id: str, iid: str) -> None:
        if node_id == self.node_id:
            self.host.release(iid)
        else:
            await self.peers.call(node_id, "/peer/instances/release", InstanceRef(instance_id=iid), Ack)

    async def _launch(self, inst: Coordinated) -> None:
        """Start the entry rank, learn its rendezvous port, start the others."""
        shards, epoch = inst.placement.shards, inst.epoch
        try:
            await self._bring_weights(inst)
            if inst.ended or inst.epoch != epoch:
                raise StaleLaunch
            first = await self._start_on(inst, 0, None)
            if first.port is None:
                raise RuntimeError("the entry runner reported no rendezvous port")
            if inst.ended or inst.epoch != epoch:  # stopped, or replaced, while the entry started
                raise StaleLaunch
            replies = await asyncio.gather(*(self._start_on(inst, s.rank, first.port) for s in shards[1:]), return_exceptions=True)
            for r in replies:
                if isinstance(r, Exception):
                    raise r
        except StaleLaunch:
            if inst.ended:
                await self._stop_everywhere(inst)
        except Exception as e:  # noqa: BLE001 - any failure to start fails the instance
            if inst.ended or inst.epoch != epoch:
                return  # what it started belongs to a placement that is gone
            if epoch == 0:
                await self._fail(inst, f"starting the runners failed: {e}")
            else:  # a recovery's placement: a node of it may have gone meanwhile
                spawn(self._recover(inst, f"starting the runners failed: {e}", epoch=epoch), self._tasks, log)

    async def _bring_weights(self, inst: Coordinated) -> None:
        """Nodes of the placement that lack the model's files copy them from a node that has them
        first; the copy's predicted time joins the placement's prediction, and its course the
        instance's events."""
        from shoal.daemon.weights import has_weights

        model = inst.model[:256]

        async def has(nid: str) -> HasWeightsReply:
            if nid == self.node_id:
                return await asyncio.to_thread(has_weights, model)
            return await self.peers.call(nid, "/peer/weights/has", HasWeights(model=model), HasWeightsReply)

        nodes = list(dict.fromkeys(s.node_id for s in inst.placement.shards))
        up = list(dict.fromkeys([*nodes, *(n.id for n in self.view.up_nodes())]))
        replies = await asyncio.gather(*(has(n) for n in up), return_exceptions=True)
        have = {n: r for n, r in zip(up, replies) if isinstance(r, HasWeightsReply)}
        missing = [n for n in nodes if n in have and not have[n].has]
        if not missing:
            return
        sources = [n for n in up if n in have and have[n].has]  # placement nodes first: already busy with it
        if not sources:
            raise RuntimeError(f"no node of the cluster has the files of {model} (`shoal download` it on one)")
        size = max(have[n].bytes for n in sources)
        seconds = max(_copy_seconds(self.view, sources[0], n, size) for n in missing)
        prediction = inst.placement.prediction.model_copy(update={"copy_s": round(seconds, 1)})
        inst.placement = inst.placement.model_copy(update={"prediction": prediction})
        names = ", ".join(self.peers.name(n) for n in missing)
        inst.event(f"{names} lack the model's files: copying {size / 1e6:.0f} MB from {self.peers.name(sources[0])} "
                   f"(about {seconds:.0f} s)")
        t0 = time.monotonic()
        msg = CopyWeights(instance_id=inst.id, model=model, sources=sources)
        timeout = COPY_TIMEOUT_S + size / COPY_SLOWEST_BYTES_PER_S
        results = await asyncio.gather(*(self.peers.call(n, "/peer/weights/copy", msg, Ack, timeout) for n in missing),
                                       return_exceptions=True)
        for n, r in zip(missing, results):
            if isinstance(r, Exception):
                raise RuntimeError(f"copying the model's files to {self.peers.name(n)}: {r}")
        inst.event(f"model files copied to {names} in {time.monotonic() - t0:.1f} s")

    async def _start_on(self, inst: Coordinated, rank: int, port: int | None) -> StartReply:
        msg = StartShard(instance_id=inst.id, model=inst.model[:256], rank=rank, placement=inst.placement,
                         master_port=port, coordinator=self.node_id, epoch=inst.epoch)
        node_id = inst.placement.shards[rank].node_id
        if node_id == self.node_id:
            return await self.host.start(msg)
        return await self.peers.call(node_id, "/peer/instances/start", msg, StartReply, PORT_TIMEOUT_S + 5)

    # -- life -------------------------------------------------------------------------------------
    async def _fail(self, inst: Coordinated, why: str) -> None:
        if inst.ended:
            return
        log.warning("instance %s (%s) failed: %s", inst.id, inst.model, why)
        self._end(inst, "failed", why)
        await self._stop_everywhere(inst)

    def _end(self, inst: Coordinated, status: str, why: str = "") -> None:
        inst.end(status, why)  # type: ignore[arg-type]
        self.coordinated.pop(inst.id, None)
        self.ended.append(inst)

    async def _stop_everywhere(self, inst: Coordinated, only: set[str] | None = None, keep: set[str] = frozenset()) -> None:
        """Stop the instance's shards on every node of its placement (`only`: those of them; on the
        nodes in `keep`, its memory stays reserved for the placement that replaces it)."""
        nodes = [n for n in dict.fromkeys(s.node_id for s in inst.placement.shards) if only is None or n in only]

        async def stop_on(nid: str) -> None:
            if nid == self.node_id:
                await self.host.stop(inst.id, inst.epoch, nid in keep)
            else:
                ref = InstanceRef(instance_id=inst.id, epoch=inst.epoch, keep_reservation=nid in keep)
                await self.peers.call(nid, "/peer/instances/stop", ref, Ack, CALL_TIMEOUT_S + 5)

        results = await asyncio.gather(*(stop_on(n) for n in nodes), return_exceptions=True)
        for nid, r in zip(nodes, results):
            if isinstance(r, Exception):
                log.warning("stopping %s on %s: %s", inst.id, self.peers.name(nid), r)

    async def delete(self, iid: str) -> InstanceRecord:
        inst = self.coordinated.get(iid)
        if inst is None:
            ended = next((c for c in self.ended if c.id == iid), None)
            if ended is not None:
                return ended.record(self.node_id)
            raise InstanceError(404, f"no instance {iid} coordinated here")
        log.info("stopping instance %s (%s)", iid, inst.model)
        self._end(inst, "stopped")
        await self._stop_everywhere(inst)
        return inst.record(self.node_id)

    def on_shard_state(self, msg: ShardState) -> None:
        inst = self.coordinated.get(msg.instance_id)
        if inst is None or msg.epoch != inst.epoch:
            return  # a shard of a placement that a recovery already replaced
        inst.shard_status[msg.rank] = msg.status
        if msg.status == "failed":  # ("stopped" is only ever a shard this coordinator stopped)
            why = f"rank {msg.rank} on {self.peers.name(inst.placement.shards[msg.rank].node_id)} failed: {msg.error or 'runner failed'}"
            spawn(self._recover(inst, why, epoch=msg.epoch), self._tasks, log)
        elif msg.status == "ready" and msg.rank == 0 and inst.status in ("loading", "recovering"):
            # The entry is ready only once every rank joined the group: the instance is.
            if inst.status == "recovering":
                took = time.monotonic() - inst.recovery_started
                self.metrics.recovery.observe(took, model=inst.model)
                inst.event(f"re-placed on {'+'.join(_node_names(inst.placement))} in {took:.1f} s")
                log.info("instance %s (%s) recovered in %.1f s", inst.id, inst.model, took)
            inst.status, inst.recoveries_in_row = "ready", 0
            log.info("instance %s (%s) ready", inst.id, inst.model)

    def shard_owner(self, iid: str, rank: int) -> str | None:
        """The node that runs a shard of an instance placed here (only it may report on it)."""
        inst = self.coordinated.get(iid)
        return inst.placement.shards[rank].node_id if inst is not None and rank < len(inst.placement.shards) else None

    def on_member(self, kind: str, node_id: str) -> None:
        if kind not in ("down", "leave", "drop"):
            return
        lost = f"{self.peers.name(node_id)} is {'gone' if kind == 'leave' else kind}"
        for inst in list(self.coordinated.values()):
            if any(s.node_id == node_id for s in inst.placement.shards):
                spawn(self._recover(inst, lost, node=node_id), self._tasks, log)
        self._adopt_orphans(node_id, lost)

    # -- rebalancing ------------------------------------------------------------------------------
    async def rebalance(self, lists: dict[str, ListReply]) -> None:
        """Mark instances whose best plan on the cluster as it is now is predicted REBALANCE_GAIN
        faster than the one they run as degraded, and re-place those that are idle (no request at
        their entry for IDLE_BEFORE_REBALANCE_S): never mid-stream. Only where the planner chose
        the placement: one asked for by strategy or nodes stays as asked."""
        entries = {s.instance_id: s for reply in lists.values() for s in reply.shards if s.rank == 0}
        for inst in list(self.coordinated.values()):
            if inst.status != "ready" or inst.recovering or not inst.planner_chose:
                continue
            best = await self._best_plan(inst, lists)
            now = inst.placement.prediction.decode_tokens_per_s
            was = inst.degraded
            inst.degraded = best is not None and best.prediction.decode_tokens_per_s >= REBALANCE_GAIN * now
            if not inst.degraded:
                continue
            assert best is not None
            better = best.prediction.decode_tokens_per_s
            if not was:
                inst.event(f"degraded: {now:.1f} tok/s predicted where {'+'.join(_node_names(best))} would give {better:.1f}")
            entry = entries.get(inst.id)
            if entry is not None and entry.active_requests == 0 and entry.idle_s >= IDLE_BEFORE_REBALANCE_S:
                why = f"rebalancing while idle: {better:.1f} tok/s predicted against {now:.1f}"
                log.info("instance %s (%s): %s", inst.id, inst.model, why)
                spawn(self._move(inst, best, why), self._tasks, log)

    async def _move(self, inst: Coordinated, to: Placement, why: str) -> None:
        """Re-place a healthy, idle instance on a better plan. Unlike a recovery, the new plan's
        memory is reserved while the old placement still runs (a node in both counts the
        instance's old share as free), and only then is the old one stopped — keeping that memory
        reserved where the new plan needs it: a move that cannot be reserved leaves the instance
        running where it is, to be tried again on a later pass."""
        if inst.recovering or inst.ended:
            return
        inst.recovering = True
        try:
            refused = await self._reserve_all(inst.id, to)
            if inst.ended:
                return
            if refused:
                inst.event(f"rebalancing postponed: {refused}")
                log.info("instance %s (%s): rebalancing postponed: %s", inst.id, inst.model, refused)
                return
            inst.degraded = False
            inst.status, inst.recovery_started = "recovering", time.monotonic()
            inst.event(f"{why}; re-placing")
            new_nodes = set(to.memory_by_node())
            inst.replacing, inst.planned_on = inst.epoch, new_nodes
            await self._stop_everywhere(inst, keep=new_nodes)
            if inst.ended:
                await asyncio.gather(*(self._release_on(n, inst.id) for n in new_nodes), return_exceptions=True)
                return
            inst.placement, inst.epoch = to, inst.epoch + 1
            inst.planner_chose, inst.shard_status = True, {}
            log.info("moving %s (%s) as epoch %d: %s", inst.id, inst.model, inst.epoch, to.reason)
            await self._launch(inst)
        finally:
            inst.recovering = False

    async def _best_plan(self, inst: Coordinated, lists: dict[str, ListReply]) -> Placement | None:
        """The plan a fresh placement of this instance would get now (its own memory counted free)."""
        try:
            spec = await self.spec_of(inst.model, inst.placement.weights)
            view = self.view
            view = view.model_copy(update={"nodes": [n for n in view.nodes if n.id in lists and n.id not in inst.exclude]})
            reserved = self.reserved_by_node(lists)
            for nid, b in inst.placement.memory_by_node().items():
                if nid in reserved:
                    reserved[nid] -= b
            return plan(spec, view, inst.placement.replan_request(), reserved)
        except (PlacementError, InstanceError):
            return None

    # -- recovery ---------------------------------------------------------------------------------
    def _adopt_orphans(self, lost_id: str, why: str) -> None:
        """The live instances a lost node coordinated are taken over by one successor: the up node
        with the lowest id. Every node computes the same choice from its own view, so two nodes
        never both re-place (a brief disagreement of views at worst delays the take-over)."""
        up = [n.id for n in self.view.up_nodes() if n.id != lost_id]
        if not up or min(up) != self.node_id:
            return
        for rec in self.cluster:
            if rec.coordinator == lost_id and rec.ended_at is None and rec.id not in self.coordinated:
                inst = Coordinated.adopt(rec)
                self.coordinated[inst.id] = inst
                inst.event(f"coordinator {self.peers.name(lost_id)} lost; {self.peers.name(self.node_id)} took over")
                log.warning("taking over instance %s (%s) from %s", inst.id, inst.model, self.peers.name(lost_id))
                spawn(self._recover(inst, why), self._tasks, log)

    async def hand_over(self, timeout_s: float) -> None:
        """Before this node leaves: every instance it coordinates goes, as it runs, to the node that
        would take it over anyway (the lowest id up), so nothing is re-placed for a coordinator's
        leaving. An instance still moving finishes its move first; one the successor would not
        take is left to the take-over after this node is gone."""
        others = [n.id for n in self.view.up_nodes() if n.id != self.node_id]
        if not others:
            return
        successor = min(others)
        deadline = time.monotonic() + timeout_s
        for inst in list(self.coordinated.values()):
            while inst.recovering and not inst.ended and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            if inst.ended or inst.recovering:
                continue
            try:
                await self.peers.call(successor, "/peer/instances/handover", HandOver(record=inst.record(self.node_id)),
                                      Ack, CALL_TIMEOUT_S + 10)
            except (PeerError, InstanceError) as e:
                log.warning("handing %s over to %s: %s", inst.id, self.peers.name(successor), e)
                continue
            self.coordinated.pop(inst.id, None)  # not ended: it runs on, coordinated there
            log.info("handed instance %s (%s) over to %s", inst.id, inst.model, self.peers.name(successor))

    async def take_over(self, rec: InstanceRecord, sender: str) -> None:
        """An instance handed over by its leaving coordinator: kept as it runs. Reserving its shares
        again, now as its coordinator, is what makes its nodes report here."""
        if rec.coordinator != sender:
            raise InstanceError(403, "only an instance's coordinator hands it over")
        if rec.id in self.coordinated or rec.ended_at is not None:
            return
        inst = Coordinated.adopt(rec)
        self.coordinated[inst.id] = inst
        inst.event(f"{self.peers.name(sender)} is leaving: {self.peers.name(self.node_id)} coordinates it now")
        refused = await self._reserve_all(inst.id, inst.placement)
        if refused:
            spawn(self._recover(inst, f"taking over from {self.peers.name(sender)}: {refused}"), self._tasks, log)

    def drain(self, node_id: str) -> None:
        """Move every instance placed here off a node that is leaving (it still serves meanwhile)."""
        for inst in list(self.coordinated.values()):
            if any(s.node_id == node_id for s in inst.placement.shards):
                inst.exclude.add(node_id)
                spawn(self._recover(inst, f"{self.peers.name(node_id)} is leaving"), self._tasks, log)

    async def _recover(self, inst: Coordinated, why: str, epoch: int | None = None, node: str | None = None) -> None:
        """Re-plan the instance on the nodes still up and answering (auto strategy, memory reserved,
        the reason recorded), under the same id; fail it, saying what is missing, if it no longer fits.

        `epoch`: the placement the trigger is about (a shard's failure), `node`: the node it lost.
        One loss is often heard several times (every rank of the group fails with it, and the node
        is found down seconds later): a trigger about a placement already being replaced, or about
        a node the running recovery planned without, changes nothing."""
        if inst.ended or (epoch is not None and epoch != inst.epoch):
            return
        if inst.recovering:
            if epoch is not None and epoch == inst.replacing:
                return
            if node is not None and (inst.planned_on is None or node not in inst.planned_on):
                return
            inst.event(why)
            inst.recover_again = True  # this loss came after the plan: look again when done
            return
        inst.recovering, inst.recover_again = True, False
        try:
            while True:
                await self._recover_once(inst, why)
                if inst.ended or not inst.recover_again:
                    return
                inst.recover_again, why = False, "another node was lost while re-placing"
        finally:
            inst.recovering = False

    async def _recover_once(self, inst: Coordinated, why: str) -> None:
        inst.recoveries_in_row += 1
        if inst.recoveries_in_row > MAX_RECOVERIES_IN_ROW:
            await self._fail(inst, f"{why}; it failed {MAX_RECOVERIES_IN_ROW} times in a row after re-placing")
            return
        if inst.status != "recovering":
            inst.status, inst.recovery_started = "recovering", time.monotonic()
            if not why.startswith("rebalancing"):
                self.metrics.recoveries.inc(model=inst.model)
        inst.event(f"{why}; re-placing")
        log.warning("instance %s (%s): %s; re-placing", inst.id, inst.model, why)
        inst.replacing, inst.planned_on = inst.epoch, None
        lists = await self.gather_lists()  # who still answers: a node that does not is as good as lost
        await self._stop_everywhere(inst, only=set(lists))
        answering = set(lists)
        lists = {nid: r for nid, r in (await self.gather_lists()).items() if nid in answering}  # their memory is free now
        inst.planned_on = set(lists) - inst.exclude
        spec = await self.spec_of(inst.model, inst.placement.weights)
        if inst.ended:
            return
        request = inst.placement.replan_request()
        refused = ""
        for _ in range(PLACE_ATTEMPTS):
            view = self.view
            view = view.model_copy(update={"nodes": [n for n in view.nodes if n.id in lists and n.id not in inst.exclude]})
            try:
                placement = plan(spec, view, request, self.reserved_by_node(lists))
            except PlacementError as e:
                await self._fail(inst, f"{why}; {inst.model} no longer fits on the nodes left: {e}")
                return
            refused = await self._reserve_all(inst.id, placement)
            if inst.ended:  # stopped meanwhile: give back what was just reserved
                await asyncio.gather(*(self._release_on(n, inst.id) for n in placement.memory_by_node()),
                                     return_exceptions=True)
                return
            if not refused:
                break
            await asyncio.sleep(0.05 + 0.2 * secrets.randbelow(100) / 100)
            lists = {nid: r for nid, r in (await self.gather_lists()).items() if nid in answering}
        else:
            await self._fail(inst, f"{why}; could not reserve memory to re-place it: {refused}")
            return
        inst.placement, inst.epoch = placement, inst.epoch + 1  # a new epoch: a new wire secret
        inst.planner_chose = True
        inst.shard_status = {}
        log.info("re-placing %s (%s) as epoch %d: %s", inst.id, inst.model, inst.epoch, placement.reason)
        await self._launch(inst)


def _node_names(p: Placement) -> list[str]:
    return list(dict.fromkeys(s.node_name for s in p.shards))


def _copy_seconds(view: ClusterView, src: str, dst: str, nbytes: int) -> float:
    """The time to copy nbytes from src to dst at their measured link speed (a guess if unmeasured)."""
    link = view.link(src, dst)
    mbps = link.bandwidth_mbps if link is not None and link.bandwidth_mbps else UNMEASURED_LINK_MBPS
    return nbytes * 8 / (mbps * 1e6)
