"""The OpenAI-compatible API, for real: a server process on a loopback port, called with the
official `openai` package and with raw HTTP (SSE parsed by hand)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading

import aiohttp
import openai
import pytest
from api_helpers import MODEL, MODEL_PATH, free_port, http, metric, needs_model, parse_sse, server_fixture, wait_for

pytestmark = needs_model

# No --model: the first request places it (models on demand).
server = server_fixture()
KEY = "test-key-0123456789"
# A second, tight server: the model preloaded under its file name, nothing loaded on demand, an API
# key, and room for one sequence only (so a second concurrent one is refused with 429).
tight = server_fixture("--model", str(MODEL_PATH), "--no-auto-load", "--api-key", KEY, "--max-running", "1", "--max-waiting", "0")
TIGHT_MODEL = MODEL_PATH.stem if MODEL_PATH else ""

CHAT = [{"role": "system", "content": "You are a concise assistant."}, {"role": "user", "content": "Name three colors of the rainbow."}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def greedy_chat(client, max_tokens=16, **kw):
    return client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=max_tokens, temperature=0, **kw)


def test_model_placed_on_demand_while_client_gets_keepalives(server):
    status, _, body = http("GET", f"{server.url}/healthz")
    if json.loads(body)["models"]:
        pytest.skip("the model was loaded by an earlier test")
    status, _, body = http("GET", f"{server.url}/v1/models")
    assert status == 200 and MODEL in [m["id"] for m in json.loads(body)["data"]]  # listed before it is loaded
    status, headers, raw = http("POST", f"{server.url}/v1/chat/completions",
                                {"model": MODEL, "messages": CHAT, "max_tokens": 4, "stream": True, "temperature": 0}, timeout=180)
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    comments, events = parse_sse(raw)
    assert raw.startswith(b": keep-alive\n\n") and "keep-alive" in comments
    assert events[-1] == "[DONE]" and events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert json.loads(http("GET", f"{server.url}/healthz")[2])["models"] == [MODEL]


def test_models_list(client):
    models = client.models.list()
    assert MODEL in [m.id for m in models.data]
    assert client.models.retrieve(MODEL).id == MODEL


def test_chat_non_streaming_usage_and_timings(client):
    r = greedy_chat(client)
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.model == MODEL
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 10 and 0 < r.usage.completion_tokens <= 16
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    shoal = r.model_extra["shoal"]
    assert shoal["ttft_ms"] > 0 and shoal["decode_tokens_per_s"] > 0


def test_chat_streaming_equals_non_streaming(client):
    whole = greedy_chat(client, max_tokens=16)
    chunks = list(greedy_chat(client, max_tokens=16, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_stop_sequences(client):
    text = greedy_chat(client).choices[0].message.content
    words = text.split()
    assert len(words) >= 3, text
    stop = " " + words[2]  # cut before the third word
    cut = text[: text.index(stop)]
    r = greedy_chat(client, stop=[stop, "never-appears"])
    assert r.choices[0].message.content == cut and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in greedy_chat(client, stop=stop, stream=True))
    assert streamed == cut


def test_greedy_chat_equals_shoal_generate(client):
    prompt = "Write one sentence about the moon."
    out = subprocess.run([sys.executable, "-m", "shoal.cli", "generate", "--max-tokens", "12", prompt],
                         capture_output=True, text=True, timeout=300, check=True)
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=12, temperature=0)
    assert out.stdout == r.choices[0].message.content + "\n"


def test_shared_prompt_prefix_is_reused_and_changes_nothing(client, server):
    """A second chat with the same system prompt reuses its K/V (reported as OpenAI's cached
    tokens) and answers exactly what a fresh prefill gives (`shoal generate`, a fresh process)."""
    system = {"role": "system", "content": "You are a patient teacher who explains things with everyday examples."}
    before = metric(server.url, "shoal_prompt_tokens_cached_total", model=MODEL)
    replies = []
    for question in ("What is gravity?", "What is friction?"):
        r = client.chat.completions.create(model=MODEL, messages=[system, {"role": "user", "content": question}],
                                           max_tokens=10, temperature=0)
        replies.append(r)
    cached = replies[1].usage.prompt_tokens_details.cached_tokens
    assert cached >= 16 and cached < replies[1].usage.prompt_tokens
    assert metric(server.url, "shoal_prompt_tokens_cached_total", model=MODEL) - before >= cached
    out = subprocess.run([sys.executable, "-m", "shoal.cli", "generate", "--max-tokens", "10", "--system", system["content"],
                          "What is friction?"], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout == replies[1].choices[0].message.content + "\n"


def test_completions_streaming_and_not(client):
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text and r.usage.completion_tokens <= 8
    stream = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_completions_echo_scores_a_text(client):
    text = "The capital of France is Paris."
    r = client.completions.create(model=MODEL, prompt=text, max_tokens=0, echo=True, logprobs=2)
    choice = choice0 = r.choices[0]
    lp = choice.logprobs
    assert choice.text == text and r.usage.completion_tokens == 0
    assert "".join(lp.tokens) == text
    assert lp.token_logprobs[0] is None and all(x < 0 for x in lp.token_logprobs[1:])
    assert lp.top_logprobs[0] is None and all(len(t) <= 2 for t in lp.top_logprobs[1:])
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    # A likely continuation scores higher than an unlikely one.
    other = client.completions.create(model=MODEL, prompt="The capital of France is banana.", max_tokens=0, echo=True, logprobs=0)
    assert sum(lp.token_logprobs[1:]) > sum(other.choices[0].logprobs.token_logprobs[1:])
    assert choice0.finish_reason == "length"


def test_chat_logprobs(client):
    r = greedy_chat(client, max_tokens=6, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.logprob - 1e-5  # greedy picks the top token
        assert bytes(entry.bytes).decode("utf-8", errors="replace") == entry.token


def test_n_choices_and_seed(client):
    kw = dict(model=MODEL, messages=CHAT, max_tokens=8, temperature=1.0, seed=1234)
    r = client.chat.completions.create(n=3, **kw)
    assert [c.index for c in r.choices] == [0, 1, 2]
    again = client.chat.completions.create(n=3, **kw)
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]  # seeded: reproducible
    chunks = list(client.chat.completions.create(n=2, stream=True, **kw))
    texts = ["", ""]
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
    assert texts == [c.message.content for c in r.choices[:2]]


def test_raw_sse_framing(server):
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 5, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    status, headers, raw = http("POST", f"{server.url}/v1/chat/completions", body)
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    assert headers.get("Cache-Control") == "no-cache"
    _, events = parse_sse(raw)
    assert events[-1] == "[DONE]" and isinstance(events[-2], dict) and events[-2]["usage"]["completion_tokens"] == 5
    assert events[-2]["choices"] == [] and "ttft_ms" in events[-2]["shoal"]
    finals = [e for e in events[:-1] if e["choices"] and e["choices"][0]["finish_reason"]]
    assert len(finals) == 1 and finals[0]["choices"][0]["delta"] == {} and finals[0]["shoal"]["ttft_ms"] > 0


def test_errors_are_openai_shaped(client, server):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=CHAT)
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=CHAT, temperature=5)
    assert e.value.body["param"] == "temperature" and e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=9000)
    assert e.value.body["code"] == "context_length_exceeded" and "8192" in e.value.body["message"] and "9000" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="word " * 9000, max_tokens=1)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=CHAT, presence_penalty=0.5)
    assert e.value.body["param"] == "presence_penalty"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=CHAT, n=100)
    for raw, param in [(b'{"model": "x", "messages": [', None), (b'{"model": 5, "messages": []}', "model"),
                       (b'{"model": "smollm2-135m", "messages": [{"role": "user", "content": 7}]}', "messages[0].content"),
                       (b'{"model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "9"}', "max_tokens"),
                       (b"\xff\xfe", None), (b"[]", None)]:
        status, headers, body = http("POST", f"{server.url}/v1/chat/completions", raw)
        err = json.loads(body)["error"]
        assert status == 400 and headers["Content-Type"].startswith("application/json"), raw
        assert set(err) == {"message", "type", "param", "code"} and err["param"] == param, (raw, err)
    status, _, body = http("GET", f"{server.url}/v1/nowhere")
    assert status == 404 and json.loads(body)["error"]["code"] == "unknown_url"


def test_client_disconnect_stops_generation(server):
    before = metric(server.url, "shoal_requests_cancelled_total", model=MODEL)

    async def go() -> int:
        body = {"model": MODEL, "messages": CHAT, "max_tokens": 4000, "ignore_eos": True, "stream": True}
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{server.url}/v1/chat/completions", json=body) as r:
                n = 0
                async for line in r.content:
                    n += line.startswith(b"data: ")
                    if n >= 4:
                        break
        return n

    assert asyncio.run(go()) == 4
    assert wait_for(lambda: metric(server.url, "shoal_requests_cancelled_total", model=MODEL) == before + 1, 10)
    assert wait_for(lambda: metric(server.url, "shoal_queue_running", model=MODEL) == 0, 10)
    assert metric(server.url, "shoal_kv_cache_bytes", model=MODEL) == 0


def test_concurrent_streams_decode_in_one_batch(client, server):
    prompts = ["Tell me about cats.", "Tell me about dogs.", "What is rain?", "Describe a forest."]
    solo = [client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": p}], max_tokens=8, temperature=0,
                                           extra_body={"ignore_eos": True}).choices[0].message.content for p in prompts]
    steps0 = metric(server.url, "shoal_engine_steps_total", model=MODEL)
    results: list[str | None] = [None] * len(prompts)
    start = threading.Barrier(len(prompts))

    def run(i: int) -> None:
        start.wait()
        stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompts[i]}], max_tokens=8,
                                                temperature=0, stream=True, extra_body={"ignore_eos": True})
        results[i] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    steps = metric(server.url, "shoal_engine_steps_total", model=MODEL) - steps0
    assert results == solo  # batching does not change greedy outputs
    assert steps < 4 * 8 * 0.75, f"{steps} forward passes for 32 tokens: the streams were not batched"


def test_metrics_exposition(server):
    status, headers, body = http("GET", f"{server.url}/metrics")
    text = body.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    for name in ("shoal_requests_total", "shoal_generation_tokens_total", "shoal_time_to_first_token_seconds_bucket",
                 "shoal_queue_waiting", "shoal_process_resident_bytes", "shoal_kv_cache_bytes"):
        assert name in text
    assert metric(server.url, "shoal_time_to_first_token_seconds_count", model=MODEL) > 0
    assert metric(server.url, "shoal_requests_total", endpoint="/v1/chat/completions", status="200") > 0


# -- the tight server: API key, no loading on demand, admission control ----------------------------


def test_api_key_required(tight):
    bad = openai.OpenAI(base_url=f"{tight.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert e.value.body["code"] == "invalid_api_key"
    status, _, _ = http("POST", f"{tight.url}/api/chat", {"model": TIGHT_MODEL})
    assert status == 401
    # Only /healthz is open; loopback clients need the key too (this server gives them no exemption).
    assert http("GET", f"{tight.url}/healthz")[0] == 200 and http("GET", f"{tight.url}/openapi.json")[0] == 401
    assert http("GET", f"{tight.url}/openapi.json", headers={"x-api-key": KEY})[0] == 200
    good = openai.OpenAI(base_url=f"{tight.url}/v1", api_key=KEY, max_retries=0)
    r = good.chat.completions.create(model=TIGHT_MODEL, messages=CHAT, max_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3


def test_no_auto_load_refuses_unloaded_models(tight):
    good = openai.OpenAI(base_url=f"{tight.url}/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError) as e:
        good.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3)
    assert e.value.body["code"] == "model_not_loaded"


def test_overload_is_429_with_retry_after(tight):
    auth = {"Authorization": f"Bearer {KEY}"}

    async def go():
        body = {"model": TIGHT_MODEL, "messages": CHAT, "max_tokens": 2000, "ignore_eos": True, "stream": True}
        async with aiohttp.ClientSession(headers=auth) as s:
            async with s.post(f"{tight.url}/v1/chat/completions", json=body) as long_run:
                await long_run.content.readline()  # it holds the only place
                async with s.post(f"{tight.url}/v1/chat/completions", json={**body, "stream": False, "max_tokens": 2}) as r:
                    return r.status, r.headers.get("Retry-After"), await r.json()

    status, retry_after, body = asyncio.run(go())
    assert status == 429 and retry_after is not None and int(retry_after) >= 1
    assert body["error"]["type"] == "rate_limit_error" and body["error"]["code"] == "rate_limit_exceeded"
    assert wait_for(lambda: metric(tight.url, "shoal_queue_running", headers=auth, model=TIGHT_MODEL) == 0, 10)


# -- a stand-in instance that is not the engine (as a remote one would be), placed slowly ----------


class EchoInstance:
    """Streams the prompt's own tokens back from the event loop, like a remote instance would."""

    max_context = 8192
    loaded_at = load_seconds = 0.0
    alive = True

    def __init__(self, name, tokenizer, card):
        self.name, self.tokenizer, self.card = name, tokenizer, card

    async def submit(self, request):
        from shoal.api.instance import GenerationStream
        from shoal.engine.generate import TokenEvent

        stream = GenerationStream(request, lambda s: None, lambda s: None)

        async def feed():
            ids = request.prompt_ids[-request.params.max_tokens:]
            for i, t in enumerate(ids):
                await asyncio.sleep(0.01)
                last = i == len(ids) - 1
                stream.push([TokenEvent(0, t, self.tokenizer.decode([t]), "length" if last else None)])

        asyncio.ensure_future(feed())
        return stream

    def queue_depth(self):
        return 0, 0

    def kv_bytes(self):
        return 0

    async def close(self):
        pass


