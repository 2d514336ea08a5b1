"""Model instances as the API sees them, and the local one: a `Scheduler` stepped by the device thread.

An `Instance` takes token ids and sampling parameters and hands back a `GenerationStream`, an
async iterator of the engine's `TokenEvent`s — or refuses the request at once. The API never
touches the model itself, so the instance behind a name can be a model in this process
(`LocalInstance`) or a cluster instance whose entry runs elsewhere (daemon/placer.py): both are
driven by the same scheduler and feed the same kind of stream.

The API keeps, per request, the prompt ids, sampling parameters and every token streamed so far
(`GenerationRequest`).

Threads: the event loop calls `submit` and `GenerationStream.cancel`; the device thread
(`device.DeviceWorker`) owns the scheduler and the model (torch never runs in the loop thread).
They talk through the scheduler's locked queue one way and `loop.call_soon_threadsafe` the other,
once per step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from shoal.api.device import DeviceWorker
from shoal.api.errors import from_refusal
from shoal.api.metrics import Metrics
from shoal.engine.generate import TokenEvent
from shoal.engine.sampler import SamplingParams
from shoal.engine.scheduler import Outcome, RequestRefused, Scheduler, SchedulerLimits
from shoal.engine.tokenizer import Tokenizer

log = logging.getLogger("shoal.api")

@dataclass
class ModelCard:
    """What the listing endpoints say about a model, loaded or not."""

    name: str
    path: Path | None
    size_bytes: int
    architecture: str
    parameter_size: str  # "135M", "7.6B"
    quantization: str  # "Q4_1", "BF16", ...
    context_length: int
    format: str  # "gguf" | "safetensors"
    modified_at: float  # unix time of the weights file

    def details(self) -> dict[str, Any]:
        return {
            "parent_model": "",
            "format": self.format,
            "family": self.architecture,
            "families": [self.architecture],
            "parameter_size": self.parameter_size,
            "quantization_level": self.quantization,
        }


@dataclass
class GenerationRequest:
    """One sequence as the entry keeps it: enough to replay it on another instance."""

    id: str
    model: str
    prompt_ids: list[int]
    params: SamplingParams
    t_arrival: float  # perf_counter when the HTTP request arrived
    output_ids: list[int] = field(default_factory=list)
    t_first_token: float | None = None
    t_last_token: float | None = None
    finish_reason: str | None = None
    stats: SequenceTimings | None = None  # the engine's own timings, once it has taken the sequence


class SequenceTimings(Protocol):
    """What the API reads of a sequence's engine-side stats (the engine's own `SequenceStats`, or
    the copy that came back from a cluster instance's entry)."""

    @property
    def cached_tokens(self) -> int: ...

    @property
    def ttft_s(self) -> float | None: ...

    @property
    def prefill_tps(self) -> float: ...

    @property
    def decode_tps(self) -> float: ...


class Instance(Protocol):
    """A running model the API can send sequences to."""

    name: str
    tokenizer: Tokenizer
    max_context: int
    card: ModelCard
    loaded_at: float
    load_seconds: float

    alive: bool  # False once it can serve no more (unloaded, or its cluster instance is gone)

    async def submit(self, request: GenerationRequest) -> GenerationStream:
        """Start a sequence, or refuse it at once (an ApiError: 4xx, or 429 with Retry-After)."""
        ...

    def queue_depth(self) -> tuple[int, int]:
        """(running, waiting) sequences."""
        ...

    def kv_bytes(self) -> int: ...

    async def close(self) -> None: ...


# Not a token: "the model is recovering on another placement; keep the client's connection open".
KEEPALIVE = TokenEvent(-1, None, "")


class GenerationStream:
    """The API's side of one sequence: `async for ev in stream` yields TokenEvents and ends after the
    one that carries a finish_reason; errors the instance reports are raised as ApiError."""

    def __init__(self, request: GenerationRequest, on_cancel, on_close):
        self.request = request
        self._queue: asyncio.Queue[TokenEvent | BaseException] = asyncio.Queue()
        self._on_cancel, self._on_close = on_cancel, on_close
        self.closed = False

    # -- fed by the instance (event loop thread)
    def push(self, events: list[TokenEvent]) -> None:
        if self.closed:
            return
        req, now = self.request, time.perf_counter()
        for ev in events:
            if ev.token is not None:
                req.output_ids.append(ev.token)
                req.t_last_token = now
                if req.t_first_token is None:
                    req.t_first_token = now
            self._queue.put_nowait(ev)
            if ev.finish_reason is not None:
                req.finish_reason = ev.finish_reason
                self._close()
                return

    def keepalive(self) -> None:
        if not self.closed:
            self._queue.put_nowait(KEEPALIVE)

    def fail(self, err: BaseException) -> None:
        if not self.closed:
            self._queue.put_nowait(err)
            self._close()

    def _close(self) -> None:
        self.closed = True
        self._on_close(self)

    # -- read by a request handler
    def __aiter__(self) -> GenerationStream:
        return self

    async def __anext__(self) -> TokenEvent:
        if self.closed and self._queue.empty():
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self) -> None:
        """The client went away: stop generating and free the sequence's cache."""
        if self.closed:
            return
        self._queue.put_nowait(TokenEvent(-1, None, "", "cancelled"))
        self.request.finish_reason = "cancelled"
        self._on_cancel(self)  # first: the instance still knows the stream (closing forgets it)
        self._close()


