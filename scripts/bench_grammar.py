"""What grammar-constrained decoding costs per token: decode tok/s of a batch of free rows against
the same batch with every row (then half the rows) constrained by a JSON schema, interleaved in
one process on the same model, plus the time spent computing and applying the masks.

    .venv/bin/python scripts/bench_grammar.py [--batch 4] [--tokens 64] [--trials 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

from shoal.engine.generate import BatchGenerator
from shoal.engine.grammar import Constraint, Grammars
from shoal.engine.loader import load_model
from shoal.engine.sampler import SamplingParams

# At least 32 records (~400 tokens): no row finishes its JSON inside the measured tokens.
_PET = {"type": "object", "additionalProperties": False, "required": ["name", "age", "kind"],
        "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 30},
                       "kind": {"enum": ["cat", "dog", "bird"]}}}
SCHEMA = {"type": "array", "items": _PET, "minItems": 32}
PROMPT = "List the pets of a large animal shelter as a JSON array."


class TimedGrammars(Grammars):
    """Grammars that keep the time each constrained row's mask took (compute and apply)."""

    def __init__(self, tokenizer, spent: list[float]):
        super().__init__(tokenizer)
        self.spent = spent

    def mask(self, logits, rows):
        t0 = time.perf_counter()
        out = super().mask(logits, rows)
        self.spent.append((time.perf_counter() - t0) / len(rows))
        return out


def run(lm, batch: int, constrained: int, tokens: int, spent: list[float]) -> float:
    """Decode tok/s of one batch (prefill excluded); `constrained` of its rows carry the schema."""
    gen = BatchGenerator(lm.model, lm.tokenizer, lm.args.max_context)
    gen.grammars = TimedGrammars(lm.tokenizer, spent)
    ids = lm.tokenizer.encode_chat([{"role": "user", "content": PROMPT}])
    for i in range(batch):
        c = Constraint.json_schema(SCHEMA) if i < constrained else None
        gen.add(ids, SamplingParams(max_tokens=tokens, ignore_eos=True, constraint=c))
    gen.step()  # the prefill, and every row's first token
    n, t0 = 0, time.perf_counter()
    while gen.has_work:
        n += sum(ev.token is not None for ev in gen.step())
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--trials", type=int, default=3)
    a = ap.parse_args()
    lm = load_model(None)
    modes = {"free": 0, "all constrained": a.batch}
    if a.batch > 1:
        modes["half constrained"] = a.batch // 2
    rates: dict[str, list[float]] = {m: [] for m in modes}
    mask_s: list[float] = []
    run(lm, a.batch, a.batch, 8, [])  # warm-up: numba's compile, the grammar's tokenizer
    for _ in range(a.trials):
        for mode, k in modes.items():
            rates[mode].append(run(lm, a.batch, k, a.tokens, mask_s))
    # The best of the interleaved trials: on a shared machine the others measure its neighbours.
    free = max(rates["free"])
    print(f"batch {a.batch}, {a.tokens} tokens a row, best of {a.trials} interleaved trials")
    for mode, r in rates.items():
        tps = max(r)
        print(f"  {mode:17s} {tps:7.1f} tok/s  ({1000 * a.batch / tps:6.2f} ms a step, {100 * (tps - free) / free:+5.1f}% vs free)")
    print(f"  mask (compute + apply) per constrained row: median {1e6 * statistics.median(mask_s):.0f} us, "
          f"mean {1e6 * statistics.mean(mask_s):.0f} us")


if __name__ == "__main__":
    main()
