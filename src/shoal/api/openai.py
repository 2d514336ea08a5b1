"""OpenAI-compatible endpoints: /v1/chat/completions, /v1/completions, /v1/models.

Request bodies are pydantic models (strict types: a string where a number belongs is a 400, not a
silent conversion); unknown fields are accepted and ignored, as clients send ones we do not use.
Parameters we cannot honour (penalties, logit_bias) are refused by name rather
than ignored, since ignoring them would change what the client gets without telling it.
Responses are plain dicts in OpenAI's exact shapes; shoal's timings ride in an extra "shoal" field.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

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
    parse_stop,
    run_to_end,
    sampling,
    submit,
    timings,
    token_logprobs_openai,
    tokenize,
    watch_disconnect,
)
from shoal.api.instance import GenerationStream, Instance, new_request_id
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
from shoal.api.tools import constraint as tool_constraint
from shoal.engine.generate import TokenEvent
from shoal.engine.grammar import Constraint

MAX_CHOICES = 16  # n, or prompts x n for /v1/completions
MAX_STOPS = 16
MAX_TOP_LOGPROBS = 20
MAX_TOKENS_LIMIT = 1 << 24
FINGERPRINT = f"shoal-{__version__}"


# ----------------------------------------------------------------------------- request models


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)


class ContentPart(_Body):
    type: str = Field(description="only 'text' parts are supported")
    text: str | None = None


class FunctionCall(_Body):
    name: str = Field(min_length=1, max_length=64)
    arguments: str = Field(description="a JSON object, as text")


class MessageToolCall(_Body):
    id: str = Field(min_length=1, max_length=128)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = Field(None, description="an assistant turn's calls")
    tool_call_id: str | None = Field(None, description="a tool turn's: the call it answers")


class FunctionDef(_Body):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = Field(None, description="calls forced by tool_choice always match the schema")


class ToolDef(_Body):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(_Body):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="absent: any JSON object")
    strict: bool | None = Field(None, description="true: a keyword that cannot be enforced is a 400; else it is ignored")


class ResponseFormat(_Body):
    """Structured output, by grammar-constrained decoding (engine/grammar.py)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(_Body):
    include_usage: bool = False


Stop = str | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=MAX_STOPS)] | None


class _Sampling(_Body):
    model: str = Field(min_length=1, max_length=512)
    temperature: float | None = Field(None, ge=0, le=2, description="default 1")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, le=1 << 20, description="extension: 0 or -1 is off")
    min_p: float | None = Field(None, ge=0, le=1, description="extension")
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    stop: Stop = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(1, ge=1, le=MAX_CHOICES)
    presence_penalty: float | None = Field(None, ge=-2, le=2, description="only 0 is supported")
    frequency_penalty: float | None = Field(None, ge=-2, le=2, description="only 0 is supported")
    logit_bias: dict[str, float] | None = Field(None, description="not supported")
    ignore_eos: bool | None = Field(False, description="extension: keep generating past end-of-sequence")
    user: str | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[ToolDef] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(_Sampling):
    prompt: (
        Annotated[str, Field(min_length=1)]
        | TokenIds
        | Annotated[list[str], Field(min_length=1, max_length=MAX_CHOICES)]
        | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_CHOICES)]
    )
    max_tokens: int | None = Field(16, ge=0, le=MAX_TOKENS_LIMIT)
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    best_of: int | None = Field(None, ge=1, le=MAX_CHOICES)
    suffix: str | None = Field(None, description="not supported")


def _refuse_unsupported(body: _Sampling) -> None:
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name):
            raise invalid(f"{name} is not supported by shoal yet; leave it 0 or unset", name, "unsupported_parameter")
    if body.logit_bias:
        raise invalid("logit_bias is not supported by shoal yet", "logit_bias", "unsupported_parameter")
    if body.stream_options is not None and not body.stream:
        raise invalid("stream_options is only allowed when stream is true", "stream_options")


def _sampling_kwargs(body: _Sampling) -> dict[str, Any]:
    return {
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "top_p": 1.0 if body.top_p is None else body.top_p,
        "top_k": max(0, body.top_k or 0),
        "min_p": body.min_p or 0.0,
        "seed": None if body.seed is None else body.seed % (2**63),
        "stop": parse_stop(body.stop),
        "ignore_eos": bool(body.ignore_eos),
    }


