"""Tool calling: a request's tools into the chat template, the model's calls out of its text.

The three APIs each take tools and tool messages in their own shape; they turn them into `Tool`s and
chat messages in Hugging Face's convention (an assistant message's `tool_calls`, `role: tool`
results), and this module does the rest:

- **The prompt.** A chat template that knows tools (it names one of the families below) gets them as
  transformers passes them (`tools=[{"type": "function", "function": ...}]`). A template that does
  not (the bundled SmolLM2's) gets the tools described in the system message in the Hermes format,
  its past calls written into assistant turns and its results as `<tool_response>` user turns.
- **The reply.** Each family writes calls its own way; `Family.calls_in` reads them from the
  text after the family's opening marker:
      Hermes / Qwen   <tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>  (repeated)
      Llama 3.1       {"name": ..., "parameters": {...}}  as the whole reply (<|python_tag|> optional)
      Mistral         [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]  or  [TOOL_CALLS]name[ARGS]{...}
      DeepSeek        <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>name\\n```json\\n{...}\\n```
                      <｜tool▁call▁end｜>...  (V3; V3.1 drops "function" and the fence)
  `CallStream` turns a stream of text into content to show and complete calls as they close.
- **Enforcement.** `tool_choice` required or a named function becomes a Lark grammar of the family's
  call syntax around each tool's parameter schema (`%json{...}`), applied by the engine's
  constrained decoding (engine/grammar.py), so even a small model returns a call that parses and
  validates against its schema. `auto` leaves the model free and parses what it writes.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from shoal.api.errors import invalid
from shoal.engine.grammar import Constraint, InvalidConstraint, check
from shoal.engine.tokenizer import Tokenizer

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MAX_TOOLS = 128


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]  # JSON schema of the arguments object

    def as_hf(self) -> dict[str, Any]:
        """The tool as transformers hands it to a chat template."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, as text

    def arguments_value(self) -> Any:
        try:
            return json.loads(self.arguments)
        except ValueError:
            return self.arguments

    def as_hf(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments_value()}}


@dataclass(frozen=True)
class ToolChoice:
    mode: Literal["auto", "none", "required"] = "auto"
    name: str | None = None  # with "required": this function and no other
    parallel: bool = True


def make_tool(name: Any, description: Any, parameters: Any, where: str) -> Tool:
    """A tool from a request, checked: a bad name or a schema that cannot constrain decoding is a 400."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise invalid(f"{where}: a tool's name must be 1-64 letters, digits, '_', '.' or '-'", where)
    if description is not None and not isinstance(description, str):
        raise invalid(f"{where}: description must be a string", where)
    if parameters is None:
        parameters = {"type": "object", "properties": {}}
    if not isinstance(parameters, dict):
        raise invalid(f"{where}: parameters must be a JSON schema object", where)
    try:
        check(Constraint.json_schema(parameters, strict=False))
    except InvalidConstraint as e:
        raise invalid(f"{where}: invalid JSON schema for {name!r}: {e}", where, "invalid_json_schema") from None
    return Tool(name, description or "", parameters)


def check_tools(tools: list[Tool], choice: ToolChoice, param: str) -> None:
    if len(tools) > MAX_TOOLS:
        raise invalid(f"at most {MAX_TOOLS} tools per request", param)
    names = [t.name for t in tools]
    if len(set(names)) != len(names):
        raise invalid("tool names must be unique", param)
    if choice.name is not None and choice.name not in names:
        raise invalid(f"tool_choice names the function {choice.name!r}, which is not among the tools", "tool_choice")


# ----------------------------------------------------------------------------- families


def _args_text(value: Any) -> str | None:
    """A call's arguments as JSON text of an object (a string holding one is accepted), else None."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    return json.dumps(value, ensure_ascii=False) if isinstance(value, dict) else None


def _call_of(obj: Any, args_keys: tuple[str, ...] = ("arguments", "parameters")) -> tuple[str, str] | None:
    if isinstance(obj, dict) and "name" not in obj and isinstance(obj.get("function"), dict):
        obj = obj["function"]  # the tool's own shape, {"type": "function", "function": {...}}, as small models echo it
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    for key in args_keys:
        if key in obj:
            args = _args_text(obj[key])
            return None if args is None else (obj["name"], args)
    return obj["name"], "{}"


