#!/usr/bin/env python
"""What encrypting the data plane costs: one link's frames, and decode through a pipeline over 3
loopback nodes, with the wire's AES-256-GCM against the same code with frames in clear.

    .venv/bin/python scripts/bench_wire.py [--model smollm2-135m] [--tokens 128] [--repeats 5] [--rounds 3]
                                           [--baseline-wire OLD_WIRE.py] [--skip-links] [--skip-pipeline]

Links: a decode frame (a step message and one row of hidden states) and a prefill frame (the
message and 128 rows) go through `Link.send` + `Link.recv`, (a) on one thread over a socket pair
whose buffers hold the frame — the CPU a hop's framing and cipher cost — and (b) as a ping-pong
with a forked process over loopback TCP, pinned to one core and to two — a hop as a pipeline sees
it, wake-ups included. Each arm runs in turns (best of `--repeats`). `--baseline-wire` adds another version of wire.py as an arm
(e.g. `git show REV:src/shoal/runner/wire.py > /tmp/old_wire.py`), if its Link takes
(sock, peer, send_key, recv_key).

Pipeline: the model is planned as pipeline-3 over three nodes on 127.0.0.1 (this machine's profile,
as `shoal node` would measure it) and started twice as three runner processes each — the daemon's
own runner command, configured on its stdin as a daemon would — once as a node runs it and once
with `bench_plaintext_wire` (a RunnerConfig field for benchmarks only: nothing a node is told or
configured with sets it), `--rounds` times afresh. Greedy requests go to the two in turns; decode
tokens/s is what the entry runner's generator measured: the best of all runs, and the median ratio
of each turn's two runs (a burst of load from elsewhere hits both alike). Every process it starts
is stopped by its own pid at the end.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import psutil
import torch

from shoal.runner import wire
from shoal.runner.contract import (
    RUNNER_EVENT,
    Failed,
    Fatal,
    PortBound,
    Ready,
    Refused,
    RunnerConfig,
    Sampling,
    Stop,
    Submit,
    Tokens,
)

HIDDEN = 576  # SmolLM2-135M
PREFILL_ROWS = 128


# -- one link ----------------------------------------------------------------------------------------------
def frame_parts(rows: int) -> list[torch.Tensor]:
    """A step frame as the pipeline sends it: the int64 message (decode: ~20 numbers) and the rows."""
    return [torch.arange(8 + 4 * rows + 4, dtype=torch.int64), torch.randn(rows, HIDDEN)]


def make_link(module: ModuleType, sock: socket.socket, peer: int, keys: tuple[bytes, bytes], plaintext: bool):
    if plaintext:
        return module.Link(sock, peer, *keys, plaintext=True)
    return module.Link(sock, peer, *keys)


def cpu_cost(module: ModuleType, plaintext: bool, parts: list[torch.Tensor], n: int) -> float:
    """µs per send + recv of one frame on one thread (no wake-ups: the framing and cipher alone)."""
    a, b = socket.socketpair()
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    k = (os.urandom(32), os.urandom(32))
    tx, rx = make_link(module, a, 1, k, plaintext), make_link(module, b, 0, k[::-1], plaintext)
    size = sum(p.numel() * p.element_size() for p in parts)
    into = torch.empty(size, dtype=torch.uint8)
    for _ in range(20):
        tx.send(wire.TAG_STEP, parts)
        rx.recv(wire.TAG_STEP, into)
    t = time.perf_counter()
    for _ in range(n):
        tx.send(wire.TAG_STEP, parts)
        rx.recv(wire.TAG_STEP, into)
    out = (time.perf_counter() - t) / n * 1e6
    a.close()
    b.close()
    return out


def hop(module: ModuleType, plaintext: bool, parts: list[torch.Tensor], n: int, cores: tuple[int, int]) -> float:
    """µs per one-way hop: half the round trip of a frame echoed by a forked process over TCP, this
    process on cores[0] and the echo on cores[1] (unpinned, a VM's wake-ups across cores swing
    between ~10 and ~50 µs from one run to the next)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        a = socket.create_connection(server.getsockname())
        b, _ = server.accept()
    for s in (a, b):
        wire._configure(s, 30)
    k = (os.urandom(32), os.urandom(32))
    size = sum(p.numel() * p.element_size() for p in parts)
    allowed = os.sched_getaffinity(0)
    pid = os.fork()
    if pid == 0:  # the echo: receive each frame into place, send it back
        a.close()
        try:
            os.sched_setaffinity(0, {cores[1]})
            echo = make_link(module, b, 0, k[::-1], plaintext)
            buf = torch.empty(size, dtype=torch.uint8)
            for _ in range(n + 20):
                echo.recv(wire.TAG_STEP, buf)
                echo.send(wire.TAG_STEP, [buf])
        finally:
            os._exit(0)
    b.close()
    os.sched_setaffinity(0, {cores[0]})
    try:
        link = make_link(module, a, 1, k, plaintext)
        into = torch.empty(size, dtype=torch.uint8)
        times = []
        for i in range(n + 20):
            t = time.perf_counter()
            link.send(wire.TAG_STEP, parts)
            link.recv(wire.TAG_STEP, into)
            if i >= 20:
                times.append(time.perf_counter() - t)
    finally:
        os.sched_setaffinity(0, allowed)
        os.waitpid(pid, 0)
        a.close()
    return statistics.median(times) / 2 * 1e6


