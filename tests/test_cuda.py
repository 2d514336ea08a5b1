"""The torch backend on an NVIDIA card (`--device cuda`): skipped where torch sees no CUDA device,
run by scripts/gpu_check.sh on a machine with one.

Tolerances, bf16 against the float32 reference: bf16 keeps 8 bits of mantissa, so a logit of
magnitude ~10 carries ~0.04 of rounding per operation, compounded over the layers; the tiny models'
logits must agree within 0.15 absolute (with the same argmax at most positions), and the bundled
model's greedy continuation must equal the float32 CPU run for its first 8 tokens (past the first
near-tie, bf16 and float32 may part ways, as they do between any two bf16 implementations)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
transformers = pytest.importorskip("transformers")

from shoal.engine.device import Device  # noqa: E402
from shoal.engine.loader import load_model  # noqa: E402
from shoal.models.base import BatchLayout  # noqa: E402

CUDA = Device("cuda")
GREEDY_TOKENS = 8


def _run(model, ids: list[int], chunks: list[tuple[int, int]]) -> torch.Tensor:
    caches = [model.make_cache()]
    rows = []
    with torch.inference_mode():
        for a, b in chunks:
            rows.append(model(torch.tensor(ids[a:b]), BatchLayout([b - a], torch.arange(a, b), caches), torch.arange(b - a)))
    return torch.cat(rows)


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_bf16_logits_on_the_card_match_transformers(tmp_path, kind):
    from test_models import IDS, make_checkpoint

    path, ref = make_checkpoint(tmp_path, kind)
    lm = load_model(str(path), with_tokenizer=False, device=CUDA)
    assert next(lm.model.parameters()).device.type == "cuda"
    with torch.no_grad():
        expected = ref(torch.tensor([IDS])).logits[0].float()
    chunks = [(0, 4), (4, 7)] + [(i, i + 1) for i in range(7, len(IDS))]
    got = _run(lm.model, IDS, chunks)
    assert got.device.type == "cpu" and got.dtype == torch.float32  # back on the host, as the sampler takes it
    torch.testing.assert_close(got, expected, atol=0.15, rtol=0.05)
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.9


def test_bundled_model_greedy_on_the_card_equals_the_cpu_run():
    from api_helpers import MODEL_PATH

    from shoal.engine.generate import stream_generate
    from shoal.engine.sampler import SamplingParams

    if MODEL_PATH is None:
        pytest.skip("bundled model not installed")
    cpu = load_model(str(MODEL_PATH))
    gpu = load_model(str(MODEL_PATH), device=CUDA)
    prompt = cpu.tokenizer.encode_chat([{"role": "user", "content": "What is the capital of France?"}])

    def greedy(lm):
        params = SamplingParams(max_tokens=GREEDY_TOKENS, ignore_eos=True)
        return [ev.token for ev, _ in stream_generate(lm.model, lm.tokenizer, prompt, params, 2048) if ev.token is not None]

    assert greedy(gpu) == greedy(cpu)


def test_a_cpu_stage_and_a_card_stage_make_one_model(tmp_path):
    from test_models import IDS, make_checkpoint

    path, ref = make_checkpoint(tmp_path, "qwen2")
    first = load_model(str(path), 0, 2, with_tokenizer=False)  # the numba engine on the host
    last = load_model(str(path), 2, 3, with_tokenizer=False, device=CUDA)
    n = len(IDS)
    with torch.inference_mode():
        h = first.model(torch.tensor(IDS), BatchLayout([n], torch.arange(n), [first.model.make_cache()]))
        logits = last.model(h, BatchLayout([n], torch.arange(n), [last.model.make_cache()]), torch.arange(n))
        expected = ref(torch.tensor([IDS])).logits[0].float()
    torch.testing.assert_close(logits, expected, atol=0.15, rtol=0.05)
