"""Every request to a cluster instance gets the scheduler's care, for real: two `shoal node`
processes on loopback, the bundled model placed as a pipeline over both, requests through the
instance routes and the OpenAI API of either node.

- Bad requests (token ids outside the vocabulary, a message without content, a chat template that
  raises, too many logprobs, a huge max_tokens) are refused alone with a 4xx and a clear message,
  while a concurrent greedy stream finishes with the single-process text and the instance stays
  ready. A hypothesis fuzz of the instance route and a schemathesis fuzz of the OpenAI routes leave
  it ready too.
- Admission: with a small KV budget, 64 concurrent streams are each served or answered 429 with
  Retry-After, never queued without bound, and the node stays healthy.
- Prefix reuse through the pipeline: a chat's second turn reports cached prompt tokens and gives
  the single-process greedy text.
- Instances behave: placing a model that runs answers with its instance, `replica` places another,
  a stopped one leaves the list for "ended", `shoal instances` and `shoal stop` work.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import NodeLauncher, NodeProc, wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shoal.catalog import CATALOG, DEFAULT_MODEL, bundled_path

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.skipif(bundled_path(CATALOG[DEFAULT_MODEL]) is None, reason="the bundled model is not installed")

CONTEXT = 512
KV_BUDGET = "32MiB"  # ~700 tokens of the bundled model's KV cache (46 KB a token)
SYSTEM = ("You are a careful assistant for a small bakery. Answer in one short sentence, politely, and never "
          "invent prices, opening hours or ingredients that you were not told about. The bakery sells bread, "
          "croissants and cakes, and it is closed on Mondays. ")
QUESTION = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is the capital of France?"}]
FAST = settings(deadline=None, suppress_health_check=list(HealthCheck), database=None, derandomize=True)


# -- helpers ---------------------------------------------------------------------------------------
def call(node: NodeProc, method: str, path: str, body: Any = None, timeout_s: float = 120.0) -> tuple[int, Any, dict]:
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(node.url + path, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            raw = r.read()
            ctype = r.headers.get("Content-Type", "")
            return r.status, ([json.loads(x) for x in raw.splitlines()] if "ndjson" in ctype else json.loads(raw)), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}"), dict(e.headers)


def listing(node: NodeProc) -> dict[str, Any]:
    return call(node, "GET", "/v1/instances")[1]


def wait_ready(node: NodeProc, iid: str) -> dict[str, Any]:
    def ready() -> bool:
        got = listing(node)
        assert iid not in [i["id"] for i in got["ended"]], got["ended"]
        return next(i for i in got["instances"] if i["id"] == iid)["status"] == "ready"

    wait_for(ready, 240, interval_s=0.3, what=f"instance {iid} ready")
    return next(i for i in listing(node)["instances"] if i["id"] == iid)


def single_process_tokens(prompt: list[int], max_tokens: int) -> list[int]:
    from shoal.engine.generate import stream_generate
    from shoal.engine.loader import load_model
    from shoal.engine.sampler import SamplingParams

    lm = load_model(DEFAULT_MODEL)
    params = SamplingParams(max_tokens=max_tokens)
    return [ev.token for ev, _ in stream_generate(lm.model, lm.tokenizer, prompt, params, CONTEXT) if ev.token is not None]


def chat_ids(messages: list[dict[str, str]]) -> list[int]:
    from shoal.engine.loader import load_model

    return load_model(DEFAULT_MODEL).tokenizer.encode_chat(messages)


def decode(ids: list[int]) -> str:
    from shoal.engine.loader import load_model

    return load_model(DEFAULT_MODEL).tokenizer.decode(ids)


def two_node_instance(nl: NodeLauncher, b_extra: list[str], a_extra: tuple[str, ...] = (),
                      strategy: str = "pipeline", **placement: str) -> tuple[NodeProc, NodeProc, dict]:
    """Nodes a (numba, or as `a_extra` says) and b (started with `b_extra`, e.g. another --device),
    and the bundled model placed over both (a pipeline, or `strategy`, with any other `placement`
    fields); checks from the runners' logs where each rank computes."""
    a = nl.start("a", extra=list(a_extra))
    b = nl.start("b", peers=[a], extra=b_extra)
    wait_for(lambda: all(len([x for x in n.cluster()["nodes"] if x["status"] == "up"]) == 2 for n in (a, b)), 30,
             what="two nodes up")
    status, out, _ = call(a, "POST", "/v1/instances", {"model": DEFAULT_MODEL, "strategy": strategy, "nodes": ["a", "b"],
                                                        "context": CONTEXT, **placement})
    assert status == 202, out
    inst = wait_ready(a, out["instance"]["id"])
    assert [s["node_name"] for s in inst["shards"]] == ["a", "b"]
    device = {n: x[x.index("--device") + 1] if "--device" in x else "cpu" for n, x in (("a", a_extra), ("b", b_extra))}
    logs = {n: "".join(p.read_text() for p in (nl.root / n / "runners").glob("*.log")) for n in "ab"}
    assert all(f"on {device[n]}" in logs[n] for n in "ab"), logs
    return a, b, inst