def _tools(body: ChatCompletionRequest) -> tuple[list[Tool], ToolChoice]:
    if not body.tools:
        if body.tool_choice is not None and body.tool_choice != "none":
            raise invalid("tool_choice is only allowed when tools are specified", "tool_choice")
        return [], ToolChoice("none")
    tools = [make_tool(t.function.name, t.function.description, t.function.parameters, f"tools[{i}].function")
             for i, t in enumerate(body.tools)]
    parallel = body.parallel_tool_calls is not False
    c = body.tool_choice
    choice = (ToolChoice("required", c.function.name, parallel) if isinstance(c, NamedToolChoice)
              else ToolChoice(c or "auto", None, parallel))
    check_tools(tools, choice, "tools")
    if choice.mode == "required" and body.response_format is not None and body.response_format.type != "text":
        raise invalid("response_format cannot be combined with a tool_choice that forces a call", "response_format")
    return tools, choice


def _constraint(fmt: ResponseFormat | None) -> Constraint | None:
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return json_constraint(None, True, "response_format", "response_format")
    if fmt.json_schema is None:
        raise invalid("response_format of type 'json_schema' needs a 'json_schema' object", "response_format.json_schema")
    js = fmt.json_schema
    return json_constraint(js.schema_, bool(js.strict), f"response_format {js.name!r}", "response_format")


# ----------------------------------------------------------------------------- handlers


