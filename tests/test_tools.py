"""Tool calling: each family's call syntax read from fixed outputs (whole and streamed in pieces),
the grammars that force a call accepting exactly what the parsers read, the chat template given
tools as transformers gives them, and the three APIs through their official clients on the
bundled model (`tool_choice` required and named on five schemas, streamed deltas, a tool result
sent back, Anthropic's tool_use round trip, Ollama's tools)."""

from __future__ import annotations

import json

import anthropic
import jsonschema
import ollama
import openai
import pytest
from api_helpers import MODEL, MODEL_PATH, http, needs_model, server_fixture

from shoal.api.tools import (
    CallStream,
    DeepSeek,
    Hermes,
    Llama3,
    Mistral,
    Tool,
    ToolCall,
    ToolChoice,
    chat_messages,
    constraint,
    dialect,
    parse,
    token_marker,
)


def _object(properties: dict, required: list[str] | None = None) -> dict:
    return {"type": "object", "properties": properties, "required": list(properties) if required is None else required,
            "additionalProperties": False}


# Five tools, one schema feature each (enums, bounded numbers, arrays, nested objects, optional fields).
TOOLS = {
    "get_weather": ("Current weather in a city", _object({"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}}),
                    "What is the weather in Paris?"),
    "set_thermostat": ("Set the thermostat", _object({"temperature": {"type": "number", "minimum": 10, "maximum": 30},
                                                      "mode": {"enum": ["heat", "cool", "auto"]}, "eco": {"type": "boolean"}}),
                       "Make the living room warmer."),
    "add_todo": ("Add items to the to-do list", _object({"items": {"type": "array", "items": {"type": "string", "maxLength": 40},
                                                                   "minItems": 1, "maxItems": 3},
                                                         "priority": {"type": "integer", "minimum": 1, "maximum": 5}}),
                 "Remind me to buy milk and eggs."),
    "create_event": ("Put an event in the calendar", _object({"title": {"type": "string", "maxLength": 40},
                                                              "when": _object({"date": {"type": "string", "maxLength": 12},
                                                                               "hour": {"type": "integer", "minimum": 0, "maximum": 23}})}),
                     "Schedule lunch with Sam tomorrow at noon."),
    "search_books": ("Search the library", _object({"query": {"type": "string", "maxLength": 40}, "year": {"type": "integer"},
                                                    "limit": {"type": "integer", "minimum": 1, "maximum": 10}}, required=["query"]),
                     "Find me books about octopuses."),
}


def openai_tools(names=None) -> list[dict]:
    return [{"type": "function", "function": {"name": n, "description": d, "parameters": s}}
            for n, (d, s, _) in TOOLS.items() if names is None or n in names]


def _tools() -> list[Tool]:
    return [Tool(n, d, s) for n, (d, s, _) in TOOLS.items()]


# -- each family's syntax, no model -----------------------------------------------------------------
WEATHER = ("get_weather", '{"city": "Paris", "unit": "celsius"}')
TIME = ("get_time", '{"zone": "CET"}')
D3 = DeepSeek(fenced=True)
FIXED = [
    # (family, model output, expected content, expected calls)
    (Hermes(), 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>\n'
               '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>', "Let me check.\n", [WEATHER, TIME]),
    (Hermes(), '<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\", \\"unit\\": \\"celsius\\"}"}\n</tool_call>',
     "", [WEATHER]),  # arguments as a string holding JSON, as some Qwen versions write them
    (Hermes(), '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}', "", [TIME]),  # the closing tag never came
    (Hermes(), 'Use <tool_call> tags like <tool_call>\n{"name": "get_ti', 'Use <tool_call> tags like <tool_call>\n{"name": "get_ti', []),
    (Hermes(), "No tools needed: 2 + 2 = 4.", "No tools needed: 2 + 2 = 4.", []),
    (Llama3(), '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}', "", [WEATHER]),
    (Llama3(), '<|python_tag|>{"name": "get_time", "parameters": {"zone": "CET"}}', "", [TIME]),
    (Llama3(), 'The answer is {"name": "x"}', 'The answer is {"name": "x"}', []),  # not at the start: text
    (Llama3(), '{"city": "Paris"}', '{"city": "Paris"}', []),  # JSON, but not a call
    (Mistral(), '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}, '
                '{"name": "get_time", "arguments": {"zone": "CET"}}]', "", [WEATHER, TIME]),
    (Mistral(True), 'Sure. [TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "celsius"}[TOOL_CALLS]get_time[ARGS]{"zone": "CET"}',
     "Sure. ", [WEATHER, TIME]),
    (D3, "Checking.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
         '{"city": "Paris", "unit": "celsius"}\n```<｜tool▁call▁end｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_time\n'
         '```json\n{"zone": "CET"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>', "Checking.", [WEATHER, TIME]),
    (DeepSeek(fenced=False), '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_time<｜tool▁sep｜>{"zone": "CET"}<｜tool▁call▁end｜>'
                             "<｜tool▁calls▁end｜>", "", [TIME]),
]


@pytest.mark.parametrize("family,text,content,calls", FIXED, ids=[f"{f.name}-{i}" for i, (f, *_) in enumerate(FIXED)])
def test_each_family_parsed_from_fixed_outputs(family, text, content, calls):
    got_content, got = parse(family, text)
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in got] == [(n, json.loads(a)) for n, a in calls]
    # Streamed a few characters at a time: the same content and calls, each call given out once
    # and, where the family closes calls, as soon as it closes.
    for size in (1, 3, 7):
        s = CallStream(family)
        shown, made = "", []
        for i in range(0, len(text), size):
            piece, new = s.feed(text[i : i + size])
            shown, made = shown + piece, made + new
        piece, new = s.finish()
        assert shown + piece == content and [(c.name, c.arguments) for c in made + new] == [(c.name, c.arguments) for c in got]


def test_content_streams_ahead_of_a_call():
    s = CallStream(Hermes())
    assert s.feed("Let me look that up. <tool") == ("Let me look that up. ", [])  # "<tool" may open a call
    assert s.feed("_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>")[1][0].name == "get_time"
    assert CallStream(Hermes()).feed("a <b> c") == ("a <b> c", [])


@pytest.mark.parametrize("family", [Hermes(), Llama3(), Mistral(), Mistral(True), D3, DeepSeek(fenced=False)], ids=lambda f: f.name)
def test_what_a_family_writes_it_reads_back(family):
    calls = [ToolCall(family.new_id(), *WEATHER), ToolCall(family.new_id(), *TIME)]
    if isinstance(family, Llama3):
        calls = calls[:1]
    content, got = parse(family, family.render(calls))
    assert content == "" and [(c.name, c.arguments) for c in got] == [(c.name, c.arguments) for c in calls]
    if isinstance(family, Mistral):
        assert all(len(c.id) == 9 and c.id.isalnum() for c in got)  # Mistral's templates check this


def test_the_family_comes_from_the_chat_template():
    from shoal.engine.tokenizer import Tokenizer

    def of(template):
        from tokenizers import Tokenizer as HF
        from tokenizers import models

        return dialect(Tokenizer(HF(models.BPE()), template, None, None, set()))

    assert (of(None).family.name, of(None).native) == ("hermes", False)
    assert (of("{{ tools }}<tool_call>").family.name, of("{{ tools }}<tool_call>").native) == ("hermes", True)
    assert of("{{ tools }}[TOOL_CALLS]").family.name == "mistral" and of("[TOOL_CALLS][ARGS]").family.args_style
    assert of("{{ tools }}<｜tool▁calls▁begin｜>```json").family.fenced
    assert of("<|start_header_id|>{{ tools }}<|python_tag|>").family.name == "llama3"


# -- with the bundled model's tokenizer -------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    from shoal.engine.loader import load_tokenizer, open_checkpoint

    return load_tokenizer(open_checkpoint(MODEL_PATH))


@needs_model
@pytest.mark.parametrize("family", [Hermes(), Llama3(), Mistral(), Mistral(True), D3, DeepSeek(fenced=False)], ids=lambda f: f.name)
def test_the_grammar_that_forces_a_call_takes_what_the_family_writes(tokenizer, family):
    from shoal.engine.grammar import Constraint, Grammars

    tools = [Tool("get_weather", "", TOOLS["get_weather"][1]), Tool("get_time", "", _object({"zone": {"type": "string"}}))]
    grammar = family.grammar(tools, True, token_marker(tokenizer))
    g = Grammars(tokenizer)

    def accepts(text: str) -> bool:
        m = g.matcher(Constraint("lark", grammar)).inner
        return all(m.consume_token(t) for t in tokenizer.encode(text, add_special_tokens=False)) and m.is_accepting()

    calls = [ToolCall("x", "get_weather", '{"city": "Paris", "unit": "celsius"}')]
    if not isinstance(family, Llama3):
        calls.append(ToolCall("y", "get_time", '{"zone": "CET"}'))
    assert accepts(family.render(calls))
    assert not accepts(family.render([ToolCall("x", "get_weather", '{"city": "Paris", "unit": "kelvin"}')]))  # outside the enum
    assert not accepts(family.render([ToolCall("x", "get_news", "{}")]))  # no such tool


@needs_model
def test_tools_reach_the_template_as_transformers_gives_them(tokenizer):
    """A tool-aware template (Qwen's layout) renders the same prompt from shoal's messages as from
    transformers' apply_chat_template with the same tools and tool messages."""
    transformers = pytest.importorskip("transformers")
    template = (
        "{% if tools %}<|im_start|>system\n{{ messages[0]['content'] if messages[0]['role'] == 'system' else 'Be helpful.' }}"
        "\n\n<tools>{% for t in tools %}\n{{ t | tojson }}{% endfor %}\n</tools>\nCall with <tool_call>.<|im_end|>\n{% endif %}"
        "{% for m in messages %}{% if m['role'] == 'system' and tools %}{% elif m['role'] == 'tool' %}"
        "<|im_start|>user\n<tool_response>\n{{ m['content'] }}\n</tool_response><|im_end|>\n"
        "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] or '' }}{% for c in m.get('tool_calls', []) %}"
        "\n<tool_call>\n{\"name\": \"{{ c['function']['name'] }}\", \"arguments\": {{ c['function']['arguments'] | tojson }}}"
        "\n</tool_call>{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    from shoal.engine.tokenizer import Tokenizer

    ours = Tokenizer(tokenizer.backend, template, tokenizer.bos_token, tokenizer.eos_token, tokenizer.eos_token_ids)
    call = ToolCall("call_1", *WEATHER)
    messages = [{"role": "system", "content": "You check the weather."}, {"role": "user", "content": "Paris?"},
                {"role": "assistant", "content": "", "tool_calls": [call.as_hf()]},
                {"role": "tool", "tool_call_id": "call_1", "content": "18 C"}]
    tools = [Tool("get_weather", "Current weather", TOOLS["get_weather"][1])]
    assert dialect(ours).native and dialect(ours).family.name == "hermes"
    msgs, extra = chat_messages(ours, messages, tools)
    text = ours.apply_chat_template(msgs, True, **extra)
    ref = transformers.AutoTokenizer.from_pretrained(str(MODEL_PATH.parent), gguf_file=MODEL_PATH.name)
    expected = ref.apply_chat_template(messages, tools=[t.as_hf() for t in tools], chat_template=template, tokenize=False,
                                       add_generation_prompt=True)
    assert text == expected and '"arguments": {"city": "Paris"' in text and "<tools>" in text
    # A template that knows no tools (the bundled one): the tools, calls and results written in.
    msgs, extra = chat_messages(tokenizer, messages, tools)
    assert extra == {} and [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert "get_weather" in msgs[0]["content"] and msgs[0]["content"].startswith("You check the weather.")
    assert json.loads(msgs[2]["content"].split("\n")[1]) == {"name": "get_weather", "arguments": json.loads(WEATHER[1])}
    assert msgs[3]["content"] == "<tool_response>\n18 C\n</tool_response>"
    # Without tools or tool messages, the messages pass through untouched.
    plain = [{"role": "user", "content": "hi", "name": "sam"}]
    assert chat_messages(tokenizer, plain, []) == (plain, {})


@needs_model
def test_required_and_named_choices_become_grammars(tokenizer):
    tools = _tools()
    assert constraint(tokenizer, tools, ToolChoice("auto")) is None
    named = constraint(tokenizer, tools, ToolChoice("required", "add_todo"))
    assert named.kind == "lark" and "add_todo" in named.text and "get_weather" not in named.text
    assert "call (" in constraint(tokenizer, tools, ToolChoice("required")).text  # parallel calls allowed
    assert "call (" not in constraint(tokenizer, tools, ToolChoice("required", parallel=False)).text


# -- through the APIs, on the bundled model ---------------------------------------------------------
server = server_fixture()


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)


def _ask(oai, prompt: str, **kw):
    return oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}], temperature=0,
                                       max_tokens=160, **kw)


