"""Anthropic's Messages API, for real: one server process on a loopback port with an API key, called
with the official `anthropic` client (which sends the key as x-api-key) and with raw HTTP, and
checked against the OpenAI chat route on the same conversation (greedy, so the texts must match)."""

from __future__ import annotations

import json

import anthropic
import openai
import pytest
from api_helpers import MODEL, http, needs_model, server_fixture
from conftest import TEST_API_KEY

from shoal.api.errors import ApiError

pytestmark = needs_model

KEY = "test-key-anthropic-0123456789"
server = server_fixture("--api-key", KEY)

GREEDY = {"temperature": 0}  # this client version has no temperature argument; the API still takes it
SYSTEM = "You are a concise assistant."
RAINBOW = "Name three colors of the rainbow."
ARITHMETIC = "What is 2+2? Answer with a number only."  # the bundled model ends this turn in a few tokens
FINISH = {"stop": "end_turn", "length": "max_tokens"}  # OpenAI's finish_reason -> Anthropic's stop_reason


@pytest.fixture(scope="module")
def claude(server):
    return anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=300)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def reference(oai, question: str, max_tokens: int, **kw):
    messages = [{"role": "system", "content": SYSTEM}, *user(question)]
    return oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0, **kw)


def post(server, body: dict | bytes | None, path: str = "/v1/messages", method: str = "POST") -> tuple[int, dict, bytes]:
    return http(method, server.url + path, body, headers={"x-api-key": KEY, "anthropic-version": "2023-06-01"}, timeout=300)


def sse_events(raw: bytes) -> list[tuple[str, dict]]:
    """(event name, data) of each record of an Anthropic stream, parsed strictly."""
    text = raw.decode()
    assert text.endswith("\n\n")
    out = []
    for record in text[:-2].split("\n\n"):
        event, data = record.split("\n")
        assert event.startswith("event: ") and data.startswith("data: "), record
        out.append((event[len("event: "):], json.loads(data[len("data: "):])))
    return out


def assert_error(status: int, body: bytes, want_status: int, kind: str, mentions: str = "") -> None:
    err = json.loads(body)
    assert status == want_status, (status, err)
    assert set(err) == {"type", "error"} and err["type"] == "error", err
    assert set(err["error"]) == {"type", "message"} and err["error"]["type"] == kind, err
    assert mentions in err["error"]["message"], err


def test_create_with_system_prompt_equals_openai_chat(claude, oai):
    seen = set()
    for question, max_tokens in [(RAINBOW, 16), (ARITHMETIC, 48)]:
        ours = claude.messages.create(model=MODEL, max_tokens=max_tokens, system=SYSTEM, messages=user(question),
                                      extra_body=GREEDY)
        ref = reference(oai, question, max_tokens)
        assert ours.type == "message" and ours.role == "assistant" and ours.model == MODEL and ours.id.startswith("msg_")
        assert [b.type for b in ours.content] == ["text"]
        assert ours.content[0].text == ref.choices[0].message.content
        assert ours.stop_reason == FINISH[ref.choices[0].finish_reason] and ours.stop_sequence is None
        assert (ours.usage.input_tokens, ours.usage.output_tokens) == (ref.usage.prompt_tokens, ref.usage.completion_tokens)
        seen.add(ours.stop_reason)
    assert seen == {"max_tokens", "end_turn"}


def test_stream_sends_anthropics_events_and_folds_to_the_same_message(claude, server):
    # The system prompt and the content as text blocks this time; one block is the same prompt as a string.
    conversation = {"model": MODEL, "max_tokens": 16, "system": [{"type": "text", "text": SYSTEM}],
                    "messages": [{"role": "user", "content": [{"type": "text", "text": RAINBOW}]}]}
    whole = claude.messages.create(**conversation, extra_body=GREEDY)
    with claude.messages.stream(**conversation, extra_body=GREEDY) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop" and "content_block_delta" in kinds
    assert final.content[0].text == whole.content[0].text
    assert (final.stop_reason, final.usage.input_tokens, final.usage.output_tokens) == (
        whole.stop_reason, whole.usage.input_tokens, whole.usage.output_tokens)

    status, headers, raw = post(server, {**conversation, **GREEDY, "stream": True})
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    events = sse_events(raw)
    names = [name for name, _ in events]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[3:-3]) == {"content_block_delta"}
    assert all(data["type"] == name for name, data in events)
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["usage"]["input_tokens"] == whole.usage.input_tokens
    assert events[1][1] == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    deltas = [data["delta"] for name, data in events if name == "content_block_delta"]
    assert all(d["type"] == "text_delta" for d in deltas)
    assert "".join(d["text"] for d in deltas) == whole.content[0].text
    assert events[-2][1] == {"type": "message_delta", "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
                             "usage": {"output_tokens": 16}}