class LocalInstance:
    """A whole model in this process, driven by the one `Scheduler`: the event loop offers and
    cancels; the device thread (`DeviceWorker`, shared by the device's models) steps it."""

    def __init__(self, name: str, lm, card: ModelCard, limits: SchedulerLimits, metrics: Metrics, load_seconds: float,
                 device: DeviceWorker):
        self.name, self.metrics, self.device = name, metrics, device
        self.tokenizer: Tokenizer = lm.tokenizer
        self.max_context: int = lm.args.max_context
        self.card = dataclasses.replace(card, context_length=self.max_context)
        self.loaded_at, self.load_seconds = time.time(), load_seconds
        self.alive = True
        # Bytes of K and V per token across the model's layers.
        kv_per_token = sum(c.bytes_per_token for c in lm.model.make_cache())
        self.scheduler = Scheduler(lm.model, lm.tokenizer, self.max_context, lm.args.vocab_size, kv_per_token, limits, name=name)
        self._loop = asyncio.get_running_loop()
        self._streams: dict[str, GenerationStream] = {}  # loop side: open requests by id
        device.attach(self)

    # -- event loop side ----------------------------------------------------------------------------
    async def submit(self, request: GenerationRequest) -> GenerationStream:
        try:
            self.scheduler.offer(request.id, request.prompt_ids, request.params)
        except RequestRefused as e:
            if e.status == 429:
                self.metrics.rejected.inc(model=self.name, reason="queue_full")
            raise from_refusal(e) from None
        stream = GenerationStream(request, self._cancel, self._closed)
        self._streams[request.id] = stream
        self.device.send(self, "wake")
        return stream

    def queue_depth(self) -> tuple[int, int]:
        return self.scheduler.n_running, self.scheduler.n_waiting

    def kv_bytes(self) -> int:
        return self.scheduler.kv_tokens * self.scheduler.kv_bytes_per_token

    async def close(self) -> None:
        self.alive = False
        await self.device.detach(self)

    def _cancel(self, stream: GenerationStream) -> None:
        self.metrics.cancelled.inc(model=self.name)
        self.scheduler.cancel(stream.request.id)
        self.device.send(self, "wake")

    def _closed(self, stream: GenerationStream) -> None:
        self._streams.pop(stream.request.id, None)
        record_finished(self.metrics, self.name, stream.request)

    def _deliver(self, outcomes: list[Outcome], n_seqs: int) -> None:
        if n_seqs:
            self.metrics.steps.inc(model=self.name)
            self.metrics.step_sequences.inc(n_seqs, model=self.name)
            self.metrics.batch.observe(n_seqs, model=self.name)
        for o in outcomes:
            stream = self._streams.get(o.rid)
            if stream is None:
                continue
            if o.stats is not None:
                stream.request.stats = o.stats
            if o.events:
                stream.push(o.events)
            if o.error is not None:
                stream.fail(from_refusal(o.error))

    # -- device thread side (Steppable) ------------------------------------------------------------------
    def handle(self, kind: str, arg: Any) -> None:
        pass  # "wake": the scheduler's queue already holds what changed

    def has_work(self) -> bool:
        return self.scheduler.has_work

    def step(self) -> None:
        n_seqs = len(self.scheduler.gen.sequences)
        self._post(self.scheduler.step(), n_seqs)

    def detached(self) -> None:
        gone = RequestRefused(503, f"model {self.name!r} was unloaded", "model_unloaded", retry_after=1.0)
        self._post(self.scheduler.fail_all(gone), 0)

    def _post(self, outcomes: list[Outcome], n_seqs: int) -> None:
        if not outcomes and not n_seqs:
            return
        try:
            self._loop.call_soon_threadsafe(self._deliver, outcomes, n_seqs)
        except RuntimeError:  # the loop is closed: the process is exiting
            pass


def record_finished(metrics: Metrics, model: str, req: GenerationRequest) -> None:
    """Count a finished (or abandoned) sequence; every kind of instance calls this once per sequence."""
    if req.stats is not None or req.output_ids:
        metrics.prompt_tokens.inc(len(req.prompt_ids), model=model)
    if req.stats is not None and req.stats.cached_tokens:
        metrics.cached_prompt_tokens.inc(req.stats.cached_tokens, model=model)
    metrics.generation_tokens.inc(len(req.output_ids), model=model)
    if req.t_first_token is not None:
        metrics.ttft.observe(req.t_first_token - req.t_arrival, model=model)
    if req.t_last_token is not None:
        metrics.duration.observe(req.t_last_token - req.t_arrival, model=model)


_request_ids = itertools.count()


def new_request_id(prefix: str) -> str:
    # Unique per process and cheap; the time part keeps ids unique across restarts for logs.
    return f"{prefix}-{int(time.time() * 1000):x}{next(_request_ids):06x}"
