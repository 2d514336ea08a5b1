"""Rank 0 of an instance: the distributed model the scheduler drives, and the loop that serves
requests from the node daemon over the runner's pipes.

`DistributedModel` implements the engine's `ShardedModel` protocol (`make_cache`, `__call__`), so
the very `Scheduler` that runs a model in one process — admission, continuous batching, chunked
prefill, sampling, stop strings, failure isolation — runs the instance unchanged. Its caches are
handles: a sequence id the other ranks key their own KV caches by; when the generator drops a
sequence, the handle is collected and its id travels with the next step as freed.

The serve loop is the runner's one owner of the model (one thread): it takes the daemon's typed
commands (a reader thread parses stdin), steps the scheduler, and writes typed events on stdout.
When idle it pings the other ranks every few seconds, so their waiting receive never reaches the
group's timeout.
"""

from __future__ import annotations

import collections
import itertools
import logging
import queue
import sys
import threading
import time
import weakref
from typing import TextIO

import numpy as np
import torch
from pydantic import BaseModel, ValidationError

from shoal.engine.scheduler import Outcome, RequestRefused, Scheduler
from shoal.engine.tokenizer import Tokenizer
from shoal.models.base import BatchLayout
from shoal.runner.contract import (
    COMMAND,
    Accepted,
    Cancel,
    Failed,
    Failure,
    GetStats,
    Refused,
    SeqStats,
    StageStats,
    Stop,
    Submit,
    Token,
    Tokens,
)
from shoal.runner.protocol import (
    OP_PING,
    OP_STEP,
    OP_STOP,
    PREFIX_DROP,
    PREFIX_KEEP,
    PREFIX_LOAD,
    StepMessage,
)
from shoal.runner.stage import StageWorker
from shoal.runner.wire import WireError

log = logging.getLogger("shoal.runner")

PING_EVERY_S = 10.0


class SequenceHandle(list):
    """What `make_cache` hands the generator: no tensors, just the sequence's id on every rank."""

    seq_id: int


class DistributedModel:
    """The instance as the scheduler's model, and as its prefix keeper: a reused prompt's K/V stays
    on the ranks (each its own layers' share), named by a prefix id the entry hands out; keeping,
    loading and dropping one are ops that travel with the next step message."""

    def __init__(self, worker: StageWorker):
        self.worker = worker
        self._ids = itertools.count()
        self._prefix_ids = itertools.count()
        self._freed: collections.deque[int] = collections.deque()
        self._prefix_ops: list[tuple[int, int, int, int]] = []
        self._step = 0

    def make_cache(self) -> SequenceHandle:
        handle = SequenceHandle()
        handle.seq_id = next(self._ids)
        weakref.finalize(handle, self._freed.append, handle.seq_id)
        return handle

    def __call__(self, ids: torch.Tensor, layout: BatchLayout, logit_rows: torch.Tensor | None = None) -> torch.Tensor:
        if logit_rows is None:
            logit_rows = torch.tensor(np.cumsum(layout.lengths) - 1)
        self._step += 1
        msg = StepMessage(OP_STEP, [h.seq_id for h in layout.caches], list(layout.lengths), layout.positions, ids,
                          logit_rows, self._drain_freed(), self._step, self._drain_prefix_ops())
        try:
            out = self.worker.lead(msg)
        except WireError:
            raise
        except Exception as e:
            # The other ranks ran (or wait in) their part of this step: the group is out of step,
            # which only a new placement mends. Fatal, like a broken link.
            raise WireError(f"rank 0 failed inside a step: {type(e).__name__}: {e}") from e
        assert out is not None
        return out

    def ping(self) -> None:
        self.worker.lead(self._control(OP_PING))

    def stop(self) -> None:
        self.worker.lead(self._control(OP_STOP))

    def _control(self, op: int) -> StepMessage:
        empty = torch.zeros(0, dtype=torch.int64)
        return StepMessage(op, [], [], empty, empty, empty, self._drain_freed(), self._step, self._drain_prefix_ops())

    # -- PrefixKeeper
    def can_keep(self, caches: object) -> bool:
        return isinstance(caches, SequenceHandle)

    def keep(self, caches: SequenceHandle, n: int) -> int:
        pid = next(self._prefix_ids)
        self._prefix_ops.append((PREFIX_KEEP, caches.seq_id, pid, n))
        return pid

    def load(self, caches: SequenceHandle, kept: int, n: int) -> None:
        self._prefix_ops.append((PREFIX_LOAD, caches.seq_id, kept, n))

    def drop(self, kept: int) -> None:
        self._prefix_ops.append((PREFIX_DROP, -1, kept, 0))

    def _drain_prefix_ops(self) -> list[tuple[int, int, int, int]]:
        ops, self._prefix_ops = self._prefix_ops, []
        return ops

    def _drain_freed(self) -> list[int]:
        out = []
        while self._freed:
            out.append(self._freed.popleft())
        return out


