"""Encryption and authentication of node-to-node traffic with the cluster key.

Keys. The cluster key is stretched once per process with scrypt (a fixed salt: every node must
reach the same result and they share nothing else), so a guess at the key costs ~0.1 s and 32 MiB
whatever an attacker holds (a captured message, an mDNS announcement). HKDF-SHA256 turns the
result into independent keys: the peer channel's root key, the mDNS fingerprint key, the public
cluster id. Messages are sealed with AES-256-GCM under HKDF-Expand(root, direction ‖ sealer's node
id ‖ hour of the request's timestamp) and a random 96-bit nonce: one key seals one node's
requests (or replies) of one hour, millions at most, where random nonces first risk repeating
near 2^32 messages per key (the chance stays below 2^-40 even at 10,000 messages a second).
Random nonces need no state that a restart could reset, as a counter would.

What is authenticated. A request carries, in headers, the sender's node id, the recipient (its
node id when the sender knows it, else the host:port it dialled), a unix timestamp and the nonce;
all of them, with the method and the path, are the GCM associated data, and the body is the
ciphertext. A reply is sealed by the replier under its own id, bound to the request's method,
path, sender, recipient, nonce and the reply's status. So nothing can be moved between messages,
paths, directions or nodes, and a reply answers exactly one request.

Order of checks on a request (cheapest first, nothing remembered before the tag verifies): headers
present and well formed, timestamp within the skew window, body no larger than its path allows
(read bounded, before any crypto), tag, recipient is this node, nonce not seen before. A replay
inside the window fails the nonce check; outside it, the timestamp check; to another node, the
recipient check.

The key itself never travels, and nothing in this module reveals it: the mDNS fingerprint is
salted per node and stretched again (PBKDF2), so each announcement has to be attacked on its own.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
import os
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand

H_NODE = "X-Shoal-Node"  # the sender of a request, the replier of a reply
H_TO = "X-Shoal-To"  # the recipient: a node id, or the host:port the sender dialled
H_TIME = "X-Shoal-Timestamp"
H_NONCE = "X-Shoal-Nonce"

MAX_SKEW_S = 30.0
NONCE_CACHE_MAX = 200_000  # ~25 MB at worst; far above any honest rate within the window
GCM_NONCE_BYTES = 12
SEAL_OVERHEAD = GCM_NONCE_BYTES + 16  # nonce in front, tag behind

# scrypt: ~0.1 s and 32 MiB per guess of the cluster key, paid once per process by a node.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 15, 8, 1
# PBKDF2 rounds of an mDNS fingerprint: ~20 ms to check one announcement (cached per salt).
FINGERPRINT_ROUNDS = 100_000

KEY_PERIOD_S = 3600  # a message key is per sealer, direction and hour
KEY_CACHE_MAX = 4096
_NONCE_RE = re.compile(r"[0-9a-f]{32}")
_PROTOCOL = "shoal peer v2"


class AuthError(Exception):
    """A request or reply that fails authentication; `reason` is safe to log and return."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# -- keys ------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def master_key(cluster_key: str) -> bytes:
    """The stretched cluster key every other key is derived from (cached: stretching is slow by design)."""
    return hashlib.scrypt(
        cluster_key.encode(), salt=b"shoal cluster key v2", n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P,
        maxmem=64 << 20, dklen=32,
    )


def subkey(cluster_key: str, purpose: str) -> bytes:
    """An independent 32-byte key for one purpose ("peer channel", ...), from the stretched key."""
    return HKDF(hashes.SHA256(), 32, salt=None, info=b"shoal v2 " + purpose.encode()).derive(master_key(cluster_key))


def cluster_id(cluster_key: str) -> str:
    """A label of the cluster for people (logs, /v1/cluster, the dashboard): the same on every
    node; as hard to reverse as the stretched key."""
    return hmac.new(subkey(cluster_key, "cluster id"), b"id", hashlib.sha256).hexdigest()[:16]


def new_fingerprint_salt() -> str:
    return secrets.token_hex(16)


def cluster_fingerprint(cluster_key: str, salt: str) -> str:
    """The tag a node publishes over mDNS beside its random salt, so nodes of another cluster
    are skipped without a hello. Checking one costs FINGERPRINT_ROUNDS of PBKDF2 (callers cache
    per salt); guessing the key from one costs that plus the scrypt stretch, per guess, per salt."""
    key = subkey(cluster_key, "mdns fingerprint")
    return hashlib.pbkdf2_hmac("sha256", key, bytes.fromhex(salt), FINGERPRINT_ROUNDS, dklen=16).hex()


