"""The one scheduler: which sequences a model steps, and what happens to the ones it cannot take.

Every model a node serves is driven by a `Scheduler` — a whole model in the node's process (on the
device thread) and the entry rank of a distributed instance (in its runner) alike — so every
request gets the same care:

- admission by KV-cache bytes (prompt + max_tokens per sequence, against a budget), not a count;
- a bounded queue (by count, and by KV bytes: a few budgets' worth): past it, `offer` refuses with
  429 and a Retry-After estimated from how long requests have been taking;
- chunked prefill that shrinks while other sequences decode, so a long prompt costs running
  streams a few short steps rather than one long stall;
- prompt-prefix reuse (the generator's prefix store, kept per stage for a distributed model);
- failure isolation: a request that cannot be served (token ids outside the vocabulary, a prompt
  or `max_tokens` past the context, too many logprobs, a schema that cannot constrain decoding) is
  refused alone with a 4xx before it reaches the model; a step that raises fails only the
  sequences it was computing, and the model goes on serving the rest.

Threads: `offer` and `cancel` may be called from any thread (the event loop, a runner's command
reader); everything else runs on the one thread that owns the model.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field

import psutil

from shoal.engine.generate import (
    BatchGenerator,
    SequenceStats,
    ShardedModel,
    TokenEvent,
)
from shoal.engine.grammar import InvalidConstraint, check
from shoal.engine.prefix import PrefixKeeper
from shoal.engine.sampler import SamplingParams
from shoal.engine.tokenizer import Tokenizer

log = logging.getLogger("shoal.scheduler")

MAX_LOGPROBS = 20  # alternatives per token, as OpenAI allows
# The queue holds at most this many KV budgets' worth of requests: beyond that a request would wait
# for several full batches to finish, and the client is better told to retry (429) than left hanging.
QUEUE_BUDGETS = 4


@dataclass(frozen=True)
class SchedulerLimits:
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


class RequestRefused(Exception):
    """A request the scheduler will not serve, with the HTTP status a client should see."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 retry_after: float | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.retry_after = status, message, code, param, retry_after


@dataclass
class Outcome:
    """What one step did for one request: new events, or the error that ended it."""

    rid: str
    events: list[TokenEvent] = field(default_factory=list)
    error: RequestRefused | None = None
    stats: SequenceStats | None = None  # the sequence's timings, from when the model took it

    @property
    def final(self) -> bool:
        return self.error is not None or any(ev.finish_reason is not None for ev in self.events)


@dataclass
class _Job:
    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    kv_need: int
    t_offered: float
    resumed: list[int]
    uid: int | None = None
    stats: SequenceStats | None = None  # the generator's, from admission on


