"""The data plane's frames, over real sockets on loopback: what one rank sends another arrives bit
for bit; a forged, altered, replayed or unexpected frame is refused; a stranger who connects
during the rendezvous is dropped while the real ranks still connect; a tensor group's exchange of
tensors larger than the socket buffers does not deadlock."""

from __future__ import annotations

import datetime
import hashlib
import hmac
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist

from shoal.runner import wire
from shoal.runner.protocol import OP_STEP, Comm, StepMessage
from shoal.runner.stage import TensorGroup
from shoal.runner.wire import HEADER, MAGIC, TAG_FINAL, TAG_HELLO, TAG_REDUCE, TAG_STEP, WireError

TOKEN = "t" * 48


def run_ranks(size: int, body: Callable[[int, wire.Wire], Any], timeout_s: float = 30.0) -> list[Any]:
    """Connect `size` ranks (threads, each with its own sockets) and run body(rank, wire) on each."""
    store = dist.HashStore()
    results: list[Any] = [None] * size
    errors: list[BaseException] = []

    def rank_main(rank: int) -> None:
        try:
            w = wire.connect(store, TOKEN, rank, size, "127.0.0.1", timeout_s, setup_timeout_s=timeout_s)
            try:
                results[rank] = body(rank, w)
            finally:
                w.close()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s + 10)
    if errors:
        raise errors[0]
    return results


def test_frames_arrive_bit_for_bit_in_order():
    x = torch.randn(3, 576)
    ids = torch.arange(10, dtype=torch.int64)

    def body(rank: int, w: wire.Wire):
        if rank == 0:
            w.send(1, TAG_STEP, ids, x)
            w.send(1, TAG_FINAL, x[1:].contiguous())
            return w.recv(1, TAG_FINAL, torch.empty(2, 576))
        got = w.recv(0, TAG_STEP)
        final = w.recv(0, TAG_FINAL, torch.empty(2, 576))
        w.send(0, TAG_FINAL, final * 2)
        return got

    echoed, got = run_ranks(2, body)
    assert torch.equal(got[:80].view(torch.int64), ids)
    assert torch.equal(got[80:].view(torch.float32).view(3, 576), x)
    assert torch.equal(echoed, x[1:] * 2)


def test_step_message_travels_with_its_hidden_states():
    msg = StepMessage(OP_STEP, [4, 9], [1, 3], torch.tensor([7, 0, 1, 2]), torch.tensor([11, 12, 13, 14]),
                      torch.tensor([0, 3]), [2], 5)
    h = torch.randn(4, 64)

    def body(rank: int, w: wire.Wire):
        comm = Comm(w, rank, [[0], [1]], 64)
        if rank == 0:
            comm.send_step(msg.encode(), h, [1])
            comm.send_step(msg.encode(), None, [1])
            return None
        return comm.recv_step(0), comm.recv_step(0)

    (m1, _, h1), (m2, _, h2) = run_ranks(2, body)[1]
    for m in (m1, m2):
        assert (m.op, m.seq_ids, m.lengths, m.freed, m.step) == (OP_STEP, [4, 9], [1, 3], [2], 5)
        assert torch.equal(m.positions, msg.positions) and torch.equal(m.token_ids, msg.token_ids)
        assert torch.equal(m.logit_rows, msg.logit_rows)
    assert torch.equal(h1, h) and h2 is None


def test_tensor_group_sums_identically_on_every_rank_without_deadlock():
    """Three ranks exchange partials of a small (decode) and a large (prefill, 8 MB) tensor at once."""
    gens = [torch.Generator().manual_seed(r) for r in range(3)]
    small = [torch.randn(1, 576, generator=g) for g in gens]
    large = [torch.randn(2048, 1024, generator=g) for g in gens]

    def body(rank: int, w: wire.Wire):
        group = TensorGroup(w, [0, 1, 2], rank)
        a, b = small[rank].clone(), large[rank].clone()
        group.allreduce([a]).wait()
        group.allreduce([b]).wait()
        return a, b

    out = run_ranks(3, body, timeout_s=60)
    want_small = small[0] + small[1] + small[2]
    want_large = large[0] + large[1] + large[2]
    for a, b in out:
        assert torch.equal(a, out[0][0]) and torch.equal(b, out[0][1])  # bit for bit on every rank
        torch.testing.assert_close(a, want_small)
        torch.testing.assert_close(b, want_large)


def _pair() -> tuple[wire.Link, wire.Link, socket.socket]:
    """Two linked ends over a real socket pair; returns (rank 0's link, rank 1's link, rank 0's raw socket)."""
    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(5)
    l0 = wire.Link(a, 1, wire.direction_key(TOKEN, 0, 1), wire.direction_key(TOKEN, 1, 0))
    l1 = wire.Link(b, 0, wire.direction_key(TOKEN, 1, 0), wire.direction_key(TOKEN, 0, 1))
    return l0, l1, a


def _frame(key: bytes, tag: int, seq: int, body: bytes) -> bytes:
    head = HEADER.pack(MAGIC, tag, seq, len(body))
    return head + body + hmac.new(key, head + body, hashlib.sha256).digest()


