"""The Ollama-compatible API, for real: a server process called with the official `ollama` package."""

from __future__ import annotations

import json

import ollama
import openai
import pytest
from api_helpers import MODEL, http, needs_model, server_fixture

pytestmark = needs_model

server = server_fixture("--model", MODEL)
MESSAGES = [{"role": "user", "content": "Name three colors of the rainbow."}]
GREEDY = {"temperature": 0, "num_predict": 12}


@pytest.fixture(scope="module")
def client(server):
    return ollama.Client(host=server.url, timeout=120)


def test_chat_non_streaming(client):
    r = client.chat(model=MODEL, messages=MESSAGES, options=GREEDY, stream=False)
    assert r.done and r.done_reason in ("stop", "length") and r.message.role == "assistant" and r.message.content
    assert r.model == MODEL and r.created_at
    assert r.prompt_eval_count > 5 and 0 < r.eval_count <= 12
    assert r.total_duration >= r.prompt_eval_duration > 0 and r.eval_duration > 0
    assert r.load_duration == 0  # preloaded with --model


def test_chat_streaming_equals_non_streaming(client):
    whole = client.chat(model=MODEL, messages=MESSAGES, options=GREEDY)
    parts = list(client.chat(model=MODEL, messages=MESSAGES, options=GREEDY, stream=True))
    assert all(not p.done for p in parts[:-1]) and parts[-1].done
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert parts[-1].eval_count == whole.eval_count and parts[-1].done_reason == whole.done_reason


def test_chat_matches_openai_endpoint(client, server):
    o = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    ref = o.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0).choices[0].message.content
    assert client.chat(model=f"{MODEL}:latest", messages=MESSAGES, options=GREEDY).message.content == ref


def test_generate_with_context_and_raw(client):
    r = client.generate(model=MODEL, prompt="What is 2 + 2?", options=GREEDY)
    assert r.done and r.response and r.context and r.eval_count <= 12
    follow = client.generate(model=MODEL, prompt="And 3 + 3?", context=r.context, options={"temperature": 0, "num_predict": 8})
    assert follow.response and len(follow.context) > len(r.context)
    assert follow.context[: len(r.context)] == list(r.context)
    parts = list(client.generate(model=MODEL, prompt="Once upon a time", raw=True, options={"temperature": 0, "num_predict": 8},
                                 stream=True))
    assert parts[-1].done and parts[-1].eval_count == 8
    assert "".join(p.response for p in parts)


def test_options_stop_and_seed(client):
    text = client.chat(model=MODEL, messages=MESSAGES, options=GREEDY).message.content
    words = text.split()
    assert len(words) >= 3, text
    stop = " " + words[2]
    r = client.chat(model=MODEL, messages=MESSAGES, options={**GREEDY, "stop": [stop]})
    assert r.message.content == text[: text.index(stop)] and r.done_reason == "stop"
    seeded = {"temperature": 1.0, "seed": 7, "num_predict": 12, "top_k": 50, "top_p": 0.95}
    a = client.chat(model=MODEL, messages=MESSAGES, options=seeded).message.content
    assert client.chat(model=MODEL, messages=MESSAGES, options=seeded).message.content == a


def test_listings(client, server):
    tags = client.list()
    assert [m.model for m in tags.models] == [f"{MODEL}:latest"]
    m = tags.models[0]
    assert m.size > 50_000_000 and m.details.format == "gguf" and m.details.quantization_level == "Q4_1"
    ps = client.ps()
    assert [p.model for p in ps.models] == [f"{MODEL}:latest"] and ps.models[0].context_length == 8192
    show = client.show(MODEL)
    assert show.details.family == "llama" and "im_start" in show.template
    status, _, body = http("GET", f"{server.url}/api/version")
    assert status == 200 and json.loads(body)["version"].count(".") == 2


def test_errors(client, server):
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="no-such-model", messages=MESSAGES)
    assert e.value.status_code == 404 and "no-such-model" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model=MODEL, messages=MESSAGES, options={"temperature": "hot"})
    assert e.value.status_code == 400 and "temperature" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model=MODEL, messages=MESSAGES, format={"type": "foo"})  # not a JSON schema
    assert e.value.status_code == 400 and "format" in e.value.error
    status, _, body = http("POST", f"{server.url}/api/chat", b"{not json")
    assert status == 400 and isinstance(json.loads(body)["error"], str)


def test_load_and_unload(client):
    r = client.generate(model=MODEL, prompt="")
    assert r.done and r.done_reason == "load"
    r = client.generate(model=MODEL, prompt="", keep_alive=0)
    assert r.done_reason == "unload" and client.ps().models == []
    # The next request places it again, on demand.
    again = client.chat(model=MODEL, messages=MESSAGES, options={"temperature": 0, "num_predict": 2})
    assert again.done and again.load_duration > 0
