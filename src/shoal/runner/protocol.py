"""The data plane of an instance: its process groups and the step message between ranks.

Every step is described by one small int64 tensor from the entry (rank 0) — no pickle, numbers:

    header  [op, n_seqs, n_tokens, n_rows, n_freed, payload_len, step, 0]
    payload seq_ids(n_seqs) lengths(n_seqs) positions(n_tokens) token_ids(n_tokens)
            logit_rows(n_rows) freed_seq_ids(n_freed)

The message travels with the data, so a rank wakes once per step, when its input arrives. It is
framed as a `Packet`: header, a payload of up to `INLINE` numbers and the hidden states of up to a
few rows in one fixed-size message — every decode step of a small batch is one message per hop;
a longer payload or more rows follow as messages of their own.

    rank 0 -> the other ranks of stage 0:          step packet (TAG_STEP)
    leader of stage s -> every rank of stage s+1:   step packet with the hidden states (T, hidden)
    leader of the last stage -> every rank of stage 0: the rows that need logits (R, hidden)
    other ranks of stage 0 -> rank 0:               their vocabulary columns of the logits

Inside a stage, a tensor group all-reduces after attention and after the MLP (models/llama.py,
through stage.TensorGroup). Control steps (ping, stop) travel the same path without data.

Sequences are named by ids the entry allocates; a rank makes a sequence's KV caches the first time
it sees its id and drops them when the id comes back in `freed`.

Everything here is a gloo point-to-point message: gloo runs those on the calling thread, where its
collectives (broadcast, all-reduce) hop through a worker thread — two more thread wake-ups per
call, which on a loaded 2-core machine cost more than the bytes.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

OP_STEP, OP_STOP, OP_PING = 1, 2, 3
HEADER = 8
INLINE = 248  # numbers of payload carried in the step packet (2 KiB with the header)
INLINE_HIDDEN_BYTES = 8192  # hidden states of a few decode rows ride in the same packet
TAG_STEP, TAG_PAYLOAD, TAG_HIDDEN, TAG_FINAL, TAG_LOGITS, TAG_REDUCE = 1, 2, 3, 4, 5, 6


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

    def encode(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        payload = torch.cat([
            torch.tensor(self.seq_ids, dtype=torch.int64), torch.tensor(self.lengths, dtype=torch.int64),
            self.positions.to(torch.int64), self.token_ids.to(torch.int64), self.logit_rows.to(torch.int64),
            torch.tensor(self.freed, dtype=torch.int64),
        ])
        n = payload.numel()
        first = torch.zeros(HEADER + INLINE, dtype=torch.int64)
        first[:HEADER] = torch.tensor([self.op, len(self.seq_ids), self.positions.numel(), self.logit_rows.numel(),
                                       len(self.freed), n, self.step, 0])
        if n <= INLINE:
            first[HEADER : HEADER + n] = payload
            return first, None
        return first, payload

    @staticmethod
    def decode(first: torch.Tensor, rest: torch.Tensor | None) -> "StepMessage":
        op, s, t, r, f, n, step, _ = (int(x) for x in first[:HEADER])
        p = first[HEADER : HEADER + n] if rest is None else rest
        parts = torch.split(p, [s, s, t, t, r, f])
        return StepMessage(op, parts[0].tolist(), parts[1].tolist(), parts[2], parts[3], parts[4], parts[5].tolist(), step)

    @staticmethod
    def payload_len(first: torch.Tensor) -> int:
        return int(first[5])


class Packet:
    """The step packet: header + inline payload (int64) and, when they fit, the hidden states of
    the step (float32), in one fixed-size byte buffer — one message per hop for a decode step.
    Longer payloads and hidden states follow as messages of their own."""

    def __init__(self, hidden: int):
        self.hidden = hidden
        self.rows = max(1, INLINE_HIDDEN_BYTES // (4 * hidden))
        self.head_bytes = 8 * (HEADER + INLINE)
        self.nbytes = self.head_bytes + 4 * self.rows * hidden

    def pack(self, first: torch.Tensor, h: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(packet, hidden states still to send separately or None)."""
        pkt = torch.zeros(self.nbytes, dtype=torch.uint8)
        pkt[: self.head_bytes].view(torch.int64)[:] = first
        if h is None or h.shape[0] > self.rows:
            return pkt, h
        pkt[self.head_bytes : self.head_bytes + 4 * h.numel()].view(torch.float32)[:] = h.reshape(-1)
        return pkt, None

    def first(self, pkt: torch.Tensor) -> torch.Tensor:
        return pkt[: self.head_bytes].view(torch.int64)

    def hidden_in(self, pkt: torch.Tensor, rows: int) -> torch.Tensor | None:
        if rows > self.rows:
            return None
        return pkt[self.head_bytes : self.head_bytes + 4 * rows * self.hidden].view(torch.float32).view(rows, self.hidden)