# -- fixtures --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory, cached_profile: Path):
    """Nodes a (the entry, with a small KV budget) and b, and the bundled model as a pipeline over both.
    a computes with the numba engine, b with the torch backend (`--device torch-cpu`): every test
    of this module runs through a pipeline of two devices, and its greedy text must equal the
    single-process run's."""
    nl = NodeLauncher(tmp_path_factory.mktemp("pipeline2"), cached_profile)
    try:
        yield two_node_instance(nl, ["--device", "torch-cpu"], ("--kv-budget", KV_BUDGET))
    finally:
        nl.close()


@pytest.fixture(scope="module")
def reference() -> tuple[list[int], str]:
    ids = chat_ids(QUESTION)
    return ids, decode(single_process_tokens(ids, 24))


def stream_chat(node: NodeProc, messages: list[dict[str, str]], max_tokens: int) -> tuple[str, Any]:
    """A greedy streaming chat through the official client: (text, the usage chunk)."""
    client = openai.OpenAI(base_url=node.url + "/v1", api_key="none", timeout=300, max_retries=0)
    text, usage = "", None
    for chunk in client.chat.completions.create(model=DEFAULT_MODEL, messages=messages, max_tokens=max_tokens,
                                                temperature=0, stream=True, stream_options={"include_usage": True}):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage is not None:
            usage = chunk.usage
    return text, usage


def assert_ready_and_serving(a: NodeProc, b: NodeProc, iid: str) -> None:
    assert a.proc.poll() is None and b.proc.poll() is None
    inst = next(i for i in listing(b)["instances"] if i["id"] == iid)
    assert inst["status"] == "ready", inst
    status, out, _ = call(b, "POST", f"/v1/instances/{iid}/generate", {"prompt_ids": [504, 3575, 282], "params": {"max_tokens": 3}})
    assert status == 200 and not [x for x in out if "error" in x] and len(out) >= 1, out