class Output:
    """Events to the daemon, one JSON line each, one writer at a time. Token events are held and
    written together at most every `FLUSH_S` (a request's first token at once): every line wakes
    the daemon, and a daemon waking once per token takes CPU time from the very stages that make
    the tokens."""

    FLUSH_S = 0.05

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.lock = threading.Lock()
        self._held: list[str] = []
        self._last = 0.0

    def __call__(self, event: BaseModel, hold: bool = False) -> None:
        line = event.model_dump_json(exclude_defaults=False)
        with self.lock:
            self._held.append(line)
            if not hold or time.monotonic() - self._last >= self.FLUSH_S:
                self._flush()

    def flush(self, if_due: bool = False) -> None:
        with self.lock:
            if not if_due or time.monotonic() - self._last >= self.FLUSH_S:
                self._flush()

    def _flush(self) -> None:
        if self._held:
            self.stream.write("\n".join(self._held) + "\n")
            self.stream.flush()
            self._held.clear()
        self._last = time.monotonic()


def read_commands(stream: TextIO, inbox: queue.SimpleQueue) -> None:
    """The stdin reader thread: each line a command; end of input means the daemon is gone."""
    for line in stream:
        if not line.strip():
            continue
        try:
            inbox.put(COMMAND.validate_json(line))
        except ValidationError as e:
            log.warning("ignoring a malformed command: %s", e.errors()[0]["msg"] if e.errors() else e)
    inbox.put(Stop())


def tokenize(tokenizer: Tokenizer, cmd: Submit) -> list[int]:
    """The request's prompt as token ids; a prompt the tokenizer or chat template refuses is the
    request's own 400, never the runner's failure."""
    try:
        if cmd.prompt_ids is not None:
            return list(cmd.prompt_ids)
        if cmd.messages is not None:
            return tokenizer.encode_chat([m.model_dump() for m in cmd.messages])
        return tokenizer.encode(cmd.text or "")
    except Exception as e:  # noqa: BLE001 - jinja's errors, the tokenizer's: all the request's own
        what = "the model's chat template refused these messages" if cmd.messages is not None else "the tokenizer failed"
        raise RequestRefused(400, f"{what}: {type(e).__name__}: {e}"[:500], "invalid_prompt", "messages") from None


def serve_entry(scheduler: Scheduler, model: DistributedModel, tokenizer: Tokenizer, inbox: queue.SimpleQueue,
                out: Output) -> None:
    """The entry's loop: take commands between steps, step the scheduler, write what it produced."""
    last = time.monotonic()
    while True:
        block = not scheduler.has_work
        try:
            cmd = inbox.get(timeout=PING_EVERY_S) if block else inbox.get_nowait()
        except queue.Empty:
            cmd = None
            if block:
                model.ping()
                last = time.monotonic()
                continue
        while cmd is not None:
            if isinstance(cmd, Stop):
                gone = RequestRefused(503, f"model {scheduler.name!r} was stopped", "model_unavailable", retry_after=1.0)
                write_outcomes(out, scheduler.fail_all(gone))
                out.flush()
                model.stop()
                return
            if isinstance(cmd, Submit):
                try:
                    ids = tokenize(tokenizer, cmd)
                    scheduler.offer(cmd.rid, ids, cmd.params.params(), cmd.resume_ids)
                except RequestRefused as e:
                    out(Refused(rid=cmd.rid, error=Failure.of(e)))
                else:
                    out(Accepted(rid=cmd.rid, prompt_ids=ids))
            elif isinstance(cmd, Cancel):
                scheduler.cancel(cmd.rid)
            elif isinstance(cmd, GetStats):
                out(StageStats(**model.worker.stats()))
            try:
                cmd = inbox.get_nowait()
            except queue.Empty:
                cmd = None
        if not scheduler.has_work:
            out.flush()
            if time.monotonic() - last > PING_EVERY_S:
                model.ping()
                last = time.monotonic()
            continue
        out.flush(if_due=True)  # held tokens never wait behind a long step for long
        write_outcomes(out, scheduler.step())
        last = time.monotonic()


def write_outcomes(out: Output, outcomes: list[Outcome]) -> None:
    for o in outcomes:
        if o.error is not None:
            out(Failed(rid=o.rid, error=Failure.of(o.error)))
            continue
        if not o.events:
            continue
        final = o.final
        stats = SeqStats.of(o.stats) if final and o.stats is not None else None
        first = o.stats is not None and o.stats.generation_tokens <= 1
        out(Tokens(rid=o.rid, tokens=[Token.of(ev) for ev in o.events], stats=stats), hold=not final and not first)


def start_reader(inbox: queue.SimpleQueue) -> threading.Thread:
    t = threading.Thread(target=read_commands, args=(sys.stdin, inbox), name="shoal-runner-stdin", daemon=True)
    t.start()
    return t