def bench_links(repeats: int, baseline: Path | None) -> None:
    arms: list[tuple[str, ModuleType, bool]] = [("aes-256-gcm", wire, False), ("plaintext", wire, True)]
    if baseline is not None:
        spec = importlib.util.spec_from_file_location("baseline_wire", baseline)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        arms.append((f"baseline ({baseline.name})", module, False))
    frames = {"decode": frame_parts(1), "prefill": frame_parts(PREFILL_ROWS)}
    cpus = sorted(os.sched_getaffinity(0))
    placements = {"hop, 1 core": (cpus[0], cpus[0])} | ({"hop, 2 cores": (cpus[0], cpus[1])} if len(cpus) > 1 else {})
    print(f"link: µs per frame (hops: median of each run), best of {repeats} runs (turns interleaved)")
    print(f"{'frame':<8} {'bytes':>8}  {'arm':<28} {'send+recv, 1 thread':>20}" + "".join(f"{h:>14}" for h in placements))
    for name, parts in frames.items():
        size = sum(p.numel() * p.element_size() for p in parts)
        n_cpu, n_hop = (20000, 3000) if name == "decode" else (1000, 300)
        got: dict[tuple[str, str], list[float]] = {}
        for _ in range(repeats):
            for label, module, plaintext in arms:
                got.setdefault((label, "cpu"), []).append(cpu_cost(module, plaintext, parts, n_cpu))
                for h, cores in placements.items():
                    got.setdefault((label, h), []).append(hop(module, plaintext, parts, n_hop, cores))
        for label, _, _ in arms:
            print(f"{name:<8} {size:>8}  {label:<28} {min(got[label, 'cpu']):20.2f}"
                  + "".join(f"{min(got[label, h]):14.2f}" for h in placements))


# -- a pipeline over 3 loopback nodes ----------------------------------------------------------------------
def pipeline_placement(model: str, context: int):
    from shoal.cluster.profile import load_or_measure
    from shoal.cluster.topology import ClusterView, LinkView, NodeView
    from shoal.placement.contract import PlacementRequest
    from shoal.placement.planner import plan
    from shoal.placement.spec import spec_for

    profile, _ = load_or_measure(Path(tempfile.gettempdir()) / "shoal-bench-wire-profile.json")
    mem = psutil.virtual_memory().available // 3
    nodes = [NodeView(id=f"{i:032x}", name=f"n{i}", address=f"127.0.0.1:{52600 + i}", status="up", is_self=i == 0,
                      last_seen_s=0.0, incarnation=1, memory_available_bytes=mem, memory_offered_bytes=mem, profile=profile)
             for i in range(3)]
    links = [LinkView(a=nodes[i].id, b=nodes[j].id, rtt_ms=0.05, bandwidth_mbps=20_000, measured_at=0.0, age_s=0.0)
             for i in range(3) for j in range(i + 1, 3)]
    view = ClusterView(self_id=nodes[0].id, cluster="bench", nodes=nodes, links=links)
    return plan(spec_for(model), view, PlacementRequest(strategy="pipeline", node_count=3, context=context))


class Runner:
    """One `python -m shoal.runner` process, configured on its stdin as a daemon configures it."""

    def __init__(self, cfg: RunnerConfig, log: Path):
        from shoal.daemon.process import RUNNER_ENV

        env = {**RUNNER_ENV, **os.environ, "PYTHONUNBUFFERED": "1"}
        with open(log, "ab") as logf:
            self.proc = subprocess.Popen([sys.executable, "-m", "shoal.runner"], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=logf, env=env)
        self.send(cfg)

    def send(self, msg) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((msg.model_dump_json() + "\n").encode())
        self.proc.stdin.flush()

    def event(self):
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"runner {self.proc.pid} exited (code {self.proc.wait()})")
        ev = RUNNER_EVENT.validate_json(line)
        if isinstance(ev, Fatal):
            raise RuntimeError(ev.message)
        return ev

    def wait_for(self, kind: type):
        while not isinstance(ev := self.event(), kind):
            pass
        return ev


