"""Numba kernels for quantized weights (see ``formats.QuantizedWeight`` for the layouts).

Public kernels (all ``@njit(parallel=True, fastmath=False, cache=True)``, parallel over weight rows N):

    matmul_q4_affine(x, codes, scales, biases, out)    out = x @ W.T
    matmul_q8_sym(x, codes, scales, out)
    matmul_q8_affine(x, codes, scales, biases, out)
    dequantize_q4_affine(codes, scales, biases, out)   out = W (float32, N x K)
    dequantize_q8_sym(codes, scales, out)
    dequantize_q8_affine(codes, scales, biases, out)
    gather_rows_<kind>(codes, scales, [biases,] ids, out)  out[i] = W[ids[i]]

plus the Python helpers ``matmul(qw, x, out=None)``, ``dequantize(qw, out=None)`` and
``gather_rows(qw, ids)``.  ``x``/``out`` must be C-contiguous float32, M x K / M x N.

Why intrinsics: with ``fastmath=False`` LLVM may not reassociate float reductions, numba keeps
SLP vectorisation off, and the short per-group loops of a hand-written "lane accumulator" loop
need runtime alias checks that cost more than the loop body.  The hot tiles (one or two weight
rows against one to four rows of x, all groups of the row) are therefore emitted as explicit
``<16 x float>`` LLVM IR through ``numba.extending.intrinsic``: each group of the row is a
handful of vector instructions, accumulators stay in registers, and each weight byte is loaded
once per call (for M > 1 a row's codes are re-read from L1 for each tile of 4 rows of x, never
from memory).  On hardware without AVX-512 LLVM splits the vectors; the code stays correct.

Arithmetic: per group g of a weight row, ``scale_g * sum_j(code_j * x_j) + bias_g * sum_j(x_j)``,
accumulated in float32 in 16 lanes (lane l holds the elements l, l+16, ... of each group) and
summed by a fixed tree at the end of the row; the per-group sums of x are precomputed once per
call, also in 16 lanes.  Multiply-adds are ``llvm.fmuladd`` (may fuse).  Dequantisation is
``scale*code + bias`` with separate rounding (fmul then fadd), so it is bit-identical to numpy.

Fast paths need group_size % 32 == 0 (q4_affine) or % 16 == 0 (q8); other group sizes use plain
numba loops (correct, slower).
"""
from __future__ import annotations

import llvmlite.ir as ir
import numpy as np
from numba import njit, prange, types
from numba.core import cgutils
from numba.core.errors import TypingError
from numba.extending import intrinsic

__all__ = [
    "matmul_q4_affine", "matmul_q8_sym", "matmul_q8_affine",
    "dequantize_q4_affine", "dequantize_q8_sym", "dequantize_q8_affine",
    "gather_rows_q4_affine", "gather_rows_q8_sym", "gather_rows_q8_affine",
    "matmul", "dequantize", "gather_rows",
]

_W = 16  # vector lanes
_i8, _i32, _i64, _f32 = ir.IntType(8), ir.IntType(32), ir.IntType(64), ir.FloatType()
_V8 = ir.VectorType(_i8, _W)
_V32 = ir.VectorType(_i32, _W)
_VF = ir.VectorType(_f32, _W)


# ----------------------------------------------------------------------------------------------
# IR helpers
# ----------------------------------------------------------------------------------------------
def _check_c(*arys):
    for a in arys:
        if not isinstance(a, types.Array) or a.layout != "C":
            raise TypingError("quant kernels need C-contiguous arrays, got %s" % (a,))


def _data(context, builder, ty, val):
    return context.make_array(ty)(context, builder, val).data


def _i64c(v):
    return ir.Constant(_i64, v)


def _vload(builder, ptr, idx, vty, align):
    p = builder.gep(ptr, [idx])
    return builder.load(builder.bitcast(p, vty.as_pointer()), align=align)


