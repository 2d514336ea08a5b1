"""How fast this machine decodes, measured with the engine itself: the fixed cost of one layer
(Python, kernel dispatch, the small per-layer ops) and the rate at which a layer's 4-bit weights
are read. The placement's cost model prices every layer with these two numbers, so its predictions
follow the machine rather than constants from another one (a copy benchmark says little about
how fast the quantized kernels stream weights, and nothing about dispatch).

Three random q4 Llama shards, decoding one sequence with the real kernels:
    narrow 2 layers, narrow 8 layers  -> per-layer fixed cost (the difference, over 6 layers)
    wide 4 layers (~9.5 MB a layer)    -> the weight read rate, once the fixed cost is taken off
each timed in a few rounds, the best round of each kept, with how far the rounds disagree.

`python -m shoal.engine.probe` prints the figures as JSON; the node's profile runs it in a child
process (the kernels' memory never lands in the daemon) and caches the result with the profile
when profile.py judges it trustworthy.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import numpy as np
import torch

from shoal.engine import threads
from shoal.models.base import BatchLayout, Part
from shoal.models.llama import LlamaShard, ModelArgs
from shoal.quant.formats import quantize_affine

NARROW = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
WIDE = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_key_value_heads=4)
CONTEXT = 64  # tokens already cached when the timed steps run
ROUNDS = 3  # ~0.25 s a round on the reference machine


def random_q4_model(layers: int, seed: int = 0, vocab: int = 256, **shape: int) -> LlamaShard:
    args = ModelArgs(model_type="llama", num_hidden_layers=layers, vocab_size=vocab, tie_word_embeddings=True, **shape)
    g = np.random.default_rng(seed)
    H, F = args.hidden_size, args.intermediate_size
    D = H // args.num_attention_heads
    kv = args.num_key_value_heads * D

    def q4(n: int, k: int):
        return quantize_affine(g.standard_normal((n, k), dtype=np.float32) * 0.02)

    w: dict[str, object] = {"model.embed_tokens.weight": torch.from_numpy(g.standard_normal((vocab, H), dtype=np.float32)),
                            "model.norm.weight": torch.ones(H)}
    for i in range(layers):
        p = f"model.layers.{i}."
        w.update({
            p + "input_layernorm.weight": torch.ones(H), p + "post_attention_layernorm.weight": torch.ones(H),
            p + "self_attn.q_proj.weight": q4(H, H), p + "self_attn.k_proj.weight": q4(kv, H),
            p + "self_attn.v_proj.weight": q4(kv, H), p + "self_attn.o_proj.weight": q4(H, H),
            p + "mlp.gate_proj.weight": q4(F, H), p + "mlp.up_proj.weight": q4(F, H), p + "mlp.down_proj.weight": q4(H, F),
        })
    return LlamaShard(args, Part(), w).eval()


def layer_bytes(model: LlamaShard) -> int:
    """Bytes of weights one decode step reads per layer."""
    total = 0
    for layer in model.layers:
        for mod in layer.modules():
            qw = getattr(mod, "qweight", None)
            if qw is not None:
                total += qw.nbytes
    return total // len(model.layers)


def time_layers(model: LlamaShard, steps: int, budget_s: float) -> float:
    """Median seconds of one decode step through the model's layers (one sequence)."""
    cache = model.make_cache()
    H = model.args.hidden_size
    with torch.inference_mode():
        prompt = torch.randn(CONTEXT, H)
        model.run_layers(prompt, BatchLayout([CONTEXT], torch.arange(CONTEXT), [cache]))
        times: list[float] = []
        deadline = time.perf_counter() + budget_s
        for pos in range(CONTEXT, CONTEXT + steps):
            x = torch.randn(1, H)
            layout = BatchLayout([1], torch.tensor([pos]), [cache])
            t = time.perf_counter()
            model.run_layers(x, layout)
            times.append(time.perf_counter() - t)
            if time.perf_counter() > deadline and len(times) >= 5:
                break
    return statistics.median(times[2:] if len(times) > 6 else times)


def measure(budget_s: float = 6.0, rounds: int = ROUNDS) -> dict[str, float]:
    """{"layer_overhead_us", "q4_read_gbps", "q4_layer_bytes", "spread"}: decode on every core, as a
    runner does. Every timing is the best of `rounds` rounds: a burst of other work only ever makes
    a round slower, so the best is the closest to what the idle machine does. `spread` is how far
    the worst round fell behind the best (0.5: 1.5x slower), a sign of load while it ran."""
    threads.configure()
    threads.for_step(1)
    narrow2, narrow8 = random_q4_model(2, **NARROW), random_q4_model(8, **NARROW)
    wide = random_q4_model(4, **WIDE)
    for m in (narrow2, narrow8, wide):  # compile or load the kernels, first touch of every buffer
        time_layers(m, 3, budget_s)
    share = budget_s / (3 * rounds)
    runs: list[tuple[float, float, float]] = []
    for _ in range(rounds):
        runs.append((time_layers(narrow2, 60, share), time_layers(narrow8, 60, share), time_layers(wide, 40, share)))
    t2, t8, tw = (min(ts) for ts in zip(*runs))
    spread = max(max(ts) / min(ts) for ts in zip(*runs)) - 1
    overhead = max(1e-6, (t8 - t2) / 6)
    fixed = max(0.0, t2 - 2 * overhead)  # per step: RoPE tables, the decode-attention tables
    nbytes = layer_bytes(wide)
    read_s = max(1e-7, (tw - fixed) / 4 - overhead)
    return {"layer_overhead_us": round(overhead * 1e6, 1), "q4_read_gbps": round(nbytes / read_s / 1e9, 2),
            "q4_layer_bytes": nbytes, "spread": round(spread, 3)}


if __name__ == "__main__":
    budget = float(sys.argv[1]) if len(sys.argv) > 1 else 6.0
    print(json.dumps(measure(budget)))
