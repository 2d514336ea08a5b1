"""The one scheduler, in process: what it refuses and why, its bounded queue, a failing step that
takes only its own sequences with it, cancellation that frees the KV reservation, and prompt-prefix
reuse for MLA caches (DeepSeek-V3's compressed latents) equal to running without it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shoal.catalog import CATALOG, DEFAULT_MODEL, bundled_path
from shoal.engine.generate import BatchGenerator, stream_generate
from shoal.engine.loader import load_model
from shoal.engine.sampler import SamplingParams
from shoal.engine.scheduler import (
    QUEUE_BUDGETS,
    Outcome,
    RequestRefused,
    Scheduler,
    SchedulerLimits,
)

needs_bundled = pytest.mark.skipif(bundled_path(CATALOG[DEFAULT_MODEL]) is None, reason="the bundled model is not installed")
CONTEXT = 256
PROMPT = [1, 504, 3439, 282, 253, 1789, 28, 2, 198, 42, 7, 900]


@pytest.fixture(scope="module")
def lm():
    return load_model(DEFAULT_MODEL)


def scheduler(lm, budget_tokens: int = 4096, model=None, **limits) -> Scheduler:
    per_token = sum(c.bytes_per_token for c in lm.model.make_cache())
    return Scheduler(model or lm.model, lm.tokenizer, CONTEXT, lm.args.vocab_size, per_token,
                     SchedulerLimits(kv_budget_bytes=budget_tokens * per_token, **limits), name="smol")


def run_all(s: Scheduler) -> dict[str, list[Outcome]]:
    out: dict[str, list[Outcome]] = {}
    while s.has_work:
        for o in s.step():
            out.setdefault(o.rid, []).append(o)
    return out


def tokens(outcomes: list[Outcome]) -> list[int]:
    return [ev.token for o in outcomes for ev in o.events if ev.token is not None]


def reference(lm, prompt: list[int], n: int) -> list[int]:
    params = SamplingParams(max_tokens=n, ignore_eos=True)
    return [ev.token for ev, _ in stream_generate(lm.model, lm.tokenizer, prompt, params, CONTEXT) if ev.token is not None]


@needs_bundled
@pytest.mark.parametrize("prompt, params, status, words", [
    ([], SamplingParams(max_tokens=2), 400, "empty"),
    ([1, 2, 49152], SamplingParams(max_tokens=2), 400, "outside the model's vocabulary"),
    ([1, -1], SamplingParams(max_tokens=2), 400, "outside the model's vocabulary"),
    (list(range(1, 300)), SamplingParams(max_tokens=2), 400, "context is 256"),
    ([1, 2], SamplingParams(max_tokens=10**6), 400, "max_tokens"),
    ([1, 2], SamplingParams(max_tokens=2, logprobs=21), 400, "logprobs"),
    ([1, 2], SamplingParams(max_tokens=2, prompt_logprobs=99), 400, "prompt_logprobs"),
    ([1, 2], SamplingParams(max_tokens=2, stop_token_ids=(10**9,)), 400, "stop token id"),
    ([1, 2], SamplingParams(max_tokens=200), 400, "KV cache"),
])
def test_refusals_are_the_requests_own(lm, prompt, params, status, words) -> None:
    s = scheduler(lm, budget_tokens=100)
    s.offer("ok", PROMPT, SamplingParams(max_tokens=4, ignore_eos=True))
    with pytest.raises(RequestRefused) as e:
        s.offer("bad", prompt, params)
    assert e.value.status == status and words in e.value.message, e.value.message
    got = run_all(s)
    assert list(got) == ["ok"] and tokens(got["ok"]) == reference(lm, PROMPT, 4)


@needs_bundled
def test_queue_is_bounded_by_kv_bytes_and_count(lm) -> None:
    s = scheduler(lm, budget_tokens=64)  # one request of 12 + 40 tokens fits at a time
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    taken = 0
    with pytest.raises(RequestRefused) as e:
        for i in range(100):
            s.offer(f"r{i}", PROMPT, params)
            taken += 1
    assert e.value.status == 429 and e.value.retry_after and e.value.retry_after > 0, e.value.message
    # Nothing runs yet (offers only queue): every accepted request waits, a few budgets' worth.
    assert taken == (QUEUE_BUDGETS * 64) // 52, taken
    s2 = scheduler(lm, max_running=2, max_waiting=3)
    for i in range(5):
        s2.offer(f"r{i}", PROMPT, params)
    with pytest.raises(RequestRefused, match="busy") as e:
        s2.offer("one too many", PROMPT, params)
    assert e.value.status == 429 and e.value.code == "rate_limit_exceeded"


@needs_bundled
def test_admission_waits_for_kv_and_everything_finishes_equal(lm) -> None:
    s = scheduler(lm, budget_tokens=60)  # one 12 + 40-token request at a time: the second waits
    want = reference(lm, PROMPT, 40)
    for rid in ("a", "b"):
        s.offer(rid, PROMPT, SamplingParams(max_tokens=40, ignore_eos=True))
    s.step()
    assert s.n_running == 1 and s.n_waiting == 1
    got = run_all(s)
    assert tokens(got["b"]) == want and s._reserved == 0 and s.open_requests == 0


@needs_bundled
def test_a_step_that_raises_fails_only_its_sequences(lm) -> None:
    class Flaky:
        """The real model, except the step that carries token 13 raises (as a bug in one
        request's path would)."""

        def make_cache(self):
            return lm.model.make_cache()

        def __call__(self, ids, layout, rows=None):
            if 13 in ids.tolist():
                raise RuntimeError("a kernel failed")
            return lm.model(ids, layout, rows)

    s = scheduler(lm, model=Flaky())
    s.offer("poison", [1, 13, 2], SamplingParams(max_tokens=4))
    first = run_all(s)
    (o,) = first["poison"]
    assert o.error is not None and o.error.status == 500 and "failed while generating" in o.error.message
    s.offer("next", PROMPT, SamplingParams(max_tokens=8, ignore_eos=True))
    assert tokens(run_all(s)["next"]) == reference(lm, PROMPT, 8)


@needs_bundled
def test_cancel_frees_waiting_and_running_requests(lm) -> None:
    s = scheduler(lm, budget_tokens=60)
    for rid in ("a", "b", "c"):
        s.offer(rid, PROMPT, SamplingParams(max_tokens=40, ignore_eos=True))
    s.step()
    s.cancel("a")  # running
    s.cancel("c")  # waiting
    got = run_all(s)
    assert set(got) <= {"a", "b"} and tokens(got["b"]) == reference(lm, PROMPT, 40)
    assert s._reserved == 0 and s.open_requests == 0 and not s.gen.sequences


def write_word_tokenizer(path: Path, vocab: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "t2", "bos_token": "t1"}))


