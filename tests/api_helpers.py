"""Shared by the API tests: a real `python -m shoal.api.serve` process on a free loopback port,
SSE parsing from raw bytes, and reading one value from /metrics.

The server is stopped by its own pid (SIGTERM, then SIGKILL), never by name."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web

from shoal.catalog import CATALOG, DEFAULT_MODEL, bundled_path

MODEL = DEFAULT_MODEL
MODEL_PATH = bundled_path(CATALOG[DEFAULT_MODEL])
START_TIMEOUT_S = 180  # imports + model load + warm-up on a busy 2-core machine

needs_model = pytest.mark.skipif(MODEL_PATH is None, reason="bundled model not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log_path: Path

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


@contextmanager
def running_server(*args: str):
    """Start `python -m shoal.api.serve --port P *args`; yield a Server once it prints 'ready'."""
    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix="shoal-api-", suffix=".log", delete=False)
    cmd = [sys.executable, "-m", "shoal.api.serve", "--host", "127.0.0.1", "--port", str(port), "--log-level", "INFO", *args]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    server = Server(f"http://127.0.0.1:{port}", proc, Path(log.name))
    ready = threading.Event()

    def read_stdout() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "ready on" in line:
                ready.set()

    threading.Thread(target=read_stdout, daemon=True).start()
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready.wait(0.2):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"API server did not start (exit {proc.poll()}):\n{server.log_tail()}")
        yield server
    finally:
        stop(proc)
        log.close()
        os.unlink(log.name)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)


def server_fixture(*args: str):
    """A module-scoped pytest fixture running one server with these arguments."""

    @pytest.fixture(scope="module")
    def fixture():
        with running_server(*args) as s:
            yield s

    return fixture


# -- HTTP without a client library -----------------------------------------------------------------


def http(method: str, url: str, body: bytes | dict | None = None, headers: dict[str, str] | None = None,
         timeout: float = 60) -> tuple[int, dict[str, str], bytes]:
    """One request with urllib; returns (status, headers, body) for any status."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def parse_sse(raw: bytes) -> tuple[list[str], list[dict | str]]:
    """(comments, events) of an SSE body: events are parsed JSON, or the string '[DONE]'."""
    comments, events = [], []
    text = raw.decode("utf-8")
    assert text.endswith("\n\n"), "an SSE stream ends with a blank line"
    for block in text.split("\n\n")[:-1]:
        data = []
        for line in block.split("\n"):
            if line.startswith(":"):
                comments.append(line[1:].strip())
            elif line.startswith("data: "):
                data.append(line[6:])
            else:
                raise AssertionError(f"unexpected SSE line {line!r}")
        if data:
            payload = "\n".join(data)
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return comments, events


def metric(url: str, name: str, headers: dict[str, str] | None = None, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` (0 if none)."""
    _, _, body = http("GET", f"{url}/metrics", headers=headers)
    total = 0.0
    for m in re.finditer(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", body.decode(), re.MULTILINE):
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group(2))
    return total


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


# -- a model hub on loopback -----------------------------------------------------------------------


class FakeHub:
    """A real HTTP server speaking the hub's two endpoints (file list with hashes, file download with
    Range) over the repositories in `root/<org>/<name>/`, on its own thread and event loop."""

    def __init__(self, root: Path):
        self.root, self.requests = root, []
        self.lie: set[str] = set()
        self.unhashed: set[str] = set()
        self.loop = asyncio.new_event_loop()
        self.port = None
        ready = threading.Event()
        threading.Thread(target=self._run, args=(ready,), daemon=True).start()
        ready.wait(10)

    def _run(self, ready):
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_get("/api/models/{org}/{name}/revision/{rev}", self.info)
        app.router.add_get("/{org}/{name}/resolve/{rev}/{file}", self.file)
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()

    async def info(self, request):
        repo = self.root / request.match_info["org"] / request.match_info["name"]
        if not repo.exists():
            raise web.HTTPNotFound()
        if request.query.get("blobs") != "true":
            return web.json_response({"siblings": [{"rfilename": p.name} for p in sorted(repo.iterdir())]})
        return web.json_response({"siblings": [self.listing(p) for p in sorted(repo.iterdir())]})

    def listing(self, path: Path) -> dict:
        """As the hub lists a file with ?blobs=true: large files by their LFS sha256, small ones by
        their git blob id. `self.lie` names a file whose listed hash is not its bytes'."""
        data = path.read_bytes()
        if path.name in self.unhashed:
            return {"rfilename": path.name}
        if path.name in self.lie:
            data = data + b"!"
        out = {"rfilename": path.name, "size": len(data),
               "blobId": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()}
        if path.suffix in (".safetensors", ".gguf"):
            out["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        return out

    async def file(self, request):
        self.requests.append((request.match_info["file"], request.headers.get("Range")))
        path = self.root / request.match_info["org"] / request.match_info["name"] / request.match_info["file"]
        if not path.exists():
            raise web.HTTPNotFound()
        return web.FileResponse(path)  # honours Range

    def stop(self):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
