"""Encrypted node-to-node HTTP: the server side (a middleware guarding every /peer/* path, and
`peer_handler`, which parses the typed message) and the client side (`PeerClient`). The sealing
itself (keys, associated data, order of checks) is in auth.py.

Every /peer/* body, request and reply, travels sealed; handlers and callers see plaintext only.
A request is addressed: to a node id, or to the host:port the sender dialled, which must be one
of this node's own addresses or names (`OwnAddresses`) and its port, so a captured request
replayed to another node is refused.

A refused request gets a `Refusal` and one log line naming the remote address and why; the node
keeps serving. A refusal before the request proved the key (unsigned, stale, oversized, bad tag,
misaddressed, replayed) goes out in plaintext and says only which check failed; anything after
that (a message that does not parse, an unknown path, a handler's refusal) is sealed like any
reply. Refusal logs are rate-limited per (address, reason) so a flood cannot fill the disk.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any, TypeVar

import aiohttp
import psutil
from aiohttp import web
from pydantic import ValidationError

from shoal.cluster.auth import H_NODE, SEAL_OVERHEAD, AuthError, PeerCipher, host_port, normal_host, split_recipient
from shoal.cluster.messages import MAX_BODY_BYTES, MAX_PROBE_BYTES, Message, Refusal

log = logging.getLogger("shoal.peer")

PEER_PREFIX = "/peer/"
# Per-path body limits (bytes); every other /peer/ path gets MAX_BODY_BYTES.
PEER_BODY_LIMITS = {"/peer/probe": MAX_PROBE_BYTES}

CIPHER_KEY = web.AppKey("shoal_cipher", PeerCipher)
# Set on each authenticated /peer/ request by the middleware:
PEER_ID = web.RequestKey("shoal_peer_id", str)  # the sender's node id, as sealed
PEER_BODY = web.RequestKey("shoal_peer_body", bytes)  # the body, read, verified and decrypted
SEALED = "application/octet-stream"

M = TypeVar("M", bound=Message)
R = TypeVar("R", bound=Message)


class RefusalLog:
    """At most one line per (remote, reason) every `every_s`, with a count of the ones skipped."""

    def __init__(self, logger: logging.Logger, every_s: float = 5.0) -> None:
        self.log = logger
        self.every_s = every_s
        self._last: dict[tuple[str, str], tuple[float, int]] = {}

    def __call__(self, remote: str, reason: str, what: str) -> None:
        now = time.monotonic()
        last, skipped = self._last.get((remote, reason), (0.0, 0))
        if now - last < self.every_s:
            self._last[(remote, reason)] = (last, skipped + 1)
            return
        more = f" (+{skipped} similar)" if skipped else ""
        self.log.warning("refused %s from %s: %s%s", what, remote, reason, more)
        if len(self._last) > 10_000:  # bounded memory under a scan from many addresses
            self._last.clear()
        self._last[(remote, reason)] = (now, 0)


_log_refusal = RefusalLog(log)


def refuse(request: web.Request, status: int, reason: str) -> web.Response:
    _log_refusal(request.remote or "?", reason, f"{request.method} {request.path}")
    return _json(Refusal(error=reason), status)


def _json(msg: Message, status: int = 200) -> web.Response:
    # Bytes, not str: the middleware seals resp.body, which must be the whole body.
    return web.Response(status=status, body=msg.model_dump_json().encode(), content_type="application/json")


class OwnAddresses:
    """Whether a recipient named in a request is this node: its node id, or host:port with this
    node's port and one of its interface addresses (any family, loopback included), its hostname,
    "localhost", or a host it was told to bind or advertise. Interfaces are re-read when a name
    misses, at most every `refresh_s`, so an address that came up after start is found."""

    def __init__(self, node_id: str, port: int, names: Iterable[str | None] = (), refresh_s: float = 2.0) -> None:
        self.node_id = node_id
        self.port = port
        hostname = normal_host(socket.gethostname())
        short = hostname.split(".")[0]
        given = {normal_host(n) for n in names if n and n not in ("0.0.0.0", "::")}  # a wildcard names no host
        self.names = frozenset({"localhost", hostname, short, f"{short}.local", *given})
        self.refresh_s = refresh_s
        self._addresses: frozenset[str] = frozenset()
        self._read_at = float("-inf")

    def __call__(self, recipient: str) -> bool:
        if recipient == self.node_id:
            return True
        where = split_recipient(recipient)
        if where is None or where[1] != self.port:
            return False
        host = where[0]
        if host in self.names or host in self.addresses():
            return True
        if time.monotonic() - self._read_at > self.refresh_s:
            return host in self.addresses(refresh=True)
        return False

    def addresses(self, refresh: bool = False) -> frozenset[str]:
        if refresh or not self._addresses:
            self._addresses = local_addresses()
            self._read_at = time.monotonic()
        return self._addresses


def local_addresses() -> frozenset[str]:
    """Every address of this machine's interfaces (in this network namespace), normalised."""
    out = set()
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family in (socket.AF_INET, socket.AF_INET6):
                out.add(normal_host(a.address.split("%")[0]))  # "fe80::1%eth0": the zone is not the address
    return frozenset(out)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(normal_host(host)).is_loopback
    except ValueError:
        return host == "localhost"


