"""What the OpenAI and Ollama endpoints share about turning an HTTP request into a generation.

- `Reply`: one HTTP answer that may have to start before its outcome is known, so it can send
  keep-alives while a model loads (SSE comments, empty NDJSON records, or whitespace before a
  JSON body), and report a failure in-band once its status line has gone out.
- `prepare`: a request's prompt and parameters checked against the instance (context length,
  max_tokens) and submitted; `merge` interleaves several streams (n > 1, several prompts).
- `watch_disconnect`: a client that goes away cancels its sequences (frees their KV cache).
- `TokenPieces`: the text and exact bytes of single tokens, for logprobs.
- `json_constraint`: a request's structured-output format as a checked `Constraint`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Literal

from aiohttp import web

from shoal.api.errors import ApiError, error_response, invalid, json_response
from shoal.api.instance import (
    KEEPALIVE,
    GenerationRequest,
    GenerationStream,
    Instance,
    new_request_id,
)
from shoal.api.service import ModelService
from shoal.engine.generate import TokenEvent
from shoal.engine.grammar import Constraint, InvalidConstraint, check
from shoal.engine.sampler import SamplingParams
from shoal.engine.tokenizer import Tokenizer

# Text longer than this is tokenized in a worker thread so the event loop keeps serving streams.
INLINE_TOKENIZE_CHARS = 32_768
STREAM_KEEPALIVE_S = 2.0
# A non-streaming reply commits to "200 + JSON" only once a load has made the client wait this long.
JSON_KEEPALIVE_AFTER_S = 10.0
DISCONNECT_POLL_S = 0.25

Kind = Literal["sse", "ndjson", "json"]


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


class Reply:
    def __init__(self, request: web.Request, kind: Kind, ollama: bool = False,
                 keepalive_record: Callable[[], dict] | None = None):
        self.request, self.kind, self.ollama = request, kind, ollama
        self.keepalive_record = keepalive_record  # NDJSON: a harmless record (Ollama clients parse every line)
        self.response: web.StreamResponse | None = None
        self._t0 = time.monotonic()

    @property
    def started(self) -> bool:
        return self.response is not None

    @property
    def keepalive_interval(self) -> float:
        return STREAM_KEEPALIVE_S if self.kind != "json" else JSON_KEEPALIVE_AFTER_S

    async def start(self) -> None:
        if self.response is not None:
            return
        content_type = {"sse": "text/event-stream", "ndjson": "application/x-ndjson", "json": "application/json"}[self.kind]
        headers = {"Content-Type": content_type + "; charset=utf-8", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        resp = web.StreamResponse(status=200, headers=headers)
        await resp.prepare(self.request)
        self.response = resp

    async def keepalive(self) -> None:
        if self.kind == "json" and time.monotonic() - self._t0 < JSON_KEEPALIVE_AFTER_S:
            return
        await self.start()
        assert self.response is not None
        if self.kind == "sse":
            await self.response.write(b": keep-alive\n\n")
        elif self.kind == "ndjson" and self.keepalive_record is not None:
            await self.response.write(dumps(self.keepalive_record()) + b"\n")
        elif self.kind == "json":
            await self.response.write(b" ")  # leading whitespace is valid JSON

    async def send(self, obj: Any) -> None:
        """One streamed record."""
        await self.start()
        assert self.response is not None
        if self.kind == "sse":
            await self.response.write(b"data: " + dumps(obj) + b"\n\n")
        else:
            await self.response.write(dumps(obj) + b"\n")

    async def end(self) -> web.StreamResponse:
        await self.start()
        assert self.response is not None
        if self.kind == "sse":
            await self.response.write(b"data: [DONE]\n\n")
        await self.response.write_eof()
        return self.response

    async def complete(self, obj: Any) -> web.StreamResponse:
        """The whole answer of a non-streaming request."""
        if self.response is None:
            return json_response(obj)
        await self.response.write(dumps(obj))
        await self.response.write_eof()
        return self.response

    async def fail(self, err: ApiError) -> web.StreamResponse:
        if self.response is None:
            return error_response(err, self.ollama)
        body = err.to_ollama() if self.ollama else err.to_openai()
        with contextlib.suppress(ConnectionError):
            if self.kind == "sse":
                await self.response.write(b"data: " + dumps(body) + b"\n\n")
            else:
                await self.response.write(dumps(body) + (b"\n" if self.kind == "ndjson" else b""))
            await self.response.write_eof()
        return self.response


async def acquire(service: ModelService, model: str, reply: Reply) -> Instance:
    """The model's instance; a streaming reply starts at once if the model must load first."""
    if reply.kind != "json" and service.must_wait(model):
        await reply.start()
        await reply.keepalive()
    return await service.acquire(model, reply.keepalive, reply.keepalive_interval)