def test_stop_sequences_and_max_tokens_give_their_stop_reasons(claude, oai, server):
    full = reference(oai, RAINBOW, 16).choices[0].message.content
    stop = full.split()[3]  # a word from the middle of the greedy answer
    stops = ["never-in-this-answer", stop]
    ours = claude.messages.create(model=MODEL, max_tokens=16, system=SYSTEM, messages=user(RAINBOW), stop_sequences=stops,
                                  extra_body=GREEDY)
    ref = reference(oai, RAINBOW, 16, stop=stops)
    assert ours.stop_reason == "stop_sequence" and ours.stop_sequence == stop
    assert ours.content[0].text == ref.choices[0].message.content == full[: full.index(stop)]
    assert ours.usage.output_tokens == ref.usage.completion_tokens

    status, _, raw = post(server, {"model": MODEL, "max_tokens": 16, "system": SYSTEM, "messages": user(RAINBOW),
                                   "stop_sequences": stops, "stream": True, **GREEDY})
    assert status == 200
    delta = [data for name, data in sse_events(raw) if name == "message_delta"]
    assert [d["delta"] for d in delta] == [{"stop_reason": "stop_sequence", "stop_sequence": stop}]

    short = claude.messages.create(model=MODEL, max_tokens=3, system=SYSTEM, messages=user(RAINBOW), extra_body=GREEDY)
    assert short.stop_reason == "max_tokens" and short.usage.output_tokens == 3


def test_prefilled_assistant_turn_is_continued(claude):
    whole = claude.messages.create(model=MODEL, max_tokens=12, messages=user(RAINBOW), extra_body=GREEDY).content[0].text
    cut = whole.index(" ", 8)  # a word boundary: the prefill tokenizes as the answer did
    prefill = whole[:cut]
    rest = claude.messages.create(model=MODEL, max_tokens=8, extra_body=GREEDY,
                                  messages=[*user(RAINBOW), {"role": "assistant", "content": prefill}])
    assert rest.content[0].text and whole[cut:].startswith(rest.content[0].text)


def test_count_tokens_equals_the_prompt_the_reply_counts(claude, oai):
    counted = claude.messages.count_tokens(model=MODEL, system=SYSTEM, messages=user(RAINBOW))
    assert counted.input_tokens == reference(oai, RAINBOW, 1).usage.prompt_tokens


def test_on_a_cluster_instance_with_the_context_as_limit(launcher):
    """A node places the model as a cluster instance (runner processes): the same route answers the
    same text there, and asking for more than the placement's context has room for ends the reply
    at the context, saying so; a prompt that fills it is refused."""
    node = launcher.start("a")
    claude = anthropic.Anthropic(base_url=node.url, api_key=TEST_API_KEY, max_retries=0, timeout=300)
    oai = openai.OpenAI(base_url=f"{node.url}/v1", api_key=TEST_API_KEY, max_retries=0, timeout=300)

    def listed_context() -> int:
        return next(m.model_extra["context_length"] for m in oai.models.list().data if m.id == MODEL)

    before = listed_context()  # nothing placed yet: what a placement will enforce
    ours = claude.messages.create(model=MODEL, max_tokens=16, system=SYSTEM, messages=user(RAINBOW), extra_body=GREEDY)
    ref = reference(oai, RAINBOW, 16)
    assert ours.content[0].text == ref.choices[0].message.content
    assert (ours.usage.input_tokens, ours.usage.output_tokens) == (ref.usage.prompt_tokens, ref.usage.completion_tokens)

    context = listed_context()

    def words(n: int) -> list[dict]:
        # Filler, a question, and a prefill the model goes on with (rather than ending the turn at once).
        return [*user("hello " * n + RAINBOW), {"role": "assistant", "content": "The three colors of the rainbow are"}]

    base = claude.messages.count_tokens(model=MODEL, messages=words(100)).input_tokens
    assert claude.messages.count_tokens(model=MODEL, messages=words(200)).input_tokens == base + 100  # a token a word
    near = words(context - 3 - base + 100)  # room for 3 tokens
    r = claude.messages.create(model=MODEL, max_tokens=64, messages=near, extra_body=GREEDY)
    assert (r.usage.input_tokens, r.usage.output_tokens, r.stop_reason) == (context - 3, 3, "model_context_window_exceeded")
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.messages.create(model=MODEL, max_tokens=1, messages=words(context - base + 100))
    assert e.value.body["error"]["type"] == "invalid_request_error" and "prompt is too long" in e.value.body["error"]["message"]
    assert before == context  # /v1/models said, before placing, the context that was then enforced


