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
        probs = probs / probs.sum()  # top_p measures the mass of what min_p left
    if params.top_p < 1.0:
        probs = _nucleus(probs, params.top_p)
    return _draw(probs, generator)


# The nucleus is looked for among this many most likely tokens first (a partial sort), and the
# whole vocabulary is sorted only where it is wider: sorting 49,152 probabilities took 3 ms, more
# than the bundled model's whole decode step.
NUCLEUS_FIRST_LOOK = 64


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """probs with every token outside the nucleus set to 0: the smallest prefix of the tokens by
    descending probability whose mass reaches top_p (the token that crosses it included)."""
    vocab = probs.shape[-1]
    k = min(vocab, NUCLEUS_FIRST_LOOK)
    while True:
        if k < vocab:
            kept, order = torch.topk(probs, k)
        else:
            kept, order = torch.sort(probs, descending=True)
        cum = torch.cumsum(kept, dim=-1)
        # The first token outside these k has cum[-1] before it: dropped when that exceeds top_p,
        # and so then is every token after it; the same sums, in the same order, as a full sort's.
        # Where the k hold every token left (a zero among them), there is nothing further to look at.
        if k == vocab or cum[-1] > top_p or kept[-1] == 0:
            kept = kept.masked_fill(cum - kept > top_p, 0.0)
            return torch.zeros_like(probs).scatter_(0, order, kept)
        k = min(vocab, 8 * k)


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """A token drawn with these (unnormalised) probabilities, by inverting their running sum at one
    uniform number: one random draw a token, where `torch.multinomial` drew one per vocabulary
    entry (~0.9 ms a token over 49,152)."""
    cdf = torch.cumsum(probs, dim=-1)
    u = torch.rand(1, generator=generator, dtype=torch.float64).item()
    # The first token whose running sum exceeds u·total: its own probability is > 0.
    token = int(torch.searchsorted(cdf, torch.tensor([u * float(cdf[-1])], dtype=cdf.dtype), right=True))
    if token >= cdf.shape[-1]:  # u·total rounded up to the total: the last token that can be drawn
        token = int(torch.nonzero(probs).max())
    return token


def token_logprobs(logits: torch.Tensor, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """The chosen token's log-probability and the `top` most likely alternatives."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    alts = []
    if top > 0:
        vals, ids = torch.topk(lp, top)
        # A grammar's mask leaves some rows fewer possible tokens than `top`: the impossible ones are no alternative.
        alts = [(int(i), float(v)) for i, v in zip(ids, vals) if v > float("-inf")]
    return float(lp[token]), alts


def skip_samples(generator: torch.Generator, n: int) -> None:
    """Advance `generator` past n samples, as `sample` drew them (one uniform number each): a
    seeded request moved to another placement goes on with the random stream it would have had."""
    for _ in range(n):
        torch.rand(1, generator=generator, dtype=torch.float64)
