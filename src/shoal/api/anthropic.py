"""Anthropic's Messages API: POST /v1/messages and /v1/messages/count_tokens.

A request becomes the same chat-template prompt and `SamplingParams` the OpenAI route builds and
goes through the same `ModelService` and scheduler, so a local model and a cluster instance answer
alike. What differs is the shape:

- the system prompt is a top-level `system` (a string or text blocks), `messages` alternate
  `user` / `assistant` turns (consecutive turns of one role are joined, as Anthropic joins them),
  and a final `assistant` turn is a prefill: the reply continues it;
- `max_tokens` is required; asking for more than the context has room for generates until the
  context is full and says so (`model_context_window_exceeded`), as Anthropic's newer models do;
- a stream is named SSE events: message_start, content_block_start, ping, content_block_delta...,
  content_block_stop, message_delta (stop_reason, stop_sequence, usage.output_tokens),
  message_stop; a non-streaming `Message` is the fold of that same stream (`fold`);
- errors are {"type": "error", "error": {"type", "message"}} (`ApiError.to_anthropic`).

Tools (api/tools.py) are client tools: `tools` with an `input_schema`, `tool_choice` auto / any /
tool / none, `tool_use` blocks in the reply (streamed as a content block whose input arrives as
`input_json_delta`), `tool_result` blocks in the next user turn. Server tools (web search, code
execution...), images, documents, extended thinking and structured output (`output_config.format`)
are refused by name with a 400.
"""

from __future__ import annotations

import contextlib
import json
import time
from typing import Annotated, Any

from aiohttp import web
from jinja2 import TemplateError
from pydantic import BaseModel, ConfigDict, Field

from shoal.api.errors import ApiError, invalid, json_response, parse, read_json
from shoal.api.generation import (
    Reply,
    acquire,
    dumps,
    run_to_end,
    sampling,
    submit,
    timings,
    tokenize,
    watch_disconnect,
)
from shoal.api.instance import (
    GenerationRequest,
    GenerationStream,
    Instance,
    new_request_id,
)
from shoal.api.service import ModelService
from shoal.api.tools import (
    CallStream,
    Family,
    Tool,
    ToolCall,
    ToolChoice,
    chat_messages,
    check_tools,
    dialect,
    make_tool,
)
from shoal.api.tools import constraint as tool_constraint
from shoal.engine.generate import TokenEvent
from shoal.engine.tokenizer import Tokenizer

MAX_TOKENS_LIMIT = 1 << 24
MAX_STOP_SEQUENCES = 16
ROLES = ("user", "assistant")
# Blocks of Anthropic's own server tools, which shoal does not run.
SERVER_TOOL_BLOCKS = frozenset({"server_tool_use", "web_search_tool_result", "web_fetch_tool_result",
                                "code_execution_tool_result", "mcp_tool_use", "mcp_tool_result"})

Event = tuple[str, dict[str, Any]]  # (SSE event name, its data)


# ----------------------------------------------------------------------------- request models


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)


class Block(_Body):
    type: str = Field(min_length=1, description="'text', 'tool_use' or 'tool_result'")
    text: str | None = None
    id: str | None = Field(None, max_length=128, description="tool_use")
    name: str | None = Field(None, max_length=64, description="tool_use")
    input: dict[str, Any] | None = Field(None, description="tool_use")
    tool_use_id: str | None = Field(None, max_length=128, description="tool_result")
    content: str | list[Block] | None = Field(None, description="tool_result: text, or text blocks")
    is_error: bool | None = Field(None, description="tool_result")


class ToolDef(_Body):
    name: Any = None
    description: Any = None
    input_schema: dict[str, Any] | None = None
    type: str | None = Field(None, description="'custom' or absent; server tools are not supported")


class ToolChoiceParam(_Body):
    type: str
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class Message(_Body):
    role: str = Field(description="'user' or 'assistant'")
    content: str | list[Block]


class _Conversation(_Body):
    model: str = Field(min_length=1, max_length=512)
    messages: list[Message] = Field(min_length=1)
    system: str | list[Block] | None = None
    tools: list[ToolDef] | None = None
    tool_choice: ToolChoiceParam | None = None
    thinking: dict[str, Any] | None = Field(None, description="'enabled' is refused; 'adaptive' never thinks here")
    output_config: dict[str, Any] | None = Field(None, description="'effort' is ignored; 'format' is refused")


class MessagesRequest(_Conversation):
    max_tokens: int = Field(ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float | None = Field(None, ge=0, le=1, description="default 1")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=1 << 20, description="0 is off")
    stop_sequences: Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    stream: bool | None = False
    metadata: dict[str, Any] | None = Field(None, description="accepted and ignored")


