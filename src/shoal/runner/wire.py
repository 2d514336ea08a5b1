"""The data plane of an instance: authenticated frames over one TCP connection per pair of ranks.

Every message between two ranks — a step with its hidden states, the rows that need logits, a
tensor group's partial sums — is one frame:

    header  magic "SHW1" | tag u32 | sequence number u64 | body length u64     (24 bytes)
    body    the bytes of the tensors, as they lie in memory
    mac     HMAC-SHA256(key of this direction, header + body)                   (32 bytes)

Each direction of each pair has its own key, derived from the instance's secret (which only the
chosen nodes learn, in signed control messages), and its own sequence numbers, so a frame cannot be
forged, altered, replayed or reordered: any of those is a `WireError`, and the runner fails rather
than compute with it. A connection proves itself before it is used: the listening rank sends a
fresh nonce and the connecting rank answers with a hello frame, under its own key, that names its
rank and carries the nonce. Anything else that connects is dropped, and the listener closes once
every rank is in.

Why not gloo (torch.distributed's CPU backend): its frames carry no authentication, and its sends
and receives hop through its own event-loop threads — two more thread wake-ups per message: a
loopback pipeline hop measured ~0.39 ms with gloo and ~0.25 ms here, most of it now the receiving
process waking up. A frame goes out with one `sendmsg` (a frame of up to 64 KiB is first joined
into one buffer, so that its MAC is one C call; larger ones go straight from the tensors' memory)
and is read on the calling thread, straight into the destination tensor.

Sends block until the kernel has taken the bytes. Every message pattern of the protocol has its
receiver waiting, except a tensor group's exchange, where every rank sends to every other at once:
`exchange` sends large tensors from a helper thread so that no two ranks can block on each other.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger("shoal.runner")

MAGIC = b"SHW1"
HEADER = struct.Struct("<4sIQQ")
MAC_BYTES = 32
NONCE_BYTES = 16
MAX_FRAME = 1 << 34  # 16 GiB: larger than any step's tensors; a bigger length is a corrupt header
SMALL_EXCHANGE = 1 << 16  # tensors up to this size fit the kernel's socket buffers: sent inline
SMALL_FRAME = 1 << 16  # frames up to this size are copied into one buffer and MACed in one call
TAG_HELLO, TAG_STEP, TAG_FINAL, TAG_LOGITS, TAG_REDUCE = 1, 2, 3, 4, 5
TAG_NAMES = {TAG_HELLO: "hello", TAG_STEP: "step", TAG_FINAL: "final", TAG_LOGITS: "logits", TAG_REDUCE: "reduce"}


class WireError(ConnectionError):
    """A peer closed its connection, timed out, or sent a frame that failed its checks."""


def direction_key(token: str, src: int, dst: int) -> bytes:
    """The key of frames from rank src to rank dst."""
    return hmac.new(token.encode(), f"shoal-wire:{src}>{dst}".encode(), hashlib.sha256).digest()


Buffer = torch.Tensor | np.ndarray | bytes | bytearray | memoryview


def _bytes_of(t: Buffer) -> memoryview:
    """A tensor's or array's memory as bytes (no copy). It must be contiguous, on the CPU."""
    if isinstance(t, torch.Tensor):
        if not t.is_contiguous():
            raise ValueError("only contiguous tensors travel on the wire")
        t = t.numpy() if t.dtype in (torch.float32, torch.int64, torch.uint8) else t.reshape(-1).view(torch.uint8).numpy()
    elif isinstance(t, np.ndarray) and not t.flags.c_contiguous:
        raise ValueError("only contiguous arrays travel on the wire")
    return memoryview(t).cast("B")


class Link:
    """One connected peer: frames out under our key with our sequence numbers, frames in checked
    against the peer's key and sequence numbers.

    A decode step's frames are a few KiB and every microsecond of Python on their path adds to each
    token (the path runs on a cold cache: a stage wakes once per step), so small frames take the
    short way: one copy into one buffer, one C call for the MAC, one system call each way."""

    def __init__(self, sock: socket.socket, peer: int, send_key: bytes, recv_key: bytes):
        self.sock, self.peer = sock, peer
        self._send_key, self._recv_key = send_key, recv_key
        self._send_mac = hmac.new(send_key, digestmod=hashlib.sha256)
        self._recv_mac = hmac.new(recv_key, digestmod=hashlib.sha256)
        self._sent = 0
        self._received = 0
        self._head = bytearray(HEADER.size)
        self._mac = bytearray(MAC_BYTES)

    # -- out
    def send(self, tag: int, parts: Sequence[Buffer]) -> None:
        views = [_bytes_of(p) for p in parts]
        n = sum(v.nbytes for v in views)
        head = HEADER.pack(MAGIC, tag, self._sent, n)
        self._sent += 1
        if n <= SMALL_FRAME:
            frame = b"".join((head, *views))
            self._sendmsg([memoryview(frame), memoryview(hmac.digest(self._send_key, frame, "sha256"))])
            return
        mac = self._send_mac.copy()
        mac.update(head)
        for v in views:
            mac.update(v)
        self._sendmsg([memoryview(head), *views, memoryview(mac.digest())])

    def _sendmsg(self, views: list[memoryview]) -> None:
        views = [v.cast("B") for v in views if v.nbytes]
        try:
            while views:
                n = self.sock.sendmsg(views)
                while views and n >= views[0].nbytes:
                    n -= views[0].nbytes
                    views.pop(0)
                if n:
                    views[0] = views[0][n:]
        except (TimeoutError, BlockingIOError):  # SO_SNDTIMEO ran out: the peer reads nothing
            raise WireError(f"rank {self.peer} took nothing for {_timeout_of(self.sock):.0f} s") from None
        except OSError as e:
            raise WireError(f"sending to rank {self.peer}: {e}") from None

    # -- in
    def recv(self, tag: int, into: torch.Tensor | None = None) -> torch.Tensor:
        """The next frame's body, which must carry `tag`: into `into` (whose size it must have), or
        a new uint8 tensor."""
        self._fill([memoryview(self._head)])
        magic, got_tag, seq, n = HEADER.unpack(self._head)
        if magic != MAGIC:
            raise WireError(f"rank {self.peer} sent a frame without the wire's magic")
        if seq != self._received:
            raise WireError(f"rank {self.peer} sent frame {seq} where {self._received} was due (replayed or lost)")
        if got_tag != tag:
            raise WireError(f"rank {self.peer} sent a {TAG_NAMES.get(got_tag, got_tag)} frame where a "
                            f"{TAG_NAMES.get(tag, tag)} frame was due")
        if n > MAX_FRAME or (into is not None and n != into.numel() * into.element_size()):
            raise WireError(f"rank {self.peer} sent a {TAG_NAMES[tag]} frame of {n} bytes, not the size due")
        body = into if into is not None else torch.empty(n, dtype=torch.uint8)
        view = _bytes_of(body)
        self._fill([view, memoryview(self._mac)])
        if n <= SMALL_FRAME:
            want = hmac.digest(self._recv_key, b"".join((self._head, view)), "sha256")
        else:
            mac = self._recv_mac.copy()
            mac.update(self._head)
            mac.update(view)
            want = mac.digest()
        if not hmac.compare_digest(want, self._mac):
            raise WireError(f"a {TAG_NAMES[tag]} frame from rank {self.peer} failed authentication")
        self._received += 1
        return body

    def _fill(self, views: list[memoryview]) -> None:
        views = [v.cast("B") for v in views if v.nbytes]
        try:
            while views:
                n = self.sock.recvmsg_into(views)[0]
                if n == 0:
                    raise WireError(f"rank {self.peer} closed its connection")
                while views and n >= views[0].nbytes:
                    n -= views[0].nbytes
                    views.pop(0)
                if n:
                    views[0] = views[0][n:]
        except (TimeoutError, BlockingIOError):  # SO_RCVTIMEO ran out
            raise WireError(f"rank {self.peer} sent nothing for {_timeout_of(self.sock):.0f} s") from None
        except OSError as e:
            if isinstance(e, WireError):
                raise
            raise WireError(f"receiving from rank {self.peer}: {e}") from None

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class Wire:
    """This rank's links to every other rank of its instance."""

    def __init__(self, rank: int, links: dict[int, Link]):
        self.rank, self.links = rank, links

    def send(self, dst: int, tag: int, *parts: torch.Tensor) -> None:
        self.links[dst].send(tag, parts)

    def recv(self, src: int, tag: int, into: torch.Tensor | None = None) -> torch.Tensor:
        return self.links[src].recv(tag, into)

    def exchange(self, x: torch.Tensor, peers: Sequence[int], tag: int = TAG_REDUCE) -> dict[int, torch.Tensor]:
        """Send x to every peer and receive each peer's tensor of the same shape. Large tensors are
        sent from a helper thread: with every rank sending at once, blocking sends could wait on
        each other forever once the socket buffers are full."""
        got = {p: torch.empty_like(x) for p in peers}
        if x.numel() * x.element_size() <= SMALL_EXCHANGE:
            for p in peers:
                self.send(p, tag, x)
            for p in peers:
                self.recv(p, tag, got[p])
            return got
        failed: list[BaseException] = []

        def send_all() -> None:
            try:
                for p in peers:
                    self.send(p, tag, x)
            except BaseException as e:  # noqa: BLE001 - re-raised on the calling thread
                failed.append(e)

        sender = threading.Thread(target=send_all, name="shoal-wire-send", daemon=True)
        sender.start()
        try:
            for p in peers:
                self.recv(p, tag, got[p])
        finally:
            sender.join()
        if failed:
            raise failed[0]
        return got

    def close(self) -> None:
        for link in self.links.values():
            link.close()


