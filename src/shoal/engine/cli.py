"""`shoal generate` and `shoal bench`. Nothing heavy is imported until a command runs."""

from __future__ import annotations

import argparse
import json
import sys


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None, help="catalog id, GGUF file or model directory (default: smollm2-135m)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--max-tokens", type=int, default=256, metavar="N", help="most tokens to generate (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="sampling temperature; 0 is greedy (default 0)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P",
                   help="sample only from the most likely tokens whose probabilities sum to P (default 1: off)")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="sample only from the K most likely tokens (default 0: off)")
    p.add_argument("--min-p", type=float, default=0.0, metavar="P",
                   help="drop tokens less likely than P times the most likely one (default 0: off)")
    p.add_argument("--seed", type=int, default=None, metavar="N", help="random seed, for a sampled reply that can be repeated")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    p.add_argument("--system", default=None, metavar="TEXT", help="system message for the chat template")
    p.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    p.add_argument("prompt", help="the prompt ('-' reads standard input)")
    p.add_argument("--local", action="store_true",
                   help="run the model in this process even if a node runs on this machine (used by default)")
    # --cluster URL: run on the cluster's instance of the model (placed first if there is none).
    from shoal.daemon.cli import add_cluster_placement_arguments

    add_cluster_placement_arguments(p, None)


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--prompt-tokens", type=int, default=128, help="prompt length for the prefill measurement (default 128)")
    p.add_argument("--gen-tokens", type=int, default=128, help="tokens generated for the decode measurement (default 128)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each measurement; the best is reported")
    p.add_argument("--no-llama-cpp", action="store_true", help="skip the llama.cpp comparison")
    p.add_argument("--rounds", type=int, default=2,
                   help="alternating rounds of shoal and llama.cpp (each of --repeats runs); the best of each is reported")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def add_download_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="catalog id (see `shoal download --list`)", nargs="?")
    p.add_argument("--list", action="store_true", help="list the catalog's models")


def run_download(args) -> int:
    from shoal.catalog import CATALOG
    from shoal.weights.download import (
        DownloadError,
        ProgressBar,
        cached_model_path,
        download,
    )

    if args.list or not args.model:
        for e in CATALOG.values():
            where = cached_model_path(e) or ("bundled" if e.bundled_package else "-")
            print(f"{e.id:16} {e.architecture:8} {e.params_b:7.2f}B  {e.hf_repo:45} {where}")
        return 0
    entry = CATALOG.get(args.model)
    if entry is None:
        return _fail(f"unknown model {args.model!r} (known: {', '.join(CATALOG)})")
    try:
        path = download(entry, progress=ProgressBar())
    except DownloadError as e:
        return _fail(str(e))
    print(path)
    return 0


def set_threads(n: int | None) -> int:
    from shoal.engine import threads

    return threads.configure(n)


def _fail(msg: str, code: int = 1) -> int:
    print(f"shoal: error: {msg}", file=sys.stderr)
    return code


def _load(args):
    from shoal.engine.loader import ModelNotFound, load_model
    from shoal.weights.errors import ModelFileError

    try:
        return load_model(args.model)
    except (ModelFileError, ModelNotFound, ValueError) as e:
        raise SystemExit(_fail(str(e)))


