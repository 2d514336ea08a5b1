"""Fuzzing the HTTP surface of a real server: schemathesis from the app's own OpenAPI document,
then hypothesis with raw bytes, wrong types, bad UTF-8 and huge bodies. Nothing may answer 5xx
or hang, and the node must still serve a normal chat afterwards.

Generation is capped at a few tokens (--max-tokens-cap) so valid fuzzed requests stay cheap."""

from __future__ import annotations

import json
import socket
import time
from urllib.parse import urlsplit

import pytest
import schemathesis
from api_helpers import MODEL, http, needs_model, server_fixture
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

pytestmark = needs_model

server = server_fixture("--model", MODEL, "--max-tokens-cap", "3", "--max-waiting", "8")
ENDPOINTS = ["/v1/chat/completions", "/v1/completions", "/api/chat", "/api/generate", "/api/show"]
FAST = settings(deadline=None, suppress_health_check=list(HealthCheck), database=None, derandomize=True)


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection]


@pytest.mark.parametrize("mode", list(schemathesis.GenerationMode))
def test_openapi_schema_fuzz(server, mode):
    """Every operation of /openapi.json, with bodies that fit the schema and bodies that break it."""
    api = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    operations = [r.ok() for r in api.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/api/chat", "/api/generate"}
    statuses: dict[str, list[int]] = {}
    for op in operations:
        if mode == schemathesis.GenerationMode.NEGATIVE and op.method.upper() != "POST":
            continue  # nothing to break in a GET without parameters

        @given(case=op.as_strategy(generation_mode=mode))
        @settings(FAST, max_examples=15)
        def run(case):
            if mode == schemathesis.GenerationMode.POSITIVE and isinstance(case.body, dict) and "model" in case.body:
                case.body["model"] = MODEL  # a served model, so valid bodies get as far as generating
            r = case.call_and_validate(base_url=server.url, timeout=60, checks=CHECKS)
            statuses.setdefault(op.path, []).append(r.status_code)  # noqa: B023 - run() is called right here

        run()
    print(mode, {p: sorted(set(s)) for p, s in statuses.items()})


# -- raw bodies ------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
chat_fields = st.fixed_dictionaries(
    {"model": st.just(MODEL) | json_values},
    optional={
        "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "x"]) | json_values,
                                                    "content": st.text(max_size=40) | json_values}), max_size=3) | json_values,
        "max_tokens": st.integers(-5, 10**12) | json_values,
        "temperature": st.floats(-1, 5, allow_nan=False) | json_values,
        "top_p": json_values, "n": st.integers(-1, 40) | json_values, "stop": json_values, "seed": json_values,
        "stream": st.booleans() | json_values, "logprobs": json_values, "top_logprobs": json_values,
        "stream_options": json_values, "prompt": json_values, "options": json_values, "echo": json_values,
    },
)


def _check(status: int, headers: dict, body: bytes, path: str) -> None:
    assert status < 500, (status, body[:500])
    if status >= 400:
        err = json.loads(body)["error"]
        if path.startswith("/api/"):
            assert isinstance(err, str)
        else:
            assert set(err) == {"message", "type", "param", "code"}
            assert "Traceback" not in err["message"]


@given(path=st.sampled_from(ENDPOINTS), body=st.binary(max_size=300))
@settings(FAST, max_examples=60)
def test_random_bytes(server, path, body):
    _check(*http("POST", f"{server.url}{path}", body), path)


@given(path=st.sampled_from(ENDPOINTS), body=chat_fields)
@settings(FAST, max_examples=80)
def test_wrong_types(server, path, body):
    _check(*http("POST", f"{server.url}{path}", json.dumps(body).encode()), path)


def test_bad_utf8_and_deep_nesting(server):
    for path in ENDPOINTS:
        for body in (b'{"model": "\xc3\x28"}', b"\xff" * 100, b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 5000 + b"1" + b"}" * 5000):
            status, headers, raw = http("POST", f"{server.url}{path}", body)
            assert status == 400, (path, body[:20], status)
            _check(status, headers, raw, path)


def test_huge_bodies_are_refused(server):
    big = b'{"model": "' + b"a" * (20 << 20) + b'"}'
    status, _, raw = http("POST", f"{server.url}/v1/chat/completions", big)
    assert status == 413 and json.loads(raw)["error"]["code"] == "request_too_large"
    # Chunked (no Content-Length): refused while reading.
    host, port = urlsplit(server.url).hostname, urlsplit(server.url).port
    with socket.create_connection((host, port), timeout=30) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n" % (host.encode(), port))
        chunk = b"b" * (1 << 20)
        try:
            for _ in range(20):
                s.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed mid-upload
        reply = s.recv(65536)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]


def test_wrong_methods_and_paths(server):
    for method, path in [("GET", "/v1/chat/completions"), ("DELETE", "/v1/models"), ("GET", "/v1/engines"), ("PUT", "/api/chat")]:
        status, _, raw = http(method, f"{server.url}{path}")
        assert status in (404, 405), (method, path, status)
        _check(status, {}, raw, path)


def test_node_still_healthy_after_fuzzing(server):
    assert server.proc.poll() is None, server.log_tail()
    status, _, body = http("GET", f"{server.url}/v1/models")
    assert status == 200 and MODEL in [m["id"] for m in json.loads(body)["data"]]
    t0 = time.monotonic()
    status, _, body = http("POST", f"{server.url}/v1/chat/completions",
                           {"model": MODEL, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 3, "temperature": 0})
    assert status == 200 and json.loads(body)["usage"]["completion_tokens"] == 3
    assert time.monotonic() - t0 < 30
    assert "Traceback" not in server.log_tail(200_000)