@pytest.mark.parametrize("kind", ["deepseek-v3", "qwen3-moe"])
def test_prefix_reuse_of_mla_and_moe_caches_equals_prefill(tmp_path: Path, kind: str) -> None:
    from shoal.synthetic import make_checkpoint

    path = make_checkpoint(kind, tmp_path / kind, experts=8, layers=2, fmt="fp32", seed=4)
    write_word_tokenizer(path, json.loads((path / "config.json").read_text())["vocab_size"])
    m = load_model(str(path))
    shared = [(5 * i + 3) % 150 + 3 for i in range(40)]
    second = shared + [7, 9, 11, 13]
    params = SamplingParams(max_tokens=8, ignore_eos=True)

    def run(gen: BatchGenerator, prompt: list[int]) -> tuple[list[int], int]:
        uid = gen.add(prompt, params)
        stats = gen.sequences[uid].stats
        out = []
        while gen.has_work:
            out += [ev.token for ev in gen.step() if ev.token is not None]
        return out, stats.cached_tokens

    plain = BatchGenerator(m.model, m.tokenizer, 128)
    reusing = BatchGenerator(m.model, m.tokenizer, 128, prefix_cache_tokens=1000)
    assert run(reusing, shared)[1] == 0
    got, cached = run(reusing, second)
    want, _ = run(plain, second)
    assert cached == len(shared) and got == want
    assert reusing.prefixes is not None and reusing.prefixes.hits == 1