_decoder = json.JSONDecoder()


def _json_values(text: str, separators: str = "") -> tuple[list[Any], str]:
    """The complete JSON values at the start of text, one after another (whitespace or any of
    `separators` between them), and what follows the last."""
    values, i = [], 0
    while True:
        while i < len(text) and (text[i].isspace() or text[i] in separators):
            i += 1
        if i >= len(text) or text[i] not in "{[":
            return values, text[i:]
        try:
            value, i = _decoder.raw_decode(text, i)
        except ValueError:
            return values, text[i:]
        values.append(value)


class Family:
    """How one family of models writes tool calls."""

    name = ""
    starts: tuple[str, ...] = ()  # text that opens the calls; what comes before is the reply's text
    at_start_only = False  # calls only when the reply opens with them (else the marker is text)
    id_alphabet, id_length, id_prefix = string.ascii_letters + string.digits, 24, "call_"

    def calls_in(self, tail: str, final: bool) -> list[tuple[str, str]] | None:
        """The complete (name, arguments) calls in `tail` (text from an opening marker on); at the
        end of the reply (final) None when it holds no valid call (then it is text after all)."""
        raise NotImplementedError

    def render(self, calls: list[ToolCall]) -> str:
        """Past calls, written into an assistant turn for a template that does not know tools."""
        raise NotImplementedError

    def grammar(self, tools: list[Tool], parallel: bool, marker: Callable[[str], str]) -> str:
        """A Lark grammar (llguidance's dialect) of replies that are only calls of these tools."""
        raise NotImplementedError

    def new_id(self) -> str:
        return self.id_prefix + "".join(secrets.choice(self.id_alphabet) for _ in range(self.id_length))


def _schema(tool: Tool, args_key: str) -> dict[str, Any]:
    return {"type": "object", "properties": {"name": {"const": tool.name}, args_key: tool.parameters},
            "required": ["name", args_key], "additionalProperties": False}


def _json(schema: dict[str, Any]) -> str:
    return "%json " + json.dumps(schema, ensure_ascii=False)


class Hermes(Family):
    name = "hermes"
    starts = ("<tool_call>",)
    _call = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
    _last = re.compile(r"<tool_call>\s*(\{.*\})\s*$", re.DOTALL)  # a final call whose closing tag never came

    def calls_in(self, tail: str, final: bool) -> list[tuple[str, str]] | None:
        bodies = self._call.findall(tail)
        end = tail.rfind("</tool_call>")
        after = tail[end + len("</tool_call>") :] if end >= 0 else tail
        if final and (m := self._last.search(after)):
            bodies.append(m.group(1))
        calls = []
        for body in bodies:
            try:
                call = _call_of(json.loads(body))
            except ValueError:
                call = None
            if call is None:
                return None if final else calls
            calls.append(call)
        return calls if calls or not final else None

    def render(self, calls: list[ToolCall]) -> str:
        return "\n".join(f"<tool_call>\n{json.dumps({'name': c.name, 'arguments': c.arguments_value()}, ensure_ascii=False)}"
                         "\n</tool_call>" for c in calls)

    def grammar(self, tools: list[Tool], parallel: bool, marker: Callable[[str], str]) -> str:
        body = {"anyOf": [_schema(t, "arguments") for t in tools]}
        rule = "start: call (\"\\n\" call)*" if parallel else "start: call"
        return f'{rule}\ncall: {marker("<tool_call>")} "\\n" {_json(body)} "\\n" {marker("</tool_call>")}\n'


class Llama3(Family):
    name = "llama3"
    starts = ("<|python_tag|>", "{")
    at_start_only = True

    def calls_in(self, tail: str, final: bool) -> list[tuple[str, str]] | None:
        values, rest = _json_values(tail.removeprefix("<|python_tag|>"), ";")
        if len(values) == 1 and isinstance(values[0], list):
            values = values[0]
        calls = []
        for v in values:
            call = _call_of(v, ("parameters", "arguments"))
            if call is None:
                return None if final else calls
            calls.append(call)
        if final and (not calls or rest.strip()):
            return None
        return calls

    def render(self, calls: list[ToolCall]) -> str:
        return "; ".join(json.dumps({"name": c.name, "parameters": c.arguments_value()}, ensure_ascii=False) for c in calls)

    def grammar(self, tools: list[Tool], parallel: bool, marker: Callable[[str], str]) -> str:
        # Llama 3.1's format has no way to write two calls in one reply.
        return f"start: {_json({'anyOf': [_schema(t, 'parameters') for t in tools]})}\n"