async def tokenize(encode: Callable[[], list[int]], size_hint: int) -> list[int]:
    """Run `encode` here for short texts, in a thread for long ones (`size_hint`: characters)."""
    if size_hint > INLINE_TOKENIZE_CHARS:
        return await asyncio.to_thread(encode)
    return encode()


def context_error(prompt_tokens: int, completion_tokens: int | None, context: int, param: str) -> ApiError:
    if completion_tokens is None:
        msg = (f"This model's maximum context length is {context} tokens. However, your prompt has {prompt_tokens} tokens. "
               "Please reduce the length of the prompt.")
    else:
        msg = (f"This model's maximum context length is {context} tokens. However, you requested "
               f"{prompt_tokens + completion_tokens} tokens ({prompt_tokens} in the prompt, {completion_tokens} in the completion). "
               "Please reduce the length of the prompt or completion.")
    return ApiError(400, msg, "invalid_request_error", param, "context_length_exceeded")


def max_tokens_for(requested: int | None, prompt_tokens: int, context: int, cap: int | None, param: str) -> int:
    """How many tokens to allow: as asked if it fits the context (else 400), all the room left if not asked."""
    if prompt_tokens >= context:
        raise context_error(prompt_tokens, None, context, param)
    if requested is not None and prompt_tokens + requested > context:
        raise context_error(prompt_tokens, requested, context, param)
    n = context - prompt_tokens if requested is None else requested
    return n if cap is None else min(n, cap)


def sampling(**kw: Any) -> SamplingParams:
    try:
        return SamplingParams(**kw)
    except ValueError as e:
        raise invalid(str(e)) from None


async def submit(instance: Instance, model: str, prompt_ids: list[int], params: SamplingParams, t_arrival: float,
                 prefix: str, count: int = 1) -> list[GenerationStream]:
    """`count` sequences of the same prompt (n > 1 gets seeds seed, seed+1, ... so choices differ)."""
    streams = []
    try:
        for i in range(count):
            p = params if i == 0 or params.seed is None else _reseed(params, params.seed + i)
            req = GenerationRequest(new_request_id(prefix), model, list(prompt_ids), p, t_arrival)
            streams.append(await instance.submit(req))
    except ApiError:
        for s in streams:
            s.cancel()
        raise
    return streams


def json_constraint(schema: dict[str, Any] | None, strict: bool, what: str, param: str) -> Constraint:
    """JSON output, matching `schema` if one is given (else any object), checked before a model is
    loaded: a schema that cannot constrain decoding is this request's 400, saying why."""
    c = Constraint("json_object") if schema is None else Constraint.json_schema(schema, strict)
    try:
        check(c)
    except InvalidConstraint as e:
        raise invalid(f"invalid JSON schema for {what}: {e}", param, "invalid_json_schema") from None
    return c


def _reseed(params: SamplingParams, seed: int) -> SamplingParams:
    import dataclasses

    return dataclasses.replace(params, seed=seed)


