"""The front door (api/guard.py), for real: `shoal node` processes, and clients on loopback and on
another address of this machine. A connection to the machine's own non-loopback address comes
from that address, not from loopback, so it is a client "from another machine" as far as the
node can tell (tests/test_netns.py does the same from a namespace of its own).

- Without a key, from another address, every route of the app (enumerated from the app itself, so
  a new route cannot slip through) answers 401 but /healthz; with the key none is refused, and the
  official openai and ollama clients chat.
- A Host that is not the node's is 421, a cross-site text/plain or form POST is 415, a POST from
  another Origin is 403, and no answer carries a CORS grant.
- Loopback needs no key, unless the node is told otherwise; the request log needs it from loopback
  too and shows no text unless asked.
- The login link sets an HttpOnly, SameSite=Strict cookie that is not the key; the dashboard then
  opens with it. A key the node made itself is printed on that start only, and by `shoal key`.
"""

from __future__ import annotations

import argparse
import http.cookies
import json
import re
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import TEST_API_KEY, TEST_KEY, NodeLauncher, NodeProc, wait_for

from shoal.catalog import CATALOG, DEFAULT_MODEL, bundled_path

needs_model = pytest.mark.skipif(bundled_path(CATALOG[DEFAULT_MODEL]) is None, reason="the bundled model is not installed")
AUTH = {"Authorization": f"Bearer {TEST_API_KEY}"}
MARKER = "PELICAN-4921"  # a prompt's secret, which the request log must not show unasked
REFUSALS = {401, 403, 415, 421}  # the front door's answers


# -- helpers ---------------------------------------------------------------------------------------
class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any) -> None:
        return None


_opener = urllib.request.build_opener(NoRedirect)


def request(url: str, method: str = "GET", body: bytes | dict | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) for any status; a dict body is sent as JSON."""
    h = dict(headers or {})
    if isinstance(body, dict):
        body = json.dumps(body).encode()
        h.setdefault("Content-Type", "application/json")
    req = urllib.request.Request(url, data=body, method=method, headers=h)
    try:
        with _opener.open(req, timeout=120) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def other_address() -> str:
    """An IPv4 address of this machine that is not loopback (skip if it has none)."""
    import psutil

    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                return a.address
    pytest.skip("this machine has no address but loopback")


def app_routes(home: Path) -> list[tuple[str, str]]:
    """(method, path pattern) of every route a node's app has, from the app that assembly builds."""
    from shoal.assembly import build
    from shoal.config import NodeConfig

    args = argparse.Namespace(home=str(home), cluster_key=TEST_KEY, api_key=TEST_API_KEY, no_discovery=True)
    node = build(NodeConfig.from_args(args, environ={}))
    routes = sorted({(r.method, r.resource.canonical) for r in node.app.router.routes() if r.resource is not None})
    known = {"/", "/static/{name}", "/v1/models", "/v1/chat/completions", "/v1/completions", "/api/chat", "/api/tags",
             "/v1/instances", "/v1/instances/{id}", "/v1/instances/{id}/requests", "/v1/placement", "/v1/cluster",
             "/metrics", "/v1/nodes/{node}/drain", "/healthz", "/openapi.json", "/login", "/peer/hello"}
    assert known <= {p for _, p in routes}, known - {p for _, p in routes}
    return routes


def concrete(pattern: str) -> str:
    """A path that the pattern matches: the dashboard's entry module, an id that names nothing."""
    return re.sub(r"\{[^}]*\}", "x", pattern.replace("{name}", "main.js"))


def start_wildcard(launcher: NodeLauncher, name: str, extra: list[str] | None = None) -> tuple[NodeProc, str]:
    """A node listening on every address; (node, its loopback URL). The launcher's own readiness
    check would ask 0.0.0.0, a Host the node refuses."""
    node = launcher.start(name, host="0.0.0.0", extra=extra or [], wait=False)
    local = f"http://127.0.0.1:{node.port}"

    def up() -> bool:
        assert node.proc is not None and node.proc.poll() is None, node.log()
        return request(local + "/healthz")[0] == 200

    wait_for(up, 60, what=f"{name} answers")
    return node, local


# -- fixtures --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def launcher(tmp_path_factory: pytest.TempPathFactory, cached_profile: Path) -> Iterator[NodeLauncher]:
    nl = NodeLauncher(tmp_path_factory.mktemp("door"), cached_profile)
    try:
        yield nl
    finally:
        nl.close()


@pytest.fixture(scope="module")
def door(launcher: NodeLauncher) -> tuple[NodeProc, str, str]:
    """A node on every address with the default exemption: (node, loopback URL, other-address URL)."""
    address = other_address()
    node, local = start_wildcard(launcher, "door")
    return node, local, f"http://{address}:{node.port}"


