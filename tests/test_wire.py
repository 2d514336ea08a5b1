"""The data plane's frames, over real sockets on loopback: what one rank sends another arrives bit
for bit and nothing of it shows in a capture of the link; a forged, altered, replayed, reordered
or unexpected frame is refused, and so is a frame recorded on another connection of the same
instance; a stranger who connects during the rendezvous, or a process without the secret, is
dropped while the real ranks still connect; the secret is derived on each node, never sent; a
tensor group's exchange of tensors larger than the socket buffers does not deadlock."""

from __future__ import annotations

import datetime
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from shoal.cluster.auth import subkey
from shoal.daemon.messages import StartShard
from shoal.runner import wire
from shoal.runner.protocol import OP_STEP, Comm, StepMessage
from shoal.runner.stage import TensorGroup
from shoal.runner.wire import HEADER, HELLO, MAGIC, NONCE, TAG_BYTES, TAG_FINAL, TAG_HELLO, TAG_REDUCE, TAG_STEP, WireError

PLACEMENT = ("0123456789abcdef", 0, "c" * 32)  # instance id, epoch, coordinator
SECRET = wire.instance_secret(subkey("a cluster key of the tests", "instance wire"), *PLACEMENT)


def _rank_main(store: dist.Store, size: int, body: Callable[[int, wire.Wire], Any], results: list[Any],
               errors: list[BaseException], timeout_s: float, setup_timeout_s: float) -> Callable[[int], None]:
    """One rank's thread: connect, run body(rank, wire) into results[rank], any failure into errors."""

    def rank_main(rank: int) -> None:
        try:
            w = wire.connect(store, SECRET, rank, size, "127.0.0.1", timeout_s, setup_timeout_s=setup_timeout_s)
            try:
                results[rank] = body(rank, w)
            finally:
                w.close()
        except BaseException as e:  # noqa: BLE001 - reported by the caller
            errors.append(e)

    return rank_main


def run_ranks(size: int, body: Callable[[int, wire.Wire], Any], timeout_s: float = 30.0) -> list[Any]:
    """Connect `size` ranks (threads, each with its own sockets) and run body(rank, wire) on each."""
    store = dist.HashStore()
    results: list[Any] = [None] * size
    errors: list[BaseException] = []
    rank_main = _rank_main(store, size, body, results, errors, timeout_s, timeout_s)
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


K01, K10 = os.urandom(32), os.urandom(32)  # one connection's keys: rank 0 -> 1 and rank 1 -> 0


def _pair() -> tuple[wire.Link, wire.Link, socket.socket]:
    """Two linked ends over a real socket pair; returns (rank 0's link, rank 1's link, rank 0's raw socket)."""
    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(5)
    return wire.Link(a, 1, K01, K10), wire.Link(b, 0, K10, K01), a


def _frame(key: bytes, tag: int, seq: int, body: bytes) -> bytes:
    """A frame as a sender with `key` would seal it."""
    head = HEADER.pack(MAGIC, tag, seq, len(body))
    return head + AESGCM(key).encrypt(NONCE.pack(seq), body, head)


@pytest.mark.parametrize("where", ["body", "gcm tag"])
def test_altered_frame_is_refused(where: str):
    l0, l1, raw = _pair()
    frame = bytearray(_frame(K01, TAG_FINAL, 0, torch.ones(4).numpy().tobytes()))
    frame[HEADER.size + 3 if where == "body" else -1] ^= 0x40  # one bit
    raw.sendall(frame)
    with pytest.raises(WireError, match="failed authentication"):
        l1.recv(TAG_FINAL, torch.empty(4))


def test_frame_under_another_key_is_refused():
    l0, l1, raw = _pair()
    raw.sendall(_frame(os.urandom(32), TAG_FINAL, 0, bytes(16)))
    with pytest.raises(WireError, match="failed authentication"):
        l1.recv(TAG_FINAL, torch.empty(4))


def test_replayed_frame_is_refused():
    l0, l1, raw = _pair()
    frame = _frame(K01, TAG_FINAL, 0, bytes(16))
    raw.sendall(frame)
    l1.recv(TAG_FINAL, torch.empty(4))
    raw.sendall(frame)
    with pytest.raises(WireError, match="replayed or lost"):
        l1.recv(TAG_FINAL, torch.empty(4))


def test_reordered_frames_are_refused():
    """Frame 1 before frame 0 is refused by its number; frame 1 with its number rewritten to 0 by
    its tag (the number is both the nonce and part of the authenticated header)."""
    l0, l1, raw = _pair()
    raw.sendall(_frame(K01, TAG_FINAL, 1, bytes(16)))
    with pytest.raises(WireError, match="frame 1 where 0 was due"):
        l1.recv(TAG_FINAL, torch.empty(4))
    l0, l1, raw = _pair()
    second = bytearray(_frame(K01, TAG_FINAL, 1, bytes(16)))
    second[: HEADER.size] = HEADER.pack(MAGIC, TAG_FINAL, 0, 16)
    raw.sendall(second)
    with pytest.raises(WireError, match="failed authentication"):
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


