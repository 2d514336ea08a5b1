"""Structured output by grammar-constrained decoding, for real: the engine's batch with
constrained and free rows side by side, the OpenAI (`response_format`) and Ollama (`format`)
routes through their official clients on the bundled model, and a request on a cluster instance
whose entry runner compiles the constraint itself."""

from __future__ import annotations

import json
import threading

import jsonschema
import ollama
import openai
import pytest
from api_helpers import MODEL, http, metric, needs_model, server_fixture
from conftest import wait_for

from shoal.engine.grammar import Constraint, InvalidConstraint, check
from shoal.engine.sampler import SamplingParams
from shoal.runner.contract import COMMAND, Sampling, Submit


def _object(properties: dict, required: list[str] | None = None) -> dict:
    return {"type": "object", "properties": properties, "required": list(properties) if required is None else required,
            "additionalProperties": False}


# Five schemas, one feature each, with a prompt the model answers them for.
SCHEMAS = {
    "person": (_object({"name": {"type": "string"}, "address": _object({
        "street": {"type": "string"}, "city": {"type": "string"},
        "geo": _object({"lat": {"type": "number"}, "lon": {"type": "number"}})})}),
        "Give me an example person with an address as JSON."),
    "tshirt": (_object({"color": {"type": "string", "enum": ["red", "green", "blue"]}, "size": {"enum": ["S", "M", "L", "XL"]}}),
               "Describe a t-shirt as JSON."),
    "recipe": (_object({"ingredients": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 4},
                        "steps": {"type": "array", "items": {"type": "integer"}, "maxItems": 5}}),
               "Give me a pancake recipe as JSON."),
    "patient": (_object({"age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "temperature": {"type": "number", "minimum": 35, "maximum": 42},
                         "visits": {"type": "integer", "exclusiveMinimum": 0}}),
                "Give me an example patient record as JSON."),
    "task": (_object({"id": {"type": "integer"}, "title": {"type": "string", "maxLength": 60}, "done": {"type": "boolean"},
                      "note": {"type": "string", "maxLength": 60}}, required=["id", "title", "done"]),
             "Give me an example task from a to-do list as JSON."),
}
FREE_PROMPTS = ["Tell me about cats.", "What is rain?"]
DOG = "Give the name and age of a dog as JSON."  # for any JSON object


# -- no model --------------------------------------------------------------------------------------
def test_unusable_schemas_and_grammars_are_refused_with_the_reason():
    for schema, reason in [({"type": "foo"}, "foo"), ({"properties": 5}, "properties"),
                           ({"$ref": "#/$defs/missing"}, "missing"),
                           ({"type": "integer", "minimum": 5, "maximum": 1}, "minimum"),
                           ({"type": "array", "uniqueItems": True}, "uniqueItems")]:
        with pytest.raises(InvalidConstraint, match=reason):
            check(Constraint.json_schema(schema))
    check(Constraint.json_schema({"type": "array", "uniqueItems": True}, strict=False))  # ignored when not strict
    for bad in [Constraint("json_schema", "not json"), Constraint("lark", "start: undefined_rule")]:
        with pytest.raises(InvalidConstraint):
            check(bad)
    check(Constraint("lark", 'start: "<call>" %json {"type": "object"} "</call>"'))


def test_the_constraint_travels_in_the_runner_contract_as_text():
    params = SamplingParams(max_tokens=9, constraint=Constraint.json_schema(SCHEMAS["tshirt"][0], strict=False))
    line = Submit(rid="r1", prompt_ids=[1, 2], params=Sampling.of(params)).model_dump_json()
    assert json.loads(line)["params"]["constraint"]["kind"] == "json_schema"
    assert COMMAND.validate_json(line).params.params() == params
    assert Sampling.of(SamplingParams()).params() == SamplingParams()


# -- the engine ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lm():
    from shoal.engine.loader import load_model

    return load_model(MODEL)


def _chat(lm, text: str) -> list[int]:
    return lm.tokenizer.encode_chat([{"role": "user", "content": text}])


def _run(gen, jobs: list[tuple[list[int], SamplingParams]], resumed: list[int] | None = None):
    uids = [gen.add(ids, p, resumed) for ids, p in jobs]
    tokens = {u: [] for u in uids}
    text = {u: "" for u in uids}
    finish = {}
    while gen.has_work:
        for ev in gen.step():
            if ev.token is not None:
                tokens[ev.uid].append(ev.token)
            text[ev.uid] += ev.text
            if ev.finish_reason:
                finish[ev.uid] = ev.finish_reason
    return [(tokens[u], text[u], finish[u]) for u in uids]


