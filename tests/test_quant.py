"""Tests for shoal.quant: GGUF / MLX conversion, numba kernels, QuantLinear."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402
from gguf.constants import GGML_QUANT_SIZES  # noqa: E402

from shoal.quant import codegen  # noqa: E402
from shoal.quant import kernels as K  # noqa: E402
from shoal.quant import linear as L  # noqa: E402
from shoal.quant.formats import QuantizedWeight, from_gguf, from_mlx, quantize_affine  # noqa: E402
from shoal.quant.linear import QuantLinear, can_fuse_rows, dense_or_quant_linear, fuse_rows  # noqa: E402
from shoal.quant.kernels import dequantize


def rng(seed=0):
    return np.random.default_rng(seed)


# ----------------------------------------------------------------------------------------------
# GGUF conversion: exact against gguf.quants.dequantize
# ----------------------------------------------------------------------------------------------
QUANTIZABLE = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1]
# types gguf cannot quantize: random bytes with the fp16 super-block scales set to sane values
RANDOM_BLOCKS = {T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208]}


def _random_blocks(t, N, Kd, f16_offsets, r):
    bs, ts = GGML_QUANT_SIZES[t]
    b = r.integers(0, 256, (N, Kd // bs, ts), dtype=np.uint8)
    for o in f16_offsets:
        d = r.uniform(1e-3, 0.1, (N, Kd // bs)) * r.choice([-1, 1], (N, Kd // bs))
        b[..., o:o + 2] = d.astype(np.float16).view(np.uint8).reshape(N, Kd // bs, 2)
    return b.reshape(N, Kd // bs * ts)


def _as_dense(x):
    return x if isinstance(x, np.ndarray) else dequantize(x)


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda t: t.name)
def test_from_gguf_exact_quantizable(qtype):
    r = rng(1)
    N, Kd = 9, 512
    w = (r.standard_normal((N, Kd)) * r.uniform(0.01, 3, (N, 1))).astype(np.float32)
    w[0, :32] = 0.0                                    # an all-zero block
    raw = gguf.quants.quantize(w, qtype)
    ref = gguf.quants.dequantize(raw, qtype).reshape(N, Kd)
    got = _as_dense(from_gguf(raw, qtype, (N, Kd)))
    assert got.dtype == np.float32 and got.shape == (N, Kd)
    assert np.array_equal(got, ref)


@pytest.mark.parametrize("qtype", list(RANDOM_BLOCKS), ids=lambda t: t.name)
def test_from_gguf_exact_k_quants(qtype):
    r = rng(2)
    N, Kd = 5, 768
    raw = _random_blocks(qtype, N, Kd, RANDOM_BLOCKS[qtype], r)
    ref = gguf.quants.dequantize(raw, qtype)
    qw = from_gguf(raw, qtype, (N, Kd))
    assert isinstance(qw, QuantizedWeight)
    assert np.array_equal(dequantize(qw), ref)


def test_from_gguf_kinds_and_group_sizes():
    r = rng(3)
    w = r.standard_normal((4, 256)).astype(np.float32)
    expect = {T.Q8_0: ("q8_sym", 32), T.Q4_0: ("q4_affine", 32), T.Q4_1: ("q4_affine", 32),
              T.Q5_0: ("q8_affine", 32), T.Q5_1: ("q8_affine", 32)}
    for t, (kind, g) in expect.items():
        qw = from_gguf(gguf.quants.quantize(w, t), t, (4, 256))
        assert (qw.kind, qw.group_size, qw.shape) == (kind, g, (4, 256))
    for t, (kind, g) in {T.Q4_K: ("q4_affine", 32), T.Q5_K: ("q8_affine", 32), T.Q6_K: ("q8_sym", 16)}.items():
        qw = from_gguf(_random_blocks(t, 4, 256, RANDOM_BLOCKS[t], r), t, (4, 256))
        assert (qw.kind, qw.group_size) == (kind, g)


def test_from_gguf_q8_k():
    r = rng(4)
    N, Kd = 3, 512
    b = r.integers(0, 256, (N, Kd // 256, 292), dtype=np.uint8)
    d = r.uniform(1e-3, 1e-2, (N, Kd // 256)).astype(np.float32)
    b[..., 0:4] = d.view(np.uint8).reshape(N, Kd // 256, 4)
    qw = from_gguf(b.reshape(N, -1), T.Q8_K, (N, Kd))
    qs = b[..., 4:260].view(np.int8).astype(np.float32)
    ref = (d[..., None] * qs).reshape(N, Kd)
    assert qw.kind == "q8_sym" and qw.group_size == 256
    assert np.array_equal(dequantize(qw), ref)


def test_from_gguf_dense_views_and_errors():
    r = rng(5)
    w = r.standard_normal((6, 64)).astype(np.float32)
    raw = w.reshape(-1).view(np.uint8)                 # bytes of a "memory-mapped" tensor
    got = from_gguf(raw, T.F32, (6, 64))
    assert np.array_equal(got, w) and np.shares_memory(got, raw)
    norm = from_gguf(w[0], T.F32, (64,))               # 1-D tensors stay 1-D
    assert norm.shape == (64,) and norm.dtype == np.float32
    h = from_gguf(w[0].astype(np.float16), T.F16, (64,))
    assert h.dtype == np.float32 and np.array_equal(h, w[0].astype(np.float16).astype(np.float32))
    with pytest.raises(ValueError, match="Q2_K"):
        from_gguf(np.zeros(84, np.uint8), T.Q2_K, (1, 256))
    with pytest.raises(ValueError):
        from_gguf(np.zeros(10, np.uint8), T.Q8_0, (1, 32))


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
def _random_qw(kind, N, Kd, G, r):
    ng = Kd // G
    if kind == "q4_affine":
        codes = r.integers(0, 256, (N, Kd // 2), dtype=np.uint8)
    elif kind == "q8_sym":
        codes = r.integers(-128, 128, (N, Kd), dtype=np.int8)
    else:
        codes = r.integers(0, 256, (N, Kd), dtype=np.uint8)
    scales = (r.standard_normal((N, ng)) * 0.01).astype(np.float32)
    biases = None if kind == "q8_sym" else (r.standard_normal((N, ng)) * 0.1).astype(np.float32)
    return QuantizedWeight(kind, codes, scales, biases, G)


def _numpy_dequant(qw):
    N, Kd = qw.shape
    G = qw.group_size
    if qw.kind == "q4_affine":
        c = qw.codes.reshape(N, Kd // G, G // 2)
        q = np.concatenate([c & 15, c >> 4], axis=-1).reshape(N, Kd)
    else:
        q = qw.codes
    w = np.repeat(qw.scales, G, axis=1) * q.astype(np.float32)
    if qw.biases is not None:
        w = w + np.repeat(qw.biases, G, axis=1)
    return w


KERNEL_CASES = [("q4_affine", 32), ("q4_affine", 64), ("q4_affine", 8),
                ("q8_sym", 32), ("q8_sym", 16), ("q8_sym", 8),
                ("q8_affine", 32), ("q8_affine", 64), ("q8_affine", 8)]


@pytest.mark.parametrize("kind,G", KERNEL_CASES)
def test_dequantize_kernel_exact(kind, G):
    qw = _random_qw(kind, 37, 256, G, rng(6))
    assert np.array_equal(dequantize(qw), _numpy_dequant(qw))


def _rel_err(got, ref):
    return float(np.abs(got.astype(np.float64) - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("kind,G", KERNEL_CASES)
def test_matmul_kernels(kind, G):
    r = rng(7)
    for N, Kd in [(37, 256), (1, 64), (5, 576)]:
        qw = _random_qw(kind, N, Kd, G, r)
        W = dequantize(qw).astype(np.float64)
        for M in (1, 3, 17, 64):
            x = r.standard_normal((M, Kd)).astype(np.float32)
            out = np.full((M, N), np.nan, np.float32)
            K.matmul(qw, x, out)
            assert _rel_err(out, x.astype(np.float64) @ W.T) <= 1e-5, (N, Kd, M)


# group sizes: the literal chunk counts (q4: G=32 -> 1 chunk, 64 -> 2; q8: 16 -> 1, 32 -> 2), a
# run-time chunk count (q4 96/128, q8 64/128) and sizes only the plain loops take (24, 8)
BATCH_CASES = [("q4_affine", 32), ("q4_affine", 64), ("q4_affine", 96), ("q4_affine", 128), ("q4_affine", 24),
               ("q8_sym", 16), ("q8_sym", 32), ("q8_sym", 64), ("q8_sym", 128), ("q8_sym", 24),
               ("q8_affine", 16), ("q8_affine", 32), ("q8_affine", 128), ("q8_affine", 8)]


@pytest.mark.parametrize("kind,G", BATCH_CASES)
def test_matmul_batches(kind, G):
    """M = 2..17 (batch tiles of 2-8 rows of x, ceil(M/8) per weight row pair), odd and even N,
    against the dequantized weight in float64.  The batch tiles compute exactly "dequantize, then
    dot" in float32, so the error is bounded by float32 summation: relative to sum |W x|."""
    r = rng(21)
    Kd = 384
    for N in (1, 2, 7, 38):
        qw = _random_qw(kind, N, Kd, G, r)
        W = dequantize(qw).astype(np.float64)
        for M in range(2, 18):
            x = r.standard_normal((M, Kd)).astype(np.float32)
            out = np.full((M, N), np.nan, np.float32)
            K.matmul(qw, x, out)
            ref = x.astype(np.float64) @ W.T
            scale = np.abs(x.astype(np.float64)) @ np.abs(W).T
            assert np.all(np.abs(out - ref) <= 5e-7 * scale), (N, M)


