"""Signed node-to-node HTTP: the server side (a middleware guarding every /peer/* path, and
`peer_handler`, which parses the typed message) and the client side (`PeerClient`).

A refused request gets a JSON `Refusal` and one log line naming the remote address and why; the
node keeps serving. Refusal logs are rate-limited per (address, reason) so a flood cannot fill
the disk.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import aiohttp
from aiohttp import web
from pydantic import ValidationError

from shoal.cluster.auth import H_NONCE, AuthError, Signer
from shoal.cluster.messages import MAX_BODY_BYTES, MAX_PROBE_BYTES, Message, Refusal

log = logging.getLogger("shoal.peer")

PEER_PREFIX = "/peer/"
# Per-path body limits (bytes); every other /peer/ path gets MAX_BODY_BYTES.
PEER_BODY_LIMITS = {"/peer/probe": MAX_PROBE_BYTES}

SIGNER_KEY = web.AppKey("shoal_signer", Signer)
# Set on each authenticated /peer/ request by the middleware:
PEER_ID = web.RequestKey("shoal_peer_id", str)  # the sender's node id, as signed
PEER_BODY = web.RequestKey("shoal_peer_body", bytes)  # the body, already read and verified

M = TypeVar("M", bound=Message)
R = TypeVar("R", bound=Message)


class _RefusalLog:
    """At most one line per (remote, reason) every `every_s`, with a count of the ones skipped."""

    def __init__(self, every_s: float = 5.0) -> None:
        self.every_s = every_s
        self._last: dict[tuple[str, str], tuple[float, int]] = {}

    def __call__(self, remote: str, reason: str, what: str) -> None:
        now = time.monotonic()
        last, skipped = self._last.get((remote, reason), (0.0, 0))
        if now - last < self.every_s:
            self._last[(remote, reason)] = (last, skipped + 1)
            return
        more = f" (+{skipped} similar)" if skipped else ""
        log.warning("refused %s from %s: %s%s", what, remote, reason, more)
        if len(self._last) > 10_000:  # bounded memory under a scan from many addresses
            self._last.clear()
        self._last[(remote, reason)] = (now, 0)


_log_refusal = _RefusalLog()


def refuse(request: web.Request, status: int, reason: str) -> web.Response:
    _log_refusal(request.remote or "?", reason, f"{request.method} {request.path}")
    return _json(Refusal(error=reason), status)


def _json(msg: Message, status: int = 200) -> web.Response:
    # Bytes, not str: the reply signature is computed over resp.body, which must be the wire bytes.
    return web.Response(status=status, body=msg.model_dump_json().encode(), content_type="application/json")


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
    """Every /peer/* request: bounded body, valid signature, fresh nonce; every reply signed."""
    if not request.path.startswith(PEER_PREFIX):
        return await handler(request)
    signer = request.app[SIGNER_KEY]
    limit = PEER_BODY_LIMITS.get(request.path, MAX_BODY_BYTES)
    try:
        signer.precheck(request.headers)
    except AuthError as e:
        return refuse(request, 401, e.reason)
    try:
        body = await _read_limited(request.content, request.content_length, limit)
    except (aiohttp.ClientPayloadError, aiohttp.web.HTTPException, ValueError) as e:
        return refuse(request, 400, f"unreadable body: {type(e).__name__}")
    if body is None:
        return refuse(request, 413, f"body larger than {limit} bytes")
    try:
        sender = signer.verify_request(request.method, request.path, request.headers, body)
    except AuthError as e:
        return refuse(request, 401, e.reason)
    request[PEER_ID] = sender
    request[PEER_BODY] = body
    try:
        resp = await handler(request)
    except web.HTTPException as e:  # 404/405 from routing, still answered with a signed reply
        resp = _json(Refusal(error=e.reason), e.status)
    if not isinstance(resp, web.Response):
        return resp  # streaming replies are not used on /peer/
    out = resp.body if isinstance(resp.body, bytes) else b""  # every /peer/ reply is made with bytes
    resp.headers.update(signer.sign_reply(request.headers[H_NONCE], resp.status, out))
    return resp


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
    """Signed requests to other nodes over one shared keep-alive session."""

    def __init__(self, signer: Signer, session: aiohttp.ClientSession) -> None:
        self.signer = signer
        self.session = session

    async def post(self, host: str, port: int, path: str, body: bytes, timeout_s: float) -> tuple[bytes, str]:
        """(reply body, replier's node id) of a signed POST that answered 200 with a valid signature."""
        headers = self.signer.sign_request("POST", path, body)
        headers["Content-Type"] = "application/json" if path != "/peer/probe" else "application/octet-stream"
        try:
            async with self.session.post(
                _url(host, port, path), data=body, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout_s)
            ) as resp:
                out = await _read_limited(resp.content, resp.content_length, MAX_BODY_BYTES)
                if out is None:
                    raise PeerError(f"{host}:{port} replied with an oversized body")
                try:
                    replier = self.signer.verify_reply(headers[H_NONCE], resp.status, resp.headers, out)
                except AuthError as e:
                    raise PeerError(f"{host}:{port}{path}: HTTP {resp.status}, {e.reason}") from None
                if resp.status != 200:
                    raise PeerError(f"{host}:{port}{path}: HTTP {resp.status}: {_refusal_text(out)}")
                return out, replier
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            raise PeerError(f"{host}:{port}{path}: {type(e).__name__} {e}".strip()) from None

    async def call(
        self, host: str, port: int, path: str, msg: Message, reply_type: type[R], timeout_s: float = 2.0
    ) -> tuple[R, str]:
        body, replier = await self.post(host, port, path, msg.model_dump_json().encode(), timeout_s)
        try:
            return reply_type.model_validate_json(body), replier
        except ValidationError as e:
            raise PeerError(f"{host}:{port}{path}: malformed {reply_type.__name__}: {e.errors()[0]['msg']}") from None
