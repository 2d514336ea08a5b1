"""The torch-device backend, run on the CPU (`torch-cpu`): the same model files computing with torch
ops only, as they will on a card. Logits equal transformers' on tiny Llama, Qwen3, DeepSeek-V3 and
Qwen3-MoE checkpoints (prefill, chunked prefill and decode through its caches); the bundled model's
greedy output equals transformers'; a pipeline of a numba stage and a torch stage in one process
equals the single-process run. (Two nodes with different `--device` are in test_instances.py.)"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from shoal.engine.device import Device, parse_device, to_device  # noqa: E402
from shoal.engine.loader import load_model  # noqa: E402
from shoal.kernels.cache import KVCache  # noqa: E402
from shoal.models.base import BatchLayout, RMSNorm  # noqa: E402
from shoal.quant.linear import QuantLinear  # noqa: E402

TORCH_CPU = Device("torch-cpu")


def _run(model, ids: list[int], chunks: list[tuple[int, int]] | None = None) -> torch.Tensor:
    """Logits of every position, the prompt fed in `chunks` (default: all at once) through one cache."""
    caches = [model.make_cache()]
    rows = []
    with torch.inference_mode():
        for a, b in chunks or [(0, len(ids))]:
            layout = BatchLayout([b - a], torch.arange(a, b), caches)
            rows.append(model(torch.tensor(ids[a:b]), layout, torch.arange(b - a)))
    return torch.cat(rows)


def _ref(ref, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return ref(torch.tensor([ids])).logits[0].float()


def _torch_only(model) -> None:
    """Nothing of the numba engine is left in a torch-device shard."""
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    assert all(not m.kernels for m in model.modules() if isinstance(m, RMSNorm))
    caches = model.make_cache()
    assert all(getattr(c, "torch_only", True) for c in caches)


def test_device_names():
    assert parse_device("cpu") == Device("cpu") and not Device("cpu").is_torch
    assert parse_device("torch-cpu").is_torch and parse_device("TORCH-CPU").dtype == torch.float32
    assert Device("cuda:1").kind == "cuda" and Device("cuda").dtype == torch.bfloat16 and Device("torch-cpu").kind == "cpu"
    with pytest.raises(ValueError, match="choose from"):
        parse_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA"):
            parse_device("cuda:0")
        assert parse_device("auto") in (Device("cpu"), Device("mps"))


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_dense_families_match_transformers(tmp_path, kind):
    from test_models import IDS, make_checkpoint

    path, ref = make_checkpoint(tmp_path, kind)
    lm = load_model(str(path), with_tokenizer=False, device=TORCH_CPU)
    _torch_only(lm.model)
    expected = _ref(ref, IDS)
    torch.testing.assert_close(_run(lm.model, IDS), expected, atol=1e-4, rtol=1e-4)
    # A prefill in two chunks, then one token at a time: the torch attention and caches.
    chunks = [(0, 4), (4, 7)] + [(i, i + 1) for i in range(7, len(IDS))]
    torch.testing.assert_close(_run(lm.model, IDS, chunks), expected, atol=1e-4, rtol=1e-4)


def check_moe_family(moe_ckpts, tmp_path, kind: str, device: Device, check=lambda model: None) -> None:
    """A tiny MoE checkpoint on `device` against transformers: whole prompt, then chunked prefill and decode."""
    from test_moe import IDS, LONG, reference

    ids = LONG if kind == "deepseek-v3" else IDS  # DeepSeek's past its YaRN original context
    lm = load_model(str(moe_ckpts[kind]), with_tokenizer=False, device=device)
    check(lm.model)
    expected = _ref(reference(moe_ckpts[kind], tmp_path), ids)
    torch.testing.assert_close(_run(lm.model, ids), expected, atol=1e-4, rtol=1e-4)
    chunks = [(0, 5)] + [(i, i + 1) for i in range(5, len(ids))]
    torch.testing.assert_close(_run(lm.model, ids, chunks), expected, atol=1e-4, rtol=1e-4)


def check_numba_stage_then(tmp_path, device: Device):
    """Layers 0-2 on the numba engine, layer 2 on `device`: the chain equals transformers. Returns
    the two loaded stages for further checks."""
    from test_models import IDS, make_checkpoint

    path, ref = make_checkpoint(tmp_path, "qwen2")
    first = load_model(str(path), 0, 2, with_tokenizer=False)  # the numba engine
    last = load_model(str(path), 2, 3, with_tokenizer=False, device=device)
    n = len(IDS)
    with torch.inference_mode():
        h = first.model(torch.tensor(IDS), BatchLayout([n], torch.arange(n), [first.model.make_cache()]))
        logits = last.model(h, BatchLayout([n], torch.arange(n), [last.model.make_cache()]), torch.arange(n))
    torch.testing.assert_close(logits, _ref(ref, IDS), atol=1e-4, rtol=1e-4)
    return first, last


@pytest.mark.parametrize("kind", ["deepseek-v3", "qwen3-moe"])
def test_moe_families_match_transformers(moe_ckpts, tmp_path, kind):
    check_moe_family(moe_ckpts, tmp_path, kind, TORCH_CPU, _torch_only)


def test_a_numba_stage_and_a_torch_stage_make_one_model(tmp_path):
    first, _ = check_numba_stage_then(tmp_path, TORCH_CPU)
    assert isinstance(first.model.make_cache()[0], KVCache) and not first.model.make_cache()[0].torch_only


@pytest.mark.skipif(pytest.importorskip("api_helpers").MODEL_PATH is None, reason="bundled model not installed")
def test_bundled_model_greedy_equals_transformers():
    """The Q4_1 GGUF, dequantized to float32 on the torch backend, greedy for 24 tokens through
    the batched generator (prefill, then decode through the torch caches), token for token with
    transformers loading the same file."""
    check_bundled_greedy(TORCH_CPU, _torch_only)


def check_bundled_greedy(device: Device, check=lambda model: None) -> None:
    """The bundled GGUF on `device`: 24 greedy tokens through the batched generator equal
    transformers' loading the same file."""
    from api_helpers import MODEL_PATH

    from shoal.engine.generate import stream_generate
    from shoal.engine.sampler import SamplingParams

    lm = load_model(str(MODEL_PATH), device=device)
    check(lm.model)
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(MODEL_PATH.parent), gguf_file=MODEL_PATH.name,
                                                            dtype=torch.float32).eval()
    prompt = lm.tokenizer.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    got = [ev.token for ev, _ in stream_generate(lm.model, lm.tokenizer, prompt, SamplingParams(max_tokens=24), lm.args.max_context)
           if ev.token is not None]
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=sorted(lm.tokenizer.eos_token_ids))
    assert got == out[0, len(prompt):].tolist(), lm.tokenizer.decode(got)


def test_to_device_leaves_the_numba_engine_alone(tmp_path):
    from test_models import make_checkpoint

    path, _ = make_checkpoint(tmp_path, "llama")
    lm = load_model(str(path), with_tokenizer=False)
    before = [type(m) for m in lm.model.modules()]
    assert to_device(lm.model, Device("cpu")) is lm.model and [type(m) for m in lm.model.modules()] == before
    assert lm.model.torch_device is None and lm.model.cache_options() == {}