class Scheduler:
    def __init__(self, model: ShardedModel, tokenizer: Tokenizer, max_context: int, vocab_size: int,
                 kv_bytes_per_token: int, limits: SchedulerLimits, name: str = "model",
                 fatal: tuple[type[BaseException], ...] = (), prefix_keeper: PrefixKeeper | None = None):
        """`fatal`: exception types a step may raise that end the whole model (a broken link to
        another rank), re-raised instead of failing only the step's sequences. `prefix_keeper`:
        where reused prompt prefixes are kept (default: copies in this process)."""
        self.name, self.limits, self.max_context, self.vocab_size = name, limits, max_context, vocab_size
        self.kv_bytes_per_token = max(1, kv_bytes_per_token)
        self.kv_budget = limits.kv_budget_bytes or psutil.virtual_memory().available // 2
        self.fatal = fatal
        prefix_tokens = min(limits.prefix_cache_bytes, self.kv_budget // 4) // self.kv_bytes_per_token
        self.gen = BatchGenerator(model, tokenizer, max_context, limits.prefill_chunk, limits.max_batch_tokens,
                                  prefix_tokens, prefix_keeper)
        self._lock = threading.Lock()  # guards the queue and the open set against offer/cancel
        self._waiting: collections.deque[_Job] = collections.deque()
        self._queued_kv = 0  # KV bytes the waiting requests will need
        self._open: set[str] = set()  # offered and not yet finished, failed or cancelled
        self._cancelled: set[str] = set()
        self._running: dict[int, _Job] = {}
        self._reserved = 0
        self._avg_duration_s = 1.0
        self.closing = False
        # For metrics, written by the owner thread (plain ints: never torn under the GIL).
        self.n_running = self.n_waiting = self.kv_tokens = 0

    # -- any thread -----------------------------------------------------------------------------------
    def offer(self, rid: str, prompt_ids: list[int], params: SamplingParams, resumed: list[int] | None = None) -> None:
        """Queue a request, or refuse it (`RequestRefused`) without touching anyone else's.
        `resumed`: what it generated before it moved here (see `BatchGenerator.add`)."""
        n = len(prompt_ids)
        if n == 0:
            raise RequestRefused(400, "the prompt is empty", param="prompt")
        resumed = list(resumed or [])
        if len(resumed) >= max(1, params.max_tokens):
            raise RequestRefused(400, f"{len(resumed)} tokens were already generated of max_tokens {params.max_tokens}",
                                 param="resume_ids")
        bad = next((t for t in [*prompt_ids, *resumed] if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise RequestRefused(400, f"token id {bad} is outside the model's vocabulary (0..{self.vocab_size - 1})",
                                 "invalid_token_id", "prompt")
        if n >= self.max_context:
            raise RequestRefused(400, f"the prompt has {n} tokens but model {self.name!r}'s context is {self.max_context} tokens",
                                 "context_length_exceeded", "prompt")
        if n + params.max_tokens > self.max_context:
            raise RequestRefused(400, f"the prompt ({n} tokens) and max_tokens ({params.max_tokens}) exceed model {self.name!r}'s "
                                 f"context of {self.max_context} tokens", "context_length_exceeded", "max_tokens")
        for what, k in (("logprobs", params.logprobs), ("prompt_logprobs", params.prompt_logprobs)):
            if k is not None and not 0 <= k <= MAX_LOGPROBS:
                raise RequestRefused(400, f"{what} must be between 0 and {MAX_LOGPROBS}, not {k}", param=what)
        bad = next((t for t in params.stop_token_ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise RequestRefused(400, f"stop token id {bad} is outside the model's vocabulary", param="stop_token_ids")
        if params.constraint is not None:
            try:
                check(params.constraint)
            except InvalidConstraint as e:
                raise RequestRefused(400, f"invalid {params.constraint.kind.replace('_', ' ')}: {e}", "invalid_constraint",
                                     "constraint") from None
        need = (n + params.max_tokens) * self.kv_bytes_per_token
        if need > self.kv_budget:
            raise RequestRefused(400, f"the request needs {need >> 20} MiB of KV cache, more than model {self.name!r}'s budget "
                                 f"({self.kv_budget >> 20} MiB); ask for fewer tokens", "too_many_tokens", "max_tokens")
        lim = self.limits
        with self._lock:
            if self.closing:
                raise RequestRefused(503, f"model {self.name!r} is being unloaded", "model_unloaded", retry_after=1.0)
            if rid in self._open:
                raise RequestRefused(409, f"request {rid} is already running", "duplicate_request")
            full = len(self._open) >= lim.max_running + lim.max_waiting
            if full or (self._waiting and self._queued_kv + need > QUEUE_BUDGETS * self.kv_budget):
                queued = len(self._waiting) + 1
                raise RequestRefused(429, f"model {self.name!r} is busy: {len(self._running)} sequences running and "
                                     f"{len(self._waiting)} waiting; retry later", "rate_limit_exceeded",
                                     retry_after=self._avg_duration_s * queued / max(1, len(self._running) or 1))
            self._open.add(rid)
            self._queued_kv += need
            self._waiting.append(_Job(rid, list(prompt_ids), params, need, time.perf_counter(), resumed))
            self.n_waiting = len(self._waiting)

    def cancel(self, rid: str) -> None:
        """The client went away: drop the request and free its cache (before or during its run)."""
        with self._lock:
            if rid in self._open:
                self._open.discard(rid)
                self._cancelled.add(rid)

    @property
    def open_requests(self) -> int:
        return len(self._open)

    # -- the owner thread -----------------------------------------------------------------------------
    @property
    def has_work(self) -> bool:
        return bool(self._running) or bool(self._waiting) or bool(self._cancelled)

    def step(self) -> list[Outcome]:
        """Drop cancelled requests, admit what fits, and run one step of the batch."""
        self._reap_cancelled()
        out = self._admit()
        gen, lim = self.gen, self.limits
        if gen.has_work:
            decoding = sum(not seq.in_prefill for seq in gen.sequences.values())
            if decoding:
                gen.prefill_chunk = lim.prefill_while_decoding
                gen.max_batch_tokens = decoding + lim.prefill_while_decoding
            else:
                gen.prefill_chunk, gen.max_batch_tokens = lim.prefill_chunk, lim.max_batch_tokens
            out += self._step()
        self._publish()
        return out

    def fail_all(self, error: RequestRefused) -> list[Outcome]:
        """End every request (the model is going away)."""
        with self._lock:
            self.closing = True
            jobs = [*self._waiting, *self._running.values()]
            self._waiting.clear()
            self._queued_kv = 0
            self._open.clear()
            self._cancelled.clear()
        for uid in list(self._running):
            self.gen.cancel(uid)
        self._running.clear()
        self._reserved = 0
        self._publish()
        return [Outcome(j.rid, error=error) for j in jobs]

    def _reap_cancelled(self) -> None:
        """Forget cancelled requests (their clients already know) and free what they held."""
        with self._lock:
            if not self._cancelled:
                return
            gone, self._cancelled = self._cancelled, set()
            self._waiting = collections.deque(j for j in self._waiting if j.rid not in gone)
            self._queued_kv = sum(j.kv_need for j in self._waiting)
        for uid, job in list(self._running.items()):
            if job.rid in gone:
                self.gen.cancel(uid)
                self._release(uid)

    def _admit(self) -> list[Outcome]:
        failed: list[Outcome] = []
        while len(self._running) < self.limits.max_running:
            with self._lock:
                if not self._waiting:
                    break
                job = self._waiting[0]
                if self._running and self._reserved + job.kv_need > self.kv_budget:
                    break  # wait for memory to free; with nothing running, anything within the budget goes
                self._waiting.popleft()
                self._queued_kv -= job.kv_need
            try:
                job.uid = self.gen.add(job.prompt_ids, job.params, job.resumed)
            except ValueError as e:
                failed.append(self._end(job, RequestRefused(400, str(e))))
                continue
            except self.fatal:
                raise
            except Exception:
                log.exception("model %s: admitting request %s failed", self.name, job.rid)
                failed.append(self._end(job, RequestRefused(500, f"model {self.name!r} could not take this request",
                                                            "internal_error")))
                continue
            job.stats = self.gen.sequences[job.uid].stats
            self._running[job.uid] = job
            self._reserved += job.kv_need
        return failed

    def _step(self) -> list[Outcome]:
        gen = self.gen
        try:
            events = gen.step()
        except self.fatal:
            raise
        except Exception:
            log.exception("model %s: a step failed; failing the %d sequences it computed", self.name, len(self._running))
            err = RequestRefused(500, f"model {self.name!r} failed while generating this request", "internal_error")
            out = []
            for uid, job in list(self._running.items()):
                gen.cancel(uid)
                out.append(self._end(job, err))
            return out
        by_uid: dict[int, list[TokenEvent]] = {}
        for ev in events:
            by_uid.setdefault(ev.uid, []).append(ev)
        out = []
        for uid, evs in by_uid.items():
            job = self._running.get(uid)
            if job is None:
                continue
            if evs[-1].finish_reason is not None:
                out.append(self._end(job, None, evs))
            else:
                out.append(Outcome(job.rid, evs, stats=job.stats))
        return out

    def _end(self, job: _Job, error: RequestRefused | None, events: list[TokenEvent] | None = None) -> Outcome:
        if job.uid is not None and job.uid in self._running:
            self._release(job.uid)
        with self._lock:
            self._open.discard(job.rid)
        if error is None:
            self._avg_duration_s = 0.9 * self._avg_duration_s + 0.1 * (time.perf_counter() - job.t_offered)
        return Outcome(job.rid, events or [], error, job.stats)

    def _release(self, uid: int) -> None:
        job = self._running.pop(uid)
        self._reserved -= job.kv_need

    def _publish(self) -> None:
        self.n_running, self.n_waiting = len(self._running), len(self._waiting)
        self.kv_tokens = sum(len(s.prompt) + len(s.output) for s in self.gen.sequences.values())