def _vstore(builder, val, ptr, idx):
    p = builder.gep(ptr, [idx])
    builder.store(val, builder.bitcast(p, _VF.as_pointer()), align=4)


def _splat(builder, s):
    v = builder.insert_element(ir.Constant(_VF, ir.Undefined), s, ir.Constant(_i32, 0))
    return builder.shuffle_vector(v, ir.Constant(_VF, ir.Undefined), ir.Constant(ir.VectorType(_i32, _W), [0] * _W))


def _fmuladd(builder, a, b, c):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VF, [_VF, _VF, _VF]), "llvm.fmuladd.v16f32")
    return builder.call(fn, [a, b, c])


def _hsum(builder, v):
    """Tree sum of the 16 lanes (fixed order: halves, quarters, ...)."""
    n = _W
    while n > 1:
        h = n // 2
        lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_i32, h), list(range(h))))
        hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_i32, h), list(range(h, n))))
        v = builder.fadd(lo, hi)
        n = h
    return builder.extract_element(v, ir.Constant(_i32, 0))


def _decode(builder, kind, ptr, idx):
    """Load 16 code bytes at ptr[idx]; return the float vectors (q4: (lo, hi); q8: (c,))."""
    c8 = _vload(builder, ptr, idx, _V8, 1)
    if kind == "q8_sym":
        return (builder.sitofp(builder.sext(c8, _V32), _VF),)
    c32 = builder.zext(c8, _V32)
    if kind == "q8_affine":
        return (builder.sitofp(c32, _VF),)
    lo = builder.sitofp(builder.and_(c32, ir.Constant(_V32, [15] * _W)), _VF)
    hi = builder.sitofp(builder.lshr(c32, ir.Constant(_V32, [4] * _W)), _VF)
    return lo, hi