class CountTokensRequest(_Conversation):
    pass


# ----------------------------------------------------------------------------- the prompt


def tools_of(body: _Conversation) -> tuple[list[Tool], ToolChoice]:
    tools = []
    for i, t in enumerate(body.tools or []):
        if t.type not in (None, "custom"):
            raise invalid(f"tools[{i}]: server tools ({t.type!r}) are not supported by shoal; client tools with an "
                          "input_schema are", f"tools.{i}.type", "unsupported_parameter")
        if t.input_schema is None:
            raise invalid(f"tools.{i}.input_schema: Field required", f"tools.{i}.input_schema")
        tools.append(make_tool(t.name, t.description, t.input_schema, f"tools.{i}"))
    c = body.tool_choice
    kinds = {"auto": "auto", "any": "required", "tool": "required", "none": "none"}
    if c is not None and c.type not in kinds:
        raise invalid(f"tool_choice.type: must be 'auto', 'any', 'tool' or 'none', not {c.type!r}", "tool_choice.type")
    if c is not None and c.type == "tool" and not c.name:
        raise invalid("tool_choice.name: Field required for type 'tool'", "tool_choice.name")
    if not tools:
        if c is not None and c.type != "none":
            raise invalid("tool_choice needs tools", "tool_choice")
        return [], ToolChoice("none")
    choice = ToolChoice("auto") if c is None else ToolChoice(kinds[c.type], c.name if c.type == "tool" else None,  # type: ignore[arg-type]
                                                             not c.disable_parallel_tool_use)
    check_tools(tools, choice, "tools")
    return tools, choice


def _refuse_unsupported(body: _Conversation) -> None:
    if body.thinking is not None and body.thinking.get("type") == "enabled":
        raise invalid("extended thinking is not supported by shoal", "thinking", "unsupported_parameter")
    if body.output_config is not None and body.output_config.get("format") is not None:
        raise invalid("output_config.format (structured output) is not supported by shoal's Messages API yet",
                      "output_config.format", "unsupported_parameter")


def _text(content: str | list[Block], where: str, allowed: tuple[str, ...] = ()) -> str:
    """The text blocks' text (blocks of the `allowed` types are left to the caller)."""
    if isinstance(content, str):
        return content
    texts = []
    for j, block in enumerate(content):
        if block.type in allowed:
            continue
        if block.type in SERVER_TOOL_BLOCKS:
            raise invalid(f"{where}.content[{j}]: {block.type!r} blocks belong to server tools, which shoal does not run",
                          f"{where}.content", "unsupported_content")
        if block.type in ("tool_use", "tool_result"):
            role = "assistant" if block.type == "tool_use" else "user"
            raise invalid(f"{where}.content[{j}]: {block.type!r} blocks belong in {role} turns", f"{where}.content")
        if block.type != "text" or block.text is None:
            raise invalid(f"{where}.content[{j}]: content blocks of type {block.type!r} are not supported (text only)",
                          f"{where}.content", "unsupported_content")
        texts.append(block.text)
    return "\n".join(texts)  # as the OpenAI route joins text parts


def _blocks(content: str | list[Block], kind: str) -> list[Block]:
    return [] if isinstance(content, str) else [b for b in content if b.type == kind]


def _tool_result(block: Block, where: str) -> dict[str, Any]:
    if not block.tool_use_id:
        raise invalid(f"{where}.tool_use_id: Field required", f"{where}.tool_use_id")
    text = "" if block.content is None else _text(block.content, where)
    return {"role": "tool", "tool_call_id": block.tool_use_id, "content": ("Error: " + text) if block.is_error else text}


def _tool_use(block: Block, where: str) -> dict[str, Any]:
    if not block.id or not block.name or block.input is None:
        raise invalid(f"{where}: a tool_use block needs an id, a name and an input", where)
    return ToolCall(block.id, block.name, json.dumps(block.input, ensure_ascii=False)).as_hf()