@pytest.fixture(scope="module")
def strict(launcher: NodeLauncher) -> NodeProc:
    """A loopback node that asks loopback clients for the key too, and answers to one more name."""
    return launcher.start("strict", extra=["--no-loopback-exemption", "--allowed-host", "shoal.test"])


@pytest.fixture(scope="module")
def routes(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, str]]:
    return app_routes(tmp_path_factory.mktemp("routes"))


# -- from another address --------------------------------------------------------------------------
def test_every_route_needs_the_key_from_another_address(door: tuple[NodeProc, str, str], routes: list[tuple[str, str]]) -> None:
    _, _, remote = door
    for method, pattern in [*routes, ("GET", "/no/such/route"), ("POST", "/v1/nope")]:
        path = concrete(pattern)
        body = {} if method in ("POST", "PUT", "PATCH", "DELETE") else None
        status, headers, raw = request(remote + path, method, body)
        if pattern == "/healthz":
            assert status == 200, (method, path, status)
            continue
        if pattern.startswith("/peer/"):  # unsigned: the peer middleware's refusal, not the front door's
            assert status in (401, 403), (method, path, status)
            continue
        assert status == 401, (method, path, status, raw[:200])
        if method == "HEAD":
            continue
        if path.startswith("/api/"):
            assert isinstance(json.loads(raw)["error"], str), raw  # Ollama's shape
        elif path.startswith("/v1/messages"):
            assert json.loads(raw)["error"]["type"] == "authentication_error", (path, raw)  # Anthropic's shape
        elif method == "GET" and path in ("/", "/index.html", "/login"):
            assert headers["Content-Type"].startswith("text/html") and b'action="/login"' in raw
        else:
            assert json.loads(raw)["error"]["code"] == "invalid_api_key", (path, raw)
        assert "Access-Control-Allow-Origin" not in headers


def test_with_the_key_no_route_is_refused(door: tuple[NodeProc, str, str], routes: list[tuple[str, str]]) -> None:
    _, _, remote = door
    for method, pattern in routes:
        if pattern.startswith("/peer/") or pattern == "/login":
            continue  # signed by peers; the login takes the key in its body (below)
        body = {} if method in ("POST", "PUT", "PATCH", "DELETE") else None
        status, _, raw = request(remote + concrete(pattern), method, body, AUTH)
        assert status not in REFUSALS, (method, pattern, status, raw[:200])
    # Anthropic clients send it as x-api-key.
    assert request(remote + "/v1/cluster", headers={"x-api-key": TEST_API_KEY})[0] == 200
    assert request(remote + "/v1/cluster", headers={"Authorization": "Bearer not-the-key-0123456789"})[0] == 401


@needs_model
def test_official_clients_chat_with_the_key(door: tuple[NodeProc, str, str]) -> None:
    import ollama
    import openai

    _, _, remote = door
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=remote + "/v1", api_key="not-the-key", max_retries=0).models.list()
    client = openai.OpenAI(base_url=remote + "/v1", api_key=TEST_API_KEY, timeout=300, max_retries=0)
    reply = client.chat.completions.create(model=DEFAULT_MODEL, max_tokens=4, temperature=0,
                                           messages=[{"role": "user", "content": f"Remember {MARKER}."}])
    assert reply.usage.completion_tokens == 4

    with pytest.raises(ollama.ResponseError) as e:
        ollama.Client(host=remote).list()
    assert e.value.status_code == 401
    oc = ollama.Client(host=remote, headers=AUTH, timeout=300)
    assert f"{DEFAULT_MODEL}:latest" in [m.model for m in oc.list().models]
    out = oc.chat(model=DEFAULT_MODEL, messages=[{"role": "user", "content": "Hello"}], options={"num_predict": 3, "temperature": 0})
    assert out.message.content and out.done


@needs_model
def test_request_log_needs_the_key_from_loopback_and_hides_text(door: tuple[NodeProc, str, str]) -> None:
    _, local, _ = door
    chat = {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3}
    assert request(local + "/v1/chat/completions", "POST", chat)[0] == 200  # the model is placed, if it was not
    instances = json.loads(request(local + "/v1/instances")[2])["instances"]
    iid = next(i["id"] for i in instances if i["model"] == DEFAULT_MODEL)
    # A request given as text (the OpenAI routes hand the entry token ids), so the entry keeps the text itself.
    turn = {"messages": [{"role": "user", "content": f"My code is {MARKER}."}], "params": {"max_tokens": 3}}
    assert request(f"{local}/v1/instances/{iid}/generate", "POST", turn)[0] == 200
    path = f"{local}/v1/instances/{iid}/requests"
    status, _, raw = request(path)  # loopback, which needs no key elsewhere
    assert status == 401 and "admin" in json.loads(raw)["error"]["message"]
    status, _, raw = request(path, headers=AUTH)
    assert status == 200
    kept = json.loads(raw)["requests"]
    assert kept and all(r["state"] == "done" and r["prompt_tokens"] > 0 and r["output_tokens"] > 0 for r in kept)
    assert MARKER.encode() not in raw and all("prompt_ids" not in r and "output" not in r for r in kept), kept
    status, _, raw = request(path + "?text=1", headers=AUTH)
    assert status == 200 and MARKER.encode() in raw
    assert all(len(r["prompt_ids"]) == r["prompt_tokens"] for r in json.loads(raw)["requests"])


