"""The generation loop on the bundled model: batching, chunked prefill, sampling, stops, limits."""

from __future__ import annotations

import os

import pytest
import torch

from shoal.catalog import CATALOG, DEFAULT_MODEL, bundled_path
from shoal.engine.generate import BatchGenerator, ContextOverflowError, stream_generate
from shoal.engine.loader import load_model
from shoal.engine import sampler
from shoal.engine.sampler import SamplingParams

pytestmark = pytest.mark.skipif(bundled_path(CATALOG[DEFAULT_MODEL]) is None, reason="bundled model not installed")


@pytest.fixture(scope="module")
def lm():
    return load_model(DEFAULT_MODEL)


def prompt_ids(lm, text):
    return lm.tokenizer.encode_chat([{"role": "user", "content": text}])


def run(lm, ids, params, **kw):
    tokens, text, finish = [], "", None
    for ev, _ in stream_generate(lm.model, lm.tokenizer, ids, params, lm.args.max_context, **kw):
        if ev.token is not None:
            tokens.append(ev.token)
        text += ev.text
        finish = ev.finish_reason or finish
    return tokens, text, finish


def test_batch_of_different_lengths_equals_each_alone(lm):
    prompts = [prompt_ids(lm, t) for t in ("Hi", "Explain photosynthesis to a child in simple words.", "Count from one to five.")]
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    alone = [run(lm, p, params)[0] for p in prompts]
    gen = BatchGenerator(lm.model, lm.tokenizer, lm.args.max_context)
    uids = [gen.add(p, params) for p in prompts]
    got = {u: [] for u in uids}
    steps = 0
    while gen.has_work:
        for ev in gen.step():
            if ev.token is not None:
                got[ev.uid].append(ev.token)
        steps += 1
    assert [got[u] for u in uids] == alone
    assert steps == 12  # all three decoded together, one forward per token


def test_sequence_joining_mid_stream(lm):
    a, b = prompt_ids(lm, "Tell me about cats."), prompt_ids(lm, "Tell me about dogs.")
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    expect_a, expect_b = run(lm, a, params)[0], run(lm, b, params)[0]
    gen = BatchGenerator(lm.model, lm.tokenizer, lm.args.max_context)
    ua = gen.add(a, params)
    got = {ua: []}
    for i in range(20):
        if i == 4:
            ub = gen.add(b, params)
            got[ub] = []
        for ev in gen.step():
            if ev.token is not None:
                got[ev.uid].append(ev.token)
        if not gen.has_work:
            break
    assert got[ua] == expect_a and got[ub] == expect_b


def test_chunked_prefill_equals_one_chunk(lm):
    ids = prompt_ids(lm, "Summarise the plot of Romeo and Juliet in three sentences, please.")
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    assert run(lm, ids, params, prefill_chunk=7)[0] == run(lm, ids, params, prefill_chunk=4096, max_batch_tokens=4096)[0]


def test_max_tokens_and_finish_reason(lm):
    tokens, _, finish = run(lm, prompt_ids(lm, "Write a long story."), SamplingParams(max_tokens=5))
    assert len(tokens) == 5 and finish == "length"


def test_eos_stops(lm):
    tokens, text, finish = run(lm, prompt_ids(lm, "Say just the word yes."), SamplingParams(max_tokens=64))
    assert finish == "stop" and tokens[-1] in lm.tokenizer.eos_token_ids
    assert "<|im_end|>" not in text