# ----------------------------------------------------------------------------------------------
# matmul tile: R consecutive weight rows (n..n+R-1) x T consecutive rows of x (m..m+T-1)
# ----------------------------------------------------------------------------------------------
def _make_tile(kind, R, T):
    has_bias = kind != "q8_sym"
    q4 = kind == "q4_affine"

    def codegen(context, builder, sig, args):
        tys = sig.args
        codes_t, scales_t, biases_t, x_t, xsl_t, out_t = tys[:6]
        cp = _data(context, builder, codes_t, args[0])
        sp = _data(context, builder, scales_t, args[1])
        bp = _data(context, builder, biases_t, args[2])
        xp = _data(context, builder, x_t, args[3])
        lp = _data(context, builder, xsl_t, args[4])
        op = _data(context, builder, out_t, args[5])
        n, m, ng, C, N = args[6:11]
        # C = 16-lane chunks per group (q4: G/32, q8: G/16); derived strides (all C-contiguous)
        G = builder.mul(C, _i64c(32 if q4 else 16))
        K = builder.mul(ng, G)
        Kc = builder.udiv(K, _i64c(2)) if q4 else K
        H = builder.udiv(G, _i64c(2))
        c_base = [builder.mul(builder.add(n, _i64c(r)), Kc) for r in range(R)]
        s_base = [builder.mul(builder.add(n, _i64c(r)), ng) for r in range(R)]
        x_base = [builder.mul(builder.add(m, _i64c(t)), K) for t in range(T)]
        l_base = [builder.mul(builder.add(m, _i64c(t)), builder.mul(ng, _i64c(_W))) for t in range(T)]
        zero = ir.Constant(_VF, [0.0] * _W)

        entry = builder.basic_block
        fn = builder.function
        gloop = fn.append_basic_block("qt.g")
        cloop = fn.append_basic_block("qt.c")
        gend = fn.append_basic_block("qt.gend")
        done = fn.append_basic_block("qt.done")
        builder.branch(gloop)

        # --- group loop header
        builder.position_at_end(gloop)
        g = builder.phi(_i64)
        acc = [[builder.phi(_VF) for _ in range(T)] for _ in range(R)]
        bacc = [[builder.phi(_VF) for _ in range(T)] for _ in range(R)] if has_bias else None
        g.add_incoming(_i64c(0), entry)
        for r in range(R):
            for t in range(T):
                acc[r][t].add_incoming(zero, entry)
                if has_bias:
                    bacc[r][t].add_incoming(zero, entry)
        sv = [_splat(builder, builder.load(builder.gep(sp, [builder.add(s_base[r], g)]))) for r in range(R)]
        bacc_new = None
        if has_bias:
            bv = [_splat(builder, builder.load(builder.gep(bp, [builder.add(s_base[r], g)]))) for r in range(R)]
            gl = builder.mul(g, _i64c(_W))
            xs = [_vload(builder, lp, builder.add(l_base[t], gl), _VF, 4) for t in range(T)]
            bacc_new = [[_fmuladd(builder, bv[r], xs[t], bacc[r][t]) for t in range(T)] for r in range(R)]
        c_g = builder.mul(g, H if q4 else G)   # code offset of the group inside a row
        x_g = builder.mul(g, G)                # x offset of the group
        builder.branch(cloop)

        # --- chunk loop (16 lanes per step)
        builder.position_at_end(cloop)
        k = builder.phi(_i64)
        a = [[builder.phi(_VF) for _ in range(T)] for _ in range(R)]
        k.add_incoming(_i64c(0), gloop)
        for r in range(R):
            for t in range(T):
                a[r][t].add_incoming(acc[r][t], gloop)
        k16 = builder.mul(k, _i64c(_W))
        cidx = builder.add(c_g, k16)
        xi = builder.add(x_g, k16)
        if q4:
            xl = [_vload(builder, xp, builder.add(x_base[t], xi), _VF, 4) for t in range(T)]
            xh = [_vload(builder, xp, builder.add(builder.add(x_base[t], xi), H), _VF, 4) for t in range(T)]
        else:
            xl = [_vload(builder, xp, builder.add(x_base[t], xi), _VF, 4) for t in range(T)]
        a_new = [[None] * T for _ in range(R)]
        for r in range(R):
            dec = _decode(builder, kind, cp, builder.add(c_base[r], cidx))
            for t in range(T):
                if q4:
                    p = builder.fmul(dec[0], xl[t])
                    p = _fmuladd(builder, dec[1], xh[t], p)
                else:
                    p = builder.fmul(dec[0], xl[t])
                a_new[r][t] = _fmuladd(builder, sv[r], p, a[r][t])
        k1 = builder.add(k, _i64c(1))
        for r in range(R):
            for t in range(T):
                a[r][t].add_incoming(a_new[r][t], cloop)
        k.add_incoming(k1, cloop)
        builder.cbranch(builder.icmp_signed("<", k1, C), cloop, gend)

        # --- group loop latch
        builder.position_at_end(gend)
        g1 = builder.add(g, _i64c(1))
        g.add_incoming(g1, gend)
        for r in range(R):
            for t in range(T):
                acc[r][t].add_incoming(a_new[r][t], gend)
                if has_bias:
                    bacc[r][t].add_incoming(bacc_new[r][t], gend)
        builder.cbranch(builder.icmp_signed("<", g1, ng), gloop, done)

        # --- reduce and store
        builder.position_at_end(done)
        for r in range(R):
            for t in range(T):
                v = a_new[r][t]
                if has_bias:
                    v = builder.fadd(v, bacc_new[r][t])
                o = builder.add(builder.mul(builder.add(m, _i64c(t)), N), builder.add(n, _i64c(r)))
                builder.store(_hsum(builder, v), builder.gep(op, [o]))
        return context.get_dummy_value()

    def typer(typingctx, codes, scales, biases, x, xsl, out, n, m, ng, C, N):
        _check_c(codes, scales, biases, x, xsl, out)
        return types.void(codes, scales, biases, x, xsl, out, n, m, ng, C, N), codegen

    typer.__name__ = "_tile_%s_r%d_t%d" % (kind, R, T)
    return intrinsic(typer)


