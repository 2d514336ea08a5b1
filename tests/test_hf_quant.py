"""Decoders of the quantized checkpoint formats MoE models ship in (weights/hf_quant.py), checked
against plain reference decoders written here from each format's definition, and against
transformers' / compressed-tensors' own code where it is installed; and the checkpoint view that
shows them under plain names (reading one MLX-stacked expert without the others)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from shoal.synthetic import fp8_block_quantize, make_checkpoint, mlx_quantize, pack_int4
from shoal.weights.hf import HFCheckpoint
from shoal.weights.hf_quant import fp8_block_dequantize, pack_quantized_to_weight
from shoal.quant.kernels import dequantize

# ----------------------------------------------------------------------------- reference decoders


def ref_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: int) -> torch.Tensor:
    """value[i, j] = float(fp8[i, j]) * scale_inv[i // block, j // block]."""
    w = weight.float()
    s = scale_inv.float()
    i = torch.arange(w.shape[0])[:, None] // block
    j = torch.arange(w.shape[1])[None, :] // block
    return w * s[i, j]


def _fields(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Element k of a row: bits [(k*bits) % 32, +bits) of word (k*bits) // 32 (unsigned)."""
    u = words.to(torch.int64) & 0xFFFFFFFF
    k = torch.arange(count)
    return (u[..., (k * bits) // 32] >> ((k * bits) % 32)) & ((1 << bits) - 1)


def ref_pack(packed: torch.Tensor, scale: torch.Tensor, K: int, bits: int, zero_point: torch.Tensor | None = None) -> torch.Tensor:
    """compressed-tensors pack-quantized: q = field - 2^(bits-1); value = (q - zero) * scale[group]."""
    q = _fields(packed, bits, K) - (1 << (bits - 1))
    G = K // scale.shape[-1]
    s = scale.float()[..., torch.arange(K) // G]
    if zero_point is None:
        return q.float() * s
    N = packed.shape[0]
    z = _fields(zero_point.T.contiguous(), bits, N).T - (1 << (bits - 1))  # packed along rows
    return (q - z[..., torch.arange(K) // G]).float() * s


def ref_mlx(words: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, bits: int) -> torch.Tensor:
    """MLX affine: value = scale[group] * field + bias[group] (any leading dims)."""
    K = words.shape[-1] * 32 // bits
    q = _fields(words.view(torch.int32), bits, K).float()
    G = K // scales.shape[-1]
    g = torch.arange(K) // G
    return scales.float()[..., g] * q + biases.float()[..., g]


# ----------------------------------------------------------------------------- FP8


@pytest.mark.parametrize("shape", [(300, 200), (128, 256), (576, 64)])
def test_fp8_block_dequantize(shape):
    torch.manual_seed(0)
    w = torch.randn(*shape) * torch.logspace(-2, 1, shape[1])
    q, s = fp8_block_quantize(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (-(-shape[0] // 128), -(-shape[1] // 128))
    ours = torch.from_numpy(fp8_block_dequantize(q, s))
    torch.testing.assert_close(ours, ref_fp8(q, s, 128), atol=0, rtol=0)
    torch.testing.assert_close(ours, w, atol=0.07 * float(w.abs().max()), rtol=0.07)  # fp8 keeps ~2 decimal digits
    # numpy input (as a uint8 view of the fp8 bytes) decodes the same
    torch.testing.assert_close(torch.from_numpy(fp8_block_dequantize(q.view(torch.uint8).numpy(), s.numpy())), ours, atol=0, rtol=0)


def test_fp8_is_held_as_8bit_codes_within_half_a_step():
    from shoal.weights.hf_quant import fp8_to_q8

    torch.manual_seed(7)
    q, s = fp8_block_quantize(torch.randn(256, 320) * torch.rand(256, 1))
    exact = fp8_block_dequantize(q, s)
    held = fp8_to_q8(exact)
    assert held.kind == "q8_sym" and held.group_size == 32
    assert held.codes.nbytes + held.scales.nbytes == 256 * 320 * 1.125  # not float32's 4 bytes/param
    step = np.repeat(held.scales, 32, axis=1)
    assert np.all(np.abs(dequantize(held) - exact) <= step / 2 + 1e-7 * np.abs(exact))
    assert np.all(np.abs(held.codes.astype(np.int32)).reshape(256, 10, 32).max(axis=-1) == 127)  # each group's max is exact
    odd = fp8_block_dequantize(*fp8_block_quantize(torch.randn(8, 40)))
    assert isinstance(fp8_to_q8(odd), torch.Tensor)  # a width that is not a multiple of 32 stays float32


def test_fp8_matches_transformers():
    fp8 = pytest.importorskip("transformers.integrations.finegrained_fp8")
    torch.manual_seed(1)
    q, s = fp8_block_quantize(torch.randn(300, 200))
    theirs = fp8._dequantize_fp8_weight(q, s, [128, 128], torch.float32)
    torch.testing.assert_close(torch.from_numpy(fp8_block_dequantize(q, s)), theirs, atol=0, rtol=0)


# ----------------------------------------------------------------------------- compressed-tensors pack-quantized


@pytest.mark.parametrize("group", [32, 128])
def test_int4_pack_quantized_symmetric(group):
    torch.manual_seed(2)
    w = torch.randn(48, 256)
    p = pack_int4(w, group)
    qw = pack_quantized_to_weight(p["weight_packed"], p["weight_scale"], tuple(p["weight_shape"].tolist()), 4)
    assert qw.kind == "q4_affine" and qw.group_size == group and qw.shape == (48, 256)
    want = ref_pack(p["weight_packed"], p["weight_scale"], 256, 4)
    torch.testing.assert_close(torch.from_numpy(dequantize(qw)), want, atol=0, rtol=0)  # bf16 scales: exact
    assert float((want - w).abs().max()) <= float(p["weight_scale"].float().max()) * 0.5 + 1e-6


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_quantized_asymmetric_with_zero_point(bits):
    rng = np.random.default_rng(3)
    N, K, G = 16, 64, 32
    per = 32 // bits
    fields = rng.integers(0, 1 << bits, size=(N, K))
    zfields = rng.integers(0, 1 << bits, size=(N, K // G))

    def pack(v, axis_len):  # element k into bits [k*bits % 32, +bits) of word k*bits // 32
        words = np.zeros((v.shape[0], axis_len // per), np.int64)
        for j in range(per):
            words |= v[:, j::per].astype(np.int64) << (bits * j)
        return torch.from_numpy(((words + 2**31) % 2**32 - 2**31).astype(np.int32))

    packed = pack(fields, K)
    zp = pack(zfields.T, N).T.contiguous()  # packed along rows: (N*bits/32, K/G)
    scale = torch.rand(N, K // G) + 0.1
    qw = pack_quantized_to_weight(packed, scale, (N, K), bits, zp)
    want = ref_pack(packed, scale, K, bits, zp)
    # scale*code + (-zero*scale) vs (code - zero)*scale: float32 rounding of terms up to 2^bits * scale
    torch.testing.assert_close(torch.from_numpy(dequantize(qw)), want, atol=3e-7 * (1 << bits), rtol=0)


def test_int4_matches_compressed_tensors():
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    torch.manual_seed(4)
    q = torch.randint(-8, 8, (24, 96), dtype=torch.int8)
    packed = helpers.pack_to_int32(q, 4)
    scale = (torch.rand(24, 3) + 0.5).to(torch.bfloat16)  # as checkpoints store them
    qw = pack_quantized_to_weight(packed, scale, (24, 96), 4)
    theirs = helpers.unpack_from_int32(packed, 4, torch.Size([24, 96])).float() * scale.float().repeat_interleave(32, dim=1)
    torch.testing.assert_close(torch.from_numpy(dequantize(qw)), theirs, atol=0, rtol=0)


# ----------------------------------------------------------------------------- MLX


def test_mlx_encoder_round_trips_through_reference():
    torch.manual_seed(5)
    w = torch.randn(3, 16, 64)
    e = mlx_quantize(w, 4, 32)
    assert e["weight"].shape == (3, 16, 8) and e["scales"].shape == (3, 16, 2)
    back = ref_mlx(e["weight"], e["scales"], e["biases"], 4)
    assert float((back - w).abs().max()) < float(e["scales"].float().max())


# ----------------------------------------------------------------------------- the checkpoint view


def test_checkpoint_shows_plain_names_and_reads_one_stacked_expert(tmp_path):
    path = make_checkpoint("kimi-k2", tmp_path / "mlx", experts=8, layers=2, fmt="mlx4")
    ckpt = HFCheckpoint(path)
    names = ckpt.tensor_names()
    assert "model.layers.1.mlp.experts.5.down_proj.weight" in names
    assert not any("switch_mlp" in n or n.endswith((".scales", ".biases")) for n in names)
    stacked = "model.layers.1.mlp.switch_mlp.down_proj"
    name = "model.layers.1.mlp.experts.5.down_proj.weight"
    one = ckpt.load([name])[name]
    with safe_open(path / "model.safetensors", "pt") as f:
        parts = {p: f.get_tensor(f"{stacked}.{p}") for p in ("weight", "scales", "biases")}
    want = ref_mlx(parts["weight"], parts["scales"], parts["biases"], 4)[5]
    torch.testing.assert_close(torch.from_numpy(dequantize(one)), want, atol=1e-6, rtol=1e-6)
    assert ckpt.tensor_nbytes(name) * 8 == sum(t.numel() * t.element_size() for t in parts.values())


def test_checkpoint_hides_companion_tensors(tmp_path):
    for fmt, gone in [("int4", ".weight_packed"), ("fp8", ".weight_scale_inv")]:
        path = make_checkpoint("kimi-k2", tmp_path / fmt, experts=8, layers=2, fmt=fmt)
        cfg = json.loads((path / "config.json").read_text())
        assert "quantization_config" in cfg
        names = HFCheckpoint(path).tensor_names()
        assert "model.layers.1.mlp.experts.7.up_proj.weight" in names
        assert not any(n.endswith((gone, ".weight_scale", ".weight_shape")) for n in names)


def test_float_quantized_fp8_with_channel_scale(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(6)
    w = torch.randn(8, 64).to(torch.float8_e4m3fn)
    scale = torch.rand(8, 1) + 0.5
    save_file({"model.layers.0.mlp.down_proj.weight": w, "model.layers.0.mlp.down_proj.weight_scale": scale}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {"quant_method": "compressed-tensors", "format": "float-quantized"}}))
    ckpt = HFCheckpoint(tmp_path)
    assert ckpt.tensor_names() == ["model.layers.0.mlp.down_proj.weight"]
    got = ckpt.load(ckpt.tensor_names())["model.layers.0.mlp.down_proj.weight"]
    torch.testing.assert_close(got, w.float() * scale, atol=0, rtol=0)