def _encode(*parts: str) -> bytes:
    # Length-prefix each part so ("ab", "c") and ("a", "bc") never encode alike.
    encoded = [p.encode() for p in parts]
    return b"".join(len(b).to_bytes(4, "big") + b for b in encoded)


# -- recipients ------------------------------------------------------------------------------------
def host_port(host: str, port: int) -> str:
    """A recipient named by address, as the sender dialled it ("[v6]:port" for IPv6)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def normal_host(host: str) -> str:
    """One spelling per address or name, so "::1" and "0:0::1" or "Box." and "box" compare equal."""
    host = host.strip().strip("[]")
    try:
        return ipaddress.ip_address(host).compressed
    except ValueError:
        return host.lower().rstrip(".")


def split_recipient(recipient: str) -> tuple[str, int] | None:
    """(normalised host, port) of a host:port recipient, or None if it is not one."""
    host, sep, port = recipient.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return None
    return normal_host(host), int(port)


# -- the nonce cache -------------------------------------------------------------------------------
class NonceCache:
    """Nonces seen within the skew window. Entries older than twice the window can go: a request
    that old is refused as stale before its nonce is looked at."""

    def __init__(self, ttl_s: float = 2 * MAX_SKEW_S, max_entries: int = NONCE_CACHE_MAX) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._seen: OrderedDict[str, float] = OrderedDict()  # nonce -> monotonic time first seen

    def __len__(self) -> int:
        return len(self._seen)

    def check_and_add(self, nonce: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        while self._seen:
            oldest, t = next(iter(self._seen.items()))
            if now - t <= self.ttl_s:
                break
            del self._seen[oldest]
        if nonce in self._seen:
            raise AuthError("replayed nonce")
        if len(self._seen) >= self.max_entries:
            # Refuse rather than forget: forgetting a live nonce would reopen it to replay.
            raise AuthError("nonce cache full")
        self._seen[nonce] = now


# -- the channel -----------------------------------------------------------------------------------
@dataclass
class PeerCipher:
    """Seals and opens peer messages with one cluster key. One per node; holds the node's nonce
    cache. `is_recipient` says whether a request's named recipient is this node (default: its id)."""

    node_id: str
    key: bytes  # the peer channel's root key
    is_recipient: Callable[[str], bool] | None = None
    max_skew_s: float = MAX_SKEW_S
    nonces: NonceCache = field(init=False)

    def __post_init__(self) -> None:
        self.nonces = NonceCache(ttl_s=2 * self.max_skew_s)
        self._keys: dict[tuple[str, str, int], AESGCM] = {}  # (direction, sealer, hour) -> cipher

    @classmethod
    def from_cluster_key(
        cls, node_id: str, cluster_key: str, is_recipient: Callable[[str], bool] | None = None
    ) -> PeerCipher:
        return cls(node_id=node_id, key=subkey(cluster_key, "peer channel"), is_recipient=is_recipient)

    def _seal(self, role: str, sealer: str, ts: str, aad: bytes, body: bytes) -> bytes:
        gcm_nonce = os.urandom(GCM_NONCE_BYTES)
        slot = (role, sealer, int(float(ts) // KEY_PERIOD_S))
        aead = self._keys.get(slot) or self._remember(slot, self._derive(*slot))
        return gcm_nonce + aead.encrypt(gcm_nonce, body, aad)

    def _open(self, role: str, sealer: str, ts: str, aad: bytes, sealed: bytes) -> bytes:
        if len(sealed) < SEAL_OVERHEAD:
            raise InvalidTag
        slot = (role, sealer, int(float(ts) // KEY_PERIOD_S))
        aead = self._keys.get(slot)
        known = aead is not None
        if aead is None:
            aead = self._derive(*slot)
        body = aead.decrypt(sealed[:GCM_NONCE_BYTES], sealed[GCM_NONCE_BYTES:], aad)
        if not known:  # kept only once a message verified under it: keyless senders fill nothing
            self._remember(slot, aead)
        return body

    def _derive(self, role: str, sealer: str, period: int) -> AESGCM:
        info = _encode(_PROTOCOL, role, sealer, str(period))
        return AESGCM(HKDFExpand(hashes.SHA256(), 32, info).derive(self.key))

    def _remember(self, slot: tuple[str, str, int], aead: AESGCM) -> AESGCM:
        if len(self._keys) >= KEY_CACHE_MAX:
            self._keys.clear()  # last hour's keys and departed nodes': cheap to derive again
        self._keys[slot] = aead
        return aead

    # -- requests -------------------------------------------------------------------------------
    def seal_request(
        self, method: str, path: str, recipient: str, body: bytes, now: float | None = None
    ) -> tuple[dict[str, str], bytes]:
        """(headers, sealed body) of a request to `recipient` (node id, or host:port as dialled)."""
        ts = f"{time.time() if now is None else now:.3f}"
        nonce = secrets.token_hex(16)
        aad = _encode(_PROTOCOL, "REQ", method.upper(), path, self.node_id, recipient, ts, nonce)
        headers = {H_NODE: self.node_id, H_TO: recipient, H_TIME: ts, H_NONCE: nonce}
        return headers, self._seal("REQ", self.node_id, ts, aad, body)

    def precheck(self, headers: Mapping[str, str]) -> None:
        """The checks that need no body: run before reading one, so an unauthenticated or stale
        request costs us no read and no crypto."""
        node, to, ts, nonce = (headers.get(h) for h in (H_NODE, H_TO, H_TIME, H_NONCE))
        if not (node and to and ts and nonce):
            raise AuthError("unsigned")
        if len(node) > 64 or len(to) > 300 or not _NONCE_RE.fullmatch(nonce) or len(ts) > 32:
            raise AuthError("malformed authentication headers")
        try:
            t = float(ts)
        except ValueError:
            raise AuthError("malformed timestamp") from None
        if not abs(time.time() - t) <= self.max_skew_s:  # `not <=` also refuses NaN
            raise AuthError("timestamp outside the allowed clock skew")

    def open_request(self, method: str, path: str, headers: Mapping[str, str], sealed: bytes) -> tuple[str, bytes]:
        """(sender's node id, plaintext body), or AuthError. The nonce is remembered only once the
        tag verified and the request is for this node, so keyless senders cannot fill the cache."""
        self.precheck(headers)
        node, to, ts, nonce = (headers[h] for h in (H_NODE, H_TO, H_TIME, H_NONCE))
        aad = _encode(_PROTOCOL, "REQ", method.upper(), path, node, to, ts, nonce)
        try:
            body = self._open("REQ", node, ts, aad, sealed)
        except InvalidTag:
            raise AuthError("bad tag (wrong cluster key, or altered)") from None
        mine = self.is_recipient(to) if self.is_recipient is not None else to == self.node_id
        if not mine:
            raise AuthError("not addressed to this node")
        self.nonces.check_and_add(nonce)
        return node, body

    # -- replies --------------------------------------------------------------------------------
    def seal_reply(
        self, method: str, path: str, request_headers: Mapping[str, str], status: int, body: bytes
    ) -> tuple[dict[str, str], bytes]:
        nonce = request_headers[H_NONCE]
        aad = _encode(
            _PROTOCOL, "REP", method.upper(), path, request_headers[H_NODE], request_headers[H_TO],
            nonce, self.node_id, str(status),
        )
        return {H_NODE: self.node_id}, self._seal("REP", self.node_id, request_headers[H_TIME], aad, body)

    def open_reply(
        self, method: str, path: str, request_headers: Mapping[str, str], status: int,
        headers: Mapping[str, str], sealed: bytes,
    ) -> tuple[str, bytes]:
        """(replier's node id, plaintext body). The request's nonce (fresh, ours) rules out replay."""
        replier = headers.get(H_NODE)
        if not replier or len(replier) > 64:
            raise AuthError("unsigned reply (wrong cluster key, or not a shoal node?)")
        nonce = request_headers[H_NONCE]
        aad = _encode(
            _PROTOCOL, "REP", method.upper(), path, request_headers[H_NODE], request_headers[H_TO],
            nonce, replier, str(status),
        )
        try:
            return replier, self._open("REP", replier, request_headers[H_TIME], aad, sealed)
        except InvalidTag:
            raise AuthError("bad reply tag (wrong cluster key, or altered)") from None