def test_batch_tile_decode_paths_agree():
    """q4 codes become weights by a table lookup (vpermps) on AVX-512 and by int -> float
    conversion elsewhere: both give the same weights, so the same bits."""
    if not codegen.PERMUTE:
        pytest.skip("no AVX-512: only the conversion path exists here")
    from numba import njit

    lookup, convert = (codegen.make_batch_tile("q4_affine", 5, permute=p) for p in (True, False))

    @njit
    def run_lookup(c, s, b, x, o, ng, C, N):
        for n in range(0, N, 2):
            lookup(c, s, b, x, o, n, 0, ng, C, N)

    @njit
    def run_convert(c, s, b, x, o, ng, C, N):
        for n in range(0, N, 2):
            convert(c, s, b, x, o, n, 0, ng, C, N)

    r = rng(22)
    for G in (32, 64, 128):
        qw = _random_qw("q4_affine", 10, 256, G, r)
        x = r.standard_normal((5, 256)).astype(np.float32)
        a, b = np.empty((5, 10), np.float32), np.empty((5, 10), np.float32)
        run_lookup(qw.codes, qw.scales, qw.biases, x, a, 256 // G, G // 32, 10)
        run_convert(qw.codes, qw.scales, qw.biases, x, b, 256 // G, G // 32, 10)
        assert np.array_equal(a, b)
        assert _rel_err(a, x.astype(np.float64) @ dequantize(qw).astype(np.float64).T) <= 1e-6


def _assert_batch_close(out, x, qw):
    """The bound of test_matmul_batches: float32 summation error relative to sum |W x|."""
    W = dequantize(qw).astype(np.float64)
    ref = x.astype(np.float64) @ W.T
    scale = np.abs(x.astype(np.float64)) @ np.abs(W).T
    assert np.all(np.abs(out - ref) <= 5e-7 * scale)


def _tile_runner(tile):
    from numba import njit

    @njit
    def run(c, s, b, x, o, ng, C, N):
        for n in range(0, N, 2):
            tile(c, s, b, x, o, n, 0, ng, C, N)
    return run


@pytest.mark.parametrize("kind", ["q4_affine", "q8_sym", "q8_affine"])
def test_batch_tiles_both_widths(kind):
    """Both batch tiles, whichever the machine takes: the 16-lane one (AVX-512's, x itself; LLVM
    splits its vectors elsewhere) and the 8-lane one (AVX2's, x packed by _pack_x), for one weight
    row pair at a time or both at once (T <= 3), at run-time chunk counts C = 1, 2, 4, with rows of
    x in L1 and in blocks (K = 2048: T*K > X_L1 for T >= 4)."""
    r = rng(23)
    q4 = kind == "q4_affine"
    for rows in (3, 4, 8):
        wide, narrow = (_tile_runner(codegen.make_batch_tile(kind, rows, permute=False, lanes=w)) for w in (16, 8))
        for Kd, C in [(256, 1), (2048, 1), (256, 2), (2048, 4)]:
            G = (32 if q4 else 16) * C
            qw = _random_qw(kind, 6, Kd, G, r)
            b = qw.scales if qw.biases is None else qw.biases
            x = r.standard_normal((rows, Kd)).astype(np.float32)
            for run, xin in [(wide, x), (narrow, K._pack_x(x, C, q4))]:
                out = np.full((rows, 6), np.nan, np.float32)
                run(qw.codes, qw.scales, b, xin, out, Kd // G, C, 6)
                _assert_batch_close(out, x, qw)


def test_batch_tile_blocks_same_bits():
    """The 8-lane tile takes rows of x longer than X_L1 floats in all in blocks of groups, the
    accumulators kept across the blocks: the same arithmetic in the same order as without blocks."""
    r = rng(24)
    for kind, C in [("q4_affine", 1), ("q8_sym", 2), ("q8_affine", 3)]:
        G = (32 if kind == "q4_affine" else 16) * C
        Kd = 50 * G                                   # 50 groups: blocks of unequal size
        qw = _random_qw(kind, 4, Kd, G, r)
        b = qw.scales if qw.biases is None else qw.biases
        x = r.standard_normal((8, Kd)).astype(np.float32)
        assert 8 * Kd > codegen.X_L1
        xin = K._pack_x(x, C, kind == "q4_affine")
        outs = []
        for x_l1 in (codegen.X_L1, 10 ** 9):
            out = np.full((8, 4), np.nan, np.float32)
            _tile_runner(codegen.make_batch_tile(kind, 8, permute=False, lanes=8, x_l1=x_l1))(
                qw.codes, qw.scales, b, xin, out, 50, C, 4)
            outs.append(out)
        assert np.array_equal(outs[0], outs[1])
        _assert_batch_close(outs[0], x, qw)


@pytest.mark.parametrize("kind,G", [("q4_affine", 32), ("q4_affine", 128), ("q8_sym", 32), ("q8_affine", 64)])
def test_matmul_batches_long_rows(kind, G):
    """As test_matmul_batches with K = 2048: the 8-lane tiles take x in blocks for T >= 4, and
    x is packed per tile of T rows (M = 9..17: two or three tiles)."""
    r = rng(25)
    Kd = 2048
    qw = _random_qw(kind, 7, Kd, G, r)
    for M in range(2, 18):
        x = r.standard_normal((M, Kd)).astype(np.float32)
        out = np.full((M, 7), np.nan, np.float32)
        K.matmul(qw, x, out)
        _assert_batch_close(out, x, qw)


def test_matmul_batch_x_any_alignment():
    """x at any 4-byte offset (numpy aligns to 16 bytes, the 8-lane tile wants 32), read-only too."""
    r = rng(26)
    qw = _random_qw("q4_affine", 10, 256, 32, r)
    x0 = r.standard_normal((5, 256)).astype(np.float32)
    ref = K.matmul(qw, x0)
    for off in range(8):
        buf = np.empty(5 * 256 + 8, np.float32)
        x = buf[off:off + 5 * 256].reshape(5, 256)
        x[:] = x0
        x.setflags(write=False)
        assert np.array_equal(K.matmul(qw, x), ref)


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q8_0, T.Q5_0])
def test_matmul_real_formats(qtype):
    """Formats with large bias/code cancellation (Q4_0: bias = -8d)."""
    r = rng(8)
    N, Kd = 33, 576
    w = r.standard_normal((N, Kd)).astype(np.float32)
    qw = from_gguf(gguf.quants.quantize(w, qtype), qtype, (N, Kd))
    W = dequantize(qw).astype(np.float64)
    for M in (1, 3, 17, 64):
        x = r.standard_normal((M, Kd)).astype(np.float32)
        assert _rel_err(K.matmul(qw, x), x.astype(np.float64) @ W.T) <= 1e-5


@pytest.mark.parametrize("kind,G", [("q4_affine", 32), ("q8_sym", 32), ("q8_affine", 16), ("q4_affine", 8)])
def test_gather_rows(kind, G):
    qw = _random_qw(kind, 41, 128, G, rng(9))
    ids = np.array([3, 0, 40, 3, 17])
    assert np.array_equal(K.gather_rows(qw, ids), dequantize(qw)[ids])
    assert K.gather_rows(qw, np.array([], np.int64)).shape == (0, 128)
    with pytest.raises(IndexError):
        K.gather_rows(qw, np.array([41]))


def test_kernels_reject_noncontiguous():
    qw = _random_qw("q8_sym", 8, 64, 32, rng(10))
    x = np.zeros((4, 128), np.float32)[:, ::2]
    with pytest.raises(Exception):
        K.MATMUL["q8_sym"](x, qw.codes, qw.scales, qw.scales, np.empty((4, 8), np.float32))


# ----------------------------------------------------------------------------------------------
# MLX
# ----------------------------------------------------------------------------------------------
def _mlx_pack(q, bits):
    """Reference MLX packer in plain Python: element k of a uint32 word at bits [k*bits, (k+1)*bits)."""
    N, Kd = q.shape
    per = 32 // bits
    out = np.zeros((N, Kd // per), np.uint32)
    for n in range(N):
        for i in range(Kd // per):
            word = 0
            for k in range(per):
                word |= int(q[n, i * per + k]) << (k * bits)
            out[n, i] = word
    return out


@pytest.mark.parametrize("bits,G", [(4, 32), (4, 64), (8, 64), (8, 32), (2, 32)])
def test_from_mlx(bits, G):
    r = rng(11)
    N, Kd = 5, 128
    q = r.integers(0, 1 << bits, (N, Kd))
    scales16 = (r.standard_normal((N, Kd // G)) * 0.05).astype(np.float16)
    biases16 = (r.standard_normal((N, Kd // G)) * 0.1).astype(np.float16)
    packed = _mlx_pack(q, bits)
    ref = (np.repeat(scales16.astype(np.float32), G, 1) * q.astype(np.float32)
           + np.repeat(biases16.astype(np.float32), G, 1))
    qw = from_mlx(packed, scales16, biases16, bits, G)
    assert qw.kind == {4: "q4_affine", 8: "q8_affine", 2: "q8_affine"}[bits]
    assert qw.shape == (N, Kd) and qw.group_size == G
    assert np.array_equal(dequantize(qw), ref)
    # torch inputs (bf16 scales, int32 view of the words) give the same values for bf16-exact data
    sb = torch.from_numpy(scales16.astype(np.float32)).bfloat16()
    bb = torch.from_numpy(biases16.astype(np.float32)).bfloat16()
    qw2 = from_mlx(torch.from_numpy(packed.view(np.int32)), sb, bb, bits, G)
    ref2 = (np.repeat(sb.float().numpy(), G, 1) * q.astype(np.float32) + np.repeat(bb.float().numpy(), G, 1))
    assert np.array_equal(dequantize(qw2), ref2)


def test_from_mlx_errors():
    with pytest.raises(ValueError):
        from_mlx(np.zeros((2, 4), np.uint32), np.zeros((2, 1)), np.zeros((2, 1)), 3, 32)
    with pytest.raises(ValueError):
        from_mlx(np.zeros((2, 4), np.uint32), np.zeros((2, 3)), np.zeros((2, 3)), 4, 32)


# ----------------------------------------------------------------------------------------------
# quantize_affine
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits,G", [(4, 32), (4, 64), (8, 32), (8, 128)])
def test_quantize_affine_error_bound(bits, G):
    r = rng(12)
    w = (r.standard_normal((17, 256)) * r.uniform(0.01, 2, (17, 1))).astype(np.float32)
    w[3, :G] = 0.7                                    # constant group
    qw = quantize_affine(w, bits, G)
    assert qw.kind == ("q4_affine" if bits == 4 else "q8_affine")
    dq = dequantize(qw)
    err = np.abs(dq - w).reshape(17, -1, G).max(-1)
    assert np.all(err <= qw.scales * 0.5 * (1 + 1e-4) + 1e-6 * np.abs(w).reshape(17, -1, G).max(-1))
    assert np.array_equal(dq[3, :G], w[3, :G])
    rel = np.linalg.norm(dq - w) / np.linalg.norm(w)
    assert rel < (0.1 if bits == 4 else 0.006)


# ----------------------------------------------------------------------------------------------
# QuantLinear and helpers
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,G", [("q4_affine", 32), ("q8_sym", 32), ("q8_affine", 64), ("q4_affine", 8)])
def test_quantlinear_paths(kind, G, monkeypatch):
    r = rng(13)
    N, Kd = 45, 192
    qw = _random_qw(kind, N, Kd, G, r)
    bias = torch.from_numpy(r.standard_normal(N).astype(np.float32))
    Wt = torch.from_numpy(dequantize(qw))
    for b in (None, bias):
        mod = QuantLinear(qw, b)
        for shape in [(1, Kd), (3, Kd), (2, 1, Kd), (QuantLinear.small_m, Kd), (QuantLinear.small_m + 1, Kd),
                      (2, 40, Kd)]:
            x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
            with torch.inference_mode():
                y = mod(x)
            ref = F.linear(x.double(), Wt.double(), None if b is None else b.double())
            assert y.shape == (*shape[:-1], N) and y.dtype == torch.float32
            assert (y.double() - ref).abs().max() / ref.abs().max() <= 1e-5, shape
        # non-contiguous input, no_grad
        x = torch.randn(Kd, 4).t()
        with torch.no_grad():
            y = mod(x)
        assert torch.allclose(y, F.linear(x, Wt, b), rtol=1e-4, atol=1e-4)
    # chunked dequantization path (weight larger than the scratch buffer)
    monkeypatch.setattr(L, "SCRATCH_FLOATS", Kd * 10)
    mod = QuantLinear(qw, bias)
    x = torch.randn(50, Kd)
    with torch.inference_mode():
        y = mod(x)
    ref = F.linear(x.double(), Wt.double(), bias.double())
    assert (y.double() - ref).abs().max() / ref.abs().max() <= 1e-5


def test_dense_or_quant_linear():
    r = rng(14)
    w = r.standard_normal((10, 32)).astype(np.float32)
    b = r.standard_normal(10).astype(np.float32)
    lin = dense_or_quant_linear(w, b)
    assert isinstance(lin, torch.nn.Linear)
    assert np.shares_memory(lin.weight.detach().numpy(), w)
    x = torch.randn(3, 32)
    with torch.inference_mode():
        assert torch.allclose(lin(x), x @ torch.from_numpy(w).T + torch.from_numpy(b), atol=1e-5)
    ro = w.copy()
    ro.setflags(write=False)                            # read-only (memory-mapped) weights
    assert np.shares_memory(dense_or_quant_linear(ro).weight.detach().numpy(), ro)
    lin16 = dense_or_quant_linear(w.astype(np.float16))
    assert lin16.weight.dtype == torch.float32 and lin16.bias is None
    lt = dense_or_quant_linear(torch.from_numpy(w))
    assert lt.weight.data_ptr() == torch.from_numpy(w).data_ptr()
    assert isinstance(dense_or_quant_linear(quantize_affine(w, 4, 32)), QuantLinear)


def test_fuse_rows():
    r = rng(15)
    ws = [_random_qw("q4_affine", n, 64, 32, r) for n in (8, 3, 5)]
    fz = fuse_rows(ws)
    assert fz.shape == (16, 64)
    assert np.array_equal(dequantize(fz), np.concatenate([dequantize(w) for w in ws]))
    x = r.standard_normal((2, 64)).astype(np.float32)
    assert np.allclose(K.matmul(fz, x), np.concatenate([K.matmul(w, x) for w in ws], axis=1), rtol=1e-5, atol=1e-6)
    d = fuse_rows([np.ones((2, 4), np.float32), np.zeros((3, 4), np.float16)])
    assert d.shape == (5, 4) and d.dtype == np.float32
    assert can_fuse_rows(ws) and not can_fuse_rows([ws[0], _random_qw("q8_sym", 2, 64, 32, r)])
    with pytest.raises(ValueError):
        fuse_rows([ws[0], np.ones((2, 32), np.float32)])     # different K


def test_fuse_rows_mixed():
    """Q4_K_M-style mixes (q4_affine G=32 with q8_sym G=16, ...) are fused in a common form."""
    r = rng(17)
    a = _random_qw("q4_affine", 6, 64, 32, r)
    b = _random_qw("q8_sym", 3, 64, 16, r)
    c = _random_qw("q8_affine", 2, 64, 64, r)
    d = _random_qw("q4_affine", 4, 64, 64, r)
    x = r.standard_normal((3, 64)).astype(np.float32)
    for parts, kind, G in [([a, b, c], "q8_affine", 16), ([a, d], "q4_affine", 32), ([b, _random_qw("q8_sym", 2, 64, 32, r)], "q8_sym", 16)]:
        fz = fuse_rows(parts)
        assert (fz.kind, fz.group_size) == (kind, G)
        ref = np.concatenate([dequantize(p) for p in parts]).astype(np.float64)
        assert np.allclose(dequantize(fz), ref, rtol=1e-6, atol=1e-7)
        assert _rel_err(K.matmul(fz, x), x.astype(np.float64) @ ref.T) <= 1e-5
    # exact when no q8_sym -> affine shift is needed
    assert np.array_equal(dequantize(fuse_rows([a, d])), np.concatenate([dequantize(a), dequantize(d)]))
    dense = fuse_rows([a, np.ones((2, 64), np.float32)])
    assert isinstance(dense, np.ndarray) and np.array_equal(dense[:6], dequantize(a))


def test_kernels_check_shapes():
    r = rng(16)
    qw = _random_qw("q4_affine", 8, 64, 32, r)
    with pytest.raises(ValueError):                     # wrong K
        K.MATMUL["q4_affine"](np.zeros((1, 32), np.float32), qw.codes, qw.scales, qw.biases, np.empty((1, 8), np.float32))
    with pytest.raises(ValueError):                     # wrong out
        K.MATMUL["q4_affine"](np.zeros((2, 64), np.float32), qw.codes, qw.scales, qw.biases, np.empty((1, 8), np.float32))
    with pytest.raises(ValueError):
        K.DEQUANTIZE["q4_affine"](qw.codes, qw.scales, qw.biases, np.empty((8, 32), np.float32))
    with pytest.raises(ValueError):
        QuantLinear(qw)(torch.zeros(1, 63))