def conversation(body: _Conversation) -> tuple[list[dict[str, Any]], str | None]:
    """The chat-template messages (transformers' convention: an assistant turn's `tool_calls`,
    `tool` turns for results), and the text of a final assistant turn to continue (or None)."""
    turns: list[dict[str, Any]] = []
    asked: set[str] = set()  # the ids of the calls in the assistant turn before
    for i, m in enumerate(body.messages):
        where = f"messages[{i}]"
        if m.role == "system":
            raise invalid(f"{where}.role: unexpected role 'system'; the Messages API takes the system prompt as the "
                          "top-level 'system' parameter", f"{where}.role")
        if m.role not in ROLES:
            raise invalid(f"{where}.role: must be 'user' or 'assistant', not {m.role!r}", f"{where}.role")
        kind = "tool_use" if m.role == "assistant" else "tool_result"
        text = _text(m.content, where, (kind,))
        tool_blocks = _blocks(m.content, kind)
        last = i == len(body.messages) - 1
        if not text and not tool_blocks and not (last and m.role == "assistant"):
            raise invalid(f"{where}: all messages must have non-empty content except for the optional final "
                          "assistant message", f"{where}.content")
        if m.role == "user":  # results first: they answer the turn before
            for b in tool_blocks:
                if b.tool_use_id not in asked:
                    raise invalid(f"{where}.content: unexpected tool_use_id {b.tool_use_id!r} in a tool_result block: each "
                                  "must answer a tool_use block in the assistant turn just before", f"{where}.content")
            turns += [_tool_result(b, f"{where}.content") for b in tool_blocks]
            asked = set()
            if not text:
                continue
        calls = [_tool_use(b, f"{where}.content") for b in tool_blocks]
        if m.role == "assistant":
            asked = {c["id"] for c in calls}
        if turns and turns[-1]["role"] == m.role:
            turns[-1]["content"] = "\n".join(p for p in (turns[-1]["content"], text) if p)
            if calls:
                turns[-1]["tool_calls"] = turns[-1].get("tool_calls", []) + calls
        else:
            turns.append({"role": m.role, "content": text, **({"tool_calls": calls} if calls else {})})
    prefill = None
    if turns[-1]["role"] == "assistant" and not turns[-1].get("tool_calls"):
        prefill = turns.pop()["content"]
        if prefill != prefill.rstrip():
            raise invalid("final assistant content cannot end with trailing whitespace", "messages")
        if not turns:
            raise invalid("the conversation needs a user turn before the assistant's", "messages")
    system = _text(body.system, "system") if body.system is not None else ""
    if system:
        turns.insert(0, {"role": "system", "content": system})
    return turns, prefill or None


def prompt_ids(tokenizer: Tokenizer, turns: list[dict[str, Any]], prefill: str | None, tools: list[Tool] = ()) -> list[int]:  # type: ignore[assignment]
    """The prompt's token ids. A prefill is rendered as the final assistant turn and cut right after
    its text (what transformers' continue_final_message does), so the reply continues that turn."""
    msgs, extra = chat_messages(tokenizer, turns, list(tools))
    if prefill is None:
        return tokenizer.encode(tokenizer.apply_chat_template(msgs, True, **extra), add_special_tokens=False)
    text = tokenizer.apply_chat_template([*msgs, {"role": "assistant", "content": prefill}], add_generation_prompt=False, **extra)
    end = text.rfind(prefill)
    if end < 0:  # a template that rewrites assistant text: the generation prompt, then the prefill
        text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, **extra) + prefill
    else:
        text = text[: end + len(prefill)]
    return tokenizer.encode(text, add_special_tokens=False)


def _size(turns: list[dict[str, Any]], prefill: str | None) -> int:
    return sum(len(t["content"]) for t in turns) + len(prefill or "")


# ----------------------------------------------------------------------------- the reply


