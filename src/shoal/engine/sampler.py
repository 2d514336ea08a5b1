"""Choosing the next token: greedy, or temperature with top-k, top-p and min-p filtering."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from shoal.engine.grammar import Constraint


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means off
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # return the chosen token's logprob and this many top alternatives
    prompt_logprobs: int | None = None  # also score the prompt (each token given the ones before it)
    stop_token_ids: tuple[int, ...] = field(default=())
    constraint: Constraint | None = None  # the output must match this schema or grammar (engine/grammar.py)
    # False: special tokens the model writes stay in the text (tool-call markers that are tokens).
    skip_special_tokens: bool = True

    def __post_init__(self):
        if self.max_tokens < 0:
            raise ValueError("max_tokens must be >= 0")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError("min_p must be in [0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")


# Below this, dividing the logits by the temperature overflows float32 (inf - inf = NaN): such a
# temperature means "the most likely token", which is what greedy gives.
MIN_TEMPERATURE = 1e-4


def is_greedy(params: SamplingParams) -> bool:
    return params.temperature < MIN_TEMPERATURE


def make_generator(params: SamplingParams) -> torch.Generator | None:
    if is_greedy(params) or params.seed is None:
        return None
    g = torch.Generator()
    g.manual_seed(params.seed)
    return g


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """logits (vocab,) float32 -> token id."""
    if is_greedy(params):
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cum = torch.cumsum(sorted_probs, dim=-1)
        # keep the smallest prefix whose mass reaches top_p (the token that crosses it included)
        drop = cum - sorted_probs > params.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def token_logprobs(logits: torch.Tensor, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """The chosen token's log-probability and the `top` most likely alternatives."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    alts = []
    if top > 0:
        vals, ids = torch.topk(lp, top)
        # A grammar's mask leaves some rows fewer possible tokens than `top`: the impossible ones are no alternative.
        alts = [(int(i), float(v)) for i, v in zip(ids, vals) if v > float("-inf")]
    return float(lp[token]), alts


def skip_samples(generator: torch.Generator, vocab: int, n: int) -> None:
    """Advance `generator` past n samples over a vocabulary of this size, as `sample` drew them.
    `torch.multinomial` of one sample draws one exponential per vocabulary entry whatever the
    probabilities, so drawing from uniform ones consumes exactly what the real draws did: a seeded
    request moved to another placement goes on with the random stream it would have had."""
    ones = torch.ones(vocab)
    for _ in range(n):
        torch.multinomial(ones, 1, generator=generator)
