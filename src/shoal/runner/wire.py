"""The data plane of an instance: encrypted, authenticated frames over one TCP connection per pair
of ranks.

Every message between two ranks — a step with its hidden states, the rows that need logits, a
tensor group's partial sums — is one frame:

    header  magic "SHW2" | tag u32 | sequence number u64 | body length u64    (24 bytes, in clear)
    body    the tensors' bytes, encrypted with AES-256-GCM                      (body length bytes)
    tag     the GCM tag over the header (as associated data) and the body        (16 bytes)

**No secret travels.** Every node derives an instance's secret itself (`instance_secret`: HKDF-SHA256
over the node's wire root key, naming the instance, its placement's epoch and its coordinator), and
its daemon hands it to the runner on the runner's stdin. The root key is a subkey of the cluster
key as the peer channel stretches it (cluster/auth.py: scrypt), so every guess at the cluster key
costs that stretch, whatever of the data plane an attacker holds. Each connection then gets keys
of its own: rank c dials rank l (c > l), and both contribute a fresh X25519 key pair —

    l -> c   l's ephemeral public key                                           (32 bytes)
    c -> l   hello: header | c's rank u64 | c's ephemeral public key | tag      (24 + 40 + 16 bytes)

— and each side derives the connection's two keys (c>l and l>c) with HKDF-SHA256 from the secret
and the Diffie-Hellman result, salted with both public keys. The hello's tag (GCM over an empty
body, the whole hello as associated data, under the c>l key) proves that the dialer holds the
secret; anything else that connects is dropped, and the listener closes once every rank is in. The
listener proves itself with its first frame, which nobody without the secret could make.

So keys are per direction and per connection: a runner restarted under the same secret never
reuses a (key, nonce) pair, and a frame recorded on one connection is refused on any other. The GCM
nonce is the frame's sequence number, unique under its key; sequence numbers count each direction
from the hello (frame 0), so a forged, altered, replayed or reordered frame is a `WireError`, and
the runner fails rather than compute with it. A capture of the link shows the headers (tag, number,
length), the ephemeral public keys and ciphertext; since every key also depends on the
Diffie-Hellman result, a capture can neither be decrypted nor checked against guesses of the
cluster key offline, even by someone who learns the cluster key later. (The rendezvous store's
traffic is in clear; its keys carry a prefix derived from the secret: protocol.store_prefix.)

Why AES-256-GCM: with AES-NI and carry-less multiply (every x86 server of the last decade, ARMv8's
crypto extensions alike) it is the fastest AEAD `cryptography` offers. Measured on the 2-core
reference VM (Xeon with VAES, cryptography 50 / OpenSSL), one call, encrypt or decrypt: 0.7 µs for
a 2.4 KiB decode frame and 19 µs for a 300 KiB prefill frame (16 GB/s), against 1.9 µs and 70 µs
for ChaCha20-Poly1305 (4.4 GB/s), and 2.5 µs and 156 µs for HMAC-SHA256, which only authenticates.
ChaCha20-Poly1305 is the better choice only on CPUs without AES instructions, which shoal's nodes
are not expected to be. A decode frame's send + receive costs ~2.6 µs more than in clear; decode
through pipeline-3 of the bundled model stays within noise of a wire in clear (scripts/bench_wire.py).

Why not gloo (torch.distributed's CPU backend): its frames carry no authentication, and its sends
and receives hop through its own event-loop threads — two more thread wake-ups per message: a
loopback pipeline hop measured ~0.39 ms with gloo and ~0.25 ms here, most of it the receiving
process waking up. A frame is encrypted in one call into a reused buffer (a frame of several
tensors is first joined: the cipher takes one buffer), goes out with one `sendmsg`, and is read on
the calling thread into a reused buffer and decrypted straight into the destination tensor.

Sends block until the kernel has taken the bytes. Every message pattern of the protocol has its
receiver waiting, except a tensor group's exchange, where every rank sends to every other at once:
`exchange` sends large tensors from a helper thread so that no two ranks can block on each other.
"""

