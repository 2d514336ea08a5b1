"""Numba kernels for quantized weights (see ``formats.QuantizedWeight`` for the layouts): the entry
points, which split the work over threads and call the tiles of ``codegen.py``.

One kernel of each operation per kind (``formats.KINDS``), all made from one source each by
``_make_matmul`` / ``_make_dequantize`` / ``_make_gather_rows`` with the kind a compile-time
constant, so each is compiled for its format alone (no branch on the kind at run time):

    MATMUL[kind](x, codes, scales, biases, out)        out = x @ W.T
    DEQUANTIZE[kind](codes, scales, biases, out)       out = W (float32, N x K)
    GATHER_ROWS[kind](codes, scales, biases, ids, out) out[i] = W[ids[i]]

(``njit(parallel=True, fastmath=False, cache=True)``, parallel over weight rows N; q8_sym has no
biases: pass its scales there.)  Plus the Python helpers ``matmul(qw, x, out=None)``,
``dequantize(qw, out=None)`` and ``gather_rows(qw, ids)``.  ``x``/``out`` must be C-contiguous
float32, M x K / M x N.

The matmul: M = 1 (or N = 1) takes the GEMV tile over pairs of weight rows; M >= 2 the batch tiles,
rows of x split into ceil(M/8) tiles of near-equal size (see codegen.py for both).  Group sizes the
tiles do not take (q4: G % 32, q8: G % 16) go through plain numba loops (correct, slower).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from shoal.kernels.attention import _f32_from_bits

from . import codegen
from .codegen import (
    BATCH_LANES,
    batch_tiles,
    copy8,
    dq_row,
    gemv_tile,
    group_sums_row,
    prefetch_rows,
)
from .formats import KINDS

__all__ = ["MATMUL", "DEQUANTIZE", "GATHER_ROWS", "matmul_bf16", "operands", "matmul", "dequantize", "gather_rows"]

Q4, S8 = KINDS.index("q4_affine"), KINDS.index("q8_sym")
# How far ahead (in weight rows) the matmuls prefetch: 2 to 8 measured alike on the 2-core machine.
_PF = 4


def _jit(parallel: bool = False, name: str | None = None):
    """``njit(fastmath=False, cache=True)``, under a name that carries codegen's digest: numba
    keys its cache on the file a function is defined in, and these compile codegen.py's IR too,
    so a change there must not find the old machine code under the old name."""

    def wrap(fn):
        fn.__qualname__ = f"{name or fn.__name__}_{codegen.DIGEST}"
        return njit(parallel=parallel, fastmath=False, cache=True)(fn)

    return wrap


def _unit(kind: int) -> int:
    """Weights per 16-byte chunk of codes: a group size the tiles take is a multiple of it."""
    return 32 if kind == Q4 else 16


# ----------------------------------------------------------------------------------------------
# per-call precomputation: per-group sums of x, shape (M, ng)
# ----------------------------------------------------------------------------------------------
@_jit()
def _xsums(x, ng, G):
    """Requires G % 16 == 0 (vector paths)."""
    M = x.shape[0]
    xs = np.empty((M, ng), np.float32)
    for m in range(M):
        group_sums_row(x, xs, m, ng, G // 16)
    return xs


@_jit()
def _group_sums(x, ng, G):
    M = x.shape[0]
    xs = np.empty((M, ng), np.float32)
    for m in range(M):
        for g in range(ng):
            t = np.float32(0.0)
            for j in range(G):
                t += x[m, g * G + j]
            xs[m, g] = t
    return xs


# ----------------------------------------------------------------------------------------------
# matmul
# ----------------------------------------------------------------------------------------------
# The batch tiles' x.  For the 8-lane tile, ``_pack_x``: each tile's rows of x rearranged chunk by
# chunk in the order the tile reads them (see codegen._batch_tile_ir), in a 32-byte aligned buffer.
# Aligned, because each x vector is an FMA memory operand, one per FMA, and at M = 8 the two vector
# loads per cycle are as busy as the two FMA pipes: a vector across two cache lines costs two, and
# numpy's 16-byte aligned x measured ~30% slower (960x576 q4, M = 8: 46 against 35 ns per weight
# and row of x).  The copy is M*K floats once per call (~1 us at 8 x 576), against the tile's
# M*K*N/8 FMAs.
@_jit()
def _pack_x(x, C, q4):
    """x (M x K) for the 8-lane batch tiles with C chunks per group: for each tile of T rows m..
    m+T-1 (the split of ``codegen.batch_tiles``), at m*K, for each chunk q (16 codes; group
    g = q // C, chunk k = q % C), for s = 0, 1 (8 codes each), for h (q4: low, high nibbles), for
    t < T: the 8 floats of x row m+t that those 8 codes multiply."""
    M, K = x.shape
    buf = np.empty(M * K + 8, np.float32)
    off = (32 - buf.ctypes.data % 32) % 32 // 4
    xp = buf[off:off + M * K]
    nh = 2 if q4 else 1
    G = 16 * nh * C
    H = G // 2
    nt = (M + 7) // 8
    m = 0
    for i in range(nt):
        T = (M - m) // (nt - i)
        d = m * K
        for q in range(K // (16 * nh)):
            g = q // C
            c0 = g * G + 16 * (q - g * C) if q4 else 16 * q      # x column of the chunk's code 0
            for s in range(2):
                for h in range(nh):
                    c = c0 + 8 * s + h * H
                    for t in range(T):
                        copy8(xp, d, x, (m + t) * K + c)
                        d += 8
        m += T
    return xp


@_jit()
def _x_itself(x, C, q4):
    return x


# chosen at import, with the tile width: the 16-lane tiles (AVX-512) read x itself
_batch_x = _pack_x if BATCH_LANES == 8 else _x_itself


@_jit()
def _row_gemv(kind, codes, scales, biases, x, xs, out, n, M, ng, C, N):
    """Weight row n against each of the M rows of x."""
    for m in range(M):
        gemv_tile(kind, 1, codes, scales, biases, x, xs, out, n, m, ng, C, N)


@_jit(parallel=True)
def _matmul_generic(x, codes, scales, biases, out, kind):
    """Plain loops for any group size."""
    M, K = x.shape
    N = codes.shape[0]
    ng = scales.shape[1]
    G = K // ng
    H = G // 2
    xs = _group_sums(x, ng, G)
    for n in prange(N):
        for m in range(M):
            tot = np.float32(0.0)
            for g in range(ng):
                d = np.float32(0.0)
                if kind == Q4:
                    for j in range(H):
                        q = codes[n, g * H + j]
                        d += np.float32(q & 15) * x[m, g * G + j] + np.float32(q >> 4) * x[m, g * G + H + j]
                else:
                    for j in range(G):
                        d += np.float32(codes[n, g * G + j]) * x[m, g * G + j]
                tot += scales[n, g] * d
                if kind != S8:
                    tot += biases[n, g] * xs[m, g]
            out[m, n] = tot


@_jit()
def _check_mm(x, codes, scales, biases, out, kmul):
    M, K = x.shape
    N = codes.shape[0]
    ng = scales.shape[1]
    if (codes.shape[1] * kmul != K or out.shape[0] != M or out.shape[1] != N or scales.shape[0] != N
            or biases.shape[0] != N or biases.shape[1] != ng or ng == 0 or K % ng != 0):
        raise ValueError("quant matmul: inconsistent shapes")


def _make_matmul(kind: int):
    q4, affine, unit = kind == Q4, kind != S8, _unit(kind)
    kmul = 2 if q4 else 1                             # weights per code byte

    @_jit(parallel=True, name=f"matmul_{KINDS[kind]}")
    def matmul(x, codes, scales, biases, out):
        _check_mm(x, codes, scales, biases, out, kmul)
        M, K = x.shape
        N = codes.shape[0]
        ng = scales.shape[1]
        G = K // ng
        if G % unit != 0:
            _matmul_generic(x, codes, scales, biases, out, kind)
            return
        C = G // unit
        if M == 1 or N == 1:
            xs = _xsums(x, ng, G) if affine else x    # q8_sym: no bias term, xs unread
            if N == 1:
                _row_gemv(kind, codes, scales, biases, x, xs, out, 0, M, ng, C, N)
                return
            for p in prange(N // 2):
                prefetch_rows(codes, 2 * p + _PF, 2 * p + _PF + 2)
                if C == 1:
                    gemv_tile(kind, 2, codes, scales, biases, x, xs, out, 2 * p, 0, ng, 1, N)
                elif C == 2:
                    gemv_tile(kind, 2, codes, scales, biases, x, xs, out, 2 * p, 0, ng, 2, N)
                else:
                    gemv_tile(kind, 2, codes, scales, biases, x, xs, out, 2 * p, 0, ng, C, N)
            if N % 2 == 1:
                _row_gemv(kind, codes, scales, biases, x, xs, out, N - 1, 1, ng, C, N)
            return
        xa = _batch_x(x, C, q4)
        for p in prange(N // 2):
            prefetch_rows(codes, 2 * p + _PF, 2 * p + _PF + 2)
            batch_tiles(kind, codes, scales, biases, xa, out, 2 * p, M, ng, C, N)
        if N % 2 == 1:          # the last row with its neighbour (recomputed, same values)
            batch_tiles(kind, codes, scales, biases, xa, out, N - 2, M, ng, C, N)

    return matmul


# ----------------------------------------------------------------------------------------------
# dequantize / gather
# ----------------------------------------------------------------------------------------------
@_jit()
def _dq_row_generic(codes, scales, biases, out, n, i, kind):
    ng = scales.shape[1]
    K = out.shape[1]
    G = K // ng
    H = G // 2
    for g in range(ng):
        s = scales[n, g]
        b = np.float32(0.0) if kind == S8 else biases[n, g]
        if kind == Q4:
            for j in range(H):
                q = codes[n, g * H + j]
                out[i, g * G + j] = s * np.float32(q & 15) + b
                out[i, g * G + H + j] = s * np.float32(q >> 4) + b
        elif kind == S8:
            for j in range(G):
                out[i, g * G + j] = s * np.float32(codes[n, g * G + j])
        else:
            for j in range(G):
                out[i, g * G + j] = s * np.float32(codes[n, g * G + j]) + b


@_jit()
def _check_dq(codes, scales, biases, out, kmul):
    N, K = out.shape
    ng = scales.shape[1]
    if (codes.shape[1] * kmul != K or codes.shape[0] != N or scales.shape[0] != N
            or biases.shape[0] != N or biases.shape[1] != ng or ng == 0 or K % ng != 0):
        raise ValueError("quant dequantize: inconsistent shapes")


def _make_dequantize(kind: int):
    unit, kmul = _unit(kind), 2 if kind == Q4 else 1

    @_jit(parallel=True, name=f"dequantize_{KINDS[kind]}")
    def dequantize(codes, scales, biases, out):
        _check_dq(codes, scales, biases, out, kmul)
        N, K = out.shape
        ng = scales.shape[1]
        G = K // ng
        if G % unit != 0:
            for n in prange(N):
                _dq_row_generic(codes, scales, biases, out, n, n, kind)
            return
        C = G // unit
        for n in prange(N):
            if C == 1:
                dq_row(kind, codes, scales, biases, out, n, n, ng, 1)
            elif C == 2:
                dq_row(kind, codes, scales, biases, out, n, n, ng, 2)
            else:
                dq_row(kind, codes, scales, biases, out, n, n, ng, C)

    return dequantize


def _make_gather_rows(kind: int):
    unit, kmul = _unit(kind), 2 if kind == Q4 else 1

    @_jit(parallel=True, name=f"gather_rows_{KINDS[kind]}")
    def gather_rows(codes, scales, biases, ids, out):
        R, K = out.shape
        N = codes.shape[0]
        ng = scales.shape[1]
        G = K // ng
        if codes.shape[1] * kmul != K or ids.shape[0] != R or biases.shape[0] != N or K % ng != 0:
            raise ValueError("gather_rows: inconsistent shapes")
        for i in range(R):
            if ids[i] < 0 or ids[i] >= N:
                raise IndexError("gather_rows: row id out of range")
        for i in prange(R):
            if G % unit == 0:
                dq_row(kind, codes, scales, biases, out, ids[i], i, ng, G // unit)
            else:
                _dq_row_generic(codes, scales, biases, out, ids[i], i, kind)

    return gather_rows


# ----------------------------------------------------------------------------------------------
# bf16 weights (the dense part of bf16 checkpoints, held as stored)
# ----------------------------------------------------------------------------------------------
# A bf16 value is the high half of a float32: widened by a shift, exactly. fastmath lets LLVM
# vectorise the dot product (reassociated sums: agrees with float32 BLAS to rounding, not bit
# for bit). Measured 4096x1024, M = 1: 165 us (51 GB/s from cache) against 355 us for torch's
# float32 linear over the widened weight, which reads twice the bytes.
@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def matmul_bf16(x, w, out):
    """out (M, N) = x (M, K) float32 @ W.T, W (N, K) the bf16 bit patterns as uint16."""
    M, K = x.shape
    N = w.shape[0]
    if w.shape[1] != K or out.shape[0] != M or out.shape[1] != N:
        raise ValueError("bf16 matmul: inconsistent shapes")
    for n in prange(N):
        row = w[n]
        for m in range(M):
            xm = x[m]
            acc = np.float32(0.0)
            for k in range(K):
                acc += _f32_from_bits(np.uint32(row[k]) << np.uint32(16)) * xm[k]
            out[m, n] = acc


MATMUL = {k: _make_matmul(i) for i, k in enumerate(KINDS)}
DEQUANTIZE = {k: _make_dequantize(i) for i, k in enumerate(KINDS)}
GATHER_ROWS = {k: _make_gather_rows(i) for i, k in enumerate(KINDS)}


# ----------------------------------------------------------------------------------------------
# Python-level dispatch
# ----------------------------------------------------------------------------------------------
def operands(qw) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes, scales, biases) as the kernels take them: q8_sym's scales stand in for its biases."""
    return qw.codes, qw.scales, qw.scales if qw.biases is None else qw.biases


def matmul(qw, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """out = x @ dequantize(qw).T for x float32 (M, K) (made C-contiguous float32 if needed)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != qw.shape[1]:
        raise ValueError("x must be (M, %d), got %s" % (qw.shape[1], x.shape))
    if out is None:
        out = np.empty((x.shape[0], qw.shape[0]), np.float32)
    MATMUL[qw.kind](x, *operands(qw), out)
    return out


def dequantize(qw, out: np.ndarray | None = None) -> np.ndarray:
    """Dequantize all rows of ``qw`` into ``out`` (float32 (N, K), C-contiguous)."""
    if out is None:
        out = np.empty(qw.shape, np.float32)
    DEQUANTIZE[qw.kind](*operands(qw), out)
    return out


def gather_rows(qw, ids) -> np.ndarray:
    """Rows ``ids`` of the dequantized weight (embedding lookup): float32 (len(ids), K)."""
    ids = np.ascontiguousarray(np.asarray(ids).reshape(-1), dtype=np.int64)
    out = np.empty((ids.shape[0], qw.shape[1]), np.float32)
    if ids.shape[0] == 0:
        return out
    GATHER_ROWS[qw.kind](*operands(qw), ids, out)
    return out