def test_stop_string_cuts_text(lm):
    ids = prompt_ids(lm, "Count from one to ten, separated by commas.")
    _, full, _ = run(lm, ids, SamplingParams(max_tokens=40))
    assert len(full) > 20
    stop = full[len(full) // 2 : len(full) // 2 + 3]  # spans a token boundary more often than not
    _, text, finish = run(lm, ids, SamplingParams(max_tokens=40, stop=(stop,)))
    assert finish == "stop" and text == full[: full.index(stop)]


def test_seeded_sampling_is_reproducible_and_varies(lm):
    ids = prompt_ids(lm, "Invent a name for a cat.")
    p = dict(max_tokens=12, temperature=1.0, top_p=0.95, ignore_eos=True)
    a = run(lm, ids, SamplingParams(seed=1, **p))[0]
    assert a == run(lm, ids, SamplingParams(seed=1, **p))[0]
    others = {tuple(run(lm, ids, SamplingParams(seed=s, **p))[0]) for s in (2, 3, 4)}
    assert len(others | {tuple(a)}) > 1


def test_top_k_one_is_greedy(lm):
    ids = prompt_ids(lm, "What is two plus two?")
    greedy = run(lm, ids, SamplingParams(max_tokens=8, ignore_eos=True))[0]
    assert run(lm, ids, SamplingParams(max_tokens=8, temperature=0.8, top_k=1, seed=5, ignore_eos=True))[0] == greedy
    assert run(lm, ids, SamplingParams(max_tokens=8, temperature=0.8, min_p=1.0, seed=5, ignore_eos=True))[0] == greedy


def test_prompt_longer_than_context_is_refused(lm):
    gen = BatchGenerator(lm.model, lm.tokenizer, max_context=16)
    with pytest.raises(ContextOverflowError, match="16"):
        gen.add(list(range(100, 140)), SamplingParams())


def test_generation_stops_at_context_end(lm):
    ids = prompt_ids(lm, "Hi")
    tokens, finish = run_ctx(lm, ids, len(ids) + 3)
    assert finish == "length" and len(tokens) == 3


def run_ctx(lm, ids, ctx):
    tokens, finish = [], None
    for ev, _ in stream_generate(lm.model, lm.tokenizer, ids, SamplingParams(max_tokens=50, ignore_eos=True), ctx):
        if ev.token is not None:
            tokens.append(ev.token)
        finish = ev.finish_reason or finish
    return tokens, finish


def test_bad_sampling_params_are_refused():
    for bad in (dict(temperature=-1), dict(top_p=0), dict(min_p=2), dict(max_tokens=-1), dict(top_k=-2)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_prefix_reuse_equals_full_prefill(lm):
    """A prompt that starts like an earlier one (shared system prompt, then a later chat turn)
    reuses its K/V and still gives the tokens a full prefill gives."""
    system = {"role": "system", "content": "You are a terse assistant. Answer in one short sentence, no lists."}
    first = lm.tokenizer.encode_chat([system, {"role": "user", "content": "Name a primary color."}])
    other = lm.tokenizer.encode_chat([system, {"role": "user", "content": "What is the capital of France?"}])
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    gen = BatchGenerator(lm.model, lm.tokenizer, lm.args.max_context, prefix_cache_tokens=4096)

    def generate(ids):
        uid = gen.add(ids, params)
        cached = gen.sequences[uid].stats.cached_tokens
        out = []
        while gen.has_work:
            out += [ev.token for ev in gen.step() if ev.token is not None]
        return out, cached

    tokens, cached = generate(first)
    assert cached == 0 and tokens == run(lm, first, params)[0]
    turn2 = lm.tokenizer.encode_chat([system, {"role": "user", "content": "Name a primary color."},
                                      {"role": "assistant", "content": lm.tokenizer.decode(tokens)},
                                      {"role": "user", "content": "And another one?"}])
    stored = [first]
    for ids in (other, turn2, first):
        shared = max(len(os.path.commonprefix([s, ids])) for s in stored)
        tokens, cached = generate(ids)
        assert cached == min(shared, len(ids) - 1) >= 16  # all it shares with a stored prompt; never the last token
        assert tokens == run(lm, ids, params)[0]
        stored.append(ids)
    assert gen.prefixes.hits == 3


def test_prefix_store_keeps_to_its_budget(lm):
    prompts = [prompt_ids(lm, f"Tell me a fact about the number {i}.") for i in range(4)]
    budget = 2 * max(len(p) for p in prompts)
    gen = BatchGenerator(lm.model, lm.tokenizer, lm.args.max_context, prefix_cache_tokens=budget)
    for p in prompts:
        gen.add(p, SamplingParams(max_tokens=1))
        while gen.has_work:
            gen.step()
        assert gen.prefixes.tokens <= budget
    assert gen.prefixes.tokens == len(prompts[-1]) + len(prompts[-2])  # the oldest ones went first


def _nucleus_by_full_sort(probs: torch.Tensor, top_p: float) -> set[int]:
    """The nucleus as its definition reads: sort everything, keep the prefix up to the token that reaches top_p."""
    ordered, order = torch.sort(probs, descending=True)
    cum = torch.cumsum(ordered, 0)
    return {int(i) for i, c, p in zip(order, cum, ordered) if c - p <= top_p and p > 0}


@pytest.mark.parametrize("temperature", [0.3, 1.0, 5.0])
@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.999])
def test_nucleus_equals_the_full_sort(temperature, top_p):
    # Temperatures from peaked (a nucleus of a few tokens) to flat (thousands: past the first look).
    logits = torch.randn(5000, generator=torch.Generator().manual_seed(7)) * 3 / temperature
    probs = torch.softmax(logits, -1)
    kept = sampler._nucleus(probs, top_p)
    assert {int(i) for i in torch.nonzero(kept)} == _nucleus_by_full_sort(probs, top_p)
    assert torch.equal(kept[kept > 0], probs[kept > 0])


def test_draws_follow_the_probabilities_and_never_pick_an_excluded_token():
    probs = torch.tensor([0.5, 0.0, 0.25, 0.125, 0.0, 0.125])
    g = torch.Generator().manual_seed(3)
    n = 40_000
    counts = torch.bincount(torch.tensor([sampler._draw(probs, g) for _ in range(n)]), minlength=6).float()
    assert counts[1] == 0 and counts[4] == 0
    # Four binomial standard deviations at most (a fixed seed: the same counts every run).
    sd = torch.sqrt(n * probs * (1 - probs))
    assert torch.all((counts - n * probs).abs() <= 4 * sd + 1e-9)


def test_skipping_samples_leaves_the_generator_where_sampling_would():
    logits = torch.randn(300, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(temperature=0.9, top_p=0.8)
    a, b = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    for _ in range(5):
        sampler.sample(logits, params, a)
    sampler.skip_samples(b, 5)
    assert [sampler.sample(logits, params, a) for _ in range(20)] == [sampler.sample(logits, params, b) for _ in range(20)]


def test_top_p_after_min_p_measures_what_min_p_left():
    # min_p leaves tokens 0-2 (80% of the mass: 3/8, 3/8 and 2/8 of it); top_p 0.7 of that keeps
    # 0 and 1, where 0.7 of the whole would keep 2 as well (0.3 + 0.3 before it).
    probs = torch.tensor([0.3, 0.3, 0.2, 0.1, 0.1])
    logits = probs.log()
    g = torch.Generator().manual_seed(0)
    drawn = {sampler.sample(logits, SamplingParams(temperature=1.0, min_p=0.6, top_p=0.7), g) for _ in range(300)}
    assert drawn == {0, 1}