@needs_model
def test_constrained_rows_beside_free_rows_in_one_batch(lm):
    """Free rows decode exactly as they do alone; constrained rows produce valid JSON and finish
    ("stop") when their grammar is complete; a constrained sequence moved elsewhere (resumed)
    goes on exactly as it would have."""
    from shoal.engine.generate import BatchGenerator

    def gen():
        return BatchGenerator(lm.model, lm.tokenizer, lm.args.max_context)

    free = SamplingParams(max_tokens=24)
    alone = [_run(gen(), [(_chat(lm, p), free)])[0] for p in FREE_PROMPTS]
    names = ["tshirt", "patient"]
    constrained = [(_chat(lm, SCHEMAS[n][1]), SamplingParams(max_tokens=120, constraint=Constraint.json_schema(SCHEMAS[n][0])))
                   for n in names]
    jobs = [(_chat(lm, p), free) for p in FREE_PROMPTS] + constrained + [
        (_chat(lm, DOG), SamplingParams(max_tokens=120, constraint=Constraint("json_object")))]
    out = _run(gen(), jobs)
    assert out[: len(FREE_PROMPTS)] == alone
    for name, (tokens, text, finish) in zip(names, out[len(FREE_PROMPTS) : -1]):
        assert finish == "stop" and tokens[-1] not in lm.tokenizer.eos_token_ids  # the grammar ended it
        jsonschema.validate(json.loads(text), SCHEMAS[name][0])
    assert isinstance(json.loads(out[-1][1]), dict)

    ids, params = constrained[1]
    tokens = out[len(FREE_PROMPTS) + 1][0]
    k = len(tokens) // 2
    assert _run(gen(), [(ids, params)], resumed=tokens[:k])[0][0] == tokens[k:]


# -- the HTTP routes -------------------------------------------------------------------------------
server = server_fixture()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)


def _schema_format(name: str) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name][0], "strict": True}}


def _ask(client, prompt: str, **kw):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}], temperature=0, **kw)