class Mistral(Family):
    name = "mistral"
    starts = ("[TOOL_CALLS]",)
    # Mistral's templates insist on ids of exactly nine letters and digits.
    id_length, id_prefix = 9, ""
    _named = re.compile(r"\s*([A-Za-z0-9_.-]+)(?:\[CALL_ID\][A-Za-z0-9]*)?\[ARGS\]")

    def __init__(self, args_style: bool = False):
        self.args_style = args_style  # [TOOL_CALLS]name[ARGS]{...} (newer templates), else a JSON list

    def calls_in(self, tail: str, final: bool) -> list[tuple[str, str]] | None:
        calls: list[tuple[str, str]] = []
        for part in tail.split("[TOOL_CALLS]")[1:]:
            if (m := self._named.match(part)) is not None:
                values, _ = _json_values(part[m.end() :])
                args = _args_text(values[0]) if values else None
                if args is None:
                    return None if final else calls
                calls.append((m.group(1), args))
                continue
            values, _ = _json_values(part)
            if not values:
                return None if final else calls
            items = values[0] if isinstance(values[0], list) else [values[0]]
            found = [_call_of(v) for v in items]
            if None in found:
                return None if final else calls
            calls += found  # type: ignore[arg-type]
        return calls if calls or not final else None

    def render(self, calls: list[ToolCall]) -> str:
        if self.args_style:
            return "".join(f"[TOOL_CALLS]{c.name}[ARGS]{json.dumps(c.arguments_value(), ensure_ascii=False)}" for c in calls)
        items = [{"name": c.name, "arguments": c.arguments_value()} for c in calls]
        return "[TOOL_CALLS]" + json.dumps(items, ensure_ascii=False)

    def grammar(self, tools: list[Tool], parallel: bool, marker: Callable[[str], str]) -> str:
        if self.args_style:
            alts = " | ".join(f'{json.dumps(t.name)} {marker("[ARGS]")} {_json(t.parameters)}' for t in tools)
            rule = "start: call+" if parallel else "start: call"
            return f"{rule}\ncall: {marker('[TOOL_CALLS]')} ({alts})\n"
        items: dict[str, Any] = {"type": "array", "items": {"anyOf": [_schema(t, "arguments") for t in tools]}, "minItems": 1}
        if not parallel:
            items["maxItems"] = 1
        return f"start: {marker('[TOOL_CALLS]')} {_json(items)}\n"


class DeepSeek(Family):
    name = "deepseek"
    BEGIN, CALL, SEP, CALL_END, END = ("<｜tool▁calls▁begin｜>", "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>",
                                       "<｜tool▁call▁end｜>", "<｜tool▁calls▁end｜>")
    starts = (BEGIN,)
    _call = re.compile(re.escape(CALL) + r"(.*?)" + re.escape(SEP) + r"(.*?)" + re.escape(CALL_END), re.DOTALL)
    _fenced = re.compile(r"\s*([^\n]+?)\s*\n```(?:json)?\s*(.*?)\s*```\s*$", re.DOTALL)

    def __init__(self, fenced: bool = True):
        self.fenced = fenced  # V3 writes "function<sep>name\n```json\n{...}\n```"; V3.1 "name<sep>{...}"

    def calls_in(self, tail: str, final: bool) -> list[tuple[str, str]] | None:
        calls = []
        for head, body in self._call.findall(tail):
            if head.strip() == "function" and (m := self._fenced.match(body)):
                name, args = m.group(1), _args_text(m.group(2))
            else:
                name, args = head.strip(), _args_text(body.strip())
            if args is None or not NAME_PATTERN.match(name):
                return None if final else calls
            calls.append((name, args))
        return calls if calls or not final else None

    def _one(self, name: str, args: str) -> str:
        if self.fenced:
            return f"{self.CALL}function{self.SEP}{name}\n```json\n{args}\n```{self.CALL_END}"
        return f"{self.CALL}{name}{self.SEP}{args}{self.CALL_END}"

    def render(self, calls: list[ToolCall]) -> str:
        return self.BEGIN + "".join(self._one(c.name, json.dumps(c.arguments_value(), ensure_ascii=False)) for c in calls) + self.END

    def grammar(self, tools: list[Tool], parallel: bool, marker: Callable[[str], str]) -> str:
        def one(t: Tool) -> str:
            if self.fenced:
                return (f'{marker(self.CALL)} "function" {marker(self.SEP)} {json.dumps(t.name)} "\\n```json\\n" '
                        f'{_json(t.parameters)} "\\n```" {marker(self.CALL_END)}')
            return f"{marker(self.CALL)} {json.dumps(t.name)} {marker(self.SEP)} {_json(t.parameters)} {marker(self.CALL_END)}"

        rule = "call+" if parallel else "call"
        return f"start: {marker(self.BEGIN)} {rule} {marker(self.END)}\ncall: {' | '.join(one(t) for t in tools)}\n"


