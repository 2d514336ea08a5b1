"""Authentication of node-to-node traffic with the cluster key.

Every peer request carries four headers: the sender's node id, a unix timestamp, a random nonce
and an HMAC-SHA256 over (method, path, node id, timestamp, nonce, SHA-256 of the body). The
receiver checks the timestamp against a skew window, the signature in constant time, and only
then remembers the nonce, so a replay inside the window is refused and a request outside it is
stale. The key itself never travels.

Replies are signed too, bound to the request's nonce, so a node that holds the key also knows the
answer came from one that does (a keyless listener at a seed address cannot feed us members).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

H_NODE = "X-Shoal-Node"
H_TIME = "X-Shoal-Timestamp"
H_NONCE = "X-Shoal-Nonce"
H_SIG = "X-Shoal-Signature"

MAX_SKEW_S = 30.0
NONCE_CACHE_MAX = 200_000  # ~25 MB at worst; far above any honest rate within the window


class AuthError(Exception):
    """A request or reply that fails authentication; `reason` is safe to log and return."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def derive_key(cluster_key: str) -> bytes:
    # Domain-separated so the same passphrase used elsewhere does not give the same MAC key.
    return hashlib.sha256(b"shoal-cluster-key-v1\0" + cluster_key.encode()).digest()


def cluster_fingerprint(cluster_key: str) -> str:
    """A public tag of the key (for mDNS TXT records, logs): tells clusters apart, reveals nothing."""
    return hmac.new(derive_key(cluster_key), b"shoal cluster id", hashlib.sha256).hexdigest()[:16]


def _mac(key: bytes, *parts: str | bytes) -> str:
    h = hmac.new(key, digestmod=hashlib.sha256)
    for p in parts:
        b = p.encode() if isinstance(p, str) else p
        # Length-prefix each part so ("ab", "c") and ("a", "bc") never collide.
        h.update(len(b).to_bytes(8, "big"))
        h.update(b)
    return h.hexdigest()


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


@dataclass
class Signer:
    """Signs and verifies with one cluster key. One per node; holds the node's nonce cache."""

    node_id: str
    key: bytes
    max_skew_s: float = MAX_SKEW_S

    def __post_init__(self) -> None:
        self.nonces = NonceCache(ttl_s=2 * self.max_skew_s)

    @classmethod
    def from_cluster_key(cls, node_id: str, cluster_key: str) -> Signer:
        return cls(node_id=node_id, key=derive_key(cluster_key))

    # -- requests -------------------------------------------------------------------------------
    def sign_request(self, method: str, path: str, body: bytes, now: float | None = None) -> dict[str, str]:
        ts = f"{time.time() if now is None else now:.3f}"
        nonce = secrets.token_hex(16)
        sig = _mac(self.key, "REQ", method.upper(), path, self.node_id, ts, nonce, hashlib.sha256(body).digest())
        return {H_NODE: self.node_id, H_TIME: ts, H_NONCE: nonce, H_SIG: sig}

    def precheck(self, headers: Mapping[str, str]) -> None:
        """The checks that need no body: run before reading one, so an unsigned or stale request
        costs us no read and no hashing."""
        node, ts, nonce, sig = (headers.get(h) for h in (H_NODE, H_TIME, H_NONCE, H_SIG))
        if not (node and ts and nonce and sig):
            raise AuthError("unsigned")
        if len(node) > 64 or len(nonce) > 64 or len(sig) != 64 or len(ts) > 32:
            raise AuthError("malformed signature headers")
        try:
            t = float(ts)
        except ValueError:
            raise AuthError("malformed timestamp") from None
        if not abs(time.time() - t) <= self.max_skew_s:  # `not <=` also refuses NaN
            raise AuthError("timestamp outside the allowed clock skew")

    def verify_request(self, method: str, path: str, headers: Mapping[str, str], body: bytes) -> str:
        """Returns the sender's node id, or raises AuthError. Records the nonce only once the
        signature is good, so keyless senders cannot fill the cache."""
        self.precheck(headers)
        node, ts, nonce, sig = (headers[h] for h in (H_NODE, H_TIME, H_NONCE, H_SIG))
        want = _mac(self.key, "REQ", method.upper(), path, node, ts, nonce, hashlib.sha256(body).digest())
        if not hmac.compare_digest(want, sig):
            raise AuthError("bad signature (wrong cluster key?)")
        self.nonces.check_and_add(nonce)
        return node

    # -- replies --------------------------------------------------------------------------------
    def sign_reply(self, request_nonce: str, status: int, body: bytes) -> dict[str, str]:
        ts = f"{time.time():.3f}"
        sig = _mac(self.key, "REP", request_nonce, str(status), self.node_id, ts, hashlib.sha256(body).digest())
        return {H_NODE: self.node_id, H_TIME: ts, H_SIG: sig}

    def verify_reply(self, request_nonce: str, status: int, headers: Mapping[str, str], body: bytes) -> str:
        """Returns the replier's node id. The request nonce (fresh, ours) already rules out replay."""
        node, ts, sig = (headers.get(h) for h in (H_NODE, H_TIME, H_SIG))
        if not (node and ts and sig):
            raise AuthError("unsigned reply (wrong cluster key, or not a shoal node?)")
        want = _mac(self.key, "REP", request_nonce, str(status), node, ts, hashlib.sha256(body).digest())
        if not hmac.compare_digest(want, sig):
            raise AuthError("bad reply signature (wrong cluster key?)")
        return node
