"""The API's way into the cluster: a `Placer` (api/service.py) whose instances are cluster
instances, and the `RemoteInstance` the API talks to.

`ClusterPlacer.place(name)` reuses a ready instance of the model anywhere in the cluster, or places
one (strategy auto) and waits for it; `RemoteInstance.submit` hands the request to the instance's
entry (this node's runner, or another node's through the signed peer client), whose scheduler
accepts or refuses it at once, and streams its tokens into the API's `GenerationStream`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
import time
from collections.abc import AsyncIterator

from shoal.api.errors import ApiError, from_refusal, internal, not_found
from shoal.api.instance import (
    GenerationRequest,
    GenerationStream,
    ModelCard,
    record_finished,
)
from shoal.api.metrics import Metrics
from shoal.api.service import LocalPlacer
from shoal.cluster.peer import PeerError
from shoal.daemon.instances import InstancesComponent
from shoal.daemon.messages import CreateInstance, InstanceRecord, PollReply, SubmitReply
from shoal.daemon.records import InstanceError
from shoal.engine.scheduler import SchedulerLimits
from shoal.placement.contract import PlacementError
from shoal.placement.planner import DEFAULT_CONTEXT
from shoal.runner.contract import Sampling, Submit

log = logging.getLogger("shoal.instances")

READY_TIMEOUT_S = 600.0
RECOVERY_DEADLINE_S = 120.0  # how long a stream waits, kept alive, for its model to run again
SAME_EPOCH_RETRY_S = 8.0
RESUME_POLL_S = 0.5
KEEPALIVE_EVERY_S = 2.0
RETRY_AFTER_LOST_S = 30.0


class EntryLost(Exception):
    """The instance's entry went away under a request (its runner or its node)."""


class ClusterPlacer:
    def __init__(self, instances: InstancesComponent, limits: SchedulerLimits, metrics: Metrics):
        self.instances, self.limits, self.metrics = instances, limits, metrics
        self.local = LocalPlacer(limits, metrics)  # what this node knows how to name and describe

    def card(self, name: str) -> ModelCard | None:
        # The context a placement made on demand enforces (the planner's default), not the checkpoint's.
        card = self.local.card(name)
        if card is None:
            return None
        return dataclasses.replace(card, context_length=min(card.context_length or DEFAULT_CONTEXT, DEFAULT_CONTEXT))

    def names(self) -> list[str]:
        return self.local.names()

    async def place(self, name: str) -> RemoteInstance:
        card = self.card(name)
        if card is None:
            raise not_found(f"model {name!r} is not available on this node")
        t0 = time.perf_counter()
        rec = await self._ready_instance(name)
        tokenizer = await asyncio.to_thread(_tokenizer, card)
        return RemoteInstance(name, rec, tokenizer, card, self.instances, self.metrics, time.perf_counter() - t0)

    async def _ready_instance(self, name: str) -> InstanceRecord:
        deadline = time.monotonic() + READY_TIMEOUT_S
        created: str | None = None
        while time.monotonic() < deadline:
            lists = await self.instances.coordinator.gather_lists()
            recs = [r for reply in lists.values() for r in reply.instances if r.model == name]
            ready = oldest_ready(recs)
            if ready is not None:
                return ready
            if created is not None and any(r.id == created and r.status == "failed" for r in recs):
                err = next(r.error for r in recs if r.id == created)
                raise internal(f"model {name!r} could not be placed: {err}")
            if created is None and not any(r.status in ("loading", "recovering") for r in recs):
                try:
                    created = (await self.instances.coordinator.create(CreateInstance(model=name)))[0].id
                except PlacementError as e:
                    raise ApiError(503, str(e), "server_error", None, "insufficient_memory", retry_after=30) from None
                except InstanceError as e:
                    raise ApiError(e.status if e.status >= 400 else 500, str(e)) from None
            await asyncio.sleep(0.5)
        raise internal(f"model {name!r} did not become ready within {READY_TIMEOUT_S:.0f} s")


def oldest_ready(recs: list[InstanceRecord]) -> InstanceRecord | None:
    """The instance a model's requests go to: its oldest ready one (every node picks the same)."""
    ready = [r for r in recs if r.status == "ready"]
    return min(ready, key=lambda r: r.created_at) if ready else None