# -- what a browser can be made to send ------------------------------------------------------------
def test_host_must_name_the_node(door: tuple[NodeProc, str, str], strict: NodeProc) -> None:
    node, local, remote = door
    for host in ("evil.example", f"evil.example:{node.port}", "0.0.0.0", f"{socket.gethostname()}.evil.example"):
        status, _, raw = request(local + "/v1/models", headers={"Host": host, **AUTH})
        assert status == 421 and "--allowed-host" in json.loads(raw)["error"]["message"], (host, status)
    assert request(local + "/api/tags", headers={"Host": "evil.example"})[0] == 421
    assert request(local + "/healthz", headers={"Host": "evil.example"})[0] == 421
    for host in ("localhost", f"LocalHost:{node.port}", "127.0.0.1", f"[::1]:{node.port}", socket.gethostname(),
                 f"{socket.gethostname()}.local", remote.split("//")[1]):
        assert request(local + "/v1/models", headers={"Host": host})[0] == 200, host
    assert request(strict.url + "/v1/models", headers={"Host": "shoal.test", **AUTH})[0] == 200  # --allowed-host
    assert request(strict.url + "/v1/models", headers={"Host": "other.test", **AUTH})[0] == 421


def test_cross_site_posts_are_refused(door: tuple[NodeProc, str, str]) -> None:
    """What a page elsewhere can send without asking the browser first: a form or text/plain body
    (415), or anything with its own Origin (403). Loopback, where no key is needed."""
    node, local, _ = door
    chat = json.dumps({"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}).encode()
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        headers = {"Content-Type": ctype} if ctype else {}
        status, _, raw = request(local + "/v1/chat/completions", "POST", chat, headers)
        assert status == 415, (ctype, status)
        assert "application/json" in json.loads(raw)["error"]["message"]
    assert request(local + "/api/chat", "POST", chat, {"Content-Type": "text/plain"})[0] == 415
    for origin in ("http://evil.example", "null", f"http://127.0.0.1:{node.port + 1}", f"http://localhost:{node.port}"):
        status, _, raw = request(local + "/v1/instances", "POST", {"model": DEFAULT_MODEL}, {"Origin": origin})
        assert status == 403 and "cross-origin" in json.loads(raw)["error"]["message"], (origin, status)
    assert request(local + "/v1/nodes/door/drain", "POST", headers={"Origin": "http://evil.example"})[0] == 403
    assert request(local + "/v1/instances/x", "DELETE", headers={"Origin": "http://evil.example"})[0] == 403
    # The page's own origin passes, with JSON (then the route answers: an empty body is a 400).
    assert request(local + "/v1/chat/completions", "POST", {}, {"Origin": local})[0] == 400
    assert request(local + "/v1/chat/completions", "POST", b"{}", {"Content-Type": "application/json; charset=utf-8"})[0] == 400
    # A GET from elsewhere is answered, but nothing lets that page read it.
    status, headers, _ = request(local + "/v1/cluster", headers={"Origin": "http://evil.example"})
    assert status == 200 and not [h for h in headers if h.lower().startswith("access-control-")]
    status, headers, _ = request(local + "/v1/chat/completions", "OPTIONS",
                                 headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST",
                                          "Access-Control-Request-Headers": "content-type"})
    assert status >= 400 and not [h for h in headers if h.lower().startswith("access-control-")]


# -- loopback --------------------------------------------------------------------------------------
def test_loopback_needs_no_key_unless_told(door: tuple[NodeProc, str, str], strict: NodeProc) -> None:
    import openai

    _, local, _ = door
    assert request(local + "/v1/models")[0] == 200
    assert request(local + "/")[0] == 200
    # Local clients that must send some key (the openai client) may send any.
    assert openai.OpenAI(base_url=local + "/v1", api_key="none", max_retries=0).models.list().data
    status, _, raw = request(strict.url + "/v1/models")
    assert status == 401 and json.loads(raw)["error"]["code"] == "invalid_api_key"
    assert request(strict.url + "/api/tags")[0] == 401
    assert request(strict.url + "/v1/models", headers=AUTH)[0] == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=strict.url + "/v1", api_key="none", max_retries=0).models.list()
    assert request(strict.url + "/healthz")[0] == 200