# -- on the network: a man in the middle, strangers ------------------------------------------------------------
HELLO_BYTES = HEADER.size + HELLO.size + TAG_BYTES


class Relay:
    """A man in the middle on loopback: forwards one connection to `target` and keeps every byte
    that passes each way. With `inject`, the dialer's hello is passed on and then `inject` instead
    of anything the dialer sends after it."""

    def __init__(self, target: tuple[str, int], inject: bytes | None = None):
        self.target, self.inject = target, inject
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.from_dialer, self.from_listener = bytearray(), bytearray()
        self.pumps: list[threading.Thread] = []
        self.accepted = threading.Thread(target=self._accept, daemon=True)
        self.accepted.start()

    def _accept(self) -> None:
        dialer, _ = self.server.accept()
        self.server.close()
        listener = socket.create_connection(self.target)
        self.pumps = [threading.Thread(target=self._pump, args=(dialer, listener, self.from_dialer, self.inject), daemon=True),
                      threading.Thread(target=self._pump, args=(listener, dialer, self.from_listener, None), daemon=True)]
        for p in self.pumps:
            p.start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, seen: bytearray, inject: bytes | None) -> None:
        try:
            while data := src.recv(1 << 16):
                before = len(seen)
                seen += data
                if inject is None:
                    dst.sendall(data)
                elif before < HELLO_BYTES:
                    dst.sendall(data[: HELLO_BYTES - before])
                    if len(seen) >= HELLO_BYTES:
                        dst.sendall(inject)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def join(self) -> None:
        self.accepted.join(30)
        for p in self.pumps:
            p.join(30)


def run_two_through_relay(body: Callable[[int, wire.Wire], Any], inject: bytes | None = None) -> tuple[list[Any], Relay]:
    """Rank 1 dials rank 0 through a Relay (the address rank 0 published is swapped for the
    relay's before rank 1 reads it); body(rank, wire) runs on each."""
    store = dist.HashStore()
    results: list[Any] = [None, None]
    errors: list[BaseException] = []
    rank_main = _rank_main(store, 2, body, results, errors, 10, 30)
    threads = [threading.Thread(target=rank_main, args=(0,))]
    threads[0].start()
    store.wait(["wire/0"], datetime.timedelta(seconds=10))
    host, port = store.get("wire/0").decode().rsplit("|", 1)
    relay = Relay((host, int(port)), inject)
    store.set("wire/0", f"127.0.0.1|{relay.port}")
    threads.append(threading.Thread(target=rank_main, args=(1,)))
    threads[1].start()
    for t in threads:
        t.join(40)
    relay.join()
    if errors:
        raise errors[0]
    return results, relay


MARKER = b"My bank PIN is 4921, and this sentence must never cross the wire in clear."


def test_a_capture_of_the_link_shows_no_plaintext():
    """Everything both ranks send passes a man in the middle that keeps every byte: the marker, the
    hidden states and the secret are nowhere in it, and the frames still arrive intact."""
    marker = torch.frombuffer(bytearray(MARKER), dtype=torch.uint8)
    h = torch.randn(4, 64)

    def body(rank: int, w: wire.Wire):
        if rank == 1:
            w.send(0, TAG_STEP, marker, h)
            return w.recv(0, TAG_FINAL, torch.empty(len(MARKER), dtype=torch.uint8))
        got = w.recv(1, TAG_STEP)
        w.send(1, TAG_FINAL, got[: len(MARKER)].clone())
        return got

    (got, echoed), relay = run_two_through_relay(body)
    assert bytes(got[: len(MARKER)].numpy()) == MARKER and torch.equal(got[len(MARKER) :].clone().view(torch.float32).view(4, 64), h)
    assert bytes(echoed.numpy()) == MARKER
    capture = bytes(relay.from_dialer) + bytes(relay.from_listener)
    assert len(relay.from_dialer) > HELLO_BYTES + len(MARKER) + h.numel() * 4 and len(relay.from_listener) > len(MARKER)
    for clear in (MARKER[:16], MARKER[-16:], h.numpy().tobytes()[:16], h.numpy().tobytes()[-16:], SECRET[:8]):
        assert clear not in capture


def test_each_connection_has_keys_of_its_own():
    """Two rendezvous of the same instance and epoch (a runner restarted, say) agree on different
    keys, and a frame recorded on the first is refused on the second."""
    x = torch.arange(8, dtype=torch.float32)

    def first(rank: int, w: wire.Wire):
        if rank == 1:
            w.send(0, TAG_FINAL, x)
        else:
            w.recv(1, TAG_FINAL, torch.empty(8))
        link = w.links[1 - rank]
        return link.send_key, link.recv_key

    keys1, relay = run_two_through_relay(first)
    assert keys1[0] == keys1[1][::-1]  # rank 0 opens what rank 1 seals, and the other way
    recorded = bytes(relay.from_dialer[HELLO_BYTES:])
    assert len(recorded) == HEADER.size + x.numel() * 4 + TAG_BYTES

    def second(rank: int, w: wire.Wire):
        link = w.links[1 - rank]
        if rank == 1:
            w.send(0, TAG_FINAL, x)  # the relay passes the recorded frame instead
            return link.send_key, link.recv_key, None
        try:
            w.recv(1, TAG_FINAL, torch.empty(8))
        except WireError as e:
            return link.recv_key, link.send_key, e
        return link.recv_key, link.send_key, None

    (k0, k1), _ = run_two_through_relay(second, inject=recorded)
    assert k0[:2] == k1[:2]
    assert not {*k0[:2]} & {*keys1[0], *keys1[1]}
    assert isinstance(k0[2], WireError) and "failed authentication" in str(k0[2])