# -- forming the links ---------------------------------------------------------------------------------
def _configure(sock: socket.socket, timeout_s: float) -> None:
    """No Nagle delay; a blocking socket whose timeout the kernel keeps (SO_RCVTIMEO/SO_SNDTIMEO):
    Python's own socket timeout would poll() before every read, one more system call a frame."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(None)
    whole = int(timeout_s)
    tv = struct.pack("ll", whole, int((timeout_s - whole) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


def _timeout_of(sock: socket.socket) -> float:
    try:
        sec, usec = struct.unpack("ll", sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.calcsize("ll")))
        return sec + usec / 1e6
    except OSError:
        return float("nan")


def connect(store: dist.Store, token: str, rank: int, size: int, host: str, timeout_s: float,
            setup_timeout_s: float = 120.0) -> Wire:
    """Connect this rank to every other one. Each rank listens on a fresh port of its own address
    (published in the instance's store, under keys only holders of the secret can name); a rank
    connects to every lower rank and accepts every higher one."""
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((host, 0))
    listener.listen(max(8, size))
    links: dict[int, Link] = {}
    try:
        port = listener.getsockname()[1]
        store.set(f"wire/{rank}", f"{host}|{port}")
        deadline = time.monotonic() + setup_timeout_s
        for peer in range(rank):
            store.wait([f"wire/{peer}"], datetime.timedelta(seconds=setup_timeout_s))
            peer_host, peer_port = store.get(f"wire/{peer}").decode().rsplit("|", 1)
            links[peer] = _dial(token, rank, peer, peer_host, int(peer_port), timeout_s, deadline)
        while len(links) < size - 1:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(set(range(size)) - set(links) - {rank})
                raise WireError(f"ranks {missing} did not connect within {setup_timeout_s:.0f} s")
            listener.settimeout(left)
            try:
                sock, _ = listener.accept()
            except TimeoutError:
                continue
            link = _answer(token, rank, size, sock, links, min(10.0, left), timeout_s)
            if link is not None:
                links[link.peer] = link
    except BaseException:
        for link in links.values():
            link.close()
        raise
    finally:
        listener.close()
    return Wire(rank, links)


def _dial(token: str, rank: int, peer: int, host: str, port: int, timeout_s: float, deadline: float) -> Link:
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=max(1.0, deadline - time.monotonic()))
            break
        except OSError as e:
            if time.monotonic() > deadline:
                raise WireError(f"connecting to rank {peer} at {host}:{port}: {e}") from None
            time.sleep(0.1)
    _configure(sock, timeout_s)
    link = Link(sock, peer, direction_key(token, rank, peer), direction_key(token, peer, rank))
    nonce = bytearray(NONCE_BYTES)
    link._fill([memoryview(nonce)])
    link.send(TAG_HELLO, [struct.pack("<Q", rank), bytes(nonce)])
    return link


def _answer(token: str, rank: int, size: int, sock: socket.socket, links: dict[int, Link], hello_timeout_s: float,
            timeout_s: float) -> Link | None:
    """Check a connecting rank's hello; None (and the connection closed) if it fails."""
    nonce = os.urandom(NONCE_BYTES)
    try:
        _configure(sock, hello_timeout_s)
        sock.sendall(nonce)
        head = bytearray(HEADER.size)
        probe = Link(sock, -1, b"", b"")
        probe._fill([memoryview(head)])
        magic, tag, seq, n = HEADER.unpack(head)
        if magic != MAGIC or tag != TAG_HELLO or seq != 0 or n != 8 + NONCE_BYTES:
            raise WireError("not a hello frame")
        body = bytearray(n)
        mac = bytearray(MAC_BYTES)
        probe._fill([memoryview(body), memoryview(mac)])
        (peer,) = struct.unpack_from("<Q", body)
        if not rank < peer < size or peer in links:
            raise WireError(f"a hello from rank {peer}, which is not due")
        want = hmac.digest(direction_key(token, peer, rank), bytes(head) + bytes(body), "sha256")
        if not hmac.compare_digest(want, bytes(mac)) or bytes(body[8:]) != nonce:
            raise WireError(f"a hello claiming rank {peer} failed authentication")
    except (OSError, struct.error) as e:
        log.warning("rank %d refused a data-plane connection: %s", rank, e)
        sock.close()
        return None
    _configure(sock, timeout_s)
    link = Link(sock, peer, direction_key(token, rank, peer), direction_key(token, peer, rank))
    link._received = 1  # the hello was frame 0
    return link
