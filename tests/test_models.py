"""Logits equal transformers' implementations on tiny random checkpoints the tests create.

Covers each architecture switch of the Llama family (GQA, tied embeddings, llama3 RoPE scaling,
Qwen2 q/k/v bias, Qwen3 q/k norm), the checkpoint formats (single and sharded safetensors, bf16,
MLX 4/8-bit), shards (a layer range chained with the rest) and flat batches of different lengths.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from shoal.engine.loader import load_model  # noqa: E402
from shoal.models.base import BatchLayout  # noqa: E402

VOCAB = 97


def _config(kind: str):
    common = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
    )
    if kind == "llama":
        return transformers.LlamaConfig(**common, rope_theta=10000.0, tie_word_embeddings=False)
    if kind == "llama31":
        return transformers.LlamaConfig(
            **common, tie_word_embeddings=True,
            rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
        )
    if kind == "mistral":
        return transformers.MistralConfig(**common, sliding_window=None)
    if kind == "qwen2":
        return transformers.Qwen2Config(**common, tie_word_embeddings=True)
    if kind == "qwen3":
        return transformers.Qwen3Config(**common, head_dim=24, tie_word_embeddings=False)
    raise ValueError(kind)


def make_checkpoint(tmp_path, kind: str, dtype=torch.float32, max_shard_size=None):
    torch.manual_seed(0)
    cfg = _config(kind)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(dtype)
    # Random init leaves norms at 1 and biases at 0; perturb them so those paths are exercised.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    path = tmp_path / kind
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kw)
    return path, model.float().eval()


def run_ours(lm, ids: list[int]) -> torch.Tensor:
    caches = [lm.model.make_cache()]
    layout = BatchLayout([len(ids)], torch.arange(len(ids)), caches)
    with torch.inference_mode():
        return lm.model(torch.tensor(ids), layout, torch.arange(len(ids)))


def run_ref(ref, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return ref(torch.tensor([ids])).logits[0].float()


IDS = [3, 17, 42, 5, 88, 1, 60, 23, 9, 71, 33, 2]


@pytest.mark.parametrize("kind", ["llama", "llama31", "mistral", "qwen2", "qwen3"])
def test_logits_match_transformers(tmp_path, kind):
    path, ref = make_checkpoint(tmp_path, kind)
    lm = load_model(str(path), with_tokenizer=False)
    ours, theirs = run_ours(lm, IDS), run_ref(ref, IDS)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_long_positions_use_scaled_rope(tmp_path):
    # Positions past original_max_position_embeddings are where llama3 scaling changes anything.
    path, ref = make_checkpoint(tmp_path, "llama31")
    lm = load_model(str(path), with_tokenizer=False)
    ids = [(7 * i) % VOCAB for i in range(100)]
    torch.testing.assert_close(run_ours(lm, ids), run_ref(ref, ids), atol=1e-4, rtol=1e-4)


def test_incremental_decode_equals_full_forward(tmp_path):
    path, ref = make_checkpoint(tmp_path, "qwen3")
    lm = load_model(str(path), with_tokenizer=False)
    full = run_ref(ref, IDS)
    caches = [lm.model.make_cache()]
    rows = []
    with torch.inference_mode():
        # prefill in two chunks, then one token at a time
        for start, end in [(0, 4), (4, 7)] + [(i, i + 1) for i in range(7, len(IDS))]:
            layout = BatchLayout([end - start], torch.arange(start, end), caches)
            rows.append(lm.model(torch.tensor(IDS[start:end]), layout, torch.arange(end - start)))
    torch.testing.assert_close(torch.cat(rows), full, atol=1e-4, rtol=1e-4)


def test_flat_batch_of_different_lengths(tmp_path):
    path, _ = make_checkpoint(tmp_path, "llama")
    lm = load_model(str(path), with_tokenizer=False)
    a, b, c = IDS[:5], IDS[2:11], IDS[7:8]
    caches = [lm.model.make_cache() for _ in range(3)]
    positions = torch.cat([torch.arange(len(s)) for s in (a, b, c)])
    layout = BatchLayout([len(a), len(b), len(c)], positions, caches)
    with torch.inference_mode():
        out = lm.model(torch.tensor(a + b + c), layout, torch.arange(len(a) + len(b) + len(c)))
    alone = torch.cat([run_ours(lm, s) for s in (a, b, c)])
    torch.testing.assert_close(out, alone, atol=1e-5, rtol=1e-5)


def test_pipeline_shards_chain_to_the_whole_model(tmp_path):
    path, ref = make_checkpoint(tmp_path, "qwen2", max_shard_size="40KB")
    assert (path / "model.safetensors.index.json").exists()
    first = load_model(str(path), 0, 2, with_tokenizer=False)
    last = load_model(str(path), 2, 3, with_tokenizer=False)
    assert first.model.lm_head is None and last.model.embed_tokens is None
    n = len(IDS)
    with torch.inference_mode():
        h = first.model(torch.tensor(IDS), BatchLayout([n], torch.arange(n), [first.model.make_cache()]))
        logits = last.model(h, BatchLayout([n], torch.arange(n), [last.model.make_cache()]), torch.arange(n))
    torch.testing.assert_close(logits, run_ref(ref, IDS), atol=1e-4, rtol=1e-4)


def test_shard_reads_only_its_tensors(tmp_path):
    from shoal.engine.loader import open_checkpoint
    from shoal.models.base import Part
    from shoal.models.llama import ModelArgs, required_weights

    path, _ = make_checkpoint(tmp_path, "llama")
    ckpt = open_checkpoint(path)
    args = ModelArgs.from_dict(ckpt.config)
    names = required_weights(args, Part(1, 2, 3), ckpt.tensor_names())
    assert names and all(n.startswith("model.layers.1.") for n in names)
    last = required_weights(args, Part(2, 3, 3), ckpt.tensor_names())
    assert "lm_head.weight" in last and "model.embed_tokens.weight" not in last


def test_a_part_that_does_not_fit_is_refused(tmp_path):
    """A part planned for another layer count, a layer range outside the model, a rank of a group
    without its slice, or experts of a dense model: refused before any tensor is read."""
    from shoal.engine.loader import load_shard
    from shoal.models.base import Part

    path, _ = make_checkpoint(tmp_path, "llama")
    for part in (Part(0, 2, 4), Part(2, 5), Part(rank=0, size=2), Part(rank=0, size=2, kv_heads=(0, 1), experts=(0,))):
        with pytest.raises(ValueError):
            load_shard(str(path), part)


def check_decode_steps(lm, ref) -> None:
    """A 6-token prompt, then one-token decodes through the caches, each step's logits transformers'."""
    caches = [lm.model.make_cache()]
    with torch.inference_mode():
        lm.model(torch.tensor(IDS[:6]), BatchLayout([6], torch.arange(6), caches))
        for pos in range(6, len(IDS)):
            step = lm.model(torch.tensor([IDS[pos]]), BatchLayout([1], torch.tensor([pos]), caches))
            torch.testing.assert_close(step[0], run_ref(ref, IDS[: pos + 1])[-1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_bf16_checkpoint(tmp_path, kind):
    """A bf16 checkpoint's matrices are held as bf16 (half of float32), and its logits equal
    transformers' on the same weights: a short prompt (the kernel), a long one (BLAS over rows
    widened in blocks) and decode steps after it."""
    from shoal.placement.spec import ModelSpec
    from shoal.quant.linear import BF16Linear

    path, ref = make_checkpoint(tmp_path, kind, dtype=torch.bfloat16)
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"
    lm = load_model(str(path), with_tokenizer=False)
    linears = [m for m in lm.model.modules() if isinstance(m, (BF16Linear, torch.nn.Linear))]
    assert linears and all(isinstance(m, BF16Linear) and m.weight.dtype == torch.bfloat16 for m in linears)
    assert lm.model.embed_tokens.weight.dtype == torch.bfloat16
    # What the planner counts is what is held: the matrices at 2 bytes a parameter.
    spec = ModelSpec.from_checkpoint(path)
    held = sum(m.weight.numel() * 2 + (0 if m.bias is None else m.bias.numel() * 4)  # qwen2's biases: float32
               for m in lm.model.layers[0].modules() if isinstance(m, BF16Linear))
    assert spec.attn_bytes + spec.mlp_bytes == held
    torch.testing.assert_close(run_ours(lm, IDS), run_ref(ref, IDS), atol=1e-4, rtol=1e-4)
    long_ids = [(i * 37 + 11) % VOCAB for i in range(100)]  # past QuantLinear.small_m rows
    torch.testing.assert_close(run_ours(lm, long_ids), run_ref(ref, long_ids), atol=1e-4, rtol=1e-4)
    check_decode_steps(lm, ref)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_bf16_checkpoint_held_as_q8_where_asked(tmp_path, kind):
    """`weights="q8"` (a placement's PlacementRequest.weights): every bf16 linear, the embedding and
    the head held as 8-bit codes with a float32 scale per 32 (quant/formats.quantize_sym8), the
    planner's spec counting exactly the bytes held, and the logits equal transformers' on the same
    weights rounded through the 8-bit codes — a prompt and decode steps after it."""
    from shoal.engine.loader import load_shard
    from shoal.models.base import Part
    from shoal.placement.spec import ModelSpec
    from shoal.quant.formats import quantize_sym8
    from shoal.quant.kernels import dequantize
    from shoal.quant.linear import QuantLinear

    path, ref = make_checkpoint(tmp_path, kind, dtype=torch.bfloat16)
    lm = load_shard(str(path), Part(), weights="q8")
    linears = [m for m in lm.model.modules() if isinstance(m, (QuantLinear, torch.nn.Linear))]
    assert linears and all(isinstance(m, QuantLinear) and m.qweight.kind == "q8_sym" for m in linears)
    assert lm.model.embed_tokens.quantized is not None
    spec, stored = ModelSpec.from_checkpoint(path, weights="q8"), ModelSpec.from_checkpoint(path)
    held = sum(m.qweight.nbytes + (0 if m.bias is None else m.bias.numel() * 4)
               for m in lm.model.layers[0].modules() if isinstance(m, QuantLinear))
    assert spec.attn_bytes + spec.mlp_bytes == held and spec.embed_bytes == lm.model.embed_tokens.quantized.nbytes
    assert spec.weight_bytes < 0.6 * stored.weight_bytes and spec.quant_group == 32
    with torch.no_grad():  # the reference: the same weights, each matrix through the 8-bit codes and back
        for name, t in ref.named_parameters():
            if t.dim() == 2:
                t.copy_(torch.from_numpy(dequantize(quantize_sym8(t.numpy(), 32))))
    torch.testing.assert_close(run_ours(lm, IDS), run_ref(ref, IDS), atol=1e-4, rtol=1e-4)
    check_decode_steps(lm, ref)


def _mlx_pack(w: np.ndarray, bits: int, group: int):
    """MLX's affine quantization, written out plainly: per group, scale=(max-min)/(2^bits-1), bias=min;
    codes packed little end first into uint32 words."""
    n, k = w.shape
    g = w.reshape(n, k // group, group)
    lo, hi = g.min(-1, keepdims=True), g.max(-1, keepdims=True)
    scale = (hi - lo) / (2**bits - 1)
    scale = np.where(scale == 0, 1.0, scale).astype(np.float16).astype(np.float32)
    bias = lo.astype(np.float16).astype(np.float32)
    codes = np.clip(np.round((g - bias) / scale), 0, 2**bits - 1).astype(np.uint32).reshape(n, k)
    per_word = 32 // bits
    words = np.zeros((n, k // per_word), dtype=np.uint32)
    for j in range(per_word):
        words |= codes[:, j::per_word] << np.uint32(bits * j)
    deq = (codes.reshape(n, k // group, group) * scale + bias).reshape(n, k)
    return words, scale[..., 0], bias[..., 0], deq.astype(np.float32)


@pytest.mark.parametrize("bits", [4, 8])
def test_mlx_quantized_checkpoint(tmp_path, bits):
    from safetensors.torch import save_file

    path, ref = make_checkpoint(tmp_path, "llama")
    group = 32
    tensors = {}
    state = ref.state_dict()
    for name, t in state.items():
        if name.endswith("proj.weight") or name in ("model.embed_tokens.weight", "lm_head.weight"):
            words, scales, biases, deq = _mlx_pack(t.numpy(), bits, group)
            base = name.removesuffix(".weight")
            tensors[name] = torch.from_numpy(words)
            tensors[f"{base}.scales"] = torch.from_numpy(scales).to(torch.float16)
            tensors[f"{base}.biases"] = torch.from_numpy(biases).to(torch.float16)
            state[name].copy_(torch.from_numpy(deq))  # the reference runs the dequantized weights
        else:
            tensors[name] = t.contiguous()
    mlx = tmp_path / f"mlx{bits}"
    mlx.mkdir()
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization"] = {"group_size": group, "bits": bits}
    (mlx / "config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(mlx / "model.safetensors"))
    ref.load_state_dict(state)
    lm = load_model(str(mlx), with_tokenizer=False)
    torch.testing.assert_close(run_ours(lm, IDS), run_ref(ref, IDS), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("shape", [(1, 576), (8, 576), (300, 64), (5, 4, 24)])
def test_rms_norm_equals_transformers(shape):
    """Our RMSNorm kernel against transformers' LlamaRMSNorm, for decode rows, a prefill chunk and
    per-head rows (Qwen3's q/k norm), contiguous or a strided view."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from shoal.models.base import RMSNorm

    g = torch.Generator().manual_seed(sum(shape))
    D = shape[-1]
    ref = LlamaRMSNorm(D, eps=1e-5)
    with torch.no_grad():
        ref.weight.copy_(1 + 0.5 * torch.randn(D, generator=g))
    ours = RMSNorm(ref.weight.detach().clone(), 1e-5)
    wide = 3 * torch.randn(*shape[:-1], 2 * D, generator=g)
    for x in (wide[..., :D].contiguous(), wide[..., D:]):  # the second: a view with a row stride of 2D
        with torch.inference_mode():
            got = ours(x)
        torch.testing.assert_close(got, ref(x).detach(), rtol=1e-6, atol=1e-6)
        assert got.shape == x.shape


@pytest.mark.parametrize("rows", [1, 8, 300])
def test_silu_mul_equals_transformers(rows):
    """The gated MLP's activation kernel, silu(gate) * up over the fused gate/up output, against
    transformers' own activation (ACT2FN["silu"]) times up: within 2-3 ulp, for decode rows and a
    prefill chunk, with zeros and values past exp's range, contiguous or a strided view."""
    from transformers.activations import ACT2FN

    from shoal.kernels.activation import silu_mul

    g = torch.Generator().manual_seed(rows)
    H = 1536
    wide = 6 * torch.randn(rows, 3 * H, generator=g)
    wide[0, :8] = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 100.0, -100.0, 88.7, -87.5])
    for gate_up in (wide[:, : 2 * H].contiguous(), wide[:, H:]):  # the second: a view with a row stride of 3H
        want = ACT2FN["silu"](gate_up[:, :H]) * gate_up[:, H:]
        got = silu_mul(gate_up, H)
        assert got.shape == (rows, H) and got.dtype == torch.float32
        # atol: below exp's range (gate < -87) silu is ~0 both ways (torch: -0, here: ~1e-36)
        torch.testing.assert_close(got, want, rtol=4e-7, atol=1e-30)