# -- the login link --------------------------------------------------------------------------------
def test_login_link_sets_a_cookie_that_is_not_the_key(strict: NodeProc) -> None:
    status, _, raw = request(strict.url + "/")
    assert status == 401 and b'action="/login"' in raw  # the page asks for the key
    assert request(strict.url + "/login?key=not-the-key-0123456789")[0] == 401
    status, headers, raw = request(f"{strict.url}/login?key={TEST_API_KEY}")
    assert status == 200 and b'http-equiv="refresh" content="0; url=/"' in raw
    assert headers["Cache-Control"] == "no-store" and headers["Referrer-Policy"] == "no-referrer"
    set_cookie = headers["Set-Cookie"]
    attrs = {a.strip().split("=")[0].lower() for a in set_cookie.split(";")}
    assert {"httponly", "path"} <= attrs and "samesite=strict" in set_cookie.lower().replace(" ", ""), set_cookie
    jar = http.cookies.SimpleCookie(set_cookie)
    (name,) = jar
    value = jar[name].value
    assert TEST_API_KEY not in value and len(value) >= 32
    cookie = {"Cookie": f"{name}={value}"}
    status, headers, raw = request(strict.url + "/", headers=cookie)
    assert status == 200 and b"/static/main.js" in raw
    assert request(strict.url + "/static/main.js", headers=cookie)[0] == 200
    assert request(strict.url + "/v1/cluster", headers=cookie)[0] == 200
    forged = value[:-1] + ("1" if value[-1] != "1" else "2")
    assert request(strict.url + "/v1/cluster", headers={"Cookie": f"{name}={forged}"})[0] == 401
    # The dashboard's own dialog: the key as JSON, a 204 and the same cookie.
    status, headers, _ = request(strict.url + "/login", "POST", {"key": TEST_API_KEY})
    assert status == 204 and http.cookies.SimpleCookie(headers["Set-Cookie"])[name].value == value
    assert request(strict.url + "/login", "POST", {"key": "not-the-key-0123456789"})[0] == 401


def test_a_key_the_node_makes_is_shown_once_and_by_shoal_key(launcher: NodeLauncher) -> None:
    node = launcher.start("fresh", api_key=None)
    key_file = node.home / "api.key"
    key = key_file.read_text().strip()
    assert key_file.stat().st_mode & 0o777 == 0o600 and len(key) >= 32
    wait_for(lambda: " ready on " in node.log(), 30, what="the node's start finished")
    first = node.log()
    assert f"{key}\n" in first and f"/login?key={key}" in first  # printed once it listens
    admin = node.url + "/v1/instances/x/requests"  # needs the key from loopback too
    assert request(admin)[0] == 401 and request(admin, headers={"Authorization": f"Bearer {key}"})[0] == 404
    out = subprocess.run([sys.executable, "-m", "shoal.cli", "key", "--home", str(node.home), "--port", str(node.port),
                          "--host", "127.0.0.1"], capture_output=True, text=True, timeout=60, check=True).stdout
    link = f"http://127.0.0.1:{node.port}/login?key={key}"
    assert key in out and link in out
    assert request(link)[0] == 200  # the printed link works
    only = subprocess.run([sys.executable, "-m", "shoal.cli", "key", "--home", str(node.home), "--api"],
                          capture_output=True, text=True, timeout=60, check=True).stdout
    assert only.strip() == key
    node.stop()
    node.start().wait_ready()
    wait_for(lambda: " ready on " in node.log()[len(first):], 30, what="the restart finished")
    assert key not in node.log()[len(first):]  # later starts keep it off the console
    assert request(admin, headers={"Authorization": f"Bearer {key}"})[0] == 404


def test_api_key_sources(tmp_path: Path) -> None:
    from shoal.config import NodeConfig

    def config(environ: dict[str, str], **flags: Any) -> NodeConfig:
        return NodeConfig.from_args(argparse.Namespace(home=str(tmp_path), cluster_key=TEST_KEY, **flags), environ=environ)

    made = config({})
    assert made.api_key_source == "generated" and made.api_key != TEST_KEY
    assert config({}).api_key_source == "home" and config({}).api_key == made.api_key
    assert config({"SHOAL_API_KEY": TEST_API_KEY}).api_key_source == "env"
    assert config({"SHOAL_API_KEY": "x" * 20}, api_key=TEST_API_KEY).api_key == TEST_API_KEY  # the flag wins
    with pytest.raises(ValueError, match="API key from --api-key is too short"):
        config({}, api_key="short")
    assert config({}, no_loopback_exemption=True, allowed_host=["Box.LAN", "*"]).allowed_hosts == ("box.lan", "*")
    assert TEST_API_KEY not in repr(config({"SHOAL_API_KEY": TEST_API_KEY}))