def run_generate(args) -> int:
    from shoal.engine.generate import ContextOverflowError, stream_generate
    from shoal.engine.sampler import SamplingParams

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    try:
        params = SamplingParams(
            max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
            min_p=args.min_p, seed=args.seed, stop=tuple(args.stop),
        )
    except ValueError as e:
        return _fail(str(e), 2)
    if not args.cluster:
        from shoal.engine.chat import node_for

        args.cluster = node_for(args.model, args.local)
        if args.cluster:
            print(f"shoal generate: on the node at {args.cluster} (--local runs in this process)", file=sys.stderr)
    if args.cluster:
        import dataclasses

        from shoal.daemon.cli import generate_on_cluster

        wire = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(params).items()}
        return generate_on_cluster(args, prompt, wire)
    set_threads(args.threads)
    lm = _load(args)
    tok = lm.tokenizer
    if args.raw:
        ids = tok.encode(prompt)
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": prompt}]
        ids = tok.encode_chat(messages)
    stats = None
    try:
        for ev, stats in stream_generate(lm.model, tok, ids, params, lm.args.max_context):
            if ev.text:
                sys.stdout.write(ev.text)
                sys.stdout.flush()
    except ContextOverflowError as e:
        return _fail(str(e))
    sys.stdout.write("\n")
    if stats is not None:
        print(
            f"[{lm.name}] prompt {stats.prompt_tokens} tokens, generated {stats.generation_tokens} | "
            f"TTFT {1000 * (stats.ttft_s or 0):.0f} ms | prefill {stats.prefill_tps:.1f} tok/s | decode {stats.decode_tps:.1f} tok/s",
            file=sys.stderr,
        )
    return 0


def run_bench(args) -> int:
    import resource

    from shoal.engine.bench import bench_llama_bench, bench_llama_cpp, bench_shoal, llama_cpp_bin

    threads = set_threads(args.threads)
    lm = _load(args)
    tools = llama_cpp_bin() if not args.no_llama_cpp and lm.path.suffix == ".gguf" else None
    ours, peer = None, None
    for _ in range(max(1, args.rounds) if tools else 1):  # interleaved: the machine's state hits both alike
        got = bench_shoal(lm, args.prompt_tokens, args.gen_tokens, args.repeats)
        ours = got if ours is None else {k: max(v, got[k]) if k != "prompt_ids" else v for k, v in ours.items()}
        if tools:
            r = bench_llama_bench(tools, lm.path, args.prompt_tokens, args.gen_tokens, threads, args.repeats)
            peer = r if peer is None else {k: max(v, r[k]) for k, v in peer.items()}
    assert ours is not None
    result = {
        "model": lm.name,
        "threads": threads,
        "prompt_tokens": args.prompt_tokens,
        "gen_tokens": args.gen_tokens,
        **ours,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if not args.no_llama_cpp and lm.path.suffix == ".gguf":
        ref = peer if peer is not None else bench_llama_cpp(lm.path, ours["prompt_ids"], args.gen_tokens, threads, args.repeats)
        if ref is not None:
            ref["tool"] = f"llama-bench ({tools})" if peer is not None else "llama-cpp-python"
        if ref is not None:
            result["llama_cpp"] = ref
            result["prefill_ratio_vs_llama_cpp"] = ours["prefill_tokens_per_s"] / ref["prefill_tokens_per_s"]
            result["decode_ratio_vs_llama_cpp"] = ours["decode_tokens_per_s"] / ref["decode_tokens_per_s"]
    result.pop("prompt_ids")
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"model {result['model']}  threads {threads}  prompt {args.prompt_tokens}  gen {args.gen_tokens}")
    print(f"shoal      prefill {result['prefill_tokens_per_s']:8.1f} tok/s   decode {result['decode_tokens_per_s']:8.1f} tok/s   peak RSS {result['peak_rss_mb']:.0f} MB")
    if "llama_cpp" in result:
        r = result["llama_cpp"]
        print(f"llama.cpp  prefill {r['prefill_tokens_per_s']:8.1f} tok/s   decode {r['decode_tokens_per_s']:8.1f} tok/s   ({r['tool']})")
        print(f"ratio      prefill {result['prefill_ratio_vs_llama_cpp']:8.2f}x        decode {result['decode_ratio_vs_llama_cpp']:8.2f}x")
    elif not args.no_llama_cpp:
        print("llama.cpp  not measured (not a GGUF model, or no llama.cpp: build its tools with "
              "../shared/tools/llama-cpp-tools.sh .peers/llama.cpp, or set $SHOAL_LLAMA_CPP to their bin folder)")
    return 0