class OpenAIHandlers:
    def __init__(self, service: ModelService):
        self.service = service
        self._pieces: dict[str, TokenPieces] = {}  # by model name

    def routes(self) -> list[tuple[str, str, Any]]:
        return [
            ("POST", "/v1/chat/completions", self.chat_completions),
            ("POST", "/v1/completions", self.completions),
            ("GET", "/v1/models", self.list_models),
            ("GET", "/v1/models/{model:.+}", self.get_model),
        ]

    def pieces(self, inst: Instance) -> TokenPieces:
        p = self._pieces.get(inst.name)
        if p is None or p.tokenizer is not inst.tokenizer:  # new, or reloaded
            p = self._pieces[inst.name] = TokenPieces(inst.tokenizer)
        return p

    # -- models
    def _model_obj(self, card) -> dict[str, Any]:
        return {"id": card.name, "object": "model", "created": int(card.modified_at), "owned_by": "shoal",
                "context_length": card.context_length or None}

    async def list_models(self, request: web.Request) -> web.Response:
        return json_response({"object": "list", "data": [self._model_obj(c) for c in self.service.models()]})

    async def get_model(self, request: web.Request) -> web.Response:
        card = self.service.card(request.match_info["model"])
        if card is None:
            raise ApiError(404, f"The model `{request.match_info['model']}` does not exist", param="model", code="model_not_found")
        return json_response(self._model_obj(card))

    # -- chat
    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        t0 = time.perf_counter()
        body: ChatCompletionRequest = parse(ChatCompletionRequest, await read_json(request))
        _refuse_unsupported(body)
        tools, choice = _tools(body)
        constraint = _constraint(body.response_format)
        if body.top_logprobs is not None and not body.logprobs:
            raise invalid("top_logprobs requires logprobs to be true", "top_logprobs")
        messages = [_template_message(m, i) for i, m in enumerate(body.messages)]
        n = body.n or 1
        reply = Reply(request, "sse" if body.stream else "json")
        try:
            inst = await acquire(self.service, body.model, reply)
            size = sum(len(m["content"]) for m in messages) + sum(len(str(t.parameters)) for t in tools)
            offered = tools if choice.mode != "none" else []
            ids = await tokenize(lambda: encode_chat(inst.tokenizer, messages, offered), size)
            d = dialect(inst.tokenizer) if offered else None
            if d is not None:
                constraint = tool_constraint(inst.tokenizer, tools, choice) or constraint
            requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
            param = "max_completion_tokens" if body.max_completion_tokens is not None else "messages"
            max_tokens = max_tokens_for(requested, len(ids), inst.max_context, self.service.config.max_tokens_cap, param)
            params = sampling(max_tokens=max_tokens, logprobs=(body.top_logprobs or 0) if body.logprobs else None,
                              constraint=constraint, skip_special_tokens=not (d and d.keep_special),
                              **_sampling_kwargs(body))
            streams = await submit(inst, inst.name, ids, params, t0, "chatcmpl", n)
        except ApiError as e:
            return await reply.fail(e)
        except _TemplateError as e:
            return await reply.fail(invalid(f"the model's chat template refused these messages: {e}", "messages"))
        rid = new_request_id("chatcmpl")
        base = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": inst.name,
                "system_fingerprint": FINGERPRINT}
        pieces = self.pieces(inst) if body.logprobs else None
        calls = [CallStream(d.family) for _ in streams] if d else None
        async with watch_disconnect(request, streams):
            try:
                if body.stream:
                    include_usage = bool(body.stream_options and body.stream_options.include_usage)
                    return await self._chat_stream(reply, base, streams, pieces, include_usage, calls)
                return await self._chat_whole(reply, {**base, "object": "chat.completion"}, streams, pieces, calls)
            except ApiError as e:
                return await reply.fail(e)
            except ConnectionError:  # the client went away mid-write; the guard cancels its sequences
                return reply.response or web.Response(status=499)

    async def _chat_stream(self, reply: Reply, base: dict, streams: list[GenerationStream], pieces: TokenPieces | None,
                           include_usage: bool, calls: list[CallStream] | None) -> web.StreamResponse:
        usage_null = {"usage": None} if include_usage else {}

        async def send(choice: dict, **extra: Any) -> None:
            await reply.send({**base, "choices": [choice], **usage_null, **extra})

        for i in range(len(streams)):
            await send({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None})

        async def send_calls(i: int, new: list[ToolCall]) -> None:
            # As OpenAI streams a call: its id and name first, then its arguments.
            for call in new:
                k = calls[i].calls.index(call)  # type: ignore[index]
                await send({"index": i, "delta": {"tool_calls": [{"index": k, "id": call.id, "type": "function",
                                                                  "function": {"name": call.name, "arguments": ""}}]},
                            "logprobs": None, "finish_reason": None})
                await send({"index": i, "delta": {"tool_calls": [{"index": k, "function": {"arguments": call.arguments}}]},
                            "logprobs": None, "finish_reason": None})

        async def on_event(i: int, ev: TokenEvent) -> None:
            lp = token_logprobs_openai(pieces, ev) if pieces else None
            text, new = calls[i].feed(ev.text) if calls else (ev.text, [])
            finished = ev.finish_reason is not None and ev.finish_reason != "cancelled"
            if finished and calls:
                more, rest = calls[i].finish()
                text, new = text + more, new + rest
            if text or lp:
                await send({"index": i, "delta": {"content": text}, "logprobs": {"content": [lp]} if lp else None,
                            "finish_reason": None})
            await send_calls(i, new)
            if finished:
                await send({"index": i, "delta": {}, "logprobs": None, "finish_reason": _finish_reason(ev.finish_reason, calls, i)},
                           shoal=timings(streams[i].request))

        await run_to_end(streams, on_event, reply.keepalive)
        if include_usage:
            await reply.send({**base, "choices": [], "usage": _usage(streams), "shoal": timings(streams[0].request)})
        return await reply.end()

    async def _chat_whole(self, reply: Reply, base: dict, streams: list[GenerationStream],
                          pieces: TokenPieces | None, calls: list[CallStream] | None) -> web.StreamResponse:
        texts = [""] * len(streams)
        lps: list[list[dict]] = [[] for _ in streams]
        finish: list[str | None] = [None] * len(streams)

        def on_event(i: int, ev: TokenEvent) -> None:
            texts[i] += ev.text
            if pieces and (lp := token_logprobs_openai(pieces, ev)):
                lps[i].append(lp)
            if ev.finish_reason is not None:
                finish[i] = ev.finish_reason

        await run_to_end(streams, on_event, reply.keepalive)
        choices = []
        for i in range(len(streams)):
            message: dict[str, Any] = {"role": "assistant", "content": texts[i], "refusal": None}
            if calls:
                content, made = calls[i].feed(texts[i])
                more, rest = calls[i].finish()
                message["content"] = (content + more) or (None if made + rest else "")
                if made + rest:
                    message["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                                             for c in made + rest]
            choices.append({"index": i, "message": message, "logprobs": {"content": lps[i], "refusal": None} if pieces else None,
                            "finish_reason": _finish_reason(finish[i], calls, i)})
        return await reply.complete({**base, "choices": choices, "usage": _usage(streams), "shoal": timings(streams[0].request)})

    # -- legacy completions
    async def completions(self, request: web.Request) -> web.StreamResponse:
        t0 = time.perf_counter()
        body: CompletionRequest = parse(CompletionRequest, await read_json(request))
        _refuse_unsupported(body)
        if body.suffix:
            raise invalid("suffix is not supported by shoal yet", "suffix", "unsupported_parameter")
        n = body.n or 1
        if body.best_of is not None and body.best_of != n:
            raise invalid("best_of must equal n (shoal returns every sequence it generates)", "best_of", "unsupported_parameter")
        prompts: list = [body.prompt] if isinstance(body.prompt, str) or isinstance(body.prompt[0], int) else list(body.prompt)
        if len(prompts) * n > MAX_CHOICES:
            raise invalid(f"at most {MAX_CHOICES} choices per request (prompts x n)", "n")
        reply = Reply(request, "sse" if body.stream else "json")
        streams: list[GenerationStream] = []
        prompt_ids: list[list[int]] = []
        try:
            inst = await acquire(self.service, body.model, reply)
            vocab = inst.tokenizer.vocab_size
            for p in prompts:
                if isinstance(p, str):
                    ids = await tokenize(lambda p=p: inst.tokenizer.encode(p), len(p))
                else:
                    if max(p) >= vocab:
                        raise invalid(f"token id {max(p)} is outside the vocabulary (size {vocab})", "prompt")
                    ids = list(p)
                prompt_ids.append(ids)
            params = []
            for ids in prompt_ids:
                mt = max_tokens_for(body.max_tokens, len(ids), inst.max_context, self.service.config.max_tokens_cap, "prompt")
                echo_lp = body.logprobs if body.echo and body.logprobs is not None else None
                params.append(sampling(max_tokens=mt, logprobs=body.logprobs, prompt_logprobs=echo_lp, **_sampling_kwargs(body)))
            for ids, sp in zip(prompt_ids, params, strict=True):
                streams += await submit(inst, inst.name, ids, sp, t0, "cmpl", n)
        except ApiError as e:
            for s in streams:
                s.cancel()
            return await reply.fail(e)
        base = {"id": new_request_id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": inst.name,
                "system_fingerprint": FINGERPRINT}
        job = _CompletionJob(self.pieces(inst), inst, [prompt_ids[k // n] for k in range(len(streams))], bool(body.echo),
                             body.logprobs)
        async with watch_disconnect(request, streams):
            try:
                if body.stream:
                    include_usage = bool(body.stream_options and body.stream_options.include_usage)
                    return await self._completion_stream(reply, base, streams, job, include_usage)
                return await self._completion_whole(reply, base, streams, job)
            except ApiError as e:
                return await reply.fail(e)
            except ConnectionError:
                return reply.response or web.Response(status=499)

    async def _completion_stream(self, reply: Reply, base: dict, streams: list[GenerationStream], job: _CompletionJob,
                                 include_usage: bool) -> web.StreamResponse:
        usage_null = {"usage": None} if include_usage else {}

        async def on_event(i: int, ev: TokenEvent) -> None:
            text, lp = job.piece(i, ev)
            if text or lp:
                await reply.send({**base, "choices": [{"index": i, "text": text, "logprobs": lp, "finish_reason": None}], **usage_null})
            if ev.finish_reason is not None and ev.finish_reason != "cancelled":
                await reply.send({**base, "choices": [{"index": i, "text": "", "logprobs": None, "finish_reason": ev.finish_reason}],
                                  **usage_null, "shoal": timings(streams[i].request)})

        await run_to_end(streams, on_event, reply.keepalive)
        if include_usage:
            await reply.send({**base, "choices": [], "usage": _usage(streams, job.prompt_ids), "shoal": timings(streams[0].request)})
        return await reply.end()

    async def _completion_whole(self, reply: Reply, base: dict, streams: list[GenerationStream], job: _CompletionJob) -> web.StreamResponse:
        texts = [""] * len(streams)
        lps: list[dict | None] = [None] * len(streams)
        finish: list[str | None] = [None] * len(streams)

        def on_event(i: int, ev: TokenEvent) -> None:
            text, lp = job.piece(i, ev)
            texts[i] += text
            if lp:
                lps[i] = _extend_logprobs(lps[i], lp)
            if ev.finish_reason is not None:
                finish[i] = ev.finish_reason

        await run_to_end(streams, on_event, reply.keepalive)
        choices = [{"index": i, "text": texts[i], "logprobs": lps[i] if job.logprobs is not None else None, "finish_reason": finish[i]}
                   for i in range(len(streams))]
        return await reply.complete({**base, "choices": choices, "usage": _usage(streams, job.prompt_ids),
                                     "shoal": timings(streams[0].request)})


class _CompletionJob:
    """Turns a choice's events into (text, legacy logprobs) pieces, echoing the prompt first if asked."""

    def __init__(self, pieces: TokenPieces, inst: Instance, prompt_ids: list[list[int]], echo: bool, logprobs: int | None):
        self.pieces, self.inst, self.prompt_ids, self.echo, self.logprobs = pieces, inst, prompt_ids, echo, logprobs
        self.started = [False] * len(prompt_ids)
        self.offset = [0] * len(prompt_ids)  # characters of text emitted so far, for text_offset

    def piece(self, i: int, ev: TokenEvent) -> tuple[str, dict | None]:
        text, lp = "", None
        if not self.started[i]:
            self.started[i] = True
            if self.echo:
                ids = self.prompt_ids[i]
                text = self.inst.tokenizer.decode(ids)
                if self.logprobs is not None:  # the first prompt token has nothing before it to be scored on
                    lp = self._entries([(ids[0], None, None), *(ev.prompt_logprobs or [])], 0)
        if self.logprobs is not None and ev.token is not None and ev.logprob is not None:
            lp = _extend_logprobs(lp, self._entries([(ev.token, ev.logprob, ev.top_logprobs)], self.offset[i] + len(text)))
        text += ev.text
        self.offset[i] += len(text)
        return text, lp

    def _entries(self, entries: list[tuple[int, float | None, list | None]], offset: int) -> dict:
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token, lp, top in entries:
            s = self.pieces(token)[0]
            out["tokens"].append(s)
            out["token_logprobs"].append(lp)
            out["top_logprobs"].append(None if top is None else {self.pieces(t)[0]: v for t, v in top})
            out["text_offset"].append(offset)
            offset += len(s)
        return out


def _extend_logprobs(acc: dict | None, more: dict) -> dict:
    if acc is None:
        return more
    for k in acc:
        acc[k].extend(more[k])
    return acc


def _usage(streams: list[GenerationStream], prompt_ids: list[list[int]] | None = None) -> dict[str, int]:
    # n choices of one prompt count its tokens once, as OpenAI does; several prompts count each.
    if prompt_ids is None:
        prompt = len(streams[0].request.prompt_ids)
    else:
        prompt = sum(len(p) for p in {id(p): p for p in prompt_ids}.values())
    completion = sum(len(s.request.output_ids) for s in streams)
    # Prompt tokens whose K/V came from the prefix store (OpenAI reports its prompt caching so).
    cached = sum(s.request.stats.cached_tokens for s in {id(s.request.stats): s for s in streams if s.request.stats}.values())
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _finish_reason(reason: str | None, calls: list[CallStream] | None, i: int) -> str | None:
    return "tool_calls" if reason == "stop" and calls and calls[i].calls else reason


def _template_message(m: ChatMessage, index: int) -> dict[str, Any]:
    if m.content is None:
        content = ""
    elif isinstance(m.content, str):
        content = m.content
    else:
        texts = []
        for j, part in enumerate(m.content):
            if part.type != "text" or part.text is None:
                raise invalid(f"content parts of type {part.type!r} are not supported (text only)", f"messages[{index}].content[{j}]",
                              "unsupported_content")
            texts.append(part.text)
        content = "\n".join(texts)
    role = "system" if m.role == "developer" else m.role
    msg: dict[str, Any] = {"role": role, "content": content}
    if m.name:
        msg["name"] = m.name
    if m.tool_calls:
        if m.role != "assistant":
            raise invalid("only assistant messages carry tool_calls", f"messages[{index}].tool_calls")
        msg["tool_calls"] = [ToolCall(c.id, c.function.name, c.function.arguments).as_hf() for c in m.tool_calls]
    if m.role == "tool":
        if not m.tool_call_id:
            raise invalid("a tool message needs the tool_call_id of the call it answers", f"messages[{index}].tool_call_id")
        msg["tool_call_id"] = m.tool_call_id
    return msg


try:
    from jinja2 import TemplateError as _TemplateError
except ImportError:  # pragma: no cover - jinja2 is a dependency
    _TemplateError = RuntimeError  # type: ignore[misc,assignment]