class SlowPlacer:
    """Places "echo" after `delay` seconds (or fails to), with the bundled model's tokenizer."""

    def __init__(self, delay, fail=False):
        from shoal.api.instance import ModelCard
        from shoal.engine.loader import load_tokenizer, open_checkpoint

        ckpt = open_checkpoint(MODEL_PATH)
        self.tokenizer = load_tokenizer(ckpt)
        ckpt.close()
        self._card = ModelCard("echo", MODEL_PATH, 1, "llama", "", "none", 8192, "test", 0.0)
        self.delay, self.fail = delay, fail

    def card(self, name):
        return self._card if name == "echo" else None

    def names(self):
        return ["echo"]

    async def place(self, name):
        from shoal.api.errors import ApiError

        await asyncio.sleep(self.delay)
        if self.fail:
            raise ApiError(503, "no room for it anywhere", "server_error", None, "service_unavailable", retry_after=5)
        return EchoInstance(name, self.tokenizer, self._card)

    async def close(self):
        pass


async def _with_app(placer, body):
    """Serve the API with `placer` on a loopback port for the duration of `body(url)`."""
    from aiohttp import web

    from shoal.api.app import setup_api
    from shoal.api.service import ModelService, ServiceConfig

    app = web.Application()
    setup_api(app, ModelService(ServiceConfig(), placer=placer))
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        return await body(f"http://127.0.0.1:{port}")
    finally:
        await runner.cleanup()


