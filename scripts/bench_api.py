#!/usr/bin/env python
"""Concurrency benchmark of the OpenAI API on one node: N streaming chat clients at once.

Starts `python -m shoal.api.serve` with the bundled model on a free loopback port (or uses --url),
then for each concurrency level runs every client at the same moment, each streaming a chat
completion of exactly --max-tokens tokens (ignore_eos). Reports per level the aggregate
generation throughput (all clients' tokens / wall time of the round), the time to first token
p50/p99 over the clients, each client's streamed decode (its tokens after the first over the time
from the first to the last), and the engine's mean batch size read from /metrics; finally the
ratio of 8-client to 1-client aggregate throughput (the bar: >= 4x).

--vs-engine: one client's streamed decode through the server against the engine's own decode
(`shoal bench --no-llama-cpp`, in its own process while the server idles), in alternating rounds,
best of each: what the server, the runner's pipe and the client cost a token.

With llama.cpp's tools built (../shared/tools/llama-cpp-tools.sh .peers/llama.cpp, or
$SHOAL_LLAMA_CPP), --peer also starts `llama-server -np <most clients>` on the same GGUF with the
same threads and runs every level against both, alternating, and prints llama-server's figures and
the ratio beside shoal's.

    .venv/bin/python scripts/bench_api.py [--levels 1,4,8,16] [--max-tokens 64] [--peer] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time

import aiohttp

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how photosynthesis works.",
    "List some tips for learning a new language.",
    "Describe the water cycle to a child.",
    "What are the benefits of regular exercise?",
    "Write a poem about the sea at night.",
    "Explain what a CPU cache is.",
    "Give me a recipe for pancakes.",
    "Why is the sky blue?",
    "Summarize the plot of a heist movie you invent.",
    "How do vaccines train the immune system?",
    "Describe a day in the life of a honeybee.",
    "What makes a good cup of coffee?",
    "Explain recursion with an example.",
    "Write a letter to a future version of yourself.",
    "What are black holes?",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, threads: int | None, max_running: int, prefix_cache_mb: int | None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "shoal.api.serve", "--port", str(port), "--model", model, "--max-running", str(max_running),
           "--log-level", "WARNING"]
    if prefix_cache_mb is not None:
        cmd += ["--prefix-cache-mb", str(prefix_cache_mb)]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "ready" not in line:
        proc.kill()
        raise SystemExit(f"server did not start: {line!r}")
    return proc, f"http://127.0.0.1:{port}"


def start_llama_server(gguf: str, threads: int, slots: int, max_tokens: int) -> tuple[subprocess.Popen, str]:
    from shoal.engine.bench import llama_cpp_bin

    tools = llama_cpp_bin()
    if tools is None:
        raise SystemExit("--peer: llama.cpp's tools are not built (../shared/tools/llama-cpp-tools.sh .peers/llama.cpp)")
    port = free_port()
    ctx = slots * (max_tokens + 256)  # each slot: a chat prompt and the reply
    cmd = [str(tools / "llama-server"), "-m", gguf, "--port", str(port), "-t", str(threads), "-tb", str(threads), "-np", str(slots),
           "-c", str(ctx), "--cont-batching", "--log-disable"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            import urllib.request

            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("llama-server did not start")


async def one_client(session: aiohttp.ClientSession, url: str, model: str, prompt: str, max_tokens: int, start: asyncio.Event) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    await start.wait()
    t0 = time.perf_counter()
    ttft = None
    last = t0
    tokens = 0
    async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        async for raw in resp.content:
            if not raw.startswith(b"data: ") or raw.startswith(b"data: [DONE]"):
                continue
            chunk = json.loads(raw[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for ch in chunk.get("choices") or []:
                if ch["delta"].get("content"):
                    last = time.perf_counter()
                    if ttft is None:
                        ttft = last - t0
    # The first token comes alone (the server holds none back); the rest is the streamed decode.
    decode = (tokens - 1) / (last - t0 - ttft) if ttft is not None and tokens > 1 and last > t0 + ttft else 0.0
    return {"t0": t0, "t1": time.perf_counter(), "ttft": ttft, "tokens": tokens, "decode_tokens_per_s": decode}


async def scrape_batches(session: aiohttp.ClientSession, url: str) -> tuple[float, float]:
    async with session.get(f"{url}/metrics") as r:
        text = await r.text() if r.status == 200 else ""  # llama-server: no metrics unless asked
    steps = sum(float(v) for v in re.findall(r"^shoal_engine_steps_total\{[^}]*\} (\S+)$", text, re.M))
    seqs = sum(float(v) for v in re.findall(r"^shoal_engine_step_sequences_total\{[^}]*\} (\S+)$", text, re.M))
    return steps, seqs


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q * (len(values) - 1))))
    return values[k]


async def run_level(url: str, model: str, clients: int, max_tokens: int, rounds: int) -> dict:
    timeout = aiohttp.ClientTimeout(total=1800)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        steps0, seqs0 = await scrape_batches(session, url)
        results, walls = [], []
        for r in range(rounds):
            start = asyncio.Event()
            tasks = [asyncio.ensure_future(one_client(session, url, model, PROMPTS[(i + r) % len(PROMPTS)], max_tokens, start))
                     for i in range(clients)]
            await asyncio.sleep(0.05)
            start.set()
            res = await asyncio.gather(*tasks)
            walls.append(max(x["t1"] for x in res) - min(x["t0"] for x in res))
            results += res
        steps1, seqs1 = await scrape_batches(session, url)
    total_tokens = sum(x["tokens"] for x in results)
    ttfts = [x["ttft"] for x in results if x["ttft"] is not None]
    return {
        "clients": clients,
        "rounds": rounds,
        "tokens": total_tokens,
        "aggregate_tokens_per_s": total_tokens / sum(walls),
        "per_client_tokens_per_s": statistics.mean(x["tokens"] / (x["t1"] - x["t0"]) for x in results),
        "per_client_decode_tokens_per_s": statistics.mean(x["decode_tokens_per_s"] for x in results),
        "best_decode_tokens_per_s": max(x["decode_tokens_per_s"] for x in results),
        "ttft_p50_ms": 1000 * pct(ttfts, 0.5),
        "ttft_p99_ms": 1000 * pct(ttfts, 0.99),
        "mean_batch": (seqs1 - seqs0) / max(1.0, steps1 - steps0),
    }


def _line(who: str, res: dict) -> str:
    return (f"{who:12s} {res['clients']:3d} clients  aggregate {res['aggregate_tokens_per_s']:7.1f} tok/s"
            f"  per client {res['per_client_tokens_per_s']:6.1f} tok/s (decode {res['per_client_decode_tokens_per_s']:6.1f})"
            f"  TTFT p50 {res['ttft_p50_ms']:7.0f} ms  p99 {res['ttft_p99_ms']:7.0f} ms")


async def bench(args: argparse.Namespace, url: str, peer_url: str | None = None) -> list[dict]:
    levels = [int(x) for x in args.levels.split(",")]
    await run_level(url, args.model, 2, 8, 1)  # warm-up: first requests, batched path
    if peer_url:
        await run_level(peer_url, args.model, 2, 8, 1)
    out = []
    for c in levels:
        res = await run_level(url, args.model, c, args.max_tokens, args.rounds)
        if peer_url:  # right after shoal's, on the same prompts
            res["llama_server"] = await run_level(peer_url, args.model, c, args.max_tokens, args.rounds)
            res["ratio_vs_llama_server"] = res["aggregate_tokens_per_s"] / res["llama_server"]["aggregate_tokens_per_s"]
        out.append(res)
        if not args.json:
            print(_line("shoal", res) + f"  mean batch {res['mean_batch']:5.1f}", flush=True)
            if peer_url:
                print(_line("llama-server", res["llama_server"]) + f"  ratio {res['ratio_vs_llama_server']:.2f}x", flush=True)
    return out


def engine_decode(model: str, threads: int | None, max_tokens: int) -> float:
    """The engine's own decode (`shoal bench`: one process, no server), as one client's would be."""
    cmd = [sys.executable, "-m", "shoal.cli", "bench", "--model", model, "--no-llama-cpp", "--repeats", "1",
           "--prompt-tokens", "32", "--gen-tokens", str(max_tokens), "--json"]
    if threads:
        cmd += ["--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True).stdout
    return json.loads(out)["decode_tokens_per_s"]


async def vs_engine(args: argparse.Namespace, url: str) -> dict:
    stream, engine = [], []
    for _ in range(args.rounds):
        stream.append((await run_level(url, args.model, 1, args.max_tokens, 1))["best_decode_tokens_per_s"])
        engine.append(await asyncio.to_thread(engine_decode, args.model, args.threads, args.max_tokens))
    return {"streamed_decode_tokens_per_s": max(stream), "engine_decode_tokens_per_s": max(engine),
            "ratio": max(stream) / max(engine), "rounds": args.rounds}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--url", default=None, help="a running server (default: start one)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--levels", default="1,4,8,16")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2, help="rounds per level (TTFT percentiles pool them)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--max-running", type=int, default=32)
    p.add_argument("--prefix-cache-mb", type=int, default=None,
                   help="the server's prompt-prefix store (default: the server's; 0: off, every prompt prefilled in full)")
    p.add_argument("--peer", action="store_true", help="also run every level against llama-server on the same GGUF")
    p.add_argument("--vs-engine", action="store_true", help="also one client's streamed decode against `shoal bench`'s, in turns")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    procs = []
    url, peer_url = args.url, None
    try:
        if url is None:
            proc, url = start_server(args.model, args.threads, args.max_running, args.prefix_cache_mb)
            procs.append(proc)
        if args.peer:
            from shoal.engine.loader import resolve_model

            slots = max(int(x) for x in args.levels.split(","))
            proc, peer_url = start_llama_server(str(resolve_model(args.model)), args.threads or os.cpu_count() or 1, slots,
                                                args.max_tokens)
            procs.append(proc)
        results = asyncio.run(bench(args, url, peer_url))
        engine = asyncio.run(vs_engine(args, url)) if args.vs_engine else None
    finally:
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
    by = {r["clients"]: r for r in results}
    ratio = by[8]["aggregate_tokens_per_s"] / by[1]["aggregate_tokens_per_s"] if 1 in by and 8 in by else None
    if args.json:
        print(json.dumps({"model": args.model, "max_tokens": args.max_tokens, "cpu_count": os.cpu_count(), "levels": results,
                          "ratio_8_vs_1": ratio, "vs_engine": engine}))
        return 0
    if ratio is not None:
        print(f"8 clients vs 1: {ratio:.2f}x aggregate throughput (bar: >= 4x)")
    if engine is not None:
        print(f"one client's streamed decode {engine['streamed_decode_tokens_per_s']:.1f} tok/s, the engine's own "
              f"(shoal bench) {engine['engine_decode_tokens_per_s']:.1f}: {engine['ratio']:.2f}x "
              f"(best of {engine['rounds']} turns each)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
