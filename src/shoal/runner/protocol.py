"""The step protocol of an instance: who sends what to whom each step (over `wire.py`'s frames).

Every step is described by one small int64 tensor from the entry (rank 0) — no pickle, numbers:

    header  [op, n_seqs, n_tokens, n_rows, n_freed, payload_len, step, n_prefix_ops]
    payload seq_ids(n_seqs) lengths(n_seqs) positions(n_tokens) token_ids(n_tokens)
            logit_rows(n_rows) freed_seq_ids(n_freed) prefix_ops(4 * n_prefix_ops)

The message travels with the data, so a rank wakes once per step, when its input arrives: a step
frame is the message followed by the step's hidden states (T, hidden) float32, if any.

    rank 0 -> the other ranks of stage 0:          step frame (message only)
    leader of stage s -> every rank of stage s+1:   step frame with the hidden states
    leader of the last stage -> every rank of stage 0: the rows that need logits (R, hidden)
    other ranks of stage 0 -> rank 0:               their vocabulary columns of the logits

Inside a stage, a tensor group all-reduces after attention and after the MLP (models/llama.py,
through stage.TensorGroup, by `Wire.exchange`). Control steps (ping, stop) travel the same path
without data.

Sequences are named by ids the entry allocates; a rank makes a sequence's KV caches the first time
it sees its id and drops them when the id comes back in `freed`. Reused prompt prefixes are kept
the same way, every rank keeping its own layers' share: a prefix op (PREFIX_KEEP seq -> prefix,
PREFIX_LOAD prefix -> seq, PREFIX_DROP prefix; each [kind, seq_id, prefix_id, n_tokens]) is applied
by every rank, in order, before the step's compute and before `freed`.
"""

from __future__ import annotations

import hashlib
import socket
from dataclasses import dataclass, field

import numpy as np
import torch

from shoal.runner.wire import (
    TAG_FINAL,
    TAG_LOGITS,
    TAG_REDUCE,
    TAG_STEP,
    Wire,
    WireError,
)

__all__ = ["TAG_FINAL", "TAG_LOGITS", "TAG_REDUCE", "Comm", "StepMessage", "bind_listener", "store_prefix"]

OP_STEP, OP_STOP, OP_PING = 1, 2, 3
PREFIX_KEEP, PREFIX_LOAD, PREFIX_DROP = 1, 2, 3
HEADER = 8


@dataclass
class StepMessage:
    op: int
    seq_ids: list[int]
    lengths: list[int]
    positions: torch.Tensor  # (T,) int64
    token_ids: torch.Tensor  # (T,) int64
    logit_rows: torch.Tensor  # (R,) int64
    freed: list[int]
    step: int = 0
    prefix_ops: list[tuple[int, int, int, int]] = field(default_factory=list)  # (kind, seq_id, prefix_id, n)

    def encode(self) -> np.ndarray:
        """The message as int64 numbers (numpy: a decode step's message is a few dozen numbers, and
        torch's per-op dispatch would cost more than the numbers)."""
        positions, tokens, rows = (_ints(x) for x in (self.positions, self.token_ids, self.logit_rows))
        ops = [x for op in self.prefix_ops for x in op]
        n = 2 * len(self.seq_ids) + 2 * len(positions) + len(rows) + len(self.freed) + len(ops)
        head = [self.op, len(self.seq_ids), len(positions), len(rows), len(self.freed), n, self.step, len(self.prefix_ops)]
        return np.array(head + list(self.seq_ids) + list(self.lengths) + positions + tokens + rows + list(self.freed) + ops,
                        dtype=np.int64)

    @staticmethod
    def decode(encoded: np.ndarray) -> "StepMessage":
        op, s, t, r, f, n, step, k = encoded[:HEADER].tolist()
        if min(s, t, r, f, k) < 0 or s + s + t + t + r + f + 4 * k != n or encoded.shape[0] != HEADER + n:
            raise WireError("a step message whose counts do not add up")
        p = encoded[HEADER:]
        ends = np.cumsum([s, s, t, t, r, f, 4 * k]).tolist()
        ops = p[ends[5] : ends[6]].reshape(k, 4).tolist()
        return StepMessage(op, p[: ends[0]].tolist(), p[ends[0] : ends[1]].tolist(), torch.from_numpy(p[ends[1] : ends[2]]),
                           torch.from_numpy(p[ends[2] : ends[3]]), torch.from_numpy(p[ends[3] : ends[4]]),
                           p[ends[4] : ends[5]].tolist(), step, [tuple(x) for x in ops])


def _ints(x: torch.Tensor | list[int]) -> list[int]:
    return x.tolist() if isinstance(x, torch.Tensor) else list(x)


def store_prefix(secret: bytes) -> str:
    """Keys of one instance in the rendezvous store: derived from its secret, so that a process
    without it can neither read the ranks' addresses nor plant its own. The prefix crosses the
    network in clear; a guess at the cluster key checked against it costs the cluster key's scrypt
    stretch (wire.instance_secret)."""
    return "shoal/" + hashlib.sha256(b"shoal-rendezvous-v1\0" + secret).hexdigest()[:32]


def bind_listener(host: str) -> socket.socket:
    """A fresh port on this node's own address (never the wildcard) for the rendezvous store."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind((host, 0))
    sock.listen(128)
    return sock


class Comm:
    """One rank's view of the instance: its links to the other ranks (`Wire`) and the ranks of
    every stage."""

    def __init__(self, wire: Wire, rank: int, stages: list[list[int]], hidden: int):
        self.wire, self.rank, self.stages, self.hidden = wire, rank, stages, hidden
        self.stage = next(i for i, st in enumerate(stages) if rank in st)
        self.tp_rank = stages[self.stage].index(rank)

    @property
    def n_stages(self) -> int:
        return len(self.stages)

    def leader(self, stage: int) -> int:
        return self.stages[stage][0]

    def send(self, t: torch.Tensor, dst: int, tag: int) -> None:
        self.wire.send(dst, tag, t)

    def recv(self, t: torch.Tensor, src: int, tag: int) -> None:
        self.wire.recv(src, tag, t)

    def send_step(self, encoded: np.ndarray, h: torch.Tensor | None, dsts: list[int]) -> None:
        """The step message (and the step's hidden states, if any) to each of `dsts`: one frame each."""
        parts = (encoded,) if h is None else (encoded, h.contiguous())
        for dst in dsts:
            self.wire.send(dst, TAG_STEP, *parts)

    def recv_step(self, src: int) -> tuple[StepMessage, np.ndarray, torch.Tensor | None]:
        """(message, the message as it came, the hidden states or None)."""
        body = self.wire.recv(src, TAG_STEP)
        raw = body.numpy()
        size = raw.shape[0]
        if size < 8 * HEADER or size % 4:
            raise WireError(f"rank {src} sent a step frame of {size} bytes")
        n = int(raw[: 8 * HEADER].view(np.int64)[5])
        m = 8 * (HEADER + n)
        if n < 0 or size < m:
            raise WireError(f"rank {src} sent a step frame shorter than its message")
        encoded = raw[:m].view(np.int64)
        msg = StepMessage.decode(encoded)
        h = None
        if size > m:
            T = msg.positions.shape[0]
            if size - m != 4 * T * self.hidden:
                raise WireError(f"rank {src} sent hidden states of the wrong size")
            h = body[m:].view(torch.float32).view(T, self.hidden)
        return msg, encoded, h