@needs_model
def test_openai_required_and_named_calls_validate_against_their_schemas(oai):
    for name, (_, schema, prompt) in TOOLS.items():
        for choice in ("required", {"type": "function", "function": {"name": name}}):
            tools = openai_tools([name]) if choice == "required" else openai_tools()
            r = _ask(oai, prompt, tools=tools, tool_choice=choice, parallel_tool_calls=False)
            c = r.choices[0]
            assert c.finish_reason == "tool_calls", (name, c.message)
            [call] = c.message.tool_calls
            assert call.type == "function" and call.function.name == name and call.id.startswith("call_")
            jsonschema.validate(json.loads(call.function.arguments), schema)


@needs_model
def test_openai_streamed_tool_call_deltas_reassemble_to_the_same_call(oai):
    kw = {"tools": openai_tools(), "tool_choice": {"type": "function", "function": {"name": "set_thermostat"}}}
    whole = _ask(oai, TOOLS["set_thermostat"][2], **kw).choices[0].message.tool_calls
    calls: dict[int, dict] = {}
    finish = None
    for chunk in _ask(oai, TOOLS["set_thermostat"][2], stream=True, **kw):
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for d in choice.delta.tool_calls or []:
                c = calls.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
                c["id"] += d.id or ""
                c["name"] += (d.function.name or "") if d.function else ""
                c["arguments"] += (d.function.arguments or "") if d.function else ""
    assert finish == "tool_calls" and len(calls) == len(whole) == 1
    assert (calls[0]["name"], calls[0]["arguments"]) == (whole[0].function.name, whole[0].function.arguments)
    assert calls[0]["id"].startswith("call_")


