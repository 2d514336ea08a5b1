"""Ollama-compatible endpoints: /api/chat, /api/generate, /api/tags, /api/ps, /api/show, /api/version
(and /api/pull, /api/delete, /api/copy from api/ollama_pull.py).

Ollama streams NDJSON by default (one JSON object per line, `done: true` on the last), reports
durations in nanoseconds, takes sampling settings in `options` with its own defaults
(temperature 0.8, top_k 40, top_p 0.9) and answers errors as {"error": "<message>"}. An empty
prompt (or message list) only loads the model; with keep_alive 0 it unloads it, as Ollama does.
"""

from __future__ import annotations

import hashlib
import json
import time
from datetime import UTC, datetime
from typing import Annotated, Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from shoal import __version__
from shoal.api.errors import ApiError, invalid, json_response, parse, read_json
from shoal.api.generation import (
    Reply,
    TokenPieces,
    acquire,
    json_constraint,
    max_tokens_for,
    run_to_end,
    sampling,
    submit,
    timings,
    token_logprobs_openai,
    tokenize,
    watch_disconnect,
)
from shoal.api.instance import GenerationStream, Instance, ModelCard
from shoal.api.ollama_pull import OllamaModelFiles
from shoal.api.service import ModelService
from shoal.api.tools import (
    CallStream,
    Tool,
    ToolCall,
    ToolChoice,
    check_tools,
    dialect,
    encode_chat,
    make_tool,
)
from shoal.engine.generate import TokenEvent
from shoal.engine.grammar import Constraint

# The Ollama API version these endpoints follow (clients compare it to gate features).
OLLAMA_API_VERSION = "0.12.0"
NEVER_EXPIRES = "2099-01-01T00:00:00Z"


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)


class Options(_Body):
    temperature: float | None = Field(None, ge=0, le=100, description="default 0.8")
    top_p: float | None = Field(None, ge=0, le=1, description="default 0.9")
    top_k: int | None = Field(None, ge=-1, le=1 << 20, description="default 40; 0 or -1 is off")
    min_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    num_predict: int | None = Field(None, ge=-2, le=1 << 24, description="-1: until the context is full")
    stop: list[Annotated[str, Field(min_length=1)]] | Annotated[str, Field(min_length=1)] | None = None
    num_ctx: int | None = Field(None, description="ignored: the model's own context is used")


class CalledFunction(_Body):
    name: str = Field(min_length=1, max_length=64)
    arguments: dict[str, Any] = Field(default_factory=dict)


class MessageToolCall(_Body):
    function: CalledFunction


class Message(_Body):
    role: str = Field(min_length=1, max_length=64)
    content: str | None = ""
    images: list[Any] | None = Field(None, description="not supported")
    tool_calls: list[MessageToolCall] | None = Field(None, description="an assistant turn's calls")
    tool_name: str | None = Field(None, description="a tool turn's: the function that answered")


class FunctionDef(_Body):
    name: Any = None
    description: Any = None
    parameters: Any = None


class ToolDef(_Body):
    type: str = "function"
    function: FunctionDef


class _Common(_Body):
    model: str = Field(min_length=1, max_length=512)
    stream: bool | None = True
    format: str | dict[str, Any] | None = Field(None, description="'json', or a JSON schema the output must match")
    options: Options | None = None
    keep_alive: str | float | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class ChatRequest(_Common):
    messages: list[Message] | None = None
    tools: list[ToolDef] | None = None
    think: bool | str | None = None


class GenerateRequest(_Common):
    prompt: str | None = None
    system: str | None = None
    template: str | None = Field(None, description="not supported")
    context: list[Annotated[int, Field(ge=0)]] | None = None
    raw: bool | None = False
    suffix: str | None = Field(None, description="not supported")
    images: list[Any] | None = Field(None, description="not supported")


class ShowRequest(_Body):
    model: str | None = Field(None, min_length=1, max_length=512)
    name: str | None = Field(None, min_length=1, max_length=512, description="older clients' spelling of model")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _digest(card: ModelCard) -> str:
    # A stable identity for the listing without hashing gigabytes: name, size and file time.
    return hashlib.sha256(f"{card.name}:{card.size_bytes}:{card.modified_at}".encode()).hexdigest()


