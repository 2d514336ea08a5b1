"""Prefill and decode speed of shoal's engine, and of llama.cpp on the same GGUF in the same run.

The peer is llama.cpp's own `llama-bench` where its tools are built (`../shared/tools/llama-cpp-tools.sh
.peers/llama.cpp` from the checkout; or `$SHOAL_LLAMA_CPP` naming their bin folder), else
llama-cpp-python where it is installed. Rounds alternate between the two, and each reports its best.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from shoal.engine.generate import BatchGenerator
from shoal.engine.sampler import SamplingParams

_FILLER = (
    "The history of computing is a story of machines growing smaller, faster and more connected. "
    "Early computers filled rooms; today a phone holds more power than they did. "
)


def bench_prompt(tokenizer, n: int) -> list[int]:
    ids = tokenizer.encode(_FILLER * (n // 8 + 2), add_special_tokens=False)
    return ids[:n]


def bench_shoal(lm, prompt_tokens: int, gen_tokens: int, repeats: int) -> dict:
    """Best of `repeats` runs: prefill of the whole prompt in one chunk, then greedy decode."""
    prompt = bench_prompt(lm.tokenizer, prompt_tokens)
    ctx = lm.args.max_context
    best_prefill, best_decode = 0.0, 0.0
    for r in range(repeats + 1):  # the first run warms up (kernel compilation, caches)
        gen = BatchGenerator(lm.model, lm.tokenizer, ctx, prefill_chunk=prompt_tokens, max_batch_tokens=prompt_tokens)
        gen.add(prompt, SamplingParams(max_tokens=gen_tokens if r else 4, ignore_eos=True))
        t0 = time.perf_counter()
        gen.step()  # prefill + first token
        t1 = time.perf_counter()
        n = 0
        while gen.has_work:
            gen.step()
            n += 1
        t2 = time.perf_counter()
        if r == 0:
            continue
        best_prefill = max(best_prefill, len(prompt) / (t1 - t0))
        if n:
            best_decode = max(best_decode, n / (t2 - t1))
    return {"prefill_tokens_per_s": best_prefill, "decode_tokens_per_s": best_decode, "prompt_ids": prompt}


def llama_cpp_bin() -> Path | None:
    """The folder of llama.cpp's built tools: $SHOAL_LLAMA_CPP, else .peers/llama.cpp/bin in the
    current folder or the checkout this package runs from."""
    candidates = [os.environ.get("SHOAL_LLAMA_CPP", "")]
    candidates += [str(root / ".peers" / "llama.cpp" / "bin") for root in (Path.cwd(), Path(__file__).resolve().parents[3])]
    for c in candidates:
        if c and (Path(c) / "llama-bench").is_file() and os.access(Path(c) / "llama-bench", os.X_OK):
            return Path(c)
    return None


def bench_llama_bench(bin_dir: Path, path: Path, prompt_tokens: int, gen_tokens: int, threads: int, repeats: int) -> dict:
    """llama-bench's best prefill (pp) and decode (tg) of `repeats` runs each, on the same GGUF."""
    cmd = [str(bin_dir / "llama-bench"), "-m", str(path), "-p", str(prompt_tokens), "-n", str(gen_tokens), "-t", str(threads),
           "-r", str(repeats), "-o", "json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=True).stdout
    rows = json.loads(out[out.index("[") :])
    best = {"prefill_tokens_per_s": 0.0, "decode_tokens_per_s": 0.0}
    for row in rows:
        key = "decode_tokens_per_s" if row.get("n_gen", 0) > 0 else "prefill_tokens_per_s"
        best[key] = max(best[key], *row.get("samples_ts", [row["avg_ts"]]))
    return best


def bench_llama_cpp(path: Path, prompt: list[int], gen_tokens: int, threads: int, repeats: int) -> dict | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    # llama.cpp crashes when n_batch exceeds n_ctx: keep the context at least one batch long.
    n_ctx = max(512, len(prompt) + gen_tokens + 8)
    llm = Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                n_batch=min(n_ctx, max(512, len(prompt))), verbose=False)
    best_prefill, best_decode = 0.0, 0.0
    for r in range(repeats + 1):
        # Greedy through llama-cpp-python's own generator (its low-level `eval` crashes in 0.3.36).
        llm.reset()  # else generate() reuses the cached prefix of the previous run
        tokens = llm.generate(prompt, temp=0.0, top_k=1, reset=True)
        t0 = time.perf_counter()
        next(tokens)  # prefill + the first token
        t1 = time.perf_counter()
        for _ in range(gen_tokens):
            next(tokens)
        t2 = time.perf_counter()
        tokens.close()
        if r:
            best_prefill = max(best_prefill, len(prompt) / (t1 - t0))
            best_decode = max(best_decode, gen_tokens / (t2 - t1))
    return {"prefill_tokens_per_s": best_prefill, "decode_tokens_per_s": best_decode}