def _make_dq_row(kind):
    """out[i, :] = dequantized weight row n (fmul then fadd: bit-exact ``scale*code + bias``)."""
    has_bias = kind != "q8_sym"
    q4 = kind == "q4_affine"

    def codegen(context, builder, sig, args):
        codes_t, scales_t, biases_t, out_t = sig.args[:4]
        cp = _data(context, builder, codes_t, args[0])
        sp = _data(context, builder, scales_t, args[1])
        bp = _data(context, builder, biases_t, args[2])
        op = _data(context, builder, out_t, args[3])
        n, i, ng, C = args[4:8]
        G = builder.mul(C, _i64c(32 if q4 else 16))
        K = builder.mul(ng, G)
        Kc = builder.udiv(K, _i64c(2)) if q4 else K
        H = builder.udiv(G, _i64c(2))
        c_base = builder.mul(n, Kc)
        s_base = builder.mul(n, ng)
        o_base = builder.mul(i, K)
        entry = builder.basic_block
        fn = builder.function
        gloop = fn.append_basic_block("dq.g")
        cloop = fn.append_basic_block("dq.c")
        gend = fn.append_basic_block("dq.gend")
        done = fn.append_basic_block("dq.done")
        builder.branch(gloop)
        builder.position_at_end(gloop)
        g = builder.phi(_i64)
        g.add_incoming(_i64c(0), entry)
        sv = _splat(builder, builder.load(builder.gep(sp, [builder.add(s_base, g)])))
        bv = _splat(builder, builder.load(builder.gep(bp, [builder.add(s_base, g)]))) if has_bias else None
        c_g = builder.add(c_base, builder.mul(g, H if q4 else G))
        o_g = builder.add(o_base, builder.mul(g, G))
        builder.branch(cloop)
        builder.position_at_end(cloop)
        k = builder.phi(_i64)
        k.add_incoming(_i64c(0), gloop)
        k16 = builder.mul(k, _i64c(_W))
        dec = _decode(builder, kind, cp, builder.add(c_g, k16))
        offs = [builder.add(o_g, k16)]
        if q4:
            offs.append(builder.add(offs[0], H))
        for d, o in zip(dec, offs):
            v = builder.fmul(sv, d)
            if has_bias:
                v = builder.fadd(v, bv)
            _vstore(builder, v, op, o)
        k1 = builder.add(k, _i64c(1))
        k.add_incoming(k1, cloop)
        builder.cbranch(builder.icmp_signed("<", k1, C), cloop, gend)
        builder.position_at_end(gend)
        g1 = builder.add(g, _i64c(1))
        g.add_incoming(g1, gend)
        builder.cbranch(builder.icmp_signed("<", g1, ng), gloop, done)
        builder.position_at_end(done)
        return context.get_dummy_value()

    def typer(typingctx, codes, scales, biases, out, n, i, ng, C):
        _check_c(codes, scales, biases, out)
        return types.void(codes, scales, biases, out, n, i, ng, C), codegen

    typer.__name__ = "_dq_row_%s" % kind
    return intrinsic(typer)