def test_keepalives_while_placing_and_a_pluggable_instance(monkeypatch):
    from shoal.api import generation

    monkeypatch.setattr(generation, "STREAM_KEEPALIVE_S", 0.2)
    monkeypatch.setattr(generation, "JSON_KEEPALIVE_AFTER_S", 0.2)
    chat = {"model": "echo", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 3}

    async def body(url):
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{url}/v1/chat/completions", json={**chat, "stream": True}) as r:
                sse = await r.read()
            assert (await (await s.post(f"{url}/api/generate", json={"model": "echo", "prompt": ""})).json())["done_reason"] == "load"
            return sse

    raw = asyncio.run(_with_app(SlowPlacer(1.0), body))
    comments, events = parse_sse(raw)
    assert comments.count("keep-alive") >= 3 and events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1] if e["choices"])  # the echo came through

    async def whole(url):  # a non-streaming reply that must wait: whitespace first, then the JSON
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{url}/v1/chat/completions", json=chat) as r:
                return r.status, await r.read()

    status, raw = asyncio.run(_with_app(SlowPlacer(1.0), whole))
    assert status == 200 and raw[:1] == b" " and json.loads(raw)["usage"]["completion_tokens"] == 3


def test_placement_failure_after_the_stream_started():
    async def body(url):
        async with aiohttp.ClientSession() as s:
            chat = {"model": "echo", "messages": [{"role": "user", "content": "hi"}], "stream": True}
            async with s.post(f"{url}/v1/chat/completions", json=chat) as r:
                sse = await r.read()
            async with s.post(f"{url}/v1/chat/completions", json={**chat, "stream": False}) as r:
                return sse, r.status, r.headers.get("Retry-After"), await r.json()

    sse, status, retry_after, err = asyncio.run(_with_app(SlowPlacer(0.1, fail=True), body))
    _, events = parse_sse(sse)
    assert events[-1]["error"]["code"] == "service_unavailable"  # told in-band: the 200 had gone out
    assert status == 503 and retry_after == "5" and err["error"]["message"] == "no room for it anywhere"
