"""MLX's own transport for a group of MLX ranks — its ring over TCP (`PlacementRequest.collective`:
mlx-ring) — with shoal's trust kept. (MLX's JACCL, over Thunderbolt 5 RDMA, would go the same way:
its `all_gather` moves sealed bytes alike; what it needs besides is each node's map of which RDMA
port reaches which peer, which only Thunderbolt 5 Macs can show.)

MLX's `all_sum` would carry each rank's partial sum in clear to whoever connects to the ring. Here a
rank seals its partial (AES-256-GCM under a key derived from the placement's secret, the nonce its
place in the group and the all-reduce's number) and `mx.distributed.all_gather` only moves the
sealed bytes. Every rank then opens every partial — a frame that was altered, replayed from an
earlier all-reduce or sent in another rank's place fails its tag or its nonce, and the instance
fails with a WireError (`SealedFrameError`) as on shoal's own wire — and adds them in rank order, so every rank gets the
same sum bit for bit, as runner/stage.TensorGroup gives. The group object is what a model's layers
call (`allreduce([x])`), so the model files do not know which transport carries it.

The ranks find each other through the placement's rendezvous store (its keys are derived from the
secret, so a process without it can neither read the addresses nor plant one). MLX reads its group
from the environment (MLX_RANK, MLX_HOSTFILE) when `mx.distributed.init` runs, once per process: a
runner is one rank of one group, so that is enough.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import tempfile
import time
from typing import Any

import numpy as np
import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from shoal.runner.wire import WireError

# PlacementRequest.collective -> MLX's backend name.
BACKENDS = {"mlx-ring": "ring"}
_AAD = b"shoal-mlx-allreduce-v1"
_NONCE = struct.Struct("<IQ")  # the sender's place in the group, the all-reduce's number: 12 bytes


class SealedFrameError(WireError):
    """A sealed partial that does not open: altered, replayed, or from the wrong rank."""


def group_cipher(secret: bytes, ranks: list[int]) -> AESGCM:
    """The cipher of one group's sealed partials, its key derived from the placement's secret and the group's ranks."""
    info = ("shoal mlx group " + ",".join(map(str, ranks))).encode()
    return AESGCM(HKDF(SHA256(), 32, salt=b"shoal-mlx-group-v1", info=info).derive(secret))


def seal(cipher: AESGCM, place: int, count: int, data: bytes) -> bytes:
    nonce = _NONCE.pack(place, count)
    return nonce + cipher.encrypt(nonce, data, _AAD)


def open_sealed(cipher: AESGCM, place: int, count: int, frame: bytes) -> bytes:
    """The data of `frame`, which must be the partial of the rank at `place` for all-reduce `count`."""
    nonce = frame[: _NONCE.size]
    if len(frame) < _NONCE.size or _NONCE.unpack(nonce) != (place, count):
        raise SealedFrameError(f"a partial from place {place} of all-reduce {count} came with another rank's or all-reduce's nonce")
    try:
        return cipher.decrypt(nonce, frame[_NONCE.size :], _AAD)
    except InvalidTag:
        raise SealedFrameError(f"the partial from place {place} of all-reduce {count} failed its check") from None


class SealedMLXGroup:
    """A tensor or expert group's all-reduce over an `mx.distributed` group, every partial sealed."""

    def __init__(self, group: Any, cipher: AESGCM):
        self.group, self.cipher = group, cipher
        self.place, self.size = group.rank(), group.size()
        self.count = 0
        self.seconds = 0.0

    def allreduce(self, tensors: list[torch.Tensor]) -> SealedMLXGroup:
        import mlx.core as mx

        (x,) = tensors
        t = time.perf_counter()
        mine = np.ascontiguousarray(x.detach().to(torch.float32).numpy())
        frame = seal(self.cipher, self.place, self.count, mine.tobytes())
        gathered = mx.distributed.all_gather(mx.array(np.frombuffer(frame, dtype=np.uint8)), group=self.group)
        frames = np.array(gathered).reshape(self.size, len(frame))
        total = None
        for place in range(self.size):  # the same order on every rank: the same sum, bit for bit
            part = np.frombuffer(open_sealed(self.cipher, place, self.count, frames[place].tobytes()), dtype=np.float32)
            total = part.copy() if total is None else total + part
        self.count += 1
        x.copy_(torch.from_numpy(total.reshape(mine.shape)))
        self.seconds += time.perf_counter() - t
        return self

    def wait(self) -> None:
        pass


def join_mlx_group(store: Any, secret: bytes, rank: int, ranks: list[int], host: str, collective: str) -> SealedMLXGroup:
    """This rank's place in an `mx.distributed` group of `ranks` over MLX's `collective` backend: each
    rank publishes the address its ring endpoint listens on in the (secret-prefixed) store, reads
    the others', and MLX connects them."""
    import mlx.core as mx

    backend = BACKENDS[collective]
    if not mx.distributed.is_available(backend):
        raise ValueError(f"{collective}: this MLX build has no {backend} backend")
    with socket.socket() as s:  # a free port for MLX's listener, released just before MLX binds it
        s.bind((host, 0))
        port = s.getsockname()[1]
    store.set(f"mlx/{rank}", f"{host}:{port}")
    hosts = [[store.get(f"mlx/{r}").decode()] for r in ranks]
    fd, path = tempfile.mkstemp(prefix="shoal-mlx-hosts-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(hosts, f)
    os.environ.update(MLX_RANK=str(ranks.index(rank)), MLX_HOSTFILE=path)
    try:
        group = mx.distributed.init(strict=True, backend=backend)
    finally:
        os.unlink(path)
    if group.size() != len(ranks):
        raise ValueError(f"{collective}: MLX made a group of {group.size()} ranks, not {len(ranks)}")
    return SealedMLXGroup(group, group_cipher(secret, ranks))


__all__ = ["BACKENDS", "SealedFrameError", "SealedMLXGroup", "group_cipher", "join_mlx_group", "open_sealed", "seal"]