@dataclass(frozen=True)
class Dialect:
    """A tokenizer's way with tools: its family, and whether its template renders tools itself."""

    family: Family
    native: bool  # the chat template takes `tools` and tool messages; else shoal writes them in
    keep_special: bool  # the family's markers are special tokens, which text must keep to be parsed


def dialect(tokenizer: Tokenizer) -> Dialect:
    template = tokenizer.chat_template or ""
    family: Family
    if "[TOOL_CALLS]" in template:
        family = Mistral(args_style="[ARGS]" in template)
    elif "tool▁calls▁begin" in template:
        family = DeepSeek(fenced="```json" in template)
    elif "<tool_call>" in template:
        family = Hermes()
    elif "<|python_tag|>" in template or ("<|start_header_id|>" in template and "tools" in template):
        family = Llama3()
    else:
        return Dialect(Hermes(), native=False, keep_special=False)
    specials = {t.content for t in tokenizer.backend.get_added_tokens_decoder().values() if t.special}
    keep = any(m in specials for m in (*family.starts, "[ARGS]", DeepSeek.CALL, DeepSeek.SEP, "</tool_call>"))
    return Dialect(family, native="tools" in template, keep_special=keep)


def token_marker(tokenizer: Tokenizer) -> Callable[[str], str]:
    """A marker in a Lark grammar: the token itself where the vocabulary has it as one (so the model
    writes it as it was trained to), else its text."""

    def marker(text: str) -> str:
        tid = tokenizer.backend.token_to_id(text)
        return f"<[{tid}]>" if tid is not None else json.dumps(text, ensure_ascii=False)

    return marker


def constraint(tokenizer: Tokenizer, tools: list[Tool], choice: ToolChoice) -> Constraint | None:
    """The grammar that enforces `required` or a named function; None for auto and none."""
    if choice.mode != "required":
        return None
    chosen = [t for t in tools if choice.name is None or t.name == choice.name]
    d = dialect(tokenizer)
    c = Constraint("lark", d.family.grammar(chosen, choice.parallel and choice.name is None, token_marker(tokenizer)))
    try:
        check(c)
    except InvalidConstraint as e:
        raise invalid(f"the tools' schemas cannot constrain decoding: {e}", "tools", "invalid_json_schema") from None
    return c


# ----------------------------------------------------------------------------- the prompt


_INSTRUCTIONS = (
    "You may call one or more functions to answer. The functions, as JSON schemas:\n<tools>\n{tools}\n</tools>\n"
    "To call a function, answer with a JSON object holding its name and arguments inside <tool_call></tool_call> "
    'tags, one per call:\n<tool_call>\n{{"name": <function name>, "arguments": <arguments object>}}\n</tool_call>'
)