@needs_model
def test_openai_tool_result_gets_an_answer(oai):
    tools = openai_tools(["get_weather"])
    first = _ask(oai, TOOLS["get_weather"][2], tools=tools, tool_choice="required").choices[0].message
    call = first.tool_calls[0]
    history = [{"role": "user", "content": TOOLS["get_weather"][2]},
               {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
               {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 18, "sky": "cloudy"})}]
    r = oai.chat.completions.create(model=MODEL, messages=history, tools=tools, temperature=0, max_tokens=60)
    assert r.choices[0].finish_reason in ("stop", "length") and r.choices[0].message.content
    assert not r.choices[0].message.tool_calls
    # The result reached the prompt: without it the prompt is shorter.
    shorter = oai.chat.completions.create(model=MODEL, messages=history[:1], tools=tools, temperature=0, max_tokens=1)
    assert r.usage.prompt_tokens > shorter.usage.prompt_tokens + 20
    # tool_choice "none": the tools are not offered, and no call comes back.
    r = _ask(oai, TOOLS["get_weather"][2], tools=tools, tool_choice="none")
    assert not r.choices[0].message.tool_calls and r.choices[0].message.content


@needs_model
def test_tool_requests_that_cannot_work_are_refused_by_name(server):
    url = f"{server.url}/v1/chat/completions"
    base = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    cases = [
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": openai_tools(["get_weather"]), "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "foo"}}}]}, "tools[0].function"),
        ({"tools": openai_tools(["get_weather"]) * 2}, "tools"),
        ({"tools": openai_tools(["get_weather"]), "tool_choice": "required", "response_format": {"type": "json_object"}},
         "response_format"),
        ({"messages": [{"role": "tool", "content": "18 C"}]}, "messages[0].tool_call_id"),
    ]
    for extra, param in cases:
        status, _, raw = http("POST", url, {**base, **extra})
        assert status == 400, (extra, raw)
        assert json.loads(raw)["error"]["param"] == param, raw
    assert http("POST", url, base)[0] == 200  # and the server goes on