def _make_lane_sums_row():
    """xsl[m, g*16 + l] = sum_c x[m, g*G + c*16 + l]  (c over the G/16 chunks of group g)."""

    def codegen(context, builder, sig, args):
        xp = _data(context, builder, sig.args[0], args[0])
        lp = _data(context, builder, sig.args[1], args[1])
        m, ng, C = args[2:5]
        G = builder.mul(C, _i64c(_W))
        x_base = builder.mul(m, builder.mul(ng, G))
        l_base = builder.mul(m, builder.mul(ng, _i64c(_W)))
        entry = builder.basic_block
        fn = builder.function
        gloop = fn.append_basic_block("ls.g")
        cloop = fn.append_basic_block("ls.c")
        gend = fn.append_basic_block("ls.gend")
        done = fn.append_basic_block("ls.done")
        builder.branch(gloop)
        builder.position_at_end(gloop)
        g = builder.phi(_i64)
        g.add_incoming(_i64c(0), entry)
        x_g = builder.add(x_base, builder.mul(g, G))
        builder.branch(cloop)
        builder.position_at_end(cloop)
        k = builder.phi(_i64)
        v = builder.phi(_VF)
        k.add_incoming(_i64c(0), gloop)
        v.add_incoming(ir.Constant(_VF, [0.0] * _W), gloop)
        v1 = builder.fadd(v, _vload(builder, xp, builder.add(x_g, builder.mul(k, _i64c(_W))), _VF, 4))
        k1 = builder.add(k, _i64c(1))
        k.add_incoming(k1, cloop)
        v.add_incoming(v1, cloop)
        builder.cbranch(builder.icmp_signed("<", k1, C), cloop, gend)
        builder.position_at_end(gend)
        _vstore(builder, v1, lp, builder.add(l_base, builder.mul(g, _i64c(_W))))
        g1 = builder.add(g, _i64c(1))
        g.add_incoming(g1, gend)
        builder.cbranch(builder.icmp_signed("<", g1, ng), gloop, done)
        builder.position_at_end(done)
        return context.get_dummy_value()

    def typer(typingctx, x, xsl, m, ng, C):
        _check_c(x, xsl)
        return types.void(x, xsl, m, ng, C), codegen

    typer.__name__ = "_lane_sums_row"
    return intrinsic(typer)


_ls_row = _make_lane_sums_row()
_t_q4_21 = _make_tile("q4_affine", 2, 1)
_t_q4_11 = _make_tile("q4_affine", 1, 1)
_t_q4_12 = _make_tile("q4_affine", 1, 2)
_t_q4_13 = _make_tile("q4_affine", 1, 3)
_t_q4_14 = _make_tile("q4_affine", 1, 4)
_t_s8_21 = _make_tile("q8_sym", 2, 1)
_t_s8_11 = _make_tile("q8_sym", 1, 1)
_t_s8_12 = _make_tile("q8_sym", 1, 2)
_t_s8_13 = _make_tile("q8_sym", 1, 3)
_t_s8_14 = _make_tile("q8_sym", 1, 4)
_t_a8_21 = _make_tile("q8_affine", 2, 1)
_t_a8_11 = _make_tile("q8_affine", 1, 1)
_t_a8_12 = _make_tile("q8_affine", 1, 2)
_t_a8_13 = _make_tile("q8_affine", 1, 3)
_t_a8_14 = _make_tile("q8_affine", 1, 4)
_dq_q4 = _make_dq_row("q4_affine")
_dq_s8 = _make_dq_row("q8_sym")
_dq_a8 = _make_dq_row("q8_affine")