def _refuse_unsupported(body: _Common) -> None:
    if isinstance(body.format, str) and body.format not in ("", "json"):
        raise invalid(f'invalid format {body.format[:40]!r}: expected "json" or a JSON schema', "format")


def _constraint(body: _Common) -> Constraint | None:
    if isinstance(body.format, dict):
        # Like Ollama, keywords that cannot be enforced are ignored (strict=False); the schema itself must be valid.
        return json_constraint(body.format, False, "format", "format")
    return json_constraint(None, False, "format", "format") if body.format == "json" else None


def _params(body: _Common, prompt_tokens: int, inst: Instance, cap: int | None, constraint: Constraint | None = None,
            skip_special_tokens: bool = True):
    o = body.options or Options()
    n = None if o.num_predict is None or o.num_predict < 0 else o.num_predict
    stop = () if o.stop is None else ((o.stop,) if isinstance(o.stop, str) else tuple(o.stop))
    return sampling(
        max_tokens=max_tokens_for(n, prompt_tokens, inst.max_context, cap, "options.num_predict"),
        temperature=0.8 if o.temperature is None else o.temperature,
        top_p=0.9 if o.top_p is None else (o.top_p or 1.0),
        top_k=40 if o.top_k is None else max(0, o.top_k),
        min_p=o.min_p or 0.0,
        seed=None if o.seed is None else o.seed % (2**63),
        stop=stop,
        logprobs=(body.top_logprobs or 0) if body.logprobs else None,
        constraint=constraint,
        skip_special_tokens=skip_special_tokens,
    )


def _unload_requested(keep_alive: str | float | None) -> bool:
    return keep_alive is not None and str(keep_alive).strip() in ("0", "0s", "0m", "0h", "0.0")


