"""How long a lost machine interrupts a stream: three `shoal node`s on loopback, the bundled model
placed as a pipeline over all three, a greedy 200-token streaming chat, and the last stage's node
killed (daemon and runners, SIGKILL) after 30 tokens. Per trial: the stall (the longest wait
between two tokens after the kill: detection + re-placing + prefill of what was streamed), and the
decode rate before the kill and after the resume. The killed node is started again (same home,
same port) and the instance placed anew for the next trial.

    python scripts/bench_recovery.py --trials 10
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil

MODEL = "smollm2-135m"
KEY = "bench-recovery-key-0123456789abcdef0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url: str, method: str = "GET", body: Any = None, timeout: float = 120) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


class Node:
    def __init__(self, root: Path, name: str, seed: Node | None):
        self.name, self.home, self.port = name, root / name, free_port()
        self.home.mkdir(parents=True, exist_ok=True)
        self.args = [sys.executable, "-m", "shoal.cli", "node", "--host", "127.0.0.1", "--port", str(self.port), "--home",
                     str(self.home), "--name", name, "--cluster-key", KEY, "--no-discovery", "--log-level", "WARNING"]
        if seed is not None:
            self.args += ["--peer", f"127.0.0.1:{seed.port}"]
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(self.args, stdout=open(self.home / "log", "ab"), stderr=subprocess.STDOUT)
        for _ in range(300):
            try:
                call(self.url + "/v1/cluster", timeout=1)
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not start")

    def die(self) -> None:
        assert self.proc is not None
        procs = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.die()


def wait(pred, timeout: float, what: str) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            if pred():
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{what}: not within {timeout} s")


def trial(nodes: list[Node], tokens: int, kill_after: int) -> dict[str, float]:
    a, victim = nodes[0], nodes[-1]
    names = [n.name for n in nodes]
    inst = call(a.url + "/v1/instances", "POST", {"model": MODEL, "strategy": "pipeline", "nodes": names, "context": 512})["instance"]
    wait(lambda: any(i["id"] == inst["id"] and i["status"] == "ready" for i in call(a.url + "/v1/instances")["instances"]),
         240, "instance ready")
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a long story about a lighthouse."}],
            "max_tokens": tokens, "temperature": 0, "stream": True, "ignore_eos": True}
    req = urllib.request.Request(a.url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    times: list[float] = []
    killed_at = 0.0
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"the stream failed: {chunk['error']['message']}")
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                times.append(time.monotonic())
                if len(times) == kill_after:
                    killed_at = time.monotonic()
                    threading.Thread(target=victim.die).start()
    after = [t for t in times if t > killed_at]
    stall = max(b - a_ for a_, b in zip([killed_at, *after], after))
    resumed = after.index(next(b for a_, b in zip([killed_at, *after], after) if b - a_ == stall))
    before_rate = (kill_after - 1) / (times[kill_after - 1] - times[0])
    tail = after[resumed:]
    after_rate = (len(tail) - 1) / (tail[-1] - tail[0]) if len(tail) > 1 else float("nan")
    call(a.url + f"/v1/instances/{inst['id']}", "DELETE")
    victim.start()
    wait(lambda: sum(n["status"] == "up" for n in call(a.url + "/v1/cluster")["nodes"]) == len(nodes), 60, "rejoined")
    return {"stall_s": stall, "before_tps": before_rate, "after_tps": after_rate, "tokens": len(times)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--kill-after", type=int, default=30)
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="shoal-bench-recovery-"))
    nodes: list[Node] = []
    try:
        for name in ("a", "b", "c"):
            nodes.append(Node(root, name, nodes[0] if nodes else None))
            nodes[-1].start()
        wait(lambda: sum(n["status"] == "up" for n in call(nodes[0].url + "/v1/cluster")["nodes"]) == 3, 30, "three up")
        results = []
        for i in range(args.trials):
            r = trial(nodes, args.tokens, args.kill_after)
            results.append(r)
            print(f"trial {i + 1}: stall {r['stall_s']:.2f} s, decode {r['before_tps']:.1f} tok/s before the kill, "
                  f"{r['after_tps']:.1f} after the resume, {r['tokens']} tokens", flush=True)
        stalls = sorted(r["stall_s"] for r in results)
        print(f"\nkill -> first resumed token over {len(stalls)} trials: p50 {statistics.median(stalls):.2f} s, "
              f"max {stalls[-1]:.2f} s")
        print(f"decode: {statistics.median(r['before_tps'] for r in results):.1f} tok/s before (pipeline over 3), "
              f"{statistics.median(r['after_tps'] for r in results):.1f} after (re-placed, strategy auto, on the two left)")
        return 0
    finally:
        for n in nodes:
            n.stop()
        if os.environ.get("KEEP") is None:
            subprocess.run(["rm", "-rf", str(root)], check=False)


if __name__ == "__main__":
    sys.exit(main())