# -- failure isolation ------------------------------------------------------------------------------
def test_bad_requests_fail_alone_while_a_stream_finishes(pipeline, reference) -> None:
    a, b, inst = pipeline
    iid = inst["id"]
    _, want = reference
    result: dict[str, Any] = {}
    started = threading.Event()

    def greedy() -> None:
        client = openai.OpenAI(base_url=b.url + "/v1", api_key="none", timeout=300, max_retries=0)
        text = ""
        for chunk in client.chat.completions.create(model=DEFAULT_MODEL, messages=QUESTION, max_tokens=24, temperature=0,
                                                    stream=True):
            started.set()
            text += (chunk.choices[0].delta.content or "") if chunk.choices else ""
        result["text"] = text

    t = threading.Thread(target=greedy)
    t.start()
    assert started.wait(120)
    generate = f"/v1/instances/{iid}/generate"
    bad = [  # (node, body, the status, words the message must hold)
        (b, {"prompt_ids": [999999999]}, 400, "outside the model's vocabulary"),
        (a, {"prompt_ids": [1, 2, -5]}, 400, "outside the model's vocabulary"),
        (b, {"messages": [{"role": "user"}]}, 400, "content"),
        (b, {"prompt_ids": [1, 2, 3], "params": {"logprobs": 50}}, 400, "logprobs"),
        (a, {"prompt_ids": [1, 2, 3], "params": {"max_tokens": 10_000_000}}, 400, "max_tokens"),
        (b, {"prompt_ids": [1, 2, 3], "params": {"max_tokens": 5000}}, 400, "context"),
        (b, {"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}, 400, "exactly one"),
        (b, b"{not json", 400, "invalid"),
    ]
    for node, body, status, words in bad:
        got, out, _ = call(node, "POST", generate, body)
        assert got == status and words in out["error"]["message"], (body, got, out)
    # The same through the OpenAI API of either node.
    client = openai.OpenAI(base_url=a.url + "/v1", api_key="none", timeout=120, max_retries=0)
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(model=DEFAULT_MODEL, messages=QUESTION, logprobs=True, top_logprobs=50)
    with pytest.raises(openai.BadRequestError, match="context length"):
        client.chat.completions.create(model=DEFAULT_MODEL, messages=QUESTION, max_tokens=1_000_000)
    with pytest.raises(openai.BadRequestError, match="outside the vocabulary"):
        client.completions.create(model=DEFAULT_MODEL, prompt=[999999], max_tokens=2)
    t.join(300)
    assert result.get("text") == want, result
    assert_ready_and_serving(a, b, iid)


def test_a_template_that_raises_fails_only_its_request(pipeline, tmp_path: Path) -> None:
    """A model whose chat template refuses a role: that request gets 400 from the entry runner, and
    the instance goes on serving."""
    from test_distributed import tiny_checkpoint

    a, b, _ = pipeline
    path = tiny_checkpoint(tmp_path, "llama")
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg["chat_template"] = ("{% for m in messages %}{% if m['role'] == 'robot' %}{{ raise_exception('robots may not "
                            "speak here') }}{% endif %}{{ m['role'] + ': ' + m['content'] + ' ' }}{% endfor %}")
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    status, out, _ = call(b, "POST", "/v1/instances", {"model": str(path), "strategy": "pipeline", "nodes": ["b", "a"],
                                                        "context": 64})
    assert status == 202, out
    iid = wait_ready(b, out["instance"]["id"])["id"]
    try:
        generate = f"/v1/instances/{iid}/generate"
        status, out, _ = call(a, "POST", generate, {"messages": [{"role": "robot", "content": "t5 t6"}]})
        assert status == 400 and "robots may not speak here" in out["error"]["message"], out
        status, out, _ = call(a, "POST", generate, {"messages": [{"role": "user", "content": "t5 t6"}],
                                                    "params": {"max_tokens": 4, "ignore_eos": True}})
        assert status == 200 and len([x for x in out if "token" in x]) == 4, out
    finally:
        call(b, "DELETE", f"/v1/instances/{iid}")


# -- admission ----------------------------------------------------------------------------------------
def test_admission_by_kv_budget_never_queues_without_bound(pipeline) -> None:
    a, b, inst = pipeline
    body = {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "Tell me a long story about a dragon."}],
            "max_tokens": 200, "temperature": 0, "stream": True}

    def one(i: int) -> tuple[int, str | None, int]:
        node = (a, b)[i % 2]
        req = urllib.request.Request(node.url + "/v1/chat/completions", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=600) as r:
                events = [line for line in r.read().decode().splitlines() if line.startswith("data: ")]
                assert events[-1] == "data: [DONE]" and not [e for e in events if '"error"' in e], events[-3:]
                return r.status, None, len(events)
        except urllib.error.HTTPError as e:
            err = json.loads(e.read())["error"]
            assert err["type"] == "rate_limit_error" and "busy" in err["message"], err
            return e.code, e.headers.get("Retry-After"), 0

    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        results = list(pool.map(one, range(64)))
    codes = [c for c, _, _ in results]
    print(f"64 streams against a {KV_BUDGET} KV budget: {codes.count(200)} served, {codes.count(429)} answered 429")
    assert set(codes) == {200, 429}, codes
    assert all(r is not None and int(r) >= 1 for c, r, _ in results if c == 429)
    # ~10 MB of KV each (prompt + 200 tokens): a few run, a few budgets' worth wait, the rest are told to retry.
    assert codes.count(200) <= 20, codes
    assert_ready_and_serving(a, b, inst["id"])


# -- prefix reuse ---------------------------------------------------------------------------------------
def test_prefix_reuse_through_the_pipeline(pipeline) -> None:
    a, b, _ = pipeline
    first, usage1 = stream_chat(b, QUESTION, 12)
    turn2 = [*QUESTION, {"role": "assistant", "content": first}, {"role": "user", "content": "And of Italy?"}]
    second, usage2 = stream_chat(a, turn2, 12)
    cached = usage2.prompt_tokens_details.cached_tokens
    print(f"turn 2: {usage2.prompt_tokens} prompt tokens, {cached} of them reused")
    assert cached >= len(chat_ids(QUESTION)) - 1 and cached < usage2.prompt_tokens
    assert second == decode(single_process_tokens(chat_ids(turn2), 12))


