"""One rank of an instance: loading its shard (only its layers, only its tensor slice), joining the
instance's process groups, and running its part of every step (see protocol.py for the message)."""

from __future__ import annotations

import ctypes
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from shoal.engine import threads
from shoal.engine.device import Device
from shoal.engine.loader import load_shard
from shoal.engine.prefix import CopyKeeper
from shoal.models.base import BatchLayout, Part
from shoal.placement.contract import ShardPlan
from shoal.runner import wire
from shoal.runner.protocol import (
    OP_PING,
    OP_STEP,
    OP_STOP,
    PREFIX_DROP,
    PREFIX_KEEP,
    PREFIX_LOAD,
    TAG_FINAL,
    TAG_LOGITS,
    TAG_REDUCE,
    Comm,
    StepMessage,
    store_prefix,
)
from shoal.runner.timeline import TIMELINE
from shoal.runner.wire import Wire, WireError

log = logging.getLogger("shoal.runner")


@dataclass
class LoadedStage:
    model: torch.nn.Module  # LlamaShard, or an MoE family's shard (same interface)
    args: object
    tokenizer: object | None


def load_stage(ref: str, shard: ShardPlan, num_layers: int | None = None, with_tokenizer: bool = False,
               device: Device | None = None, weights: str = "stored") -> LoadedStage:
    """Load this rank's part of the model (`load_shard`: only its tensors, each cut to its slice as
    it arrives). A placement's rank holds the embedding and head iff it is on the entry stage."""
    entry = shard.vocab is not None
    # A tensor group: of a dense model, or inside an MoE group (each rank every expert's columns [expert_cols)).
    tensor = shard.tp_size > 1 and (shard.experts is None or shard.expert_cols is not None)
    part = Part(
        shard.layers[0], shard.layers[1], num_layers, embed=entry, head=entry, rank=shard.tp_rank, size=shard.tp_size,
        kv_heads=shard.kv_heads if tensor else None, ffn=shard.ffn if tensor else None,
        experts=tuple(range(*shard.experts)) if shard.experts is not None else None, shared=shard.shared, vocab=shard.vocab,
        expert_cols=shard.expert_cols if tensor else None,
    )
    loaded = load_shard(ref, part, with_tokenizer=with_tokenizer, device=device, weights=weights)
    _trim_heap()
    return LoadedStage(loaded.model, loaded.args, loaded.tokenizer)


def _trim_heap() -> None:
    """Give glibc's free heap pages back to the system. Reading tensors one at a time (and widening
    bf16 to float32) leaves tens of MB of freed buffers in the heap, which would otherwise count
    against this rank's planned share for as long as it runs."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc (macOS, musl): nothing to do


class TensorGroup:
    """A stage's tensor-parallel group as the model sees it: `allreduce([x])` sums x over the
    ranks, in place, identically on every rank. Each rank sends its partial sum to the others and
    adds theirs, in rank order on every rank, so every rank gets the same sum bit for bit: one
    message latency per all-reduce, which is what decode (one row, twice per layer) needs. The
    partials of a prefill chunk are larger, but a tensor group is a few fast-linked ranks, where
    sending the whole partial to each costs little more than a ring's pieces."""

    def __init__(self, wire: Wire, ranks: list[int], rank: int):
        self.wire, self.ranks, self.rank = wire, ranks, rank
        self.others = [r for r in ranks if r != rank]
        self.size = len(ranks)
        self.seconds = 0.0

    def allreduce(self, tensors: list[torch.Tensor]) -> "TensorGroup":
        (x,) = tensors
        t = time.perf_counter()
        parts = self.wire.exchange(x.contiguous(), self.others, TAG_REDUCE)
        parts[self.rank] = x.clone()
        total = parts[self.ranks[0]]
        for r in self.ranks[1:]:  # the same order on every rank: the same sum, bit for bit
            total += parts[r]
        x.copy_(total)
        self.seconds += time.perf_counter() - t
        return self

    def wait(self) -> None:
        pass