def store_prefix(token: str) -> str:
    """Keys of one instance in the rendezvous store: derived from its secret, not the secret itself."""
    return "shoal/" + hashlib.sha256(("store:" + token).encode()).hexdigest()[:32]


def hello_proof(token: str, instance_id: str, rank: int, node_id: str) -> str:
    return hmac.new(token.encode(), f"{instance_id}:{rank}:{node_id}".encode(), hashlib.sha256).hexdigest()


def bind_listener(host: str) -> socket.socket:
    """A fresh port on this node's own address (never the wildcard) for the rendezvous store."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind((host, 0))
    sock.listen(128)
    return sock


def gloo_group(store: dist.Store, rank: int, size: int, host: str, timeout_s: float) -> dist.ProcessGroupGloo:
    """A gloo process group whose connections are bound to `host`, this node's address."""
    opts = dist.ProcessGroupGloo._Options()
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
    opts._timeout = datetime.timedelta(seconds=timeout_s)
    opts._threads = 2
    return dist.ProcessGroupGloo(store, rank, size, opts)


class Comm:
    """One rank's view of the instance's process groups: the world (stage-to-stage messages) and
    its stage's tensor group (all-reduces), with the ranks of every stage.

    Sends are posted and not waited for on the spot (their buffers are never reused): the sender
    goes on at once, and `flush` collects them at the next step."""

    def __init__(self, world: dist.ProcessGroupGloo, rank: int, stages: list[list[int]], tp: dist.ProcessGroupGloo | None,
                 hidden: int):
        self.world, self.rank, self.stages, self.tp = world, rank, stages, tp
        self.stage = next(i for i, st in enumerate(stages) if rank in st)
        self.tp_rank = stages[self.stage].index(rank)
        self.packet = Packet(hidden)
        self._pending: list = []

    @property
    def n_stages(self) -> int:
        return len(self.stages)

    def leader(self, stage: int) -> int:
        return self.stages[stage][0]

    def send(self, t: torch.Tensor, dst: int, tag: int) -> None:
        self._pending.append(self.world.send([t], dst, tag))

    def recv(self, t: torch.Tensor, src: int, tag: int) -> None:
        self.world.recv([t], src, tag).wait()

    def flush(self) -> None:
        for work in self._pending:
            work.wait()
        self._pending.clear()

    def send_step(self, first: torch.Tensor, rest: torch.Tensor | None, h: torch.Tensor | None, dsts: list[int]) -> None:
        """The step message (and the step's hidden states, if any) to each of `dsts`."""
        pkt, extra = self.packet.pack(first, h)
        for dst in dsts:
            self.send(pkt, dst, TAG_STEP)
            if rest is not None:
                self.send(rest, dst, TAG_PAYLOAD)
            if extra is not None:
                self.send(extra, dst, TAG_HIDDEN)

    def recv_step(self, src: int, with_hidden: bool) -> tuple[StepMessage, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(message, its header, its long payload or None, the hidden states or None)."""
        pkt = torch.empty(self.packet.nbytes, dtype=torch.uint8)
        self.recv(pkt, src, TAG_STEP)
        first = self.packet.first(pkt)
        rest = None
        n = StepMessage.payload_len(first)
        if n > INLINE:
            rest = torch.empty(n, dtype=torch.int64)
            self.recv(rest, src, TAG_PAYLOAD)
        msg = StepMessage.decode(first, rest)
        h = None
        if with_hidden and msg.op == OP_STEP:
            T = msg.positions.numel()
            h = self.packet.hidden_in(pkt, T)
            if h is None:
                h = torch.empty(T, self.packet.hidden)
                self.recv(h, src, TAG_HIDDEN)
        return msg, first, rest, h