# -- fuzz -------------------------------------------------------------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
valid_params = st.fixed_dictionaries({"max_tokens": st.integers(0, 4)}, optional={
    "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1), "top_k": st.integers(0, 100), "min_p": st.floats(0, 1),
    "seed": st.integers(0, 2**63 - 1), "stop": st.lists(st.text(min_size=1, max_size=5), max_size=3),
    "ignore_eos": st.booleans(), "logprobs": st.integers(0, 20), "prompt_logprobs": st.integers(0, 20),
    "stop_token_ids": st.lists(st.integers(0, 49151), max_size=3),
})
valid_bodies = st.one_of(
    st.fixed_dictionaries({"prompt_ids": st.lists(st.integers(0, 49151), min_size=1, max_size=12), "params": valid_params}),
    st.fixed_dictionaries({"prompt": st.text(min_size=1, max_size=40), "params": valid_params}),
    st.fixed_dictionaries({"messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]),
                                                                        "content": st.text(max_size=30)}), min_size=1, max_size=3),
                           "params": valid_params}),
)
broken_bodies = st.fixed_dictionaries({}, optional={
    "prompt_ids": st.lists(st.integers(-10, 60_000), max_size=8) | json_values,
    "prompt": st.text(max_size=30) | json_values,
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", ""]) | json_values,
                                                "content": st.text(max_size=30) | json_values}), max_size=3) | json_values,
    "params": st.fixed_dictionaries({}, optional={
        "max_tokens": st.integers(-3, 3) | st.integers(0, 10**9) | json_values,
        "temperature": st.floats(-1, 3, allow_nan=False) | json_values, "top_p": json_values, "top_k": json_values,
        "seed": st.integers(-5, 2**64) | json_values, "stop": json_values, "logprobs": st.integers(-2, 30) | json_values,
        "prompt_logprobs": st.integers(-2, 30) | json_values, "stop_token_ids": json_values,
    }) | json_values,
})
generate_bodies = valid_bodies | broken_bodies


def test_fuzz_the_instance_and_openai_routes_of_a_distributed_instance(pipeline) -> None:
    a, b, inst = pipeline
    iid = inst["id"]
    statuses: list[int] = []

    @given(body=generate_bodies)
    @settings(FAST, max_examples=80)
    def instance_route(body: dict[str, Any]) -> None:
        node = (a, b)[len(statuses) % 2]
        status, out, _ = call(node, "POST", f"/v1/instances/{iid}/generate", body)
        statuses.append(status)
        assert status in (200, 400), (body, status, out)
        if status == 400:
            assert out["error"]["message"] and "Traceback" not in out["error"]["message"]
        else:
            assert not [x for x in out if "error" in x], (body, out)

    instance_route()
    print("instance route:", {s: statuses.count(s) for s in set(statuses)})
    assert 200 in statuses and 400 in statuses

    import schemathesis
    from schemathesis.checks import not_a_server_error

    api = schemathesis.openapi.from_url(f"{b.url}/openapi.json")
    for op in (r.ok() for r in api.get_all_operations()):
        if op.path not in ("/v1/chat/completions", "/v1/completions"):
            continue

        @given(case=op.as_strategy(generation_mode=schemathesis.GenerationMode.POSITIVE))
        @settings(FAST, max_examples=12)
        def openai_route(case) -> None:
            if isinstance(case.body, dict):
                case.body["model"] = DEFAULT_MODEL
                case.body["max_tokens"] = min(3, case.body.get("max_tokens") or 3) if isinstance(case.body.get("max_tokens"), int) else 3
                case.body.pop("max_completion_tokens", None)
            case.call_and_validate(base_url=b.url, timeout=120, checks=[not_a_server_error])

        openai_route()
    assert_ready_and_serving(a, b, iid)
    assert "Traceback" not in a.log() and "Traceback" not in b.log()