async def merge(streams: Sequence[GenerationStream]) -> AsyncIterator[tuple[int, TokenEvent]]:
    """(index, event) from several streams as they come; one stream is passed straight through."""
    if len(streams) == 1:
        async for ev in streams[0]:
            yield 0, ev
        return
    q: asyncio.Queue[tuple[int, TokenEvent | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, s: GenerationStream) -> None:
        try:
            async for ev in s:
                q.put_nowait((i, ev))
        except Exception as e:
            q.put_nowait((i, e))
            return
        q.put_nowait((i, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(streams)
    try:
        while remaining:
            i, item = await q.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


@contextlib.asynccontextmanager
async def watch_disconnect(request: web.Request, streams: Sequence[GenerationStream]):
    """Cancel the streams when the client's connection closes, or when the handler ends early for
    any reason (an error, a failed write, the handler being cancelled)."""

    async def watch() -> None:
        while True:
            await asyncio.sleep(DISCONNECT_POLL_S)
            t = request.transport
            if t is None or t.is_closing():
                for s in streams:
                    s.cancel()
                return

    task = asyncio.ensure_future(watch())
    try:
        yield
    finally:
        task.cancel()
        for s in streams:
            s.cancel()  # a no-op for finished streams


def timings(req: GenerationRequest) -> dict[str, float]:
    """shoal's extra measurements for one sequence, in a field clients ignore."""
    out: dict[str, float] = {}
    if req.t_first_token is not None:
        out["ttft_ms"] = round(1000 * (req.t_first_token - req.t_arrival), 2)
    n = len(req.output_ids)
    if req.t_last_token is not None and req.t_first_token is not None and n > 1:
        out["tokens_per_s"] = round((n - 1) / max(req.t_last_token - req.t_first_token, 1e-9), 2)
    if req.stats is not None:
        out["prefill_tokens_per_s"] = round(req.stats.prefill_tps, 2)
        out["decode_tokens_per_s"] = round(req.stats.decode_tps, 2)
    return out


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level BPE vocabularies are written in."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


_BYTE_DECODER = {c: b for b, c in _bytes_to_unicode().items()}


class TokenPieces:
    """A token's own text and exact bytes (a byte-level token may hold part of a UTF-8 character)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, bytes]] = {}

    def __call__(self, token: int) -> tuple[str, bytes]:
        hit = self._cache.get(token)
        if hit is not None:
            return hit
        raw = self.tokenizer.backend.id_to_token(token) or ""
        if raw and all(c in _BYTE_DECODER for c in raw):
            data = bytes(_BYTE_DECODER[c] for c in raw)
            text = data.decode("utf-8", errors="replace")
        else:
            text = self.tokenizer.decode([token], skip_special_tokens=False)
            data = text.encode()
        self._cache[token] = (text, data)
        return text, data


def token_logprobs_openai(pieces: TokenPieces, ev: TokenEvent) -> dict[str, Any] | None:
    """One entry of a chat `logprobs.content` list."""
    if ev.token is None or ev.logprob is None:
        return None
    text, data = pieces(ev.token)
    top = [{"token": (p := pieces(t))[0], "logprob": lp, "bytes": list(p[1])} for t, lp in (ev.top_logprobs or [])]
    return {"token": text, "logprob": ev.logprob, "bytes": list(data), "top_logprobs": top}


async def run_to_end(streams: Sequence[GenerationStream], on_event: Callable[[int, TokenEvent], Awaitable[None] | None],
                     keepalive: Callable[[], Awaitable[None]]) -> None:
    """Feed every event to `on_event` until all streams finish; while a stream waits for its model
    to recover on another placement, `keepalive` keeps the client's connection open."""
    async with contextlib.aclosing(merge(streams)) as events:
        async for i, ev in events:
            if ev is KEEPALIVE:
                await keepalive()
                continue
            r = on_event(i, ev)
            if r is not None:
                await r


def parse_stop(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)

