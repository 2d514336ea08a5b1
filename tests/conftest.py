"""Shared test helpers: real `shoal node` processes on loopback ports (or inside network
namespaces), each with its own temporary --home, started and killed by their own pids."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

TEST_KEY = "test-cluster-key-0123456789abcdef"
TEST_API_KEY = "test-api-key-0123456789abcdef"  # what test nodes ask clients on other addresses for
NODE_CMD = [sys.executable, "-m", "shoal.cli", "node"]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def http_json(url: str, timeout_s: float = 2.0, netns: str | None = None) -> Any:
    """GET url and parse JSON; inside `netns` through a tiny python run there (our root namespace
    has no route into the test's namespaces). With the test nodes' API key: a client in a
    namespace has an address of its own, and a node may ask loopback clients for it too."""
    if netns is None:
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {TEST_API_KEY}"})
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return json.loads(r.read())
    code = (
        "import sys, urllib.request; "
        f"req = urllib.request.Request(sys.argv[1], headers={{'Authorization': 'Bearer {TEST_API_KEY}'}}); "
        "sys.stdout.write(urllib.request.urlopen(req, timeout=float(sys.argv[2])).read().decode())"
    )
    out = subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, "-c", code, url, str(timeout_s)],
        capture_output=True,
        text=True,
        timeout=timeout_s + 5,
        check=False,
    )
    if out.returncode != 0:
        raise OSError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "fetch failed")
    return json.loads(out.stdout)


class NodeProc:
    """One `shoal node` process. Restartable with the same home and port (same node id)."""

    def __init__(
        self, name: str, host: str, port: int, home: Path, args: Sequence[str], log_dir: Path, netns: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name, self.host, self.port, self.home = name, host, port, home
        self.env = dict(env or {})
        self.args = list(args)
        self.netns = netns
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready_at = 0.0  # monotonic time /v1/cluster first answered

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> NodeProc:
        cmd = [
            *NODE_CMD,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--home",
            str(self.home),
            "--name",
            self.name,
            *self.args,
        ]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]  # ip execs the node: the pid is the node's
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child holds it
        # The keys and invite of whoever runs the tests never reach a test node; the test's own do.
        env = {k: v for k, v in os.environ.items() if k not in ("SHOAL_CLUSTER_KEY", "SHOAL_API_KEY", "SHOAL_JOIN")}
        env.update({"PYTHONUNBUFFERED": "1", **self.env})
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        return self

    def cluster(self, timeout_s: float = 2.0) -> dict[str, Any]:
        return http_json(self.url + "/v1/cluster", timeout_s, self.netns)

    def wait_ready(self, timeout_s: float = 30.0) -> NodeProc:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"node {self.name} exited with {self.proc.returncode}:\n{self.log()}")
            try:
                self.cluster(timeout_s=1.0)
                self.ready_at = time.monotonic()
                return self
            except (OSError, ValueError, urllib.error.URLError):
                time.sleep(0.05)
        raise AssertionError(f"node {self.name} not ready after {timeout_s} s:\n{self.log()}")

    @property
    def node_id(self) -> str:
        return (self.home / "node_id").read_text().strip()

    def kill(self) -> None:
        """SIGKILL: no leave announcement, the others must notice by themselves."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout_s: float = 10.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


class NodeLauncher:
    """Starts nodes for one test; its fixture stops every one of them at teardown."""

    def __init__(self, root: Path, profile_file: Path | None) -> None:
        self.root = root
        self.profile_file = profile_file
        self.nodes: list[NodeProc] = []

    def start(
        self,
        name: str,
        peers: Sequence[NodeProc | str] = (),
        key: str | None = TEST_KEY,  # None: no --cluster-key (the home's, a --join invite's, or a new one)
        api_key: str | None = TEST_API_KEY,  # None: the node makes its own (<home>/api.key)
        extra: Sequence[str] = (),
        host: str = "127.0.0.1",
        port: int | None = None,
        netns: str | None = None,
        discovery: bool = False,
        wait: bool = True,
        env: dict[str, str] | None = None,
    ) -> NodeProc:
        home = self.root / name
        home.mkdir(parents=True, exist_ok=True)
        if self.profile_file is not None and not (home / "profile.json").exists():
            # One measurement per test session: nodes start in a fraction of a second and do not
            # all benchmark the same two cores at once.
            shutil.copy(self.profile_file, home / "profile.json")
        args = [*(["--cluster-key", key] if key else []), "--log-level", "DEBUG", *(["--api-key", api_key] if api_key else [])]
        for p in peers:
            args += ["--peer", p.address if isinstance(p, NodeProc) else p]
        if not discovery:
            args.append("--no-discovery")
        node = NodeProc(name, host, port or free_port(), home, [*args, *extra], self.root, netns, env)
        self.nodes.append(node)
        node.start()
        if wait:
            node.wait_ready()
        return node

    def start_cluster(self, names: Sequence[str], env: dict[str, str] | None = None) -> list[NodeProc]:
        """Nodes that all joined the first, started together, once every one sees them all up."""
        first = self.start(names[0], env=env)
        others = [self.start(name, peers=[first], wait=False, env=env) for name in names[1:]]
        for n in others:
            n.wait_ready()
        nodes = [first, *others]
        wait_for(lambda: all(len([x for x in n.cluster()["nodes"] if x["status"] == "up"]) == len(nodes) for n in nodes),
                 30, what=f"{len(nodes)} nodes see each other")
        return nodes

    def close(self) -> None:
        for n in self.nodes:
            if n.proc is not None and n.proc.poll() is None:
                os.kill(n.proc.pid, signal.SIGTERM)
        for n in self.nodes:
            if n.proc is not None:
                try:
                    n.proc.wait(10)
                except subprocess.TimeoutExpired:
                    n.kill()


@pytest.fixture(scope="session", autouse=True)
def models_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The models folder of every node a test starts is the session's temporary root, so the tiny
    checkpoints tests make in their tmp_path are files a reference from the network may name."""
    base = tmp_path_factory.getbasetemp()
    old = os.environ.get("SHOAL_MODELS")
    os.environ["SHOAL_MODELS"] = str(base)
    yield base
    if old is None:
        os.environ.pop("SHOAL_MODELS", None)
    else:
        os.environ["SHOAL_MODELS"] = old


@pytest.fixture(scope="session")
def cached_profile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A device profile measured once for the session, copied into every test node's home. Kept
    even if measured on a busy machine (its absurd decode figures are already dropped): tests need
    a profile, not the truth, and nodes that found none would all measure at once."""
    home = tmp_path_factory.mktemp("profile")
    code = (
        "import sys, pathlib; from shoal.cluster.profile import measure_profile, write_cache; "
        "write_cache(pathlib.Path(sys.argv[1]), measure_profile().model_copy(update={'reliable': True}))"
    )
    subprocess.run([sys.executable, "-c", code, str(home / "profile.json")], check=True, timeout=120)
    return home / "profile.json"


@pytest.fixture(scope="session")
def moe_ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One fp32 synthetic checkpoint per MoE family (shoal.synthetic), made once for the session."""
    from shoal.synthetic import make_checkpoint

    root = tmp_path_factory.mktemp("moe")
    return {
        "kimi-k2": make_checkpoint("kimi-k2", root / "kimi", experts=16, layers=3, fmt="fp32"),
        "deepseek-v3": make_checkpoint("deepseek-v3", root / "dsv3", experts=16, layers=3, fmt="fp32", seed=1),
        "qwen3-moe": make_checkpoint("qwen3-moe", root / "qwen", experts=8, layers=2, fmt="fp32", seed=2),
        "mixtral": make_checkpoint("mixtral", root / "mixtral", experts=8, layers=2, fmt="fp32", seed=3),
    }


@pytest.fixture
def launcher(tmp_path: Path, cached_profile: Path) -> Iterator[NodeLauncher]:
    nl = NodeLauncher(tmp_path, cached_profile)
    try:
        yield nl
    finally:
        nl.close()


def wait_for(predicate: Any, timeout_s: float, interval_s: float = 0.05, what: str = "condition") -> float:
    """Poll until predicate() is truthy; the seconds it took. Exceptions count as 'not yet'."""
    start = time.monotonic()
    last_exc: BaseException | None = None
    while True:
        try:
            if predicate():
                return time.monotonic() - start
        except Exception as e:  # noqa: BLE001 - a node briefly not answering is 'not yet'
            last_exc = e
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"{what} not reached within {timeout_s} s (last error: {last_exc!r})")
        time.sleep(interval_s)