@needs_model
def test_openai_response_format_json_schema(client):
    for name, (schema, prompt) in SCHEMAS.items():
        r = _ask(client, prompt, max_tokens=200, response_format=_schema_format(name))
        assert r.choices[0].finish_reason == "stop", (name, r.choices[0].message.content)
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    # Streamed, the same text.
    whole = _ask(client, SCHEMAS["tshirt"][1], max_tokens=200, response_format=_schema_format("tshirt"))
    chunks = list(_ask(client, SCHEMAS["tshirt"][1], max_tokens=200, response_format=_schema_format("tshirt"), stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content


@needs_model
def test_openai_json_object(client, server):
    r = _ask(client, DOG, max_tokens=200, response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    # Logprobs of a masked row: where the grammar leaves fewer tokens than asked, only possible ones.
    status, _, raw = http("POST", f"{server.url}/v1/chat/completions", {
        "model": MODEL, "messages": [{"role": "user", "content": SCHEMAS["tshirt"][1]}], "max_tokens": 60, "temperature": 0,
        "logprobs": True, "top_logprobs": 5, "response_format": _schema_format("tshirt")})
    assert status == 200 and b"Infinity" not in raw
    content = json.loads(raw)["choices"][0]["logprobs"]["content"]
    assert any(len(c["top_logprobs"]) < 5 for c in content) and all(c["logprob"] <= 0 for c in content)


@needs_model
def test_free_requests_in_the_same_batch_are_unchanged(client, server):
    """Constrained and free requests sent together decode in one batch; the free ones give exactly
    their greedy text alone."""
    reference = [_ask(client, p, max_tokens=24).choices[0].message.content for p in FREE_PROMPTS]
    names = list(SCHEMAS)[:3]
    steps0 = metric(server.url, "shoal_engine_steps_total", model=MODEL)
    results: list = [None] * (len(FREE_PROMPTS) + len(names))
    start = threading.Barrier(len(results))

    def run(i: int) -> None:
        start.wait()
        if i < len(FREE_PROMPTS):
            results[i] = _ask(client, FREE_PROMPTS[i], max_tokens=24)
        else:
            name = names[i - len(FREE_PROMPTS)]
            results[i] = _ask(client, SCHEMAS[name][1], max_tokens=200, response_format=_schema_format(name))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(results))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    steps = metric(server.url, "shoal_engine_steps_total", model=MODEL) - steps0
    assert [r.choices[0].message.content for r in results[: len(FREE_PROMPTS)]] == reference
    for name, r in zip(names, results[len(FREE_PROMPTS) :]):
        jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMAS[name][0])
    generated = sum(r.usage.completion_tokens for r in results)
    assert steps < 0.75 * generated, f"{steps} forward passes for {generated} tokens: the requests were not batched"


@needs_model
def test_an_invalid_schema_is_a_400_and_the_server_keeps_serving(client, server):
    bad = {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "object", "properties": {"a": {"type": "foo"}}}}}
    with pytest.raises(openai.BadRequestError) as e:
        _ask(client, "Hi", max_tokens=8, response_format=bad)
    assert e.value.body["param"] == "response_format" and "foo" in e.value.body["message"]
    for fmt in [{"type": "json_schema"}, {"type": "yaml"}]:
        with pytest.raises(openai.BadRequestError):
            _ask(client, "Hi", max_tokens=8, response_format=fmt)
    status, _, body = http("POST", f"{server.url}/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                                                              "format": {"type": "object", "properties": 5}, "stream": False})
    assert status == 400 and "properties" in json.loads(body)["error"]
    assert _ask(client, "Hi", max_tokens=4).choices[0].message.content


@needs_model
def test_ollama_format_json_and_schema(server):
    c = ollama.Client(host=server.url, timeout=300)
    r = c.chat(model=MODEL, messages=[{"role": "user", "content": DOG}], format="json",
               options={"temperature": 0, "num_predict": 200})
    assert r.done_reason == "stop" and isinstance(json.loads(r.message.content), dict)
    schema, prompt = SCHEMAS["patient"]
    r = c.chat(model=MODEL, messages=[{"role": "user", "content": prompt}], format=schema, options={"temperature": 0, "num_predict": 200})
    jsonschema.validate(json.loads(r.message.content), schema)
    parts = list(c.generate(model=MODEL, prompt=SCHEMAS["tshirt"][1], format=SCHEMAS["tshirt"][0], stream=True,
                            options={"temperature": 0, "num_predict": 200}))
    jsonschema.validate(json.loads("".join(p.response for p in parts)), SCHEMAS["tshirt"][0])


# -- a cluster instance ----------------------------------------------------------------------------
def _call(node, method: str, path: str, body: dict | None = None, timeout_s: float = 300) -> tuple[int, dict]:
    status, _, raw = http(method, node.url + path, body, timeout=timeout_s)
    return status, json.loads(raw or b"{}")


@needs_model
def test_a_cluster_instance_constrains_in_its_entry_runner(launcher, client):
    """A two-stage pipeline asked through the node that is not its entry: the constraint travels
    as text in the runner contract, the entry's scheduler builds the matcher, and the output is
    what the single-process server gives."""
    name = "recipe"
    expected = _ask(client, SCHEMAS[name][1], max_tokens=200, response_format=_schema_format(name)).choices[0].message.content
    nodes = launcher.start_cluster(["a", "b"])
    status, placed = _call(nodes[0], "POST", "/v1/instances", {"model": MODEL, "strategy": "pipeline", "nodes": 2, "context": 512})
    assert status == 202, placed
    iid = placed["instance"]["id"]

    def ready() -> dict:
        listing = _call(nodes[0], "GET", "/v1/instances")[1]
        return next((i for i in listing["instances"] if i["id"] == iid and i["status"] == "ready"), {})

    wait_for(lambda: bool(ready()), 240, interval_s=0.3, what="the instance is ready")
    other = next(n for n in nodes if n.node_id != ready()["entry"])
    try:
        body = {"model": MODEL, "messages": [{"role": "user", "content": SCHEMAS[name][1]}], "max_tokens": 200, "temperature": 0,
                "response_format": _schema_format(name)}
        status, reply = _call(other, "POST", "/v1/chat/completions", body)
        assert status == 200, reply
        assert reply["choices"][0]["message"]["content"] == expected
        jsonschema.validate(json.loads(expected), SCHEMAS[name][0])
        bad = {**body, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}}
        status, reply = _call(other, "POST", "/v1/chat/completions", bad)
        assert status == 400 and reply["error"]["param"] == "response_format"
        # Past the API's own check, straight to the entry: its scheduler refuses the request alone.
        params = {"max_tokens": 8, "constraint": {"kind": "json_schema", "text": json.dumps({"type": "foo"})}}
        status, _, raw = http("POST", f"{other.url}/v1/instances/{iid}/generate", {"prompt_ids": [1, 2, 3], "params": params})
        assert status == 400 and b"foo" in raw and b"invalid_constraint" in raw
    finally:
        _call(nodes[0], "DELETE", f"/v1/instances/{iid}")