def closed_by_peer(sock: socket.socket) -> bool:
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass
    return True


def _read(sock: socket.socket, n: int) -> bytes:
    got = b""
    while len(got) < n:
        more = sock.recv(n - len(got))
        assert more, "closed early"
        got += more
    return got


def _hello(secret: bytes, rank: int, listener: int, listener_public: bytes) -> bytes:
    """A hello from `rank`, made as a dialer holding `secret` would make it for that listener key."""
    mine = X25519PrivateKey.generate()
    public = mine.public_key().public_bytes_raw()
    shared = mine.exchange(X25519PublicKey.from_public_bytes(listener_public))
    key, _ = wire.connection_keys(secret, shared, listener_public, public, rank, listener)
    hello = HEADER.pack(MAGIC, TAG_HELLO, 0, HELLO.size) + HELLO.pack(rank, public)
    return hello + AESGCM(key).encrypt(NONCE.pack(0), b"", hello)


def test_strangers_are_dropped_during_the_rendezvous():
    """While rank 0 waits for rank 1, a stranger connects and sends garbage, a process with the
    wrong secret sends a well-made hello, another replays a hello made for another connection (the
    right secret, another listener key); all are dropped, rank 1 still gets in and frames flow."""
    store = dist.HashStore()
    result: dict[str, Any] = {}

    def rank0() -> None:
        try:
            w = wire.connect(store, SECRET, 0, 2, "127.0.0.1", 10, setup_timeout_s=30)
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
    wrong = wire.instance_secret(subkey("another cluster's key", "instance wire"), *PLACEMENT)
    with socket.create_connection((host, int(port))) as forger:
        forger.settimeout(10)
        forger.sendall(_hello(wrong, 1, 0, _read(forger, wire.PUBLIC_BYTES)))
        assert closed_by_peer(forger)
    with socket.create_connection((host, int(port))) as replayer:
        replayer.settimeout(10)
        _read(replayer, wire.PUBLIC_BYTES)
        other_listener = X25519PrivateKey.generate().public_key().public_bytes_raw()
        replayer.sendall(_hello(SECRET, 1, 0, other_listener))
        assert closed_by_peer(replayer)
    w1 = wire.connect(store, SECRET, 1, 2, "127.0.0.1", 10, setup_timeout_s=30)
    w1.send(0, TAG_REDUCE, torch.tensor([1.0, 2.0, 3.0]))
    t.join(30)
    w1.close()
    assert "error" not in result, result.get("error")
    assert torch.equal(result["got"], torch.tensor([1.0, 2.0, 3.0]))


def test_the_secret_is_derived_on_each_node_never_sent():
    """Every node derives the same secret for a placement from the cluster key; another instance,
    epoch, coordinator or cluster key gives another; the start message has no field to carry one."""
    root = subkey("a cluster key of the tests", "instance wire")  # what every node's host holds (daemon/host.py)
    assert wire.instance_secret(root, *PLACEMENT) == SECRET and len(SECRET) == wire.SECRET_BYTES
    iid, epoch, coordinator = PLACEMENT
    others = [wire.instance_secret(subkey("another cluster key", "instance wire"), *PLACEMENT),
              wire.instance_secret(root, "fedcba9876543210", epoch, coordinator),
              wire.instance_secret(root, iid, epoch + 1, coordinator), wire.instance_secret(root, iid, epoch, "d" * 32)]
    assert len({SECRET, *others}) == 5
    assert set(StartShard.model_fields) == {"instance_id", "model", "rank", "placement", "master_port", "coordinator", "epoch"}


def test_silent_peer_times_out_with_a_clear_error():
    """A peer that sends nothing, or takes nothing, fails the link after the timeout, with a
    message that says which rank and how long."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        a = socket.create_connection(server.getsockname())
        b, _ = server.accept()
    wire._configure(a, 0.5)
    wire._configure(b, 0.5)
    sender = wire.Link(a, 1, K01, K10)
    receiver = wire.Link(b, 0, K10, K01)
    try:
        with pytest.raises(WireError, match=r"rank 0 sent nothing for [01] s"):
            receiver.recv(TAG_FINAL, torch.empty(4))
        with pytest.raises(WireError, match=r"rank 1 took nothing"):
            sender.send(TAG_FINAL, [torch.zeros(16 << 20, dtype=torch.uint8)])  # far more than the socket buffers
    finally:
        sender.close()
        receiver.close()