async def _read_limited(stream: aiohttp.StreamReader, length: int | None, limit: int) -> bytes | None:
    """A whole body, or None if it is longer than limit (read no further than that)."""
    if length is not None and length > limit:
        return None
    chunks, size = [], 0
    async for chunk in stream.iter_chunked(1 << 16):
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


@web.middleware
async def peer_auth_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every /peer/* request: bounded body, valid tag, addressed here, fresh nonce; every reply sealed."""
    if not request.path.startswith(PEER_PREFIX):
        return await handler(request)
    cipher = request.app[CIPHER_KEY]
    limit = PEER_BODY_LIMITS.get(request.path, MAX_BODY_BYTES) + SEAL_OVERHEAD
    try:
        cipher.precheck(request.headers)
    except AuthError as e:
        return refuse(request, 401, e.reason)
    try:
        sealed = await _read_limited(request.content, request.content_length, limit)
    except (aiohttp.ClientPayloadError, aiohttp.web.HTTPException, ValueError) as e:
        return refuse(request, 400, f"unreadable body: {type(e).__name__}")
    if sealed is None:
        return refuse(request, 413, f"body larger than {limit - SEAL_OVERHEAD} bytes")
    try:
        sender, body = cipher.open_request(request.method, request.path, request.headers, sealed)
    except AuthError as e:
        return refuse(request, 401, e.reason)
    request[PEER_ID] = sender
    request[PEER_BODY] = body
    try:
        resp = await handler(request)
    except web.HTTPException as e:  # 404/405 from routing, still answered with a sealed reply
        resp = _json(Refusal(error=e.reason), e.status)
    except Exception:  # a handler's bug: the sender gets a sealed 500, the log the traceback
        log.exception("handler of %s %s failed", request.method, request.path)
        resp = _json(Refusal(error="internal error"), 500)
    if not isinstance(resp, web.Response):  # a stream cannot be sealed as one message
        log.error("handler of %s %s answered with a stream; /peer/ replies are whole", request.method, request.path)
        resp = _json(Refusal(error="internal error"), 500)
    plain = resp.body if isinstance(resp.body, bytes) else b""  # every /peer/ reply is made with bytes
    headers, out = cipher.seal_reply(request.method, request.path, request.headers, resp.status, plain)
    return web.Response(status=resp.status, body=out, headers=headers, content_type=SEALED)


Handler = Callable[[web.Request, M], Awaitable["Message | web.Response"]]


def peer_handler(model: type[M], fn: Handler[M]) -> Callable[[web.Request], Awaitable[web.Response]]:
    """Adapt `async def fn(request, msg: model) -> Message | web.Response` to an aiohttp handler:
    the verified body is parsed into `model` (refused with 400 if it does not validate) and a
    Message reply is serialised as JSON. A web.Response (e.g. from `refuse`) passes through."""

    async def handler(request: web.Request) -> web.Response:
        try:
            msg = model.model_validate_json(request[PEER_BODY])
        except ValidationError as e:
            first = e.errors()[0] if e.errors() else {}
            where = ".".join(str(x) for x in first.get("loc", ()))
            return refuse(request, 400, f"malformed {model.__name__}: {first.get('msg', 'invalid')} at {where!r}"[:200])
        reply = await fn(request, msg)
        if isinstance(reply, web.Response):
            return reply
        return _json(reply)

    return handler


def spawn(
    coro: Coroutine[Any, Any, None], tasks: set[asyncio.Task[None]], logger: logging.Logger
) -> asyncio.Task[None]:
    """A background task kept in `tasks` (so it can be cancelled at stop) whose crash is logged
    when it happens rather than lost until garbage collection."""
    task = asyncio.ensure_future(coro)
    tasks.add(task)

    def done(t: asyncio.Task[None]) -> None:
        tasks.discard(t)
        if not t.cancelled() and t.exception() is not None:
            logger.error("background task %s crashed", coro.__qualname__, exc_info=t.exception())

    task.add_done_callback(done)
    return task


class PeerError(Exception):
    """A peer call that failed: unreachable, timed out, refused, or an unauthenticated reply."""


def _url(host: str, port: int, path: str) -> str:
    h = f"[{host}]" if ":" in host else host
    return f"http://{h}:{port}{path}"


def _refusal_text(body: bytes) -> str:
    """What a refusing peer said (its `Refusal`'s words), never a byte string."""
    try:
        return Refusal.model_validate_json(body).error
    except ValidationError:
        return body[:200].decode("utf-8", errors="replace")


class PeerClient:
    """Sealed requests to other nodes over one shared keep-alive session."""

    def __init__(self, cipher: PeerCipher, session: aiohttp.ClientSession) -> None:
        self.cipher = cipher
        self.session = session

    async def post(
        self, host: str, port: int, path: str, body: bytes, timeout_s: float, *, node_id: str | None = None
    ) -> tuple[bytes, str]:
        """(reply body, replier's node id) of a sealed POST that answered 200 with a reply that
        opens. The request is addressed to `node_id` when given (and only that node may answer),
        else to host:port as dialled (a seed, or a caller that checks the replier itself)."""
        where = f"{host_port(host, port)}{path}"
        recipient = node_id or host_port(host, port)
        headers, sealed = self.cipher.seal_request("POST", path, recipient, body)
        headers["Content-Type"] = SEALED
        try:
            async with self.session.post(
                _url(host, port, path), data=sealed, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout_s)
            ) as resp:
                out = await _read_limited(resp.content, resp.content_length, MAX_BODY_BYTES + SEAL_OVERHEAD)
                if out is None:
                    raise PeerError(f"{where}: replied with an oversized body")
                if H_NODE not in resp.headers and resp.status != 200:
                    # Refused before our request proved the key: plaintext, and only an error text.
                    raise PeerError(f"{where}: HTTP {resp.status} (unauthenticated): {_refusal_text(out)}")
                try:
                    replier, plain = self.cipher.open_reply("POST", path, headers, resp.status, resp.headers, out)
                except AuthError as e:
                    raise PeerError(f"{where}: HTTP {resp.status}, {e.reason}") from None
                if resp.status != 200:
                    raise PeerError(f"{where}: HTTP {resp.status}: {_refusal_text(plain)}")
                if node_id is not None and replier != node_id:
                    raise PeerError(f"{where}: answered as {replier[:8]}, not {node_id[:8]}")
                return plain, replier
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            raise PeerError(f"{where}: {type(e).__name__} {e}".strip()) from None

    async def call(
        self, host: str, port: int, path: str, msg: Message, reply_type: type[R], timeout_s: float = 2.0,
        *, node_id: str | None = None,
    ) -> tuple[R, str]:
        body, replier = await self.post(host, port, path, msg.model_dump_json().encode(), timeout_s, node_id=node_id)
        try:
            return reply_type.model_validate_json(body), replier
        except ValidationError as e:
            why = e.errors()[0]["msg"]
            raise PeerError(f"{host_port(host, port)}{path}: malformed {reply_type.__name__}: {why}") from None