def chat_messages(tokenizer: Tokenizer, messages: list[dict[str, Any]], tools: list[Tool]) -> tuple[list[dict[str, Any]], dict]:
    """(messages, extra template arguments) for `Tokenizer.apply_chat_template`. Messages are in
    transformers' convention: an assistant turn may carry `tool_calls` (of `ToolCall.as_hf()`), a
    `tool` turn a result. For a template that does not know tools, both are written as text."""
    if not tools and not any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
        return messages, {}
    d = dialect(tokenizer)
    if d.native:
        return messages, ({"tools": [t.as_hf() for t in tools]} if tools else {})
    out: list[dict[str, Any]] = []
    if tools:
        text = _INSTRUCTIONS.format(tools="\n".join(json.dumps(t.as_hf(), ensure_ascii=False) for t in tools))
        if messages and messages[0]["role"] == "system":
            text = messages[0]["content"] + "\n\n" + text
            messages = messages[1:]
        out.append({"role": "system", "content": text})
    for m in messages:
        if m["role"] == "tool":
            result = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
            if out and out[-1].get("tool_results"):
                out[-1]["content"] += "\n" + result
            else:
                out.append({"role": "user", "content": result, "tool_results": True})
            continue
        calls = m.get("tool_calls")
        if calls:
            written = d.family.render([ToolCall(c.get("id", ""), c["function"]["name"], _args_text(c["function"]["arguments"]) or "{}")
                                       for c in calls])
            out.append({**_plain(m), "content": "\n".join(p for p in (m.get("content") or "", written) if p)})
        else:
            out.append({**_plain(m), "content": m.get("content") or ""})
    for m in out:
        m.pop("tool_results", None)
    return out, {}


def _plain(m: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in m.items() if k not in ("tool_calls", "tool_call_id")}


def encode_chat(tokenizer: Tokenizer, messages: list[dict[str, Any]], tools: list[Tool]) -> list[int]:
    msgs, extra = chat_messages(tokenizer, messages, tools)
    return tokenizer.encode(tokenizer.apply_chat_template(msgs, True, **extra), add_special_tokens=False)


# ----------------------------------------------------------------------------- the reply


@dataclass
class CallStream:
    """One sequence's text split into the reply's content and its tool calls as they complete.

    Content streams as it comes, less a tail that may be the start of an opening marker; from the
    marker on, text is held and parsed, and each call is given out once it is whole. At the end, a
    marker that opened no valid call gives its text back as content."""

    family: Family
    held: str = ""
    tail: str | None = None  # text from the opening marker on, once seen
    calls: list[ToolCall] = field(default_factory=list)
    started: bool = False  # some content has been given out (an at-start-only family is past its chance)

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        if self.tail is not None:
            self.tail += text
            # A call is complete only once it ends in "}", "]" or a closing marker's ">": the held
            # text is parsed again only then, not on every token.
            if not any(c in text for c in "}]>"):
                return "", []
            return "", self._new(self.family.calls_in(self.tail, final=False) or [])
        self.held += text
        f = self.family
        if f.at_start_only:
            if self.started:
                out, self.held = self.held, ""
                return out, []
            head = self.held.lstrip()
            if not head or any(s.startswith(head) for s in f.starts):
                return "", []  # could still open a call
            if any(head.startswith(s) for s in f.starts):
                self.tail, self.held = head, ""
                return "", self._new(f.calls_in(self.tail, final=False) or [])
            self.started = True
            out, self.held = self.held, ""
            return out, []
        hits = [i for s in f.starts if (i := self.held.find(s)) >= 0]
        if hits:
            i = min(hits)
            out, self.tail, self.held = self.held[:i], self.held[i:], ""
            return out, self._new(f.calls_in(self.tail, final=False) or [])
        keep = max((k for s in f.starts for k in range(1, len(s)) if self.held.endswith(s[:k])), default=0)
        out, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep :]
        return out, []

    def finish(self) -> tuple[str, list[ToolCall]]:
        if self.tail is None:
            out, self.held = self.held, ""
            return out, []
        found = self.family.calls_in(self.tail, final=True)
        if found is None:  # a marker, but no call after it: it was text
            return ("" if self.calls else self.tail), []
        return "", self._new(found)

    def _new(self, found: list[tuple[str, str]]) -> list[ToolCall]:
        new = [ToolCall(self.family.new_id(), name, args) for name, args in found[len(self.calls) :]]
        self.calls += new
        return new


def parse(family: Family, text: str) -> tuple[str, list[ToolCall]]:
    """A whole reply's (content, calls)."""
    s = CallStream(family)
    content, calls = s.feed(text)
    more, rest = s.finish()
    return content + more, calls + rest


__all__ = ["CallStream", "Dialect", "Family", "Tool", "ToolCall", "ToolChoice", "chat_messages", "check_tools", "constraint",
           "dialect", "encode_chat", "make_tool", "parse"]