from __future__ import annotations

import datetime
import logging
import socket
import struct
import threading
import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

log = logging.getLogger("shoal.runner")

MAGIC = b"SHW2"
HEADER = struct.Struct("<4sIQQ")
NONCE = struct.Struct("<4xQ")  # the GCM nonce: 12 bytes, the frame's sequence number
TAG_BYTES = 16
PUBLIC_BYTES = 32  # an X25519 public key
HELLO = struct.Struct("<Q32s")  # the dialer's rank and ephemeral public key
SECRET_BYTES = 32
MAX_FRAME = (1 << 31) - 1 - TAG_BYTES  # the cipher's limit per call; a step's tensors are far smaller
KEEP_BUFFER = 1 << 20  # a link keeps its buffers up to this size; a larger frame's are freed after it
SMALL_EXCHANGE = 1 << 16  # tensors up to this size fit the kernel's socket buffers: sent inline
TAG_HELLO, TAG_STEP, TAG_FINAL, TAG_LOGITS, TAG_REDUCE = 1, 2, 3, 4, 5
TAG_NAMES = {TAG_HELLO: "hello", TAG_STEP: "step", TAG_FINAL: "final", TAG_LOGITS: "logits", TAG_REDUCE: "reduce"}


class WireError(ConnectionError):
    """A peer closed its connection, timed out, or sent a frame that failed its checks."""


# -- keys ------------------------------------------------------------------------------------------------
def instance_secret(wire_root: bytes, instance_id: str, epoch: int, coordinator: str) -> bytes:
    """The secret of one placement of an instance, derived alike on every node of the cluster from
    the cluster's wire root key (daemon/host.py). The coordinator is named too: two coordinators
    that both re-placed an instance (a partition) get different secrets for their placements."""
    info = f"shoal instance {instance_id} epoch {epoch} coordinator {coordinator}".encode()
    return HKDF(SHA256(), SECRET_BYTES, salt=b"shoal-instance-secret-v1", info=info).derive(wire_root)


def connection_keys(secret: bytes, shared: bytes, listener_public: bytes, dialer_public: bytes, dialer: int,
                    listener: int) -> tuple[bytes, bytes]:
    """(the key of dialer>listener frames, the key of listener>dialer frames) of one connection."""
    info = f"shoal-wire-v2 {dialer}>{listener} {listener}>{dialer}".encode()
    okm = HKDF(SHA256(), 64, salt=listener_public + dialer_public, info=info).derive(secret + shared)
    return okm[:32], okm[32:]


# -- frames ----------------------------------------------------------------------------------------------
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


class _Scratch:
    """A buffer reused from frame to frame (no allocation on a decode step's path). A frame larger
    than KEEP_BUFFER gets one of its own, freed after it: a prefill chunk's size held for the
    runner's life would be memory its plan does not count."""

    def __init__(self) -> None:
        self.buf = memoryview(np.empty(0, np.uint8))

    def take(self, size: int) -> memoryview:
        if size <= self.buf.nbytes:
            return self.buf[:size]
        buf = memoryview(np.empty(size, np.uint8))  # uninitialized: the socket or the cipher fills it
        if size <= KEEP_BUFFER:
            self.buf = buf
        return buf


def _sendmsg(sock: socket.socket, peer: int, views: list[memoryview]) -> None:
    views = [v.cast("B") for v in views if v.nbytes]
    try:
        while views:
            n = sock.sendmsg(views)
            while views and n >= views[0].nbytes:
                n -= views[0].nbytes
                views.pop(0)
            if n:
                views[0] = views[0][n:]
    except (TimeoutError, BlockingIOError):  # SO_SNDTIMEO ran out: the peer reads nothing
        raise WireError(f"rank {peer} took nothing for {_timeout_of(sock):.0f} s") from None
    except OSError as e:
        raise WireError(f"sending to rank {peer}: {e}") from None