def join_groups(store: dist.Store, secret: bytes, rank: int, shards: list[ShardPlan], host: str, timeout_s: float,
                hidden: int, setup_timeout_s: float = 120.0, plaintext: bool = False,
                collective: str = "shoal") -> tuple[Comm, Any]:
    """Rendezvous: connect this rank to every other one over encrypted links (`wire.connect`), and
    name this rank's stage and tensor group. The store's keys live under a prefix derived from the
    secret, so a process that does not know it can neither read the addresses nor plant its own;
    the links then prove themselves with keys derived from the same secret. The group sums over
    those links (TensorGroup), or, where the placement chose one of MLX's transports for its MLX
    ranks, over that with every partial sealed (runner/mlx_group.py). `plaintext`: for benchmarks
    only (wire.Link)."""
    store = dist.PrefixStore(store_prefix(secret), store)
    links = wire.connect(store, secret, rank, len(shards), host, timeout_s, setup_timeout_s, plaintext)
    stages: list[list[int]] = []
    for s in shards:
        if s.stage == len(stages):
            stages.append([])
        stages[s.stage].append(s.rank)
    me = shards[rank]
    tp = None
    if me.tp_size > 1 and collective != "shoal":
        from shoal.runner.mlx_group import join_mlx_group

        tp = join_mlx_group(store, secret, rank, stages[me.stage], host, collective)
    elif me.tp_size > 1:
        tp = TensorGroup(links, stages[me.stage], rank)
    return Comm(links, rank, stages, hidden), tp