def test_altered_frame_is_refused():
    l0, l1, raw = _pair()
    frame = bytearray(_frame(wire.direction_key(TOKEN, 0, 1), TAG_FINAL, 0, torch.ones(4).numpy().tobytes()))
    frame[HEADER.size + 3] ^= 0x40  # one bit of the body
    raw.sendall(frame)
    with pytest.raises(WireError, match="failed authentication"):
        l1.recv(TAG_FINAL, torch.empty(4))


def test_frame_under_another_key_is_refused():
    l0, l1, raw = _pair()
    raw.sendall(_frame(wire.direction_key("another instance's secret" * 2, 0, 1), TAG_FINAL, 0, bytes(16)))
    with pytest.raises(WireError, match="failed authentication"):
        l1.recv(TAG_FINAL, torch.empty(4))


def test_replayed_frame_is_refused():
    l0, l1, raw = _pair()
    frame = _frame(wire.direction_key(TOKEN, 0, 1), TAG_FINAL, 0, bytes(16))
    raw.sendall(frame)
    l1.recv(TAG_FINAL, torch.empty(4))
    raw.sendall(frame)
    with pytest.raises(WireError, match="replayed or lost"):
        l1.recv(TAG_FINAL, torch.empty(4))


def test_unexpected_tag_and_size_are_refused():
    l0, l1, _ = _pair()
    l0.send(TAG_STEP, [torch.zeros(4)])
    with pytest.raises(WireError, match="step frame where a final frame was due"):
        l1.recv(TAG_FINAL, torch.empty(4))
    l0, l1, _ = _pair()
    l0.send(TAG_FINAL, [torch.zeros(5)])
    with pytest.raises(WireError, match="not the size due"):
        l1.recv(TAG_FINAL, torch.empty(4))


def test_closed_peer_is_a_clear_error():
    l0, l1, raw = _pair()
    raw.close()
    with pytest.raises(WireError, match="closed its connection"):
        l1.recv(TAG_FINAL, torch.empty(4))


def closed_by_peer(sock: socket.socket) -> bool:
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass
    return True


def test_strangers_are_dropped_during_the_rendezvous():
    """While rank 0 waits for rank 1, a stranger connects and sends garbage, another replays a hello
    made with the wrong secret; both are dropped, rank 1 still gets in and frames flow."""
    store = dist.HashStore()
    result: dict[str, Any] = {}

    def rank0() -> None:
        try:
            w = wire.connect(store, TOKEN, 0, 2, "127.0.0.1", 10, setup_timeout_s=30)
            result["got"] = w.recv(1, TAG_REDUCE, torch.empty(3))
            w.close()
        except BaseException as e:  # noqa: BLE001
            result["error"] = e

    t = threading.Thread(target=rank0)
    t.start()
    store.wait(["wire/0"], datetime.timedelta(seconds=10))
    host, port = store.get("wire/0").decode().rsplit("|", 1)
    with socket.create_connection((host, int(port))) as garbage:
        garbage.sendall(b"GET / HTTP/1.1\r\n\r\n" + bytes(200))
        garbage.settimeout(10)
        assert closed_by_peer(garbage)
    with socket.create_connection((host, int(port))) as forger:
        forger.settimeout(10)
        nonce = forger.recv(wire.NONCE_BYTES)
        forger.sendall(_frame(wire.direction_key("wrong secret" * 4, 1, 0), TAG_HELLO, 0, struct.pack("<Q", 1) + nonce))
        assert closed_by_peer(forger)
    w1 = wire.connect(store, TOKEN, 1, 2, "127.0.0.1", 10, setup_timeout_s=30)
    w1.send(0, TAG_REDUCE, torch.tensor([1.0, 2.0, 3.0]))
    t.join(30)
    w1.close()
    assert "error" not in result, result.get("error")
    assert torch.equal(result["got"], torch.tensor([1.0, 2.0, 3.0]))


def test_silent_peer_times_out_with_a_clear_error():
    """A peer that sends nothing, or takes nothing, fails the link after the timeout, with a
    message that says which rank and how long."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        a = socket.create_connection(server.getsockname())
        b, _ = server.accept()
    wire._configure(a, 0.5)
    wire._configure(b, 0.5)
    sender = wire.Link(a, 1, wire.direction_key(TOKEN, 0, 1), wire.direction_key(TOKEN, 1, 0))
    receiver = wire.Link(b, 0, wire.direction_key(TOKEN, 1, 0), wire.direction_key(TOKEN, 0, 1))
    try:
        with pytest.raises(WireError, match=r"rank 0 sent nothing for [01] s"):
            receiver.recv(TAG_FINAL, torch.empty(4))
        with pytest.raises(WireError, match=r"rank 1 took nothing"):
            sender.send(TAG_FINAL, [torch.zeros(16 << 20, dtype=torch.uint8)])  # far more than the socket buffers
    finally:
        sender.close()
        receiver.close()
