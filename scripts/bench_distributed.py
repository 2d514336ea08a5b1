#!/usr/bin/env python
"""Decode speed of one model split over loopback nodes, against the same model on one node, with
the planner's prediction next to each measurement — all in one run.

    .venv/bin/python scripts/bench_distributed.py [--model smollm2-135m] [--tokens 128] [--repeats 3]

Starts three `shoal node` processes on 127.0.0.1 (temporary homes, one device profile measured
once and shared), places four instances — one node, pipeline over 2 and over 3, tensor over 2 —
and runs greedy requests on them in turns (so that load from elsewhere on the machine hits them
alike). Decode tokens/s is what the entry runner's generator measured; communication per token
is the entry's step time less the compute time of each stage's slowest rank (runner counters).
Every process it starts is stopped by its own pid at the end.

With --peer (llama.cpp's tools built: ../shared/tools/llama-cpp-tools.sh .peers/llama.cpp, or
$SHOAL_LLAMA_CPP), each turn also runs llama.cpp's own `llama-bench` on the same GGUF alone and over
three `ggml-rpc-server` processes on 127.0.0.1 (its distributed mode), and prints both beside shoal.

With --timeline, every runner records when each decode step reaches each point of its path
(runner/timeline.py: one clock for all the processes), and the bench prints, for each instance of a
single rank per stage, the median of each leg of a token's path: each stage's bookkeeping, its
layers, each hop (the wire, the receiver waking, the message), the head, the entry's scheduler.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from shoal.runner.timeline import ENV as TIMELINE_ENV
from shoal.runner.timeline import legs as timeline_legs
from shoal.runner.timeline import read as read_timeline

KEY = "bench-cluster-key-0123456789abcdef"
CONFIGS = [  # label, strategy, nodes
    ("single", "auto", 1),
    ("pipeline-2", "pipeline", 2),
    ("pipeline-3", "pipeline", 3),
    ("tensor-2", "tensor", 2),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url: str, method: str = "GET", body: Any = None, timeout: float = 120) -> Any:
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(), method=method,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def generate(url: str, iid: str, prompt: list[int], tokens: int) -> dict[str, Any]:
    body = {"prompt_ids": prompt, "params": {"max_tokens": tokens, "ignore_eos": True}}
    req = urllib.request.Request(f"{url}/v1/instances/{iid}/generate", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    stats = {}
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            ev = json.loads(line)
            if "error" in ev:
                raise RuntimeError(ev["error"])
            stats = ev.get("stats") or stats
    return stats


def shard_stats(url: str, iid: str) -> list[dict[str, Any]]:
    call(f"{url}/v1/instances")  # asks the runners for fresh counters...
    time.sleep(0.5)
    inst = next(i for i in call(f"{url}/v1/instances")["instances"] if i["id"] == iid)  # ...and reads them
    return inst["shards"]


def comm_per_token(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> tuple[float, float]:
    """(communication s per step, compute s per step on the critical path) from counter deltas."""
    d = [{k: a["stats"].get(k, 0) - b["stats"].get(k, 0) for k in ("steps", "step_s", "compute_s")}
         for b, a in zip(before, after)]
    steps = d[0]["steps"]
    if not steps:
        return 0.0, 0.0
    compute = 0.0
    for stage in sorted({s["stage"] for s in after}):
        compute += max(x["compute_s"] for x, s in zip(d, after) if s["stage"] == stage)
    return max(0.0, d[0]["step_s"] - compute) / steps, compute / steps


def start_rpc_servers(tools: Path, n: int, threads: int, procs: list) -> list[str]:
    """`n` ggml-rpc-servers on loopback; their host:port."""
    endpoints = []
    for _ in range(n):
        port = free_port()
        procs.append(subprocess.Popen([str(tools / "ggml-rpc-server"), "-H", "127.0.0.1", "-p", str(port), "-t", str(threads)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("ggml-rpc-server did not start") from None
                time.sleep(0.1)
        endpoints.append(f"127.0.0.1:{port}")
    return endpoints


def llama_bench_decode(tools: Path, gguf: str, tokens: int, threads: int, rpc: list[str] | None = None) -> float:
    """llama-bench's decode tokens/s (one run), alone or over RPC servers."""
    cmd = [str(tools / "llama-bench"), "-m", gguf, "-p", "0", "-n", str(tokens), "-t", str(threads), "-r", "1", "-o", "json"]
    if rpc:
        cmd += ["--rpc", ",".join(rpc)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True).stdout
    return max(json.loads(out[out.index("["):])[0]["samples_ts"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=128, help="tokens generated per request")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens per request")
    ap.add_argument("--repeats", type=int, default=5, help="requests per configuration (the best is reported, as `shoal bench` does)")
    ap.add_argument("--configs", default=",".join(c[0] for c in CONFIGS),
                    help="which of " + ", ".join(c[0] for c in CONFIGS) + " to run (single always runs: the ratios need it)")
    ap.add_argument("--peer", action="store_true", help="also llama.cpp alone and over 3 RPC servers, in the same turns")
    ap.add_argument("--timeline", action="store_true", help="also where a decode step's time goes, leg by leg (runner/timeline.py)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    tools = None
    if args.peer:
        from shoal.engine.bench import llama_cpp_bin

        tools = llama_cpp_bin()
        if tools is None:
            raise SystemExit("--peer: llama.cpp's tools are not built (../shared/tools/llama-cpp-tools.sh .peers/llama.cpp)")

    root = Path(tempfile.mkdtemp(prefix="shoal-bench-"))
    (root / "timeline").mkdir()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        # One profile for the three nodes, kept even if measured under load (its warning says so):
        # three nodes measuring the same cores at once would all be.
        subprocess.run([sys.executable, "-c", "import sys, pathlib; from shoal.cluster.profile import measure_profile, "
                        "write_cache; write_cache(pathlib.Path(sys.argv[1]), measure_profile().model_copy(update={'reliable': True}))",
                        str(root / "profile.json")], check=True)
        urls = []
        for i in range(3):
            home = root / f"n{i}"
            home.mkdir()
            shutil.copy(root / "profile.json", home / "profile.json")
            port = free_port()
            cmd = [sys.executable, "-m", "shoal.cli", "node", "--host", "127.0.0.1", "--port", str(port), "--home", str(home),
                   "--name", f"n{i}", "--cluster-key", KEY, "--no-discovery"]
            if urls:
                cmd += ["--peer", urls[0].removeprefix("http://")]
            log = open(root / f"n{i}.log", "wb")  # noqa: SIM115 - the child holds it
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            if args.timeline:
                env[TIMELINE_ENV] = str(root / "timeline")
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env))
            urls.append(f"http://127.0.0.1:{port}")
        url = urls[0]
        deadline = time.monotonic() + 60
        while True:
            try:
                view = call(f"{url}/v1/cluster", timeout=2)
                if sum(n["status"] == "up" for n in view["nodes"]) == 3 and len(view["links"]) == 3:
                    break
            except (urllib.error.URLError, OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the nodes did not form a cluster")
            time.sleep(0.2)

        wanted = {"single", *args.configs.split(",")}
        placed = {}
        for label, strategy, n in CONFIGS:
            if label not in wanted:
                continue
            placed[label] = call(f"{url}/v1/instances", "POST", {"model": args.model, "strategy": strategy, "nodes": n, "replica": True,
                                                                 "context": 512})["instance"]
        for label, inst in placed.items():
            while True:
                cur = next(i for i in call(f"{url}/v1/instances")["instances"] if i["id"] == inst["id"])
                if cur["status"] == "ready":
                    placed[label] = cur
                    break
                if cur["status"] == "failed":
                    raise RuntimeError(f"{label}: {cur['error']}")
                time.sleep(0.3)
        prompt = [(7 * i + 11) % 1000 + 100 for i in range(args.prompt)]
        for label, inst in placed.items():  # warm up: kernels, first touch of caches
            generate(url, inst["id"], prompt, 16)
        before = {label: shard_stats(url, inst["id"]) for label, inst in placed.items()}
        runs: dict[str, list[float]] = {label: [] for label in placed}
        windows: dict[str, list[tuple[float, float]]] = {label: [] for label in placed}
        peer: dict[str, list[float]] = {"llama.cpp": [], "llama.cpp RPC-3": []}
        rpc: list[str] = []
        if tools is not None:
            from shoal.engine.loader import resolve_model

            gguf = str(resolve_model(args.model))
            rpc = start_rpc_servers(tools, 3, os.cpu_count() or 1, procs)
        for _ in range(args.repeats):
            for label, inst in placed.items():
                t0 = time.perf_counter()
                runs[label].append(generate(url, inst["id"], prompt, args.tokens)["decode_tps"])
                windows[label].append((t0, time.perf_counter()))
            if tools is not None:  # in the same turn, so load from elsewhere hits both alike
                peer["llama.cpp"].append(llama_bench_decode(tools, gguf, args.tokens, os.cpu_count() or 1))
                peer["llama.cpp RPC-3"].append(llama_bench_decode(tools, gguf, args.tokens, os.cpu_count() or 1, rpc))
        after = {label: shard_stats(url, inst["id"]) for label, inst in placed.items()}

        rows = []
        single = max(runs["single"])
        single_pred = placed["single"]["prediction"]["decode_tokens_per_s"]
        for label, inst in placed.items():
            tps = max(runs[label])
            pred = inst["prediction"]
            comm, compute = comm_per_token(before[label], after[label])
            rows.append({
                "config": label, "strategy": inst["strategy"], "ranks": len(inst["shards"]),
                "decode_tps": tps, "median_tps": statistics.median(runs[label]), "runs": runs[label], "vs_single": tps / single,
                "predicted_tps": pred["decode_tokens_per_s"], "predicted_vs_single": pred["decode_tokens_per_s"] / single_pred,
                "prediction_error": pred["decode_tokens_per_s"] / tps - 1,
                "comm_ms_per_token": comm * 1e3, "compute_ms_per_token": compute * 1e3,
                "predicted_comm_ms_per_token": pred["comm_s"] * 1e3,
                "layers": [s["layers"] for s in inst["shards"]],
            })
        peers = {k: max(v) for k, v in peer.items() if v}
        timelines = {}
        if args.timeline:
            for p in procs[:3]:  # the nodes stop their runners, which write what they still hold
                os.kill(p.pid, signal.SIGTERM)
            for p in procs[:3]:
                p.wait(60)
            marks = read_timeline(root / "timeline")
            for label, inst in placed.items():
                if all(s["tp_size"] == 1 for s in inst["shards"]):
                    timelines[label] = timeline_legs(marks, windows[label])
        if args.json:
            print(json.dumps({"model": args.model, "tokens": args.tokens, "rows": rows, "llama_cpp": peers,
                              "timelines": {k: {"steps": n, "legs_s": dict(legs)} for k, (legs, n) in timelines.items()}},
                             indent=2))
            return 0
        prof = json.loads((root / "profile.json").read_text())
        print(f"model {args.model}, {args.prompt}-token prompt, {args.tokens} tokens greedy, best of {args.repeats} "
              f"(turns interleaved), "
              f"3 nodes on 127.0.0.1 ({os.cpu_count()} cores; profile {prof['memory_bandwidth_gbps']:.1f} GB/s, "
              f"{prof['gflops_fp32']:.0f} GFLOP/s)")
        print(f"{'config':<11} {'tok/s':>7} {'median':>7} {'x single':>9} {'predicted':>10} {'pred x':>7} {'pred err':>9} "
              f"{'comm ms/tok':>12} {'pred comm':>10} {'compute ms':>11}  layers")
        for r in rows:
            print(f"{r['config']:<11} {r['decode_tps']:7.1f} {r['median_tps']:7.1f} {r['vs_single']:9.2f} {r['predicted_tps']:10.1f} "
                  f"{r['predicted_vs_single']:7.2f} {100 * r['prediction_error']:8.0f}% {r['comm_ms_per_token']:12.2f} "
                  f"{r['predicted_comm_ms_per_token']:10.2f} {r['compute_ms_per_token']:11.2f}  {r['layers']}")
        if peers:
            by = {r["config"]: r["decode_tps"] for r in rows}
            one, three = peers["llama.cpp"], peers["llama.cpp RPC-3"]
            print(f"llama.cpp (llama-bench, same turns): alone {one:.1f} tok/s, over 3 RPC servers {three:.1f} tok/s "
                  f"({three / one:.2f}x its own single)")
            print(f"shoal / llama.cpp: single {by['single'] / one:.2f}x"
                  + (f", pipeline-3 / RPC-3 {by['pipeline-3'] / three:.2f}x" if "pipeline-3" in by else ""))
        for label, (legs, n) in timelines.items():
            print(f"\n{label}: a decode step, leg by leg (median of {n} steps, us)")
            for name, sec in legs:
                print(f"  {name:<36} {sec * 1e6:8.0f}")
        return 0
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                os.kill(p.pid, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