class StageWorker:
    """Runs this rank's part of each step; rank 0 leads, the others follow.

    The step message travels with the activations: rank 0 sends it to its own stage's other
    ranks, and each stage's leader sends it to the next stage's ranks together with the hidden
    states, in one frame. So a rank wakes up once per step — when its input arrives — instead of
    once for a broadcast and again for its input."""

    def __init__(self, model: torch.nn.Module, comm: Comm, tp: TensorGroup | None, shards: list[ShardPlan]):
        self.model, self.comm, self.tp = model, comm, tp
        model.shard(tp)
        # Rank 0 assembles the logits from the vocabulary slices of its stage's ranks.
        self.vocab_ranges = {s.rank: tuple(s.vocab) for s in shards if s.vocab is not None}
        self.hidden = model.args.hidden_size
        self.caches: dict[int, list] = {}  # sequence id -> its per-layer caches (KVCache, or MLACache)
        self.prefixes: dict[int, list] = {}  # prefix id -> this rank's layers' share of a kept prompt
        self._copier = CopyKeeper()
        self.steps = 0
        self.tokens = 0
        self.step_s = 0.0  # wall time inside steps
        self.wait_s = 0.0  # of which waiting for messages (including for other stages to compute)

    # -- rank 0
    def lead(self, msg: StepMessage) -> torch.Tensor | None:
        encoded = msg.encode()
        t = time.perf_counter()
        c = self.comm
        c.send_step(encoded, None, c.stages[0][1:])
        if msg.op in (OP_STOP, OP_PING):
            if c.n_stages > 1:
                c.send_step(encoded, None, c.stages[1])
            self._apply(msg)
            return None
        self.wait_s += time.perf_counter() - t
        TIMELINE.mark("step")
        return self.run(msg, encoded, None, t)

    # -- the others
    def follow(self) -> None:
        """Run steps until the entry says stop (or a peer's connection breaks: an exception)."""
        c = self.comm
        src = 0 if c.stage == 0 else c.leader(c.stage - 1)
        while True:
            msg, encoded, h = c.recv_step(src)
            t = time.perf_counter()
            if msg.op in (OP_STOP, OP_PING):
                if c.tp_rank == 0 and c.stage + 1 < c.n_stages:
                    c.send_step(encoded, None, c.stages[c.stage + 1])
                if msg.op == OP_STOP:
                    return
                self._apply(msg)
                continue
            if msg.op != OP_STEP or (c.stage > 0) != (h is not None):
                raise WireError(f"rank {src} sent a step that does not fit this stage (op {msg.op})")
            TIMELINE.mark("recv")
            self.run(msg, encoded, h, t)

    def _apply(self, msg: StepMessage) -> None:
        """The message's prefix ops (in order), then its freed sequences: a prompt kept in the very
        step that frees its sequence is still there to keep."""
        for kind, sid, pid, n in msg.prefix_ops:
            if kind == PREFIX_KEEP:
                if sid in self.caches:
                    self.prefixes[pid] = self._copier.keep(self.caches[sid], n)
            elif kind == PREFIX_LOAD:
                kept = self.prefixes.get(pid)
                if kept is None:
                    raise WireError(f"the entry asked to reuse prefix {pid}, which this rank does not hold")
                self._copier.load(self.caches.setdefault(sid, self.model.make_cache()), kept, n)
            elif kind == PREFIX_DROP:
                self.prefixes.pop(pid, None)
        for sid in msg.freed:
            self.caches.pop(sid, None)

    def run(self, msg: StepMessage, encoded: np.ndarray, h: torch.Tensor | None, t_start: float) -> torch.Tensor | None:
        """This rank's part of one step (`h`: the hidden states that came with the message, on
        stages after the first); on rank 0, the logits (R, vocab)."""
        wait = 0.0
        self._apply(msg)
        m, c = self.model, self.comm
        caches = [self.caches.get(sid) or self.caches.setdefault(sid, m.make_cache()) for sid in msg.seq_ids]
        layout = BatchLayout(msg.lengths, msg.positions, caches)
        R = msg.logit_rows.numel()
        threads.for_step(msg.positions.numel())
        out = None
        with torch.inference_mode():
            TIMELINE.mark("compute")
            if c.stage == 0:
                h = m.embed(msg.token_ids)
            assert h is not None
            h = m.run_layers(h, layout)
            TIMELINE.mark("layers")
            t = time.perf_counter()
            final = None
            if c.stage + 1 < c.n_stages:
                if c.tp_rank == 0:
                    TIMELINE.mark("send")
                    c.send_step(encoded, h, c.stages[c.stage + 1])
            else:
                final = h[msg.logit_rows].contiguous()
                if c.n_stages > 1:
                    if c.tp_rank == 0:
                        TIMELINE.mark("send")
                        for dst in c.stages[0]:
                            c.send(final, dst, TAG_FINAL)
                    final = None
            if c.stage == 0:
                if final is None:
                    final = torch.empty(R, self.hidden)
                    c.recv(final, c.leader(c.n_stages - 1), TAG_FINAL)
                    TIMELINE.mark("final")
                wait += time.perf_counter() - t
                logits = m.logits(final)
                TIMELINE.mark("logits")
                t = time.perf_counter()
                if c.rank == 0:
                    parts = [logits]
                    for src in c.stages[0][1:]:
                        v0, v1 = self.vocab_ranges[src]
                        part = torch.empty(R, v1 - v0)
                        c.recv(part, src, TAG_LOGITS)
                        parts.append(part)
                    out = torch.cat(parts, dim=1) if len(parts) > 1 else logits
                else:
                    c.send(logits.contiguous(), 0, TAG_LOGITS)
            wait += time.perf_counter() - t
        self.steps += 1
        self.tokens += msg.positions.numel()
        self.wait_s += wait
        self.step_s += time.perf_counter() - t_start
        return out

    def stats(self) -> dict[str, float]:
        allreduce = self.tp.seconds if self.tp is not None else 0.0
        return {
            "steps": self.steps,
            "tokens": self.tokens,
            "step_s": round(self.step_s, 6),
            "wait_s": round(self.wait_s, 6),
            "allreduce_s": round(allreduce, 6),
            "compute_s": round(self.step_s - self.wait_s - allreduce, 6),
        }
