"""A node's own identity: an Ed25519 key pair kept in its home, and the node id derived from it.

The id is the first 32 hex characters (128 bits) of SHA-256 of the raw public key, so an id names
one key and a record that carries the key and a signature by it is self-certifying: nobody can
make a valid record for another node's id, nor keep its id with a key of their own (that would
take a second preimage of SHA-256 truncated to 128 bits).

Files in <home>: `node.key` (the 32-byte private seed in hex, created 0600 on first start) and
`node_id` (the derived id, kept for people and scripts; the key is the source of truth). A home
from before node keys has a random `node_id`; it gets a key and the id derived from it, and the
start that makes the change says so once.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

NODE_KEY_FILE_NAME = "node.key"
NODE_ID_FILE_NAME = "node_id"
NODE_ID_RE = re.compile(r"[0-9a-f]{32}")


def node_id_of(public_key_hex: str) -> str:
    """The node id a public key (32 bytes, hex) stands for."""
    return hashlib.sha256(bytes.fromhex(public_key_hex)).hexdigest()[:32]


def verify(public_key_hex: str, signature_hex: str, data: bytes) -> bool:
    """Whether signature_hex is the key's Ed25519 signature of data; False for any malformed input."""
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_key_hex)).verify(bytes.fromhex(signature_hex), data)
    except (InvalidSignature, ValueError):
        return False
    return True


@dataclass(frozen=True)
class NodeIdentity:
    private_key: Ed25519PrivateKey
    public_key: str  # raw 32 bytes, hex
    node_id: str

    @classmethod
    def from_seed(cls, seed: bytes) -> NodeIdentity:
        key = Ed25519PrivateKey.from_private_bytes(seed)
        public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()
        return cls(key, public, node_id_of(public))

    def sign(self, data: bytes) -> str:
        return self.private_key.sign(data).hex()


def load_or_create_identity(home: Path) -> tuple[NodeIdentity, str | None]:
    """The identity kept in home (made on first start), and a one-line note when the node id
    changed from the one in an older home's `node_id` file (else None).

    Raises ValueError for a key file that is there but unreadable as a key: replacing it silently
    would change the node's identity behind the owner's back."""
    key_path = home / NODE_KEY_FILE_NAME
    seed = os.urandom(32)
    try:
        _write_private(key_path, seed.hex() + "\n", exclusive=True)
    except FileExistsError:
        try:
            seed = bytes.fromhex(key_path.read_text().strip())
        except ValueError:
            seed = b""
        if len(seed) != 32:
            raise ValueError(f"{key_path} is not a node key (64 hex characters); move it away to make a new one")
    identity = NodeIdentity.from_seed(seed)

    id_path = home / NODE_ID_FILE_NAME
    try:
        old = id_path.read_text().strip()
    except OSError:
        old = ""
    note = None
    if old != identity.node_id:
        if NODE_ID_RE.fullmatch(old):
            note = (
                f"this node's id is now {identity.node_id}, derived from its key in {key_path} "
                f"(it was {old}); the other nodes see it as a new member"
            )
        _write_private(id_path, identity.node_id + "\n")
    return identity, note


def _write_private(path: Path, text: str, exclusive: bool = False) -> None:
    # Created 0600 from the start; `exclusive` for the key, so two racing starts never both write one.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC), 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