class _Turn:
    """One sequence's events in Anthropic's stream shape: the opening events, then per engine
    event a text delta, and on its finish the closing events."""

    def __init__(self, msg_id: str, model: str, request: GenerationRequest, tokenizer: Tokenizer,
                 context_bound: bool, family: Family | None = None):
        self.msg_id, self.model, self.request, self.tokenizer = msg_id, model, request, tokenizer
        self.context_bound = context_bound  # the context, not max_tokens, limits the reply's length
        self.text = ""
        # With tools, blocks open as the reply needs them: text while the model writes text, a
        # tool_use block per call; without, one text block from the start, as Anthropic sends it.
        self.calls = CallStream(family) if family is not None else None
        self.blocks = 0  # content blocks opened so far
        self.text_open = False

    def opening(self) -> list[Event]:
        message = {"id": self.msg_id, "type": "message", "role": "assistant", "content": [], "model": self.model,
                   "stop_reason": None, "stop_sequence": None,
                   "usage": {"input_tokens": len(self.request.prompt_ids), "output_tokens": 0}}
        out: list[Event] = [("message_start", {"type": "message_start", "message": message})]
        if self.calls is None:
            out += self._open({"type": "text", "text": ""})
            self.text_open = True
        return out + [("ping", {"type": "ping"})]

    def _open(self, block: dict[str, Any]) -> list[Event]:
        self.blocks += 1
        return [("content_block_start", {"type": "content_block_start", "index": self.blocks - 1, "content_block": block})]

    def _close(self) -> list[Event]:
        return [("content_block_stop", {"type": "content_block_stop", "index": self.blocks - 1})]

    def step(self, ev: TokenEvent) -> list[Event]:
        out: list[Event] = []
        finished = ev.finish_reason is not None and ev.finish_reason != "cancelled"
        text, made = self.calls.feed(ev.text) if self.calls else (ev.text, [])
        if finished and self.calls:
            more, rest = self.calls.finish()
            text, made = text + more, made + rest
        if text:
            if not self.text_open:
                out += self._open({"type": "text", "text": ""})
                self.text_open = True
            self.text += text
            out.append(("content_block_delta", {"type": "content_block_delta", "index": self.blocks - 1,
                                                "delta": {"type": "text_delta", "text": text}}))
        for call in made:
            if self.text_open:
                out += self._close()
                self.text_open = False
            out += self._open({"type": "tool_use", "id": _tool_use_id(call), "name": call.name, "input": {}})
            out.append(("content_block_delta", {"type": "content_block_delta", "index": self.blocks - 1,
                                                "delta": {"type": "input_json_delta", "partial_json": call.arguments}}))
            out += self._close()
        if finished:
            if self.text_open:
                out += self._close()
                self.text_open = False
            reason, sequence = self._stop_reason(ev.finish_reason)  # type: ignore[arg-type]
            if reason == "end_turn" and self.calls is not None and self.calls.calls:
                reason = "tool_use"
            out += [
                ("message_delta", {"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": sequence},
                                   "usage": {"output_tokens": len(self.request.output_ids)}}),
                ("message_stop", {"type": "message_stop"}),
            ]
        return out

    def _stop_reason(self, finish: str) -> tuple[str, str | None]:
        if finish == "length":
            return ("model_context_window_exceeded" if self.context_bound else "max_tokens"), None
        # The engine says "stop" for the end-of-sequence token and for a stop string alike; only a
        # stop string ends on another token. The one that matched is the first to occur in the output.
        stops, out = self.request.params.stop, self.request.output_ids
        if not stops or not out or out[-1] in self.tokenizer.eos_token_ids:
            return "end_turn", None
        full = self.tokenizer.decode(out)
        hits = [(i, s) for s in stops if (i := full.find(s)) >= 0]
        return "stop_sequence", min(hits)[1] if hits else stops[0]


def _tool_use_id(call: ToolCall) -> str:
    return "toolu_" + call.id.removeprefix("call_") if call.id.startswith("call_") else call.id


def fold(events: list[Event]) -> dict[str, Any]:
    """The `Message` a stream of events describes (what Anthropic's clients accumulate)."""
    message: dict[str, Any] = {}
    partial: dict[int, str] = {}  # a tool_use block's input JSON, until the block stops
    for name, data in events:
        if name == "message_start":
            message = {**data["message"], "content": [], "usage": dict(data["message"]["usage"])}
        elif name == "content_block_start":
            message["content"].append(dict(data["content_block"]))
        elif name == "content_block_delta":
            delta = data["delta"]
            if delta["type"] == "input_json_delta":
                partial[data["index"]] = partial.get(data["index"], "") + delta["partial_json"]
            else:
                message["content"][data["index"]]["text"] += delta["text"]
        elif name == "content_block_stop" and data["index"] in partial:
            message["content"][data["index"]]["input"] = json.loads(partial.pop(data["index"]) or "{}")
        elif name == "message_delta":
            message.update(data["delta"])
            message["usage"].update(data["usage"])
    return message


class _AnthropicReply(Reply):
    """Anthropic's SSE: every record names its event, pings keep the connection open, a failure
    after the status line is an `error` event, and nothing marks the end but message_stop."""

    def __init__(self, request: web.Request, stream: bool):
        super().__init__(request, "sse" if stream else "json")

    async def event(self, name: str, data: dict[str, Any]) -> None:
        await self.start()
        assert self.response is not None
        await self.response.write(b"event: " + name.encode() + b"\ndata: " + dumps(data) + b"\n\n")

    async def keepalive(self) -> None:
        if self.kind == "sse":
            await self.event("ping", {"type": "ping"})
        else:
            await super().keepalive()

    async def end(self) -> web.StreamResponse:
        await self.start()
        assert self.response is not None
        await self.response.write_eof()
        return self.response

    async def fail(self, err: ApiError) -> web.StreamResponse:
        if self.response is None:
            return json_response(err.to_anthropic(), err.status, err.headers())
        with contextlib.suppress(ConnectionError):
            if self.kind == "sse":
                await self.event("error", err.to_anthropic())
            else:
                await self.response.write(dumps(err.to_anthropic()))
            await self.response.write_eof()
        return self.response