@needs_model
def test_anthropic_tool_use_round_trip(server):
    claude = anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, timeout=300)
    greedy = {"temperature": 0}
    tools = [{"name": n, "description": d, "input_schema": s} for n, (d, s, _) in TOOLS.items()]
    question = [{"role": "user", "content": TOOLS["add_todo"][2]}]
    kw = {"model": MODEL, "max_tokens": 160, "system": "You manage my day.", "tools": tools,
          "tool_choice": {"type": "tool", "name": "add_todo", "disable_parallel_tool_use": True}}
    r = claude.messages.create(messages=question, extra_body=greedy, **kw)
    assert r.stop_reason == "tool_use"
    [use] = [b for b in r.content if b.type == "tool_use"]
    assert use.name == "add_todo" and use.id.startswith("toolu_")
    jsonschema.validate(use.input, TOOLS["add_todo"][1])
    with claude.messages.stream(messages=question, extra_body=greedy, **kw) as stream:
        streamed = stream.get_final_message()
    assert streamed.stop_reason == "tool_use"
    assert [(b.name, b.input) for b in streamed.content if b.type == "tool_use"] == [(use.name, use.input)]
    # "any": some tool, valid for its own schema.
    r = claude.messages.create(messages=question, extra_body=greedy, **{**kw, "tool_choice": {"type": "any"}})
    for b in (b for b in r.content if b.type == "tool_use"):
        jsonschema.validate(b.input, TOOLS[b.name][1])
    # The result goes back in a tool_result block; the reply is text.
    history = [*question, {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in [use]]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "Added 2 items."}]}]
    r = claude.messages.create(model=MODEL, max_tokens=40, tools=tools, messages=history, extra_body=greedy)
    assert r.stop_reason in ("end_turn", "max_tokens") and r.content[0].type == "text" and r.content[0].text
    count = claude.messages.count_tokens(model=MODEL, tools=tools, messages=history).input_tokens
    assert count == r.usage.input_tokens > claude.messages.count_tokens(model=MODEL, messages=question).input_tokens
    # Errors in Anthropic's shape.
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.messages.create(model=MODEL, max_tokens=8, messages=question,
                               tools=[{"type": "web_search_20250305", "name": "web_search"}])
    assert e.value.body["error"]["type"] == "invalid_request_error" and "server tools" in e.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError):
        claude.messages.create(model=MODEL, max_tokens=8, messages=question, tools=tools,
                               tool_choice={"type": "tool", "name": "nope"})


@needs_model
def test_ollama_chat_with_tools(server):
    client = ollama.Client(host=server.url)
    tools = openai_tools(["get_weather"])
    history = [{"role": "user", "content": TOOLS["get_weather"][2]},
               {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather",
                                                                                 "arguments": json.loads(WEATHER[1])}}]},
               {"role": "tool", "content": "18 degrees and cloudy", "tool_name": "get_weather"}]
    r = client.chat(model=MODEL, messages=history, tools=tools, options={"temperature": 0, "num_predict": 40})
    assert r.message.content and not r.message.tool_calls and r.done
    without = client.chat(model=MODEL, messages=history[:1], options={"temperature": 0, "num_predict": 1})
    assert r.prompt_eval_count > without.prompt_eval_count + 40  # the tool, the call and its result are in the prompt
    streamed = "".join(c.message.content or "" for c in client.chat(model=MODEL, messages=history, tools=tools, stream=True,
                                                                    options={"temperature": 0, "num_predict": 40}))
    assert streamed == r.message.content
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model=MODEL, messages=history, tools=[{"type": "function", "function": {"name": "bad name!"}}])
    assert e.value.status_code == 400