class OllamaHandlers:
    def __init__(self, service: ModelService):
        self.service = service
        self._pieces: dict[str, TokenPieces] = {}  # by model name
        self._files = OllamaModelFiles(service)  # /api/pull, /api/delete, /api/copy

    def routes(self) -> list[tuple[str, str, Any]]:
        return [
            ("POST", "/api/chat", self.chat),
            ("POST", "/api/generate", self.generate),
            ("GET", "/api/tags", self.tags),
            ("GET", "/api/ps", self.ps),
            ("POST", "/api/show", self.show),
            ("GET", "/api/version", self.version),
            *self._files.routes(),
        ]

    # -- listings
    def _entry(self, card: ModelCard) -> dict[str, Any]:
        name = f"{card.name}:latest"
        return {"name": name, "model": name, "modified_at": _iso(card.modified_at), "size": card.size_bytes,
                "digest": _digest(card), "details": card.details()}

    async def tags(self, request: web.Request) -> web.Response:
        return json_response({"models": [self._entry(c) for c in self.service.models()]})

    async def ps(self, request: web.Request) -> web.Response:
        models = []
        for inst in list(self.service.instances.values()):
            e = self._entry(inst.card)
            e.pop("modified_at")
            models.append({**e, "size": inst.card.size_bytes + inst.kv_bytes(), "expires_at": NEVER_EXPIRES, "size_vram": 0,
                           "context_length": inst.max_context})
        return json_response({"models": models})

    async def version(self, request: web.Request) -> web.Response:
        return json_response({"version": OLLAMA_API_VERSION, "shoal": __version__})

    async def show(self, request: web.Request) -> web.Response:
        body: ShowRequest = parse(ShowRequest, await read_json(request))
        name = body.model or body.name
        if not name:
            raise invalid("missing required parameter: 'model'", "model")
        card = self.service.card(name)
        if card is None:
            raise ApiError(404, f"model '{name}' not found", param="model", code="model_not_found")
        inst = self.service.get(name)
        template = (inst.tokenizer.chat_template or "") if inst is not None else ""
        arch = card.architecture
        return json_response({
            "modelfile": f"# served by shoal {__version__}\nFROM {card.path}\n",
            "parameters": "temperature 0.8\ntop_k 40\ntop_p 0.9",
            "template": template,
            "details": card.details(),
            "model_info": {"general.architecture": arch, f"{arch}.context_length": card.context_length},
            "capabilities": ["completion", "tools"],
            "modified_at": _iso(card.modified_at),
        })

    def pieces(self, inst: Instance) -> TokenPieces:
        p = self._pieces.get(inst.name)
        if p is None or p.tokenizer is not inst.tokenizer:  # new, or reloaded
            p = self._pieces[inst.name] = TokenPieces(inst.tokenizer)
        return p

    # -- generation
    async def chat(self, request: web.Request) -> web.StreamResponse:
        t0 = time.perf_counter()
        body: ChatRequest = parse(ChatRequest, await read_json(request))
        _refuse_unsupported(body)
        tools = []
        for i, t in enumerate(body.tools or []):
            if t.type != "function":
                raise invalid(f"tools[{i}]: only tools of type 'function' are supported", f"tools[{i}].type")
            tools.append(make_tool(t.function.name, t.function.description, t.function.parameters, f"tools[{i}].function"))
        check_tools(tools, ToolChoice(), "tools")
        messages = []
        pending: list[str] = []  # ids given to the last assistant turn's calls, for the tool turns that answer them
        for i, m in enumerate(body.messages or []):
            if m.images:
                raise invalid("images are not supported by shoal yet", f"messages[{i}].images")
            msg: dict[str, Any] = {"role": m.role, "content": m.content or ""}
            if m.tool_calls:
                calls = [ToolCall(f"call_{i}_{k}", c.function.name, json.dumps(c.function.arguments, ensure_ascii=False))
                         for k, c in enumerate(m.tool_calls)]
                msg["tool_calls"] = [c.as_hf() for c in calls]
                pending = [c.id for c in calls]
            if m.role == "tool":
                msg["tool_call_id"] = pending.pop(0) if pending else f"call_{i}"
                if m.tool_name:
                    msg["name"] = m.tool_name
            messages.append(msg)
        return await self._run(request, body, t0, messages=messages, tools=tools)

    async def generate(self, request: web.Request) -> web.StreamResponse:
        t0 = time.perf_counter()
        body: GenerateRequest = parse(GenerateRequest, await read_json(request))
        _refuse_unsupported(body)
        for name in ("template", "suffix"):
            if getattr(body, name):
                raise invalid(f"{name} is not supported by shoal yet", name)
        if body.images:
            raise invalid("images are not supported by shoal yet", "images")
        return await self._run(request, body, t0, prompt=body.prompt or "")

    async def _run(self, request: web.Request, body: ChatRequest | GenerateRequest, t0: float,
                   messages: list[dict] | None = None, prompt: str | None = None,
                   tools: list[Tool] | None = None) -> web.StreamResponse:
        is_chat = messages is not None
        head = {"model": body.model, "created_at": ""}
        empty = {"message": {"role": "assistant", "content": ""}} if is_chat else {"response": ""}
        stream = body.stream is not False
        reply = Reply(request, "ndjson" if stream else "json", ollama=True,
                      keepalive_record=lambda: {**head, "created_at": _now(), **empty, "done": False})
        if not (messages if is_chat else prompt):  # load (or unload) only
            if _unload_requested(body.keep_alive):
                await self.service.unload(body.model)
                return json_response({**head, "created_at": _now(), **empty, "done": True, "done_reason": "unload"})
            try:
                await acquire(self.service, body.model, reply)
            except ApiError as e:
                return await reply.fail(e)
            return await reply.complete({**head, "created_at": _now(), **empty, "done": True, "done_reason": "load"})

        constraint = _constraint(body)
        loaded_before = self.service.is_loaded(body.model)
        try:
            inst = await acquire(self.service, body.model, reply)
            size = len(prompt or "") + sum(len(m["content"]) for m in messages or [])
            ids = await tokenize(lambda: self._prompt_ids(inst, body, messages, prompt, tools or []), size)
            d = dialect(inst.tokenizer) if tools else None
            params = _params(body, len(ids), inst, self.service.config.max_tokens_cap, constraint, not (d and d.keep_special))
            (s,) = await submit(inst, inst.name, ids, params, t0, "ollama")
        except ApiError as e:
            return await reply.fail(e)
        except _TemplateError as e:
            return await reply.fail(invalid(f"the model's chat template refused these messages: {e}", "messages"))
        load_ns = 0 if loaded_before else int(inst.load_seconds * 1e9)
        pieces = self.pieces(inst) if body.logprobs else None
        text_key = "message" if is_chat else "response"
        calls = CallStream(d.family) if d else None

        def record(text: str, lps: list | None, made: list[ToolCall] | None = None) -> dict[str, Any]:
            out = {**head, "created_at": _now(), text_key: {"role": "assistant", "content": text} if is_chat else text, "done": False}
            if made:
                out["message"]["tool_calls"] = [{"function": {"name": c.name, "arguments": c.arguments_value()}} for c in made]
            if lps is not None:
                out["logprobs"] = lps
            return out

        def final(reason: str, text: str = "", lps: list | None = None) -> dict[str, Any]:
            out = record(text, lps)
            out.update(done=True, done_reason=reason, **_durations(s, t0, load_ns))
            if not is_chat:
                out["context"] = s.request.prompt_ids + s.request.output_ids
            out["shoal"] = timings(s.request)
            return out

        async with watch_disconnect(request, [s]):
            try:
                if stream:
                    async def on_event(_: int, ev: TokenEvent) -> None:
                        lp = token_logprobs_openai(pieces, ev) if pieces else None
                        text, made = calls.feed(ev.text) if calls else (ev.text, [])
                        if calls and ev.finish_reason is not None:
                            more, rest = calls.finish()
                            text, made = text + more, made + rest
                        if text or lp or made:
                            await reply.send(record(text, [lp] if lp else ([] if pieces else None), made))
                        if ev.finish_reason is not None and ev.finish_reason != "cancelled":
                            await reply.send(final(ev.finish_reason, "", [] if pieces else None))

                    await run_to_end([s], on_event, reply.keepalive)
                    return await reply.end()
                parts: list[str] = []
                lps: list[dict] = []
                reason = ["stop"]

                def collect(_: int, ev: TokenEvent) -> None:
                    parts.append(ev.text)
                    if pieces and (lp := token_logprobs_openai(pieces, ev)):
                        lps.append(lp)
                    if ev.finish_reason is not None:
                        reason[0] = ev.finish_reason

                await run_to_end([s], collect, reply.keepalive)
                text, made = "".join(parts), []
                if calls:
                    text, made = calls.feed(text)
                    more, rest = calls.finish()
                    text, made = text + more, made + rest
                out = final(reason[0], text, lps if pieces else None)
                if made:
                    out["message"]["tool_calls"] = [{"function": {"name": c.name, "arguments": c.arguments_value()}} for c in made]
                return await reply.complete(out)
            except ApiError as e:
                return await reply.fail(e)
            except ConnectionError:
                return reply.response or web.Response(status=499)

    @staticmethod
    def _prompt_ids(inst: Instance, body: ChatRequest | GenerateRequest, messages: list[dict] | None, prompt: str | None,
                    tools: list[Tool]) -> list[int]:
        tok = inst.tokenizer
        if messages is not None:
            return encode_chat(tok, messages, tools)
        assert isinstance(body, GenerateRequest) and prompt is not None
        context = list(body.context or [])
        if context and max(context) >= tok.vocab_size:
            raise invalid(f"context token {max(context)} is outside the vocabulary", "context")
        if body.raw:
            return context + tok.encode(prompt, add_special_tokens=not context)
        turn = ([{"role": "system", "content": body.system}] if body.system else []) + [{"role": "user", "content": prompt}]
        return context + tok.encode_chat(turn)


def _durations(s: GenerationStream, t0: float, load_ns: int) -> dict[str, int]:
    req, st = s.request, s.request.stats
    now = time.perf_counter()
    eval_ns = 0
    if req.t_first_token is not None and req.t_last_token is not None:
        eval_ns = int((req.t_last_token - req.t_first_token) * 1e9)
    return {
        "total_duration": int((now - t0) * 1e9),
        "load_duration": load_ns,
        "prompt_eval_count": len(req.prompt_ids),
        "prompt_eval_duration": int((st.ttft_s or 0.0) * 1e9) if st is not None else 0,
        "eval_count": len(req.output_ids),
        "eval_duration": eval_ns,
    }


try:
    from jinja2 import TemplateError as _TemplateError
except ImportError:  # pragma: no cover - jinja2 is a dependency
    _TemplateError = RuntimeError  # type: ignore[misc,assignment]