# ----------------------------------------------------------------------------------------------
# per-call precomputation: 16-lane per-group sums of x  (lane l of group g = sum of the group's
# elements with index = l mod 16), shape (M, ng*16)
# ----------------------------------------------------------------------------------------------
@njit(fastmath=False, cache=True)
def _lane_sums(x, ng, G):
    """Requires G % 16 == 0 (only used by the vector paths)."""
    M = x.shape[0]
    xsl = np.empty((M, ng * 16), np.float32)
    for m in range(M):
        _ls_row(x, xsl, m, ng, G // 16)
    return xsl


@njit(fastmath=False, cache=True)
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
@njit(fastmath=False, cache=True)
def _q4_row_tiles(codes, scales, biases, x, xsl, out, n, M, ng, C, N):
    m = 0
    while m + 4 <= M:
        _t_q4_14(codes, scales, biases, x, xsl, out, n, m, ng, C, N)
        m += 4
    r = M - m
    if r == 3:
        _t_q4_13(codes, scales, biases, x, xsl, out, n, m, ng, C, N)
    elif r == 2:
        _t_q4_12(codes, scales, biases, x, xsl, out, n, m, ng, C, N)
    elif r == 1:
        _t_q4_11(codes, scales, biases, x, xsl, out, n, m, ng, C, N)


@njit(fastmath=False, cache=True)
def _s8_row_tiles(codes, scales, x, out, n, M, ng, C, N):
    m = 0
    while m + 4 <= M:
        _t_s8_14(codes, scales, scales, x, x, out, n, m, ng, C, N)
        m += 4
    r = M - m
    if r == 3:
        _t_s8_13(codes, scales, scales, x, x, out, n, m, ng, C, N)
    elif r == 2:
        _t_s8_12(codes, scales, scales, x, x, out, n, m, ng, C, N)
    elif r == 1:
        _t_s8_11(codes, scales, scales, x, x, out, n, m, ng, C, N)


@njit(fastmath=False, cache=True)
def _a8_row_tiles(codes, scales, biases, x, xsl, out, n, M, ng, C, N):
    m = 0
    while m + 4 <= M:
        _t_a8_14(codes, scales, biases, x, xsl, out, n, m, ng, C, N)
        m += 4
    r = M - m
    if r == 3:
        _t_a8_13(codes, scales, biases, x, xsl, out, n, m, ng, C, N)
    elif r == 2:
        _t_a8_12(codes, scales, biases, x, xsl, out, n, m, ng, C, N)
    elif r == 1:
        _t_a8_11(codes, scales, biases, x, xsl, out, n, m, ng, C, N)


@njit(parallel=True, fastmath=False, cache=True)
def _matmul_generic(x, codes, scales, biases, out, mode):
    """Plain loops for any group size. mode 0 = q4_affine, 1 = q8_sym, 2 = q8_affine."""
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
                if mode == 0:
                    for j in range(H):
                        q = codes[n, g * H + j]
                        d += np.float32(q & 15) * x[m, g * G + j] + np.float32(q >> 4) * x[m, g * G + H + j]
                else:
                    for j in range(G):
                        d += np.float32(codes[n, g * G + j]) * x[m, g * G + j]
                tot += scales[n, g] * d
                if mode != 1:
                    tot += biases[n, g] * xs[m, g]
            out[m, n] = tot


@njit(parallel=True, fastmath=False, cache=True)
def matmul_q4_affine(x, codes, scales, biases, out):
    M, K = x.shape
    N = codes.shape[0]
    ng = scales.shape[1]
    G = K // ng
    if G % 32 != 0:
        _matmul_generic(x, codes, scales, biases, out, 0)
        return
    C = G // 32
    xsl = _lane_sums(x, ng, G)
    for p in prange(N // 2):
        n = 2 * p
        if M == 1:
            _t_q4_21(codes, scales, biases, x, xsl, out, n, 0, ng, C, N)
        else:
            _q4_row_tiles(codes, scales, biases, x, xsl, out, n, M, ng, C, N)
            _q4_row_tiles(codes, scales, biases, x, xsl, out, n + 1, M, ng, C, N)
    if N % 2 == 1:
        _q4_row_tiles(codes, scales, biases, x, xsl, out, N - 1, M, ng, C, N)


@njit(parallel=True, fastmath=False, cache=True)
def matmul_q8_sym(x, codes, scales, out):
    M, K = x.shape
    N = codes.shape[0]
    ng = scales.shape[1]
    G = K // ng
    if G % 16 != 0:
        _matmul_generic(x, codes, scales, scales, out, 1)
        return
    C = G // 16
    for p in prange(N // 2):
        n = 2 * p
        if M == 1:
            _t_s8_21(codes, scales, scales, x, x, out, n, 0, ng, C, N)
        else:
            _s8_row_tiles(codes, scales, x, out, n, M, ng, C, N)
            _s8_row_tiles(codes, scales, x, out, n + 1, M, ng, C, N)
    if N % 2 == 1:
        _s8_row_tiles(codes, scales, x, out, N - 1, M, ng, C, N)


@njit(parallel=True, fastmath=False, cache=True)
def matmul_q8_affine(x, codes, scales, biases, out):
    M, K = x.shape
    N = codes.shape[0]
    ng = scales.shape[1]
    G = K // ng
    if G % 16 != 0:
        _matmul_generic(x, codes, scales, biases, out, 2)
        return
    C = G // 16
    xsl = _lane_sums(x, ng, G)
    for p in prange(N // 2):
        n = 2 * p
        if M == 1:
            _t_a8_21(codes, scales, biases, x, xsl, out, n, 0, ng, C, N)
        else:
            _a8_row_tiles(codes, scales, biases, x, xsl, out, n, M, ng, C, N)
            _a8_row_tiles(codes, scales, biases, x, xsl, out, n + 1, M, ng, C, N)
    if N % 2 == 1:
        _a8_row_tiles(codes, scales, biases, x, xsl, out, N - 1, M, ng, C, N)


# ----------------------------------------------------------------------------------------------
# dequantize / gather
# ----------------------------------------------------------------------------------------------
@njit(fastmath=False, cache=True)
def _dq_row_generic(codes, scales, biases, out, n, i, mode):
    ng = scales.shape[1]
    K = out.shape[1]
    G = K // ng
    H = G // 2
    for g in range(ng):
        s = scales[n, g]
        b = np.float32(0.0) if mode == 1 else biases[n, g]
        if mode == 0:
            for j in range(H):
                q = codes[n, g * H + j]
                out[i, g * G + j] = s * np.float32(q & 15) + b
                out[i, g * G + H + j] = s * np.float32(q >> 4) + b
        elif mode == 1:
            for j in range(G):
                out[i, g * G + j] = s * np.float32(codes[n, g * G + j])
        else:
            for j in range(G):
                out[i, g * G + j] = s * np.float32(codes[n, g * G + j]) + b


@njit(parallel=True, fastmath=False, cache=True)
def dequantize_q4_affine(codes, scales, biases, out):
    N, K = out.shape
    ng = scales.shape[1]
    G = K // ng
    if G % 32 != 0:
        for n in prange(N):
            _dq_row_generic(codes, scales, biases, out, n, n, 0)
        return
    C = G // 32
    for n in prange(N):
        _dq_q4(codes, scales, biases, out, n, n, ng, C)


@njit(parallel=True, fastmath=False, cache=True)
def dequantize_q8_sym(codes, scales, out):
    N, K = out.shape
    ng = scales.shape[1]
    G = K // ng
    if G % 16 != 0:
        for n in prange(N):
            _dq_row_generic(codes, scales, scales, out, n, n, 1)
        return
    C = G // 16
    for n in prange(N):
        _dq_s8(codes, scales, scales, out, n, n, ng, C)


@njit(parallel=True, fastmath=False, cache=True)
def dequantize_q8_affine(codes, scales, biases, out):
    N, K = out.shape
    ng = scales.shape[1]
    G = K // ng
    if G % 16 != 0:
        for n in prange(N):
            _dq_row_generic(codes, scales, biases, out, n, n, 2)
        return
    C = G // 16
    for n in prange(N):
        _dq_a8(codes, scales, biases, out, n, n, ng, C)


@njit(parallel=True, fastmath=False, cache=True)
def gather_rows_q4_affine(codes, scales, biases, ids, out):
    R, K = out.shape
    N = codes.shape[0]
    ng = scales.shape[1]
    G = K // ng
    for i in range(R):
        if ids[i] < 0 or ids[i] >= N:
            raise IndexError("gather_rows: row id out of range")
    for i in prange(R):
        if G % 32 == 0:
            _dq_q4(codes, scales, biases, out, ids[i], i, ng, G // 32)
        else:
            _dq_row_generic(codes, scales, biases, out, ids[i], i, 0)


@njit(parallel=True, fastmath=False, cache=True)
def gather_rows_q8_sym(codes, scales, ids, out):
    R, K = out.shape
    N = codes.shape[0]
    ng = scales.shape[1]
    G = K // ng
    for i in range(R):
        if ids[i] < 0 or ids[i] >= N:
            raise IndexError("gather_rows: row id out of range")
    for i in prange(R):
        if G % 16 == 0:
            _dq_s8(codes, scales, scales, out, ids[i], i, ng, G // 16)
        else:
            _dq_row_generic(codes, scales, scales, out, ids[i], i, 1)


@njit(parallel=True, fastmath=False, cache=True)
def gather_rows_q8_affine(codes, scales, biases, ids, out):
    R, K = out.shape
    N = codes.shape[0]
    ng = scales.shape[1]
    G = K // ng
    for i in range(R):
        if ids[i] < 0 or ids[i] >= N:
            raise IndexError("gather_rows: row id out of range")
    for i in prange(R):
        if G % 16 == 0:
            _dq_a8(codes, scales, biases, out, ids[i], i, ng, G // 16)
        else:
            _dq_row_generic(codes, scales, biases, out, ids[i], i, 2)


# ----------------------------------------------------------------------------------------------
# Python-level dispatch
# ----------------------------------------------------------------------------------------------
def matmul(qw, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """out = x @ qw.dequantize().T for x float32 (M, K) (made C-contiguous float32 if needed)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != qw.codes.shape[1] * (2 if qw.kind == "q4_affine" else 1):
        raise ValueError("x must be (M, %d), got %s" % (qw.shape[1], x.shape))
    if out is None:
        out = np.empty((x.shape[0], qw.shape[0]), np.float32)
    k = qw.kind
    if k == "q4_affine":
        matmul_q4_affine(x, qw.codes, qw.scales, qw.biases, out)
    elif k == "q8_sym":
        matmul_q8_sym(x, qw.codes, qw.scales, out)
    elif k == "q8_affine":
        matmul_q8_affine(x, qw.codes, qw.scales, qw.biases, out)
    else:
        raise ValueError("unknown kind %r" % (k,))
    return out


def dequantize(qw, out: np.ndarray | None = None) -> np.ndarray:
    """Dequantize all rows of ``qw`` into ``out`` (float32 (N, K), C-contiguous)."""
    if out is None:
        out = np.empty(qw.shape, np.float32)
    k = qw.kind
    if k == "q4_affine":
        dequantize_q4_affine(qw.codes, qw.scales, qw.biases, out)
    elif k == "q8_sym":
        dequantize_q8_sym(qw.codes, qw.scales, out)
    elif k == "q8_affine":
        dequantize_q8_affine(qw.codes, qw.scales, qw.biases, out)
    else:
        raise ValueError("unknown kind %r" % (k,))
    return out


def gather_rows(qw, ids) -> np.ndarray:
    """Rows ``ids`` of the dequantized weight (embedding lookup): float32 (len(ids), K)."""
    ids = np.ascontiguousarray(np.asarray(ids).reshape(-1), dtype=np.int64)
    out = np.empty((ids.shape[0], qw.shape[1]), np.float32)
    if ids.shape[0] == 0:
        return out
    k = qw.kind
    if k == "q4_affine":
        gather_rows_q4_affine(qw.codes, qw.scales, qw.biases, ids, out)
    elif k == "q8_sym":
        gather_rows_q8_sym(qw.codes, qw.scales, ids, out)
    elif k == "q8_affine":
        gather_rows_q8_affine(qw.codes, qw.scales, qw.biases, ids, out)
    else:
        raise ValueError("unknown kind %r" % (k,))
    return out
