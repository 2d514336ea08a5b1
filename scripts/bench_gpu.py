#!/usr/bin/env python
"""Decode speed of the torch backend on a card against the card's memory-bandwidth limit.

Writes a synthetic Llama-shaped bf16 checkpoint (random weights; `--shape 1b` or `8b`), loads it
with `--device cuda`, and times greedy decode of one sequence; then measures the card's copy
bandwidth (a large device-to-device copy) and prints, side by side, the measured tokens/s, the
limit bandwidth / weight bytes per token, and their ratio (the goal: >= 0.7).

    python scripts/bench_gpu.py [--shape 1b] [--tokens 128] [--json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {  # Llama 3.2 1B and Llama 3.1 8B
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8),
}


def card_bandwidth_gbs(n_bytes: int = 1 << 30) -> float:
    """Copy bandwidth of the card (bytes read + written per second / 1e9), best of 10."""
    a = torch.empty(n_bytes // 2, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(10):
        torch.cuda.synchronize()
        t = time.perf_counter()
        b.copy_(a)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * a.numel() / best / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu: torch sees no CUDA device")
    import transformers

    from shoal.engine.device import Device
    from shoal.engine.loader import load_model
    from shoal.models.base import BatchLayout

    cfg = transformers.LlamaConfig(vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False, **SHAPES[args.shape])
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / args.shape
        with torch.device("cuda"):
            model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
        model.save_pretrained(path)
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        read_per_token = weight_bytes - model.model.embed_tokens.weight.numel() * 2  # the embedding: one row a token
        del model
        torch.cuda.empty_cache()
        lm = load_model(str(path), with_tokenizer=False, device=Device("cuda"))
    caches = [lm.model.make_cache()]
    ids = list(range(1, 17))
    with torch.inference_mode():
        lm.model(torch.tensor(ids), BatchLayout([len(ids)], torch.arange(len(ids)), caches))
        token, pos = torch.tensor([5]), len(ids)
        for warm in (True, False):
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(8 if warm else args.tokens):
                logits = lm.model(token, BatchLayout([1], torch.tensor([pos]), caches))
                token = logits.argmax(-1)
                pos += 1
            torch.cuda.synchronize()
            elapsed = time.perf_counter() - t
    tps = args.tokens / elapsed
    bw = card_bandwidth_gbs()
    limit = bw * 1e9 / read_per_token
    out = {"card": torch.cuda.get_device_name(), "shape": args.shape, "weights_gb": round(weight_bytes / 1e9, 2),
           "decode_tokens_per_s": round(tps, 1), "bandwidth_gbs": round(bw, 1), "limit_tokens_per_s": round(limit, 1),
           "ratio_to_limit": round(tps / limit, 3)}
    print(json.dumps(out) if args.json else
          f"{out['card']}, {args.shape} bf16 ({out['weights_gb']} GB): decode {tps:.1f} tok/s; the card copies {bw:.0f} GB/s, "
          f"so the limit is {limit:.1f} tok/s; ratio {tps / limit:.2f}")


if __name__ == "__main__":
    main()