def _fill(sock: socket.socket, peer: int, views: list[memoryview]) -> None:
    views = [v.cast("B") for v in views if v.nbytes]
    try:
        while views:
            n = sock.recvmsg_into(views)[0]
            if n == 0:
                raise WireError(f"rank {peer} closed its connection")
            while views and n >= views[0].nbytes:
                n -= views[0].nbytes
                views.pop(0)
            if n:
                views[0] = views[0][n:]
    except (TimeoutError, BlockingIOError):  # SO_RCVTIMEO ran out
        raise WireError(f"rank {peer} sent nothing for {_timeout_of(sock):.0f} s") from None
    except OSError as e:
        if isinstance(e, WireError):
            raise
        raise WireError(f"receiving from rank {peer}: {e}") from None


class Link:
    """One connected peer: frames out sealed under our key with our sequence numbers, frames in
    opened under the peer's key and checked against its sequence numbers.

    A decode step's frames are a few KiB and every microsecond of Python on their path adds to each
    token (the path runs on a cold cache: a stage wakes once per step), so the path is short: one
    cipher call into a reused buffer and one system call out; in, one system call for the header,
    one for the rest, one cipher call into the destination.

    `plaintext` is for benchmarks only (scripts/bench_wire.py measures what the cipher costs):
    frames travel in clear and unauthenticated. Nothing a node is told or configured with sets it."""

    def __init__(self, sock: socket.socket, peer: int, send_key: bytes, recv_key: bytes, plaintext: bool = False):
        self.sock, self.peer = sock, peer
        self.send_key, self.recv_key = send_key, recv_key
        self._seal = None if plaintext else AESGCM(send_key)
        self._open = None if plaintext else AESGCM(recv_key)
        self._sent = 0
        self._received = 0
        self._head = bytearray(HEADER.size)
        self._out, self._in = _Scratch(), _Scratch()

    # -- out
    def send(self, tag: int, parts: Sequence[Buffer]) -> None:
        views = [_bytes_of(p) for p in parts]
        n = sum(v.nbytes for v in views)
        if n > MAX_FRAME:
            raise WireError(f"a {TAG_NAMES.get(tag, tag)} frame of {n} bytes to rank {self.peer} exceeds the wire's limit")
        seq = self._sent
        head = HEADER.pack(MAGIC, tag, seq, n)
        self._sent += 1
        if self._seal is None:
            _sendmsg(self.sock, self.peer, [memoryview(head), *views])
            return
        # The cipher takes one buffer: a step frame's message and hidden states are joined first (a
        # copy of ~0.1 ms for a MiB of prefill, nothing next to its compute; a few ns for decode).
        body = views[0] if len(views) == 1 else b"".join(views)
        sealed = self._out.take(n + TAG_BYTES)
        self._seal.encrypt_into(NONCE.pack(seq), body, head, sealed)
        _sendmsg(self.sock, self.peer, [memoryview(head), sealed])

    # -- in
    def recv(self, tag: int, into: torch.Tensor | None = None) -> torch.Tensor:
        """The next frame's body, which must carry `tag`: into `into` (whose size it must have), or
        a new uint8 tensor."""
        _fill(self.sock, self.peer, [memoryview(self._head)])
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
        if self._open is None:
            _fill(self.sock, self.peer, [view])
        else:
            sealed = self._in.take(n + TAG_BYTES)
            _fill(self.sock, self.peer, [sealed])
            try:
                self._open.decrypt_into(NONCE.pack(seq), sealed, self._head, view)
            except InvalidTag:
                raise WireError(f"a {TAG_NAMES[tag]} frame from rank {self.peer} failed authentication") from None
        self._received += 1
        return body

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


