"""The API's way into the cluster: a `Placer` (api/service.py) whose instances are cluster
instances, and the `RemoteInstance` the API talks to.

`ClusterPlacer.place(name)` reuses a ready instance of the model anywhere in the cluster, or places
one (strategy auto) and waits for it; `RemoteInstance.submit` streams the request's events from the
instance's entry (this node's runner, or another node's through the signed peer client) into the
API's `GenerationStream`. The API above it does not change.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import time
from typing import Any

from shoal.api.errors import ApiError, internal, not_found
from shoal.api.instance import GenerationRequest, GenerationStream, InstanceLimits, ModelCard, record_finished
from shoal.api.metrics import Metrics
from shoal.api.service import LocalPlacer
from shoal.engine.generate import TokenEvent
from shoal.placement.planner import PlacementError
from shoal.runner.messages import CreateInstance, InstanceRecord, Submit
from shoal.runner.supervisor import InstanceError, InstancesComponent

log = logging.getLogger("shoal.instances")

READY_TIMEOUT_S = 600.0


class ClusterPlacer:
    def __init__(self, instances: InstancesComponent, limits: InstanceLimits, metrics: Metrics):
        self.instances, self.limits, self.metrics = instances, limits, metrics
        self.local = LocalPlacer(limits, metrics)  # what this node knows how to name and describe

    def card(self, name: str) -> ModelCard | None:
        return self.local.card(name)

    def names(self) -> list[str]:
        return self.local.names()

    async def place(self, name: str) -> "RemoteInstance":
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
            lists = await self.instances.gather_lists()
            recs = [r for reply in lists.values() for r in reply.instances if r.model == name]
            ready = [r for r in recs if r.status == "ready"]
            if ready:
                return min(ready, key=lambda r: r.created_at)
            if created is not None and any(r.id == created and r.status == "failed" for r in recs):
                err = next(r.error for r in recs if r.id == created)
                raise internal(f"model {name!r} could not be placed: {err}")
            if created is None and not any(r.status == "loading" for r in recs):
                try:
                    created = (await self.instances.create(CreateInstance(model=name))).id
                except PlacementError as e:
                    raise ApiError(503, str(e), "server_error", None, "insufficient_memory", retry_after=30) from None
                except InstanceError as e:
                    raise ApiError(e.status if e.status >= 400 else 500, str(e)) from None
            await asyncio.sleep(0.5)
        raise internal(f"model {name!r} did not become ready within {READY_TIMEOUT_S:.0f} s")


def _tokenizer(card: ModelCard):
    from shoal.engine.loader import load_tokenizer, open_checkpoint

    ckpt = open_checkpoint(card.path)
    try:
        return load_tokenizer(ckpt)
    finally:
        ckpt.close()


class RemoteInstance:
    """A cluster instance as the API sees it."""

    def __init__(self, name: str, rec: InstanceRecord, tokenizer, card: ModelCard, instances: InstancesComponent,
                 metrics: Metrics, load_seconds: float):
        self.name, self.rec, self.tokenizer, self.instances, self.metrics = name, rec, tokenizer, instances, metrics
        self.max_context = rec.placement.context
        self.card = dataclasses.replace(card, context_length=self.max_context)
        self.loaded_at, self.load_seconds = time.time(), load_seconds
        self._open: dict[GenerationStream, asyncio.Task[None]] = {}

    def submit(self, request: GenerationRequest) -> GenerationStream:
        stream = GenerationStream(request, self._cancel, self._closed)
        rid = re.sub(r"[^0-9A-Za-z_-]", "_", request.id)[:64]
        msg = Submit(instance_id=self.rec.id, rid=rid, prompt_ids=list(request.prompt_ids),
                     params=_params_dict(request.params))
        self._open[stream] = asyncio.ensure_future(self._pump(stream, msg))
        return stream

    async def _pump(self, stream: GenerationStream, msg: Submit) -> None:
        try:
            async for batch in self.instances.stream_events(self.rec, msg):
                if any("error" in ev for ev in batch):
                    err = next(ev["error"] for ev in batch if "error" in ev)
                    stream.fail(internal(f"model {self.name!r}: {err}"))
                    return
                stream.push([_token_event(ev) for ev in batch])
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the client gets an error, not a hang
            log.warning("request %s on %s: %s", msg.rid, self.rec.id, e)
            stream.fail(ApiError(503, f"model {self.name!r} is unreachable: {e}", "server_error", None, "model_unavailable", retry_after=1))

    def _cancel(self, stream: GenerationStream) -> None:
        task = self._open.get(stream)
        if task is not None:
            task.cancel()  # stream_events' cleanup cancels the request at the entry

    def _closed(self, stream: GenerationStream) -> None:
        self._open.pop(stream, None)
        record_finished(self.metrics, self.name, stream.request)

    def queue_depth(self) -> tuple[int, int]:
        return len(self._open), 0

    def kv_bytes(self) -> int:
        return 0  # held on the runners, not here

    async def close(self) -> None:
        """The API lets go of the instance; the instance itself stays (DELETE /v1/instances stops it)."""
        for task in list(self._open.values()):
            task.cancel()


def _token_event(ev: dict[str, Any]) -> TokenEvent:
    top = ev.get("top")
    prompt = ev.get("prompt_logprobs")
    return TokenEvent(0, ev.get("token"), ev.get("text", ""), ev.get("finish"), ev.get("logprob"),
                      [tuple(x) for x in top] if top else None,
                      [(a, b, [tuple(x) for x in c]) for a, b, c in prompt] if prompt else None)


def _params_dict(params: Any) -> dict[str, Any]:
    d = dataclasses.asdict(params)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
