"""Rank 0 of an instance: the distributed model the generator drives, and the loop that serves
requests from the node daemon over the runner's pipes.

`DistributedModel` implements the engine's `ShardedModel` protocol (`make_cache`, `__call__`), so
the very `BatchGenerator` that runs a model in one process — continuous batching, chunked
prefill, sampling, stop strings — runs the instance unchanged. Its caches are handles: a sequence
id the other ranks key their own KV caches by; when the generator drops a sequence, the handle is
collected and its id travels with the next step as freed.

The serve loop is the runner's one owner of the model (one thread): it reads commands the daemon
writes on stdin (a reader thread queues them), steps the generator, and writes events as JSON
lines on stdout. When idle it pings the other ranks every few seconds, so their waiting receive
never reaches the group's timeout.
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import queue
import sys
import threading
import time
import weakref
from typing import Any, TextIO

import numpy as np
import torch

from shoal.engine.generate import BatchGenerator, ContextOverflowError, TokenEvent
from shoal.engine.sampler import SamplingParams
from shoal.models.llama import BatchLayout
from shoal.runner.protocol import OP_PING, OP_STEP, OP_STOP, StepMessage
from shoal.runner.stage import StageWorker

log = logging.getLogger("shoal.runner")

PING_EVERY_S = 10.0


class SequenceHandle(list):
    """What `make_cache` hands the generator: no tensors, just the sequence's id on every rank."""

    seq_id: int


class DistributedModel:
    def __init__(self, worker: StageWorker):
        self.worker = worker
        self._ids = itertools.count()
        self._freed: collections.deque[int] = collections.deque()
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
                          logit_rows, self._drain_freed(), self._step)
        out = self.worker.lead(msg)
        assert out is not None
        return out

    def ping(self) -> None:
        self.worker.lead(self._control(OP_PING))

    def stop(self) -> None:
        self.worker.lead(self._control(OP_STOP))

    def _control(self, op: int) -> StepMessage:
        empty = torch.zeros(0, dtype=torch.int64)
        return StepMessage(op, [], [], empty, empty, empty, self._drain_freed(), self._step)

    def _drain_freed(self) -> list[int]:
        out = []
        while self._freed:
            out.append(self._freed.popleft())
        return out


def params_from_dict(d: dict[str, Any]) -> SamplingParams:
    d = dict(d)
    for k in ("stop", "stop_token_ids"):
        if k in d:
            d[k] = tuple(d[k])
    return SamplingParams(**d)


def event_dict(rid: str, ev: TokenEvent) -> dict[str, Any]:
    out: dict[str, Any] = {"t": "ev", "rid": rid, "token": ev.token, "text": ev.text, "finish": ev.finish_reason}
    if ev.logprob is not None:
        out["logprob"] = ev.logprob
        out["top"] = ev.top_logprobs
    if ev.prompt_logprobs is not None:
        out["prompt_logprobs"] = ev.prompt_logprobs
    return out


class Output:
    """JSON lines to the daemon, one writer at a time. Token events are held and written together
    at most every `FLUSH_S` (a request's first token at once): every line wakes the daemon, and a
    daemon waking once per token takes CPU time from the very stages that make the tokens."""

    FLUSH_S = 0.05

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.lock = threading.Lock()
        self._held: list[str] = []
        self._last = 0.0

    def __call__(self, obj: dict[str, Any], hold: bool = False) -> None:
        line = json.dumps(obj, separators=(",", ":"))
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
        line = line.strip()
        if not line:
            continue
        try:
            inbox.put(json.loads(line))
        except json.JSONDecodeError:
            log.warning("ignoring a malformed command line")
    inbox.put({"op": "stop"})


def serve_entry(model: DistributedModel, tokenizer, max_context: int, inbox: queue.SimpleQueue, out: Output,
                max_running: int = 32) -> None:
    gen = BatchGenerator(model, tokenizer, max_context)
    waiting: collections.deque[dict[str, Any]] = collections.deque()
    rid_of: dict[int, str] = {}
    uid_of: dict[str, int] = {}
    last = time.monotonic()
    while True:
        block = not gen.has_work and not waiting
        try:
            cmd = inbox.get(timeout=PING_EVERY_S) if block else inbox.get_nowait()
        except queue.Empty:
            cmd = None
            if block:
                model.ping()
                last = time.monotonic()
                continue
        while cmd is not None:
            op = cmd.get("op")
            if op == "stop":
                model.stop()
                return
            if op == "submit":
                waiting.append(cmd)
            elif op == "cancel":
                rid = cmd.get("rid")
                waiting = collections.deque(c for c in waiting if c.get("rid") != rid)
                uid = uid_of.pop(rid, None)
                if uid is not None:
                    gen.cancel(uid)
                    rid_of.pop(uid, None)
            elif op == "stats":
                out({"t": "stats", **model.worker.stats()})
            try:
                cmd = inbox.get_nowait()
            except queue.Empty:
                cmd = None
        while waiting and len(gen.sequences) < max_running:
            cmd = waiting.popleft()
            rid = cmd["rid"]
            try:
                params = params_from_dict(cmd.get("params") or {})
                if cmd.get("prompt_ids") is not None:
                    ids = [int(i) for i in cmd["prompt_ids"]]
                elif cmd.get("messages") is not None:
                    ids = tokenizer.encode_chat(cmd["messages"])
                else:
                    ids = tokenizer.encode(cmd.get("text") or "")
                uid = gen.add(ids, params)
            except (ContextOverflowError, ValueError, TypeError, KeyError) as e:
                out({"t": "error", "rid": rid, "message": str(e)})
                continue
            rid_of[uid], uid_of[rid] = rid, uid
            out({"t": "accepted", "rid": rid, "prompt_ids": ids})
        if not gen.has_work:
            out.flush()
            if time.monotonic() - last > PING_EVERY_S:
                model.ping()
                last = time.monotonic()
            continue
        out.flush(if_due=True)  # held tokens never wait behind a long step for long
        stats = {uid: gen.sequences[uid].stats for uid in gen.sequences}
        events = gen.step()
        last = time.monotonic()
        for ev in events:
            rid = rid_of.get(ev.uid)
            if rid is None:
                continue
            line = event_dict(rid, ev)
            first_token = ev.uid in stats and stats[ev.uid].generation_tokens <= 1
            if ev.finish_reason is not None:
                st = stats.get(ev.uid)
                if st is not None:
                    line["stats"] = {"prompt_tokens": st.prompt_tokens, "generation_tokens": st.generation_tokens,
                                     "ttft_s": st.ttft_s, "prefill_tps": st.prefill_tps, "decode_tps": st.decode_tps}
                rid_of.pop(ev.uid, None)
                uid_of.pop(rid, None)
            out(line, hold=ev.finish_reason is None and not first_token)


def start_reader(inbox: queue.SimpleQueue) -> threading.Thread:
    t = threading.Thread(target=read_commands, args=(sys.stdin, inbox), name="shoal-runner-stdin", daemon=True)
    t.start()
    return t