def connect(store: dist.Store, secret: bytes, rank: int, size: int, host: str, timeout_s: float,
            setup_timeout_s: float = 120.0, plaintext: bool = False) -> Wire:
    """Connect this rank to every other one. Each rank listens on a fresh port of its own address
    (published in the instance's store, under keys only holders of the secret can name); a rank
    connects to every lower rank and accepts every higher one. `plaintext`: benchmarks only (Link)."""
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"an instance secret has {SECRET_BYTES} bytes")
    if plaintext:
        log.warning("rank %d: frames travel in clear (a benchmark's setting)", rank)
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
            links[peer] = _dial(secret, rank, peer, peer_host, int(peer_port), timeout_s, deadline, plaintext)
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
            link = _answer(secret, rank, size, sock, links, min(10.0, left), timeout_s, plaintext)
            if link is not None:
                links[link.peer] = link
    except BaseException:
        for link in links.values():
            link.close()
        raise
    finally:
        listener.close()
    return Wire(rank, links)


def _dial(secret: bytes, rank: int, peer: int, host: str, port: int, timeout_s: float, deadline: float,
          plaintext: bool) -> Link:
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=max(1.0, deadline - time.monotonic()))
            break
        except OSError as e:
            if time.monotonic() > deadline:
                raise WireError(f"connecting to rank {peer} at {host}:{port}: {e}") from None
            time.sleep(0.1)
    try:
        _configure(sock, timeout_s)
        theirs = bytearray(PUBLIC_BYTES)
        _fill(sock, peer, [memoryview(theirs)])
        mine = X25519PrivateKey.generate()
        my_public = mine.public_key().public_bytes_raw()
        try:
            shared = mine.exchange(X25519PublicKey.from_public_bytes(bytes(theirs)))
        except ValueError:  # a low-order point: no key could come of it
            raise WireError(f"rank {peer} at {host}:{port} sent an unusable key") from None
        send_key, recv_key = connection_keys(secret, shared, bytes(theirs), my_public, rank, peer)
        hello = HEADER.pack(MAGIC, TAG_HELLO, 0, HELLO.size) + HELLO.pack(rank, my_public)
        proof = AESGCM(send_key).encrypt(NONCE.pack(0), b"", hello)
        _sendmsg(sock, peer, [memoryview(hello), memoryview(proof)])
    except BaseException:
        sock.close()
        raise
    link = Link(sock, peer, send_key, recv_key, plaintext)
    link._sent = 1  # the hello was frame 0
    return link


def _answer(secret: bytes, rank: int, size: int, sock: socket.socket, links: dict[int, Link], hello_timeout_s: float,
            timeout_s: float, plaintext: bool) -> Link | None:
    """Check a connecting rank's hello; None (and the connection closed) if it fails."""
    mine = X25519PrivateKey.generate()
    my_public = mine.public_key().public_bytes_raw()
    try:
        _configure(sock, hello_timeout_s)
        _sendmsg(sock, -1, [memoryview(my_public)])
        hello = bytearray(HEADER.size + HELLO.size + TAG_BYTES)
        _fill(sock, -1, [memoryview(hello)[: HEADER.size]])
        magic, tag, seq, n = HEADER.unpack_from(hello)
        if magic != MAGIC or tag != TAG_HELLO or seq != 0 or n != HELLO.size:
            raise WireError("not a hello frame")
        _fill(sock, -1, [memoryview(hello)[HEADER.size :]])
        peer, theirs = HELLO.unpack_from(hello, HEADER.size)
        if not rank < peer < size or peer in links:
            raise WireError(f"a hello from rank {peer}, which is not due")
        try:
            shared = mine.exchange(X25519PublicKey.from_public_bytes(theirs))
        except ValueError:
            raise WireError(f"a hello claiming rank {peer} with an unusable key") from None
        recv_key, send_key = connection_keys(secret, shared, my_public, theirs, peer, rank)
        try:
            AESGCM(recv_key).decrypt(NONCE.pack(0), bytes(hello[-TAG_BYTES:]), bytes(hello[:-TAG_BYTES]))
        except InvalidTag:
            raise WireError(f"a hello claiming rank {peer} failed authentication") from None
    except (OSError, struct.error) as e:
        log.warning("rank %d refused a data-plane connection: %s", rank, e)
        sock.close()
        return None
    _configure(sock, timeout_s)
    link = Link(sock, peer, send_key, recv_key, plaintext)
    link._received = 1  # the hello was frame 0
    return link