# ----------------------------------------------------------------------------- handlers


class AnthropicHandlers:
    def __init__(self, service: ModelService):
        self.service = service

    def routes(self) -> list[tuple[str, str, Any]]:
        return [
            ("POST", "/v1/messages", self.messages),
            ("POST", "/v1/messages/count_tokens", self.count_tokens),
        ]

    async def count_tokens(self, request: web.Request) -> web.Response:
        body: CountTokensRequest = parse(CountTokensRequest, await read_json(request))
        _refuse_unsupported(body)
        tools, choice = tools_of(body)
        turns, prefill = conversation(body)
        offered = tools if choice.mode != "none" else []
        inst = await self.service.acquire(body.model)
        try:
            ids = await tokenize(lambda: prompt_ids(inst.tokenizer, turns, prefill, offered), _size(turns, prefill))
        except TemplateError as e:
            raise invalid(f"the model's chat template refused these messages: {e}", "messages") from None
        return json_response({"input_tokens": len(ids)})

    async def messages(self, request: web.Request) -> web.StreamResponse:
        t0 = time.perf_counter()
        body: MessagesRequest = parse(MessagesRequest, await read_json(request))
        _refuse_unsupported(body)
        tools, choice = tools_of(body)
        turns, prefill = conversation(body)
        if prefill is not None and choice.mode == "required":
            raise invalid("a final assistant turn (prefill) cannot be combined with a tool_choice that forces a call",
                          "messages")
        offered = tools if choice.mode != "none" else []
        reply = _AnthropicReply(request, bool(body.stream))
        try:
            inst = await acquire(self.service, body.model, reply)
            ids = await tokenize(lambda: prompt_ids(inst.tokenizer, turns, prefill, offered), _size(turns, prefill))
            max_tokens, context_bound = self._budget(body.max_tokens, len(ids), inst)
            d = dialect(inst.tokenizer) if offered else None
            params = sampling(
                constraint=tool_constraint(inst.tokenizer, tools, choice) if d else None,
                skip_special_tokens=not (d and d.keep_special),
                max_tokens=max_tokens,
                temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p,
                top_k=body.top_k or 0,
                stop=tuple(body.stop_sequences or ()),
            )
            [stream] = await submit(inst, inst.name, ids, params, t0, "msg")
        except ApiError as e:
            return await reply.fail(e)
        except TemplateError as e:
            return await reply.fail(invalid(f"the model's chat template refused these messages: {e}", "messages"))
        turn = _Turn(new_request_id("msg").replace("-", "_"), inst.name, stream.request, inst.tokenizer, context_bound,
                     d.family if d else None)
        async with watch_disconnect(request, [stream]):
            try:
                if body.stream:
                    return await self._stream(reply, turn, stream)
                return await self._whole(reply, turn, stream)
            except ApiError as e:
                return await reply.fail(e)
            except ConnectionError:  # the client went away mid-write; the guard cancels its sequence
                return reply.response or web.Response(status=499)

    def _budget(self, requested: int, prompt_tokens: int, inst: Instance) -> tuple[int, bool]:
        """(max_tokens to generate, whether the context rather than the request limits it)."""
        room = inst.max_context - prompt_tokens
        if room <= 0:
            raise invalid(f"prompt is too long: {prompt_tokens} tokens > {inst.max_context - 1} maximum", "messages")
        cap = self.service.config.max_tokens_cap
        wanted = requested if cap is None else min(requested, cap)
        return min(wanted, room), room < wanted

    async def _stream(self, reply: _AnthropicReply, turn: _Turn, stream: GenerationStream) -> web.StreamResponse:
        for name, data in turn.opening():
            await reply.event(name, data)

        async def on_event(_: int, ev: TokenEvent) -> None:
            for name, data in turn.step(ev):
                await reply.event(name, data)

        await run_to_end([stream], on_event, reply.keepalive)
        return await reply.end()

    async def _whole(self, reply: _AnthropicReply, turn: _Turn, stream: GenerationStream) -> web.StreamResponse:
        events = turn.opening()
        await run_to_end([stream], lambda _, ev: events.extend(turn.step(ev)), reply.keepalive)
        return await reply.complete({**fold(events), "shoal": timings(stream.request)})