# -- instances that behave ----------------------------------------------------------------------------
def test_placing_again_answers_with_the_running_instance_and_ended_ones_leave_the_list(pipeline) -> None:
    a, b, inst = pipeline
    status, out, _ = call(b, "POST", "/v1/instances", {"model": DEFAULT_MODEL})
    assert status == 200 and out["instance"]["id"] == inst["id"] and out["created"] is False, out
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cli = [sys.executable, "-m", "shoal.cli"]
    placed = subprocess.run([*cli, "place", DEFAULT_MODEL, "--cluster", b.url, "--replica", "--nodes", "1", "--context", "128",
                             "--json"], capture_output=True, text=True, timeout=300, env=env)
    assert placed.returncode == 0, placed.stderr
    replica = json.loads(placed.stdout)
    assert replica["id"] != inst["id"] and replica["status"] == "ready"
    table = subprocess.run([*cli, "instances", "--cluster", a.url], capture_output=True, text=True, timeout=60, env=env)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:4] == ["INSTANCE", "MODEL", "STATUS", "STRATEGY"]
    assert any(line.startswith(inst["id"]) and "ready" in line and "a 0-" in line for line in lines), table.stdout
    assert any(line.startswith(replica["id"]) for line in lines), table.stdout
    stopped = subprocess.run([*cli, "stop", replica["id"], "--cluster", a.url], capture_output=True, text=True, timeout=120,
                             env=env)
    assert stopped.returncode == 0 and "stopped" in stopped.stdout, stopped.stderr
    got = listing(a)
    assert [i["id"] for i in got["instances"]] == [inst["id"]]
    ended = next(i for i in got["ended"] if i["id"] == replica["id"])
    assert ended["status"] == "stopped" and ended["ended_at"] >= ended["created_at"]
    status, out, _ = call(a, "DELETE", f"/v1/instances/{replica['id']}")  # stopping it again changes nothing
    assert status == 200 and out["status"] == "stopped"
    after = subprocess.run([*cli, "instances", "--cluster", b.url], capture_output=True, text=True, timeout=60, env=env)
    assert "recently ended:" in after.stdout and replica["id"] in after.stdout.split("recently ended:")[1]
    missing = subprocess.run([*cli, "stop", "no-such-model", "--cluster", a.url], capture_output=True, text=True, timeout=60,
                             env=env)
    assert missing.returncode == 1 and "no running instance" in missing.stderr
    status_out = subprocess.run([*cli, "status", "--cluster", a.url], capture_output=True, text=True, timeout=60, env=env)
    assert status_out.returncode == 0 and inst["id"] in status_out.stdout and "{" not in status_out.stdout
    assert_ready_and_serving(a, b, inst["id"])


# -- what the network may name --------------------------------------------------------------------
def test_model_references_from_the_network_reveal_nothing_of_the_file_system(pipeline) -> None:
    """A model named over the network is a catalog id or a file in the nodes' models folder. Any
    other path — a file that exists, a secret one, a folder, one that does not exist, a way out
    with `..` or `~` — gets the same 404 through every route that takes a model, and the node keeps
    serving. A runner's log is its owner's alone (0600)."""
    a, b, inst = pipeline
    refs = ["/etc/shadow", "/etc/passwd", "/etc", "/no/such/model.gguf", "../../../../etc/passwd", "~/.bashrc",
            str(a.home / "cluster.key")]
    answers = set()
    for ref in refs:
        for node, method, path, body in [
            (a, "POST", "/v1/instances", {"model": ref}),
            (b, "POST", "/v1/chat/completions", {"model": ref, "messages": [{"role": "user", "content": "hi"}]}),
            (a, "GET", "/v1/placement?" + urllib.parse.urlencode({"model": ref}), None),
        ]:
            status, out, _ = call(node, method, path, body)
            message = out["error"]["message"] if isinstance(out.get("error"), dict) else str(out)
            assert status == 404, (ref, path, status, out)
            for leak in ("GGUF", "magic", "ermission", "directory", "No such", "Errno"):
                assert leak not in message, (ref, message)
            answers.add((path.split("?")[0], message.replace(repr(ref), "<ref>").replace(ref, "<ref>")))
    assert len(answers) == 3, answers  # one answer per route, whatever the path was
    assert_ready_and_serving(a, b, inst["id"])
    logs = [p for n in (a, b) for p in (n.home / "runners").glob("*.log")]
    assert logs and all(p.stat().st_mode & 0o777 == 0o600 for p in logs), [(p, oct(p.stat().st_mode)) for p in logs]