def start_pipeline(model: str, placement, plaintext: bool, logs: Path) -> list[Runner]:
    shards = placement.shards
    base = dict(instance_id=secrets.token_hex(8), model=model, shards=shards, num_layers=max(s.layers[1] for s in shards),
                context=placement.context, secret=os.urandom(32).hex(), bench_plaintext_wire=plaintext)
    label = "plain" if plaintext else "gcm"
    first = Runner(RunnerConfig(rank=0, master_port=None, threads=shards[0].threads, **base), logs / f"{label}-0.log")
    runners = [first]
    try:
        port = first.wait_for(PortBound).port
        runners += [Runner(RunnerConfig(rank=s.rank, master_port=port, threads=s.threads, **base), logs / f"{label}-{s.rank}.log")
                    for s in shards[1:]]
        for r in runners:
            r.wait_for(Ready)
    except BaseException:
        stop(runners)
        raise
    return runners


def generate(entry: Runner, prompt: list[int], tokens: int) -> float:
    rid = secrets.token_hex(6)
    entry.send(Submit(rid=rid, prompt_ids=prompt, params=Sampling(max_tokens=tokens, ignore_eos=True)))
    while True:
        ev = entry.event()
        if isinstance(ev, (Failed, Refused)) and ev.rid == rid:
            raise RuntimeError(ev.error.message)
        if isinstance(ev, Tokens) and ev.rid == rid and ev.stats is not None:
            return ev.stats.decode_tps


def stop(runners: list[Runner]) -> None:
    if runners and runners[0].proc.poll() is None:
        try:
            runners[0].send(Stop())  # the entry stops its group
        except OSError:
            pass
    for r in runners:
        try:
            r.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.kill(r.proc.pid, signal.SIGKILL)
            r.proc.wait()


def bench_pipeline(model: str, tokens: int, prompt_len: int, repeats: int, rounds: int) -> None:
    """`rounds` times: start both pipelines afresh (which processes land where, and how their
    threads are pinned, differs from one start to the next by a few percent: more than the cipher
    costs), then `repeats` turns of one request each."""
    placement = pipeline_placement(model, context=512)
    logs = Path(tempfile.mkdtemp(prefix="shoal-bench-wire-"))
    prompt = [(7 * i + 11) % 1000 + 100 for i in range(prompt_len)]
    runs: dict[str, list[list[float]]] = {"aes-256-gcm": [], "plaintext": []}
    for r in range(rounds):
        arms: dict[str, list[Runner]] = {}
        try:
            for label in list(runs)[:: 1 if r % 2 == 0 else -1]:
                arms[label] = start_pipeline(model, placement, label == "plaintext", logs)
            for runners in arms.values():  # warm up: kernels, first touch of caches
                generate(runners[0], prompt, 16)
            for label in runs:
                runs[label].append([])
            for i in range(repeats):  # turns, in alternating order: neither arm always runs right after the other
                for label in list(runs)[:: 1 if i % 2 == 0 else -1]:
                    runs[label][-1].append(generate(arms[label][0], prompt, tokens))
        finally:
            for runners in arms.values():
                stop(runners)
    print(f"\npipeline-3 of {model} on 127.0.0.1 ({os.cpu_count()} cores), layers {[list(s.layers) for s in placement.shards]}, "
          f"{prompt_len}-token prompt, {tokens} tokens greedy; {rounds} starts x {repeats} turns, interleaved; logs in {logs}")
    print(f"{'arm':<12} {'best tok/s':>10} {'median':>8}  runs (one list per start)")
    for label, per_start in runs.items():
        flat = [x for start in per_start for x in start]
        print(f"{label:<12} {max(flat):10.1f} {statistics.median(flat):8.1f}  {[[round(x, 1) for x in st] for st in per_start]}")
    gcm = [x for st in runs["aes-256-gcm"] for x in st]
    plain = [x for st in runs["plaintext"] for x in st]
    print(f"encrypted / plaintext: {max(gcm) / max(plain):.3f} (best), {statistics.median(gcm) / statistics.median(plain):.3f} "
          f"(median), {statistics.median(g / p for g, p in zip(gcm, plain)):.3f} (median of each turn's pair)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=128, help="tokens generated per request")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens per request")
    ap.add_argument("--repeats", type=int, default=5, help="link runs; pipeline turns per start")
    ap.add_argument("--rounds", type=int, default=3, help="fresh starts of both pipelines")
    ap.add_argument("--baseline-wire", type=Path, default=None, help="another wire.py to measure links against")
    ap.add_argument("--skip-links", action="store_true")
    ap.add_argument("--skip-pipeline", action="store_true")
    args = ap.parse_args()
    np.random.seed(0)
    torch.manual_seed(0)
    if not args.skip_links:
        bench_links(args.repeats, args.baseline_wire)
    if not args.skip_pipeline:
        bench_pipeline(args.model, args.tokens, args.prompt, args.repeats, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
