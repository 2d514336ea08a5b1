"""Model instances as the API sees them, and the local one: a BatchGenerator stepped by the device thread.

An `Instance` takes token ids and sampling parameters and hands back a `GenerationStream`, an
async iterator of the engine's `TokenEvent`s. The API never touches the model itself, so the
instance behind a name can be a model in this process (`LocalInstance`) or, later, the entry of
a pipeline on other nodes: both feed the same kind of stream.

The entry keeps what it would need to replay a request elsewhere (`GenerationRequest`: prompt
ids, sampling parameters and every token generated so far).

Threads: the event loop calls `submit` and `GenerationStream.cancel`; the device thread
(`device.DeviceWorker`) owns the generator and the model (torch never runs in the loop thread).
They talk through the device's inbox one way and `loop.call_soon_threadsafe` the other, once per step.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import psutil

from shoal.api.device import DeviceWorker
from shoal.api.errors import ApiError, internal, overloaded
from shoal.api.metrics import Metrics
from shoal.engine.generate import BatchGenerator, ContextOverflowError, SequenceStats, TokenEvent
from shoal.engine.sampler import SamplingParams
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
    stats: SequenceStats | None = None  # the engine's own timings, once it has taken the sequence


class Instance(Protocol):
    """A running model the API can send sequences to."""

    name: str
    tokenizer: Tokenizer
    max_context: int
    card: ModelCard
    loaded_at: float
    load_seconds: float

    def submit(self, request: GenerationRequest) -> GenerationStream: ...

    def queue_depth(self) -> tuple[int, int]:
        """(running, waiting) sequences."""
        ...

    def kv_bytes(self) -> int: ...

    async def close(self) -> None: ...


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
        self._close()
        self._on_cancel(self)


@dataclass
class InstanceLimits:
    max_running: int = 32  # sequences decoded together in one batch
    max_waiting: int = 128  # sequences queued behind them before new ones get 429
    # KV cache the running batch may reserve, (prompt + max_tokens) per sequence; sequences beyond it
    # wait. None: half the memory free when the model is loaded.
    kv_budget_bytes: int | None = None
    prefill_chunk: int = 256  # prompt tokens per step when nothing is decoding (fast time to first token)
    max_batch_tokens: int = 512
    # Prompt tokens per step while other sequences are decoding: a long prompt then costs the
    # running streams several short steps rather than one long stall. Measured on the bundled model
    # (2 cores): 128-token chunks prefill as fast as 256-token ones in half the step time.
    prefill_while_decoding: int = 128
    # K/V of recent prompts kept for reuse by prompts that start the same way (a shared system
    # prompt, the earlier turns of a chat); at most this many bytes, and a quarter of the KV budget.
    prefix_cache_bytes: int = 256 << 20


@dataclass
class _Job:
    stream: GenerationStream
    kv_need: int
    uid: int | None = None


class LocalInstance:
    """A whole model in this process. The event loop side admits and cancels; the device thread
    (`DeviceWorker`, shared by the device's models) owns the generator and steps it."""

    def __init__(self, name: str, lm, card: ModelCard, limits: InstanceLimits, metrics: Metrics, load_seconds: float,
                 device: DeviceWorker):
        self.name, self.limits, self.metrics, self.device = name, limits, metrics, device
        self.tokenizer: Tokenizer = lm.tokenizer
        self.max_context: int = lm.args.max_context
        self.card = dataclasses.replace(card, context_length=self.max_context)
        self.loaded_at, self.load_seconds = time.time(), load_seconds
        caches = lm.model.make_cache()
        # Bytes of K and V per token across this shard's layers.
        self.kv_bytes_per_token = sum(c.bytes_per_token for c in caches)
        self.kv_budget = limits.kv_budget_bytes or psutil.virtual_memory().available // 2
        prefix_tokens = min(limits.prefix_cache_bytes, self.kv_budget // 4) // max(1, self.kv_bytes_per_token)
        self._gen = BatchGenerator(lm.model, lm.tokenizer, self.max_context, limits.prefill_chunk, limits.max_batch_tokens,
                                   prefix_tokens)
        self._loop = asyncio.get_running_loop()
        # Device-thread state.
        self._waiting: collections.deque[_Job] = collections.deque()
        self._running: dict[int, _Job] = {}
        self._reserved = 0
        # Written by the device thread, read by metrics (plain ints: a torn read is impossible under the GIL).
        self._n_running = self._n_waiting = self._kv_tokens = 0
        # Loop state: streams not yet closed, for admission control.
        self._open = 0
        self._avg_duration_s = 1.0
        self._closing = False
        device.attach(self)

    # -- event loop side ----------------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> GenerationStream:
        n = len(request.prompt_ids)
        if n >= self.max_context:
            raise ContextOverflowError(n, self.max_context)
        if self._closing:
            raise ApiError(503, f"model {self.name!r} is being unloaded", "server_error", None, "model_unloaded", retry_after=1)
        lim = self.limits
        if self._open >= lim.max_running + lim.max_waiting:
            self.metrics.rejected.inc(model=self.name, reason="queue_full")
            queued = self._open - lim.max_running + 1
            raise overloaded(
                f"model {self.name!r} is busy: {lim.max_running} sequences running and {lim.max_waiting} waiting; retry later",
                retry_after=self._avg_duration_s * queued / max(1, lim.max_running),
            )
        need = min(n + request.params.max_tokens, self.max_context) * self.kv_bytes_per_token
        if need > self.kv_budget:
            raise ApiError(400, f"the request needs {need >> 20} MiB of KV cache, more than this instance's budget "
                           f"({self.kv_budget >> 20} MiB); ask for fewer tokens", param="max_tokens", code="too_many_tokens")
        stream = GenerationStream(request, self._cancel, self._closed)
        self._open += 1
        self.device.send(self, "add", _Job(stream, need))
        return stream

    def queue_depth(self) -> tuple[int, int]:
        return self._n_running, self._n_waiting

    def kv_bytes(self) -> int:
        return self._kv_tokens * self.kv_bytes_per_token

    async def close(self) -> None:
        self._closing = True
        await self.device.detach(self)

    def _cancel(self, stream: GenerationStream) -> None:
        self.metrics.cancelled.inc(model=self.name)
        self.device.send(self, "cancel", stream)

    def _closed(self, stream: GenerationStream) -> None:
        self._open -= 1
        req = stream.request
        record_finished(self.metrics, self.name, req)
        if req.t_last_token is not None:
            self._avg_duration_s = 0.9 * self._avg_duration_s + 0.1 * (req.t_last_token - req.t_arrival)

    def _deliver(self, batch: list[tuple[GenerationStream, list[TokenEvent] | BaseException]], n_seqs: int) -> None:
        if n_seqs:
            self.metrics.steps.inc(model=self.name)
            self.metrics.step_sequences.inc(n_seqs, model=self.name)
            self.metrics.batch.observe(n_seqs, model=self.name)
        for stream, item in batch:
            if isinstance(item, BaseException):
                stream.fail(item)
            else:
                stream.push(item)

    # -- device thread side (Steppable) ------------------------------------------------------------------
    def handle(self, kind: str, arg: Any) -> None:
        if kind == "add":
            self._waiting.append(arg)
        elif kind == "cancel":
            self._drop(arg)
        self._publish()

    def has_work(self) -> bool:
        return self._gen.has_work or bool(self._waiting)

    def admit(self) -> None:
        lim, failed = self.limits, []
        while self._waiting and len(self._running) < lim.max_running:
            job = self._waiting[0]
            if self._running and self._reserved + job.kv_need > self.kv_budget:
                break  # wait for memory to free; with nothing running, anything that fits the budget alone goes
            self._waiting.popleft()
            req = job.stream.request
            try:
                job.uid = self._gen.add(req.prompt_ids, req.params)
            except ContextOverflowError as e:
                failed.append((job.stream, e))
                continue
            except ValueError as e:
                failed.append((job.stream, ApiError(400, str(e))))
                continue
            req.stats = self._gen.sequences[job.uid].stats
            self._running[job.uid] = job
            self._reserved += job.kv_need
        if failed:
            self._post(failed, 0)

    def step(self) -> None:
        gen, lim = self._gen, self.limits
        if not gen.has_work:
            return
        n_seqs = len(gen.sequences)
        decoding = sum(not seq.in_prefill for seq in gen.sequences.values())
        if decoding:
            gen.prefill_chunk = lim.prefill_while_decoding
            gen.max_batch_tokens = decoding + lim.prefill_while_decoding
        else:
            gen.prefill_chunk, gen.max_batch_tokens = lim.prefill_chunk, lim.max_batch_tokens
        try:
            events = gen.step()
        except Exception:
            log.exception("model %s: forward failed; failing its %d sequences", self.name, n_seqs)
            err = internal(f"model {self.name!r} failed while generating")
            batch = [(job.stream, err) for job in self._running.values()]
            for uid in list(self._running):
                gen.cancel(uid)
                self._release(uid)
            self._post(batch, n_seqs)
            self._publish()
            return
        by_uid: dict[int, list[TokenEvent]] = {}
        for ev in events:
            by_uid.setdefault(ev.uid, []).append(ev)
        batch = []
        for uid, evs in by_uid.items():
            job = self._running.get(uid)
            if job is None:
                continue
            batch.append((job.stream, evs))
            if evs[-1].finish_reason is not None:
                self._release(uid)
        self._post(batch, n_seqs)
        self._publish()

    def detached(self) -> None:
        err = ApiError(503, f"model {self.name!r} was unloaded", "server_error", None, "model_unloaded", retry_after=1)
        jobs = [*self._waiting, *self._running.values()]
        for uid in list(self._running):
            self._gen.cancel(uid)
        self._waiting.clear()
        self._running.clear()
        self._reserved = 0
        self._publish()
        if jobs:
            self._post([(j.stream, err) for j in jobs], 0)

    def _drop(self, stream: GenerationStream) -> None:
        for job in self._waiting:
            if job.stream is stream:
                self._waiting.remove(job)
                return
        for uid, job in self._running.items():
            if job.stream is stream:
                self._gen.cancel(uid)
                self._release(uid)
                return

    def _release(self, uid: int) -> None:
        job = self._running.pop(uid)
        self._reserved -= job.kv_need

    def _publish(self) -> None:
        self._n_running, self._n_waiting = len(self._running), len(self._waiting)
        self._kv_tokens = sum(len(s.prompt) + len(s.output) for s in self._gen.sequences.values())

    def _post(self, batch: list, n_seqs: int) -> None:
        try:
            self._loop.call_soon_threadsafe(self._deliver, batch, n_seqs)
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