def _tokenizer(card: ModelCard):
    from shoal.engine.loader import load_tokenizer, open_checkpoint

    ckpt = open_checkpoint(card.path)
    try:
        return load_tokenizer(ckpt)
    finally:
        ckpt.close()


class RemoteInstance:
    """A cluster instance as the API sees it: requests go to its entry, tokens come back by polling."""

    def __init__(self, name: str, rec: InstanceRecord, tokenizer, card: ModelCard, instances: InstancesComponent,
                 metrics: Metrics, load_seconds: float):
        self.name, self.rec, self.tokenizer, self.instances, self.metrics = name, rec, tokenizer, instances, metrics
        self.max_context = rec.placement.context
        self.card = dataclasses.replace(card, context_length=self.max_context)
        self.loaded_at, self.load_seconds = time.time(), load_seconds
        self.alive = True  # False once its entry is found gone: the service then places the model again
        self._open_streams: dict[GenerationStream, asyncio.Task[None]] = {}
        self._look: asyncio.Future[InstanceRecord | None] | None = None  # the record being fetched, shared
        self._look_at, self._look_id = 0.0, ""

    async def submit(self, request: GenerationRequest) -> GenerationStream:
        """The request's stream, or its refusal. An instance whose entry cannot be reached right now
        (it is recovering from a lost node) still gets the stream: it waits, kept alive, for the
        recovery and starts on the new placement."""
        feed: AsyncIterator[PollReply] | None = None
        try:
            reply, feed = await self._open(request, 0)
        except (InstanceError, PeerError) as e:
            log.info("request %s: the entry of %s is unreachable (%s); waiting for it", request.id, self.rec.id, e)
        else:
            if not reply.accepted:
                assert reply.error is not None
                if reply.error.code != "model_unavailable":
                    raise from_refusal(reply.error.error())
                feed = None
        stream = GenerationStream(request, self._cancel, self._closed)
        task = asyncio.ensure_future(self._pump(stream, feed))
        self._open_streams[stream] = task
        return stream

    async def _open(self, request: GenerationRequest, attempt: int) -> tuple[SubmitReply, AsyncIterator[PollReply] | None]:
        """Hand the request to the instance's entry; after a loss (`attempt` > 0), resumed after
        the tokens the client already has."""
        rid = re.sub(r"[^0-9A-Za-z_-]", "_", request.id)[:56] + (f"-r{attempt}" if attempt else "")
        params = Sampling.of(request.params)
        if request.output_ids:
            params = params.model_copy(update={"prompt_logprobs": None})  # sent with the first token already
        sub = Submit(rid=rid, prompt_ids=list(request.prompt_ids), params=params, resume_ids=list(request.output_ids))
        return await self.instances.submit(self.rec, sub)

    async def _pump(self, stream: GenerationStream, feed: AsyncIterator[PollReply] | None) -> None:
        attempt = 0
        if feed is None:
            attempt, feed = 1, await self._resume(stream, 1)
            if feed is None:
                return
        while True:
            try:
                async with contextlib.aclosing(feed) as replies:  # leaving early cancels the request at the entry
                    async for reply in replies:
                        if reply.stats is not None:
                            stream.request.stats = reply.stats
                        if reply.tokens:
                            stream.push([t.event() for t in reply.tokens])
                        if reply.error is not None:
                            if reply.error.code != "model_unavailable":
                                stream.fail(from_refusal(reply.error.error()))
                                return
                            raise EntryLost(reply.error.message)
                return
            except asyncio.CancelledError:
                raise
            except (EntryLost, InstanceError, PeerError) as e:
                lost = str(e)
            except Exception as e:  # noqa: BLE001 - the client gets an error, not a hang
                log.exception("request %s on %s", stream.request.id, self.rec.id)
                stream.fail(internal(f"model {self.name!r} failed: {e}"))
                return
            attempt += 1
            log.warning("request %s: the entry of %s (%s) was lost (%s); resuming after %d tokens", stream.request.id,
                        self.rec.id, self.name, lost, len(stream.request.output_ids))
            resumed = await self._resume(stream, attempt)
            if resumed is None:
                return
            feed = resumed

    async def _resume(self, stream: GenerationStream, attempt: int) -> AsyncIterator[PollReply] | None:
        """Wait (keeping the client's connection alive) for the instance to run again, then hand it
        the request from where the client's stream stands; None if it cannot be (the stream is failed)."""
        lost_epoch, t0 = self.rec.epoch, time.monotonic()
        last_keepalive = 0.0
        while time.monotonic() - t0 < RECOVERY_DEADLINE_S:
            if time.monotonic() - last_keepalive >= KEEPALIVE_EVERY_S:
                stream.keepalive()
                last_keepalive = time.monotonic()
            rec = await self._fresh_record()
            if rec is None and time.monotonic() - t0 > SAME_EPOCH_RETRY_S:
                other = await self._another_instance()
                rec, lost_epoch = (other, -1) if other is not None else (None, lost_epoch)
            if rec is not None and rec.ended_at is not None:
                other = await self._another_instance()  # the request can go on on any instance of the model
                if other is None:
                    self.alive = False
                    stream.fail(ApiError(503, f"model {self.name!r} could not go on: {rec.error or rec.status}",
                                         "server_error", None, "model_unavailable", retry_after=RETRY_AFTER_LOST_S))
                    return None
                rec, lost_epoch = other, -1
            # A ready record of the same placement is worth a try only once the coordinator had time
            # to notice a loss (it may have been the link between this node and the entry).
            if rec is not None and rec.status == "ready" and (rec.epoch > lost_epoch or time.monotonic() - t0 > SAME_EPOCH_RETRY_S):
                self.rec = rec
                try:
                    reply, feed = await self._open(stream.request, attempt)
                except (InstanceError, PeerError) as e:
                    log.info("resuming %s: %s", stream.request.id, e)
                else:
                    if reply.accepted:
                        self.metrics.resumed.inc(model=self.name)
                        log.info("request %s resumed on %s after %.1f s", stream.request.id, self.rec.id, time.monotonic() - t0)
                        return feed
                    assert reply.error is not None
                    if reply.error.code != "model_unavailable" and reply.error.status != 429:
                        stream.fail(from_refusal(reply.error.error()))
                        return None
            await asyncio.sleep(RESUME_POLL_S)
        stream.fail(ApiError(503, f"model {self.name!r} did not recover within {RECOVERY_DEADLINE_S:.0f} s", "server_error",
                             None, "model_unavailable", retry_after=RETRY_AFTER_LOST_S))
        return None

    async def _fresh_record(self) -> InstanceRecord | None:
        """The instance's record as its coordinator has it now; None if no node has it (its
        coordinator was lost too and no successor took it yet, or it is long gone). The streams
        waiting on one recovery share each look, at most one every RESUME_POLL_S."""
        stale = self._look_id != self.rec.id or time.monotonic() - self._look_at >= RESUME_POLL_S
        if self._look is None or (self._look.done() and stale):
            self._look_at, self._look_id = time.monotonic(), self.rec.id
            self._look = asyncio.ensure_future(self._find(self.rec.id))
        return await asyncio.shield(self._look)

    async def _find(self, iid: str) -> InstanceRecord | None:
        try:
            return await self.instances.coordinator.find(iid, fresh=True)
        except (InstanceError, PeerError):
            return None

    async def _another_instance(self) -> InstanceRecord | None:
        """A ready instance of the same model (a replica, or one placed since), if the cluster has one."""
        lists = await self.instances.coordinator.gather_lists()
        return oldest_ready([r for reply in lists.values() for r in reply.instances if r.model == self.name])

    def _cancel(self, stream: GenerationStream) -> None:
        task = self._open_streams.get(stream)
        if task is not None:
            task.cancel()  # the feed's cleanup cancels the request at the entry

    def _closed(self, stream: GenerationStream) -> None:
        self._open_streams.pop(stream, None)
        record_finished(self.metrics, self.name, stream.request)

    def queue_depth(self) -> tuple[int, int]:
        return len(self._open_streams), 0

    def kv_bytes(self) -> int:
        return 0  # held on the runners, not here

    async def close(self) -> None:
        """The API lets go of the instance; the instance itself stays (DELETE /v1/instances stops it)."""
        for task in list(self._open_streams.values()):
            task.cancel()