def test_malformed_requests_get_anthropic_errors_and_the_server_keeps_serving(claude, server):
    ok = {"model": MODEL, "max_tokens": 2, "messages": user("Hi")}
    cases = [
        ({k: v for k, v in ok.items() if k != "max_tokens"}, 400, "invalid_request_error", "max_tokens"),
        ({**ok, "max_tokens": "2"}, 400, "invalid_request_error", "max_tokens"),
        ({**ok, "messages": []}, 400, "invalid_request_error", "messages"),
        ({**ok, "messages": [{"role": "system", "content": "Be brief."}, *user("Hi")]}, 400, "invalid_request_error", "'system'"),
        ({**ok, "messages": [{"role": "bot", "content": "Hi"}]}, 400, "invalid_request_error", "'bot'"),
        ({**ok, "messages": [{"role": "user", "content": ""}]}, 400, "invalid_request_error", "non-empty"),
        ({**ok, "messages": [*user("Hi"), {"role": "assistant", "content": "Sure "}]}, 400, "invalid_request_error", "whitespace"),
        ({**ok, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, 400, "invalid_request_error", "'image'"),
        ({**ok, "messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "1"}]}]},
         400, "invalid_request_error", "tool_use_id"),
        ({**ok, "tools": [{"type": "web_search_20250305", "name": "web_search"}]}, 400, "invalid_request_error", "server tools"),
        ({**ok, "thinking": {"type": "enabled", "budget_tokens": 1024}}, 400, "invalid_request_error", "thinking"),
        ({**ok, "model": "claude-sonnet-4-5"}, 404, "not_found_error", "claude-sonnet-4-5"),
        (b"{not json", 400, "invalid_request_error", "JSON"),
    ]
    for body, want, kind, mentions in cases:
        status, _, raw = post(server, body)
        assert_error(status, raw, want, kind, mentions)
    status, _, raw = post(server, ok, "/v1/messages/batches")
    assert_error(status, raw, 404, "not_found_error")
    status, _, raw = post(server, None, "/v1/messages", "GET")
    assert_error(status, raw, 405, "invalid_request_error")
    with pytest.raises(anthropic.NotFoundError) as e:
        claude.messages.create(model="claude-sonnet-4-5", max_tokens=2, messages=user("Hi"))
    assert e.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError):
        claude.messages.create(model=MODEL, max_tokens=2, messages=[])
    assert claude.messages.create(**ok).content[0].text


def test_wrong_api_key_is_refused_in_anthropics_shape(server):
    stranger = anthropic.Anthropic(base_url=server.url, api_key="not-the-key", max_retries=0, timeout=60)
    with pytest.raises(anthropic.AuthenticationError) as e:
        stranger.messages.create(model=MODEL, max_tokens=2, messages=user("Hi"))
    assert e.value.status_code == 401 and e.value.body["type"] == "error"
    assert e.value.body["error"]["type"] == "authentication_error"


def test_every_status_has_anthropics_error_type():
    kinds = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
             405: "invalid_request_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
             503: "overloaded_error"}
    for status, kind in kinds.items():
        assert ApiError(status, "m").to_anthropic() == {"type": "error", "error": {"type": kind, "message": "m"}}
