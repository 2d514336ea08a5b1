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
need runtime alias checks that cost more than the loop body (measured: 4-7 GB/s, compute bound).
The hot tiles (two weight rows against one row of x for GEMV; one weight row against 1-4 rows of
x otherwise; all groups of the row) are therefore emitted as explicit ``<16 x float>`` LLVM IR
through ``numba.extending.intrinsic``: a group is a handful of vector instructions, accumulators
stay in registers, and each weight byte is loaded once per call (for M > 1 a row's codes are
re-read from L1 for each tile of 4 rows of x, never from memory).  The chunk count per group
(G/32 for q4, G/16 for q8) is passed as a literal for the common cases so the chunk loop folds
away.  Without AVX-512 LLVM splits the vectors; the code stays correct.

Arithmetic (float32, fixed order, deterministic): for weight row n and x row m,
``out[m, n] = sum_g scale[n,g] * (sum_j code_j * x_j) + sum_g bias[n,g] * xs[m,g]`` where
``xs[m, g]`` (the per-group sums of x) is computed once per call.  The first sum keeps 16 lane
accumulators (lane l collects the elements l, l+16, ... of every group, times the group's scale)
reduced by a fixed tree at the end of the row; the bias term is a 16-lane dot over the groups.
Multiply-adds are ``llvm.fmuladd`` (may fuse).  Dequantisation is ``scale*code + bias`` with
separate rounding (fmul then fadd), bit-identical to the numpy expression.

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


def _const_or(ty, val):
    """Chunk counts passed as integer literals (C = 1 or 2 for the common group sizes) become
    LLVM constants: the chunk loop then disappears instead of being versioned at run time."""
    if isinstance(ty, types.IntegerLiteral):
        return _i64c(int(ty.literal_value))
    return val


def _fmuladd_s(builder, a, b, c):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_f32, [_f32, _f32, _f32]), "llvm.fmuladd.f32")
    return builder.call(fn, [a, b, c])


def _loop(builder, count, carried, body, name):
    """Emit ``for i in range(count)`` (count may be 0) carrying the LLVM values ``carried``;
    ``body(i, vals) -> new vals`` emits the loop body.  Returns the values after the loop."""
    fn = builder.function
    pre = builder.basic_block
    hdr = fn.append_basic_block(name)
    ext = fn.append_basic_block(name + ".exit")
    builder.cbranch(builder.icmp_signed(">", count, _i64c(0)), hdr, ext)
    builder.position_at_end(hdr)
    i = builder.phi(_i64)
    i.add_incoming(_i64c(0), pre)
    phis = []
    for v in carried:
        p = builder.phi(v.type)
        p.add_incoming(v, pre)
        phis.append(p)
    new = body(i, phis)
    last = builder.basic_block
    i1 = builder.add(i, _i64c(1))
    i.add_incoming(i1, last)
    for p, v in zip(phis, new):
        p.add_incoming(v, last)
    builder.cbranch(builder.icmp_signed("<", i1, count), hdr, ext)
    builder.position_at_end(ext)
    outs = []
    for v0, v in zip(carried, new):
        p = builder.phi(v0.type)
        p.add_incoming(v0, pre)
        p.add_incoming(v, last)
        outs.append(p)
    return outs


# ----------------------------------------------------------------------------------------------
# matmul tile: R consecutive weight rows (n..n+R-1) x T consecutive rows of x (m..m+T-1)
#   out[m+t, n+r] = sum_g scale[n+r, g] * (sum over the group's codes * x)   (16-lane accumulators)
#                 + sum_g bias[n+r, g] * xs[m+t, g]                           (xs = group sums of x)
# ----------------------------------------------------------------------------------------------
def _make_tile(kind, R, T):
    has_bias = kind != "q8_sym"
    q4 = kind == "q4_affine"

    def codegen(context, builder, sig, args):
        tys = sig.args
        cp = _data(context, builder, tys[0], args[0])
        sp = _data(context, builder, tys[1], args[1])
        bp = _data(context, builder, tys[2], args[2])
        xp = _data(context, builder, tys[3], args[3])
        xsp = _data(context, builder, tys[4], args[4])
        op = _data(context, builder, tys[5], args[5])
        n, m, ng, C, N = args[6:11]
        C = _const_or(sig.args[9], C)
        # C = 16-lane chunks per group (q4: G/32, q8: G/16); all arrays C-contiguous
        G = builder.mul(C, _i64c(32 if q4 else 16))
        K = builder.mul(ng, G)
        Kc = builder.udiv(K, _i64c(2)) if q4 else K
        H = builder.udiv(G, _i64c(2))
        c_base = [builder.mul(builder.add(n, _i64c(r)), Kc) for r in range(R)]
        s_base = [builder.mul(builder.add(n, _i64c(r)), ng) for r in range(R)]
        x_base = [builder.mul(builder.add(m, _i64c(t)), K) for t in range(T)]
        zero = ir.Constant(_VF, [0.0] * _W)

        def group(g, vals):
            sv = [_splat(builder, builder.load(builder.gep(sp, [builder.add(s_base[r], g)]))) for r in range(R)]
            c_g = builder.mul(g, H if q4 else G)      # code offset of the group inside a row
            x_g = builder.mul(g, G)                   # x offset of the group

            def chunk(k, acc):
                k16 = builder.mul(k, _i64c(_W))
                cidx = builder.add(c_g, k16)
                xi = builder.add(x_g, k16)
                xl = [_vload(builder, xp, builder.add(x_base[t], xi), _VF, 4) for t in range(T)]
                if q4:
                    xh = [_vload(builder, xp, builder.add(builder.add(x_base[t], xi), H), _VF, 4) for t in range(T)]
                out = []
                for r in range(R):
                    dec = _decode(builder, kind, cp, builder.add(c_base[r], cidx))
                    for t in range(T):
                        p = builder.fmul(dec[0], xl[t])
                        if q4:
                            p = _fmuladd(builder, dec[1], xh[t], p)
                        out.append(_fmuladd(builder, sv[r], p, acc[r * T + t]))
                return out

            return _loop(builder, C, vals, chunk, "qt.c")

        acc = _loop(builder, ng, [zero] * (R * T), group, "qt.g")
        tot = [_hsum(builder, v) for v in acc]
        if has_bias:
            nv = builder.udiv(ng, _i64c(_W))

            def bvec(i, vals):
                off = builder.mul(i, _i64c(_W))
                bv = [_vload(builder, bp, builder.add(s_base[r], off), _VF, 4) for r in range(R)]
                xv = [_vload(builder, xsp, builder.add(builder.mul(builder.add(m, _i64c(t)), ng), off), _VF, 4)
                      for t in range(T)]
                return [_fmuladd(builder, bv[r], xv[t], vals[r * T + t]) for r in range(R) for t in range(T)]

            bacc = _loop(builder, nv, [zero] * (R * T), bvec, "qt.bv")
            g0 = builder.mul(nv, _i64c(_W))

            def bscal(i, vals):
                g = builder.add(g0, i)
                bs = [builder.load(builder.gep(bp, [builder.add(s_base[r], g)])) for r in range(R)]
                xs = [builder.load(builder.gep(xsp, [builder.add(builder.mul(builder.add(m, _i64c(t)), ng), g)]))
                      for t in range(T)]
                return [_fmuladd_s(builder, bs[r], xs[t], vals[r * T + t]) for r in range(R) for t in range(T)]

            btail = _loop(builder, builder.sub(ng, g0), [ir.Constant(_f32, 0.0)] * (R * T), bscal, "qt.bs")
            tot = [builder.fadd(tot[j], builder.fadd(_hsum(builder, bacc[j]), btail[j])) for j in range(R * T)]
        for r in range(R):
            for t in range(T):
                o = builder.add(builder.mul(builder.add(m, _i64c(t)), N), builder.add(n, _i64c(r)))
                builder.store(tot[r * T + t], builder.gep(op, [o]))
        return context.get_dummy_value()

    def typer(typingctx, codes, scales, biases, x, xs, out, n, m, ng, C, N):
        _check_c(codes, scales, biases, x, xs, out)
        return types.void(codes, scales, biases, x, xs, out, n, m, ng, C, N), codegen

    typer.__name__ = "_tile_%s_r%d_t%d" % (kind, R, T)
    return intrinsic(prefer_literal=True)(typer)


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
        C = _const_or(sig.args[7], C)
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
    return intrinsic(prefer_literal=True)(typer)


def _make_group_sums_row():
    """xs[m, g] = sum of the G = 16*C elements of group g of x row m (16 lanes, then a tree)."""

    def codegen(context, builder, sig, args):
        xp = _data(context, builder, sig.args[0], args[0])
        sp = _data(context, builder, sig.args[1], args[1])
        m, ng, C = args[2:5]
        G = builder.mul(C, _i64c(_W))
        x_base = builder.mul(m, builder.mul(ng, G))
        s_base = builder.mul(m, ng)

        def group(g, vals):
            x_g = builder.add(x_base, builder.mul(g, G))

            def chunk(k, v):
                return [builder.fadd(v[0], _vload(builder, xp, builder.add(x_g, builder.mul(k, _i64c(_W))), _VF, 4))]

            v = _loop(builder, C, [ir.Constant(_VF, [0.0] * _W)], chunk, "gs.c")[0]
            builder.store(_hsum(builder, v), builder.gep(sp, [builder.add(s_base, g)]))
            return []

        _loop(builder, ng, [], group, "gs.g")
        return context.get_dummy_value()

    def typer(typingctx, x, xs, m, ng, C):
        _check_c(x, xs)
        return types.void(x, xs, m, ng, C), codegen

    typer.__name__ = "_group_sums_row"
    return intrinsic(typer)


_gs_row = _make_group_sums_row()
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
# per-call precomputation: per-group sums of x, shape (M, ng)
# ----------------------------------------------------------------------------------------------
@njit(fastmath=False, cache=True)
def _xsums(x, ng, G):
    """Requires G % 16 == 0 (vector paths)."""
    M = x.shape[0]
    xs = np.empty((M, ng), np.float32)
    for m in range(M):
        _gs_row(x, xs, m, ng, G // 16)
    return xs


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
def _q4_row_tiles(codes, scales, biases, x, xs, out, n, M, ng, C, N):
    m = 0
    while m + 4 <= M:
        _t_q4_14(codes, scales, biases, x, xs, out, n, m, ng, C, N)
        m += 4
    r = M - m
    if r == 3:
        _t_q4_13(codes, scales, biases, x, xs, out, n, m, ng, C, N)
    elif r == 2:
        _t_q4_12(codes, scales, biases, x, xs, out, n, m, ng, C, N)
    elif r == 1:
        _t_q4_11(codes, scales, biases, x, xs, out, n, m, ng, C, N)


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
def _a8_row_tiles(codes, scales, biases, x, xs, out, n, M, ng, C, N):
    m = 0
    while m + 4 <= M:
        _t_a8_14(codes, scales, biases, x, xs, out, n, m, ng, C, N)
        m += 4
    r = M - m
    if r == 3:
        _t_a8_13(codes, scales, biases, x, xs, out, n, m, ng, C, N)
    elif r == 2:
        _t_a8_12(codes, scales, biases, x, xs, out, n, m, ng, C, N)
    elif r == 1:
        _t_a8_11(codes, scales, biases, x, xs, out, n, m, ng, C, N)


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


@njit(fastmath=False, cache=True)
def _check_mm(x, codes, scales, biases, out, kmul):
    M, K = x.shape
    N = codes.shape[0]
    ng = scales.shape[1]
    if (codes.shape[1] * kmul != K or out.shape[0] != M or out.shape[1] != N or scales.shape[0] != N
            or biases.shape[0] != N or biases.shape[1] != ng or ng == 0 or K % ng != 0):
        raise ValueError("quant matmul: inconsistent shapes")


@njit(fastmath=False, cache=True)
def _check_dq(codes, scales, biases, out, kmul):
    N, K = out.shape
    ng = scales.shape[1]
    if (codes.shape[1] * kmul != K or codes.shape[0] != N or scales.shape[0] != N
            or biases.shape[0] != N or biases.shape[1] != ng or ng == 0 or K % ng != 0):
        raise ValueError("quant dequantize: inconsistent shapes")


@njit(parallel=True, fastmath=False, cache=True)
def matmul_q4_affine(x, codes, scales, biases, out):
    _check_mm(x, codes, scales, biases, out, 2)
    M, K = x.shape
    N = codes.shape[0]
    ng = scales.shape[1]
    G = K // ng
    if G % 32 != 0:
        _matmul_generic(x, codes, scales, biases, out, 0)
        return
    C = G // 32
    xs = _xsums(x, ng, G)
    for p in prange(N // 2):
        n = 2 * p
        if M == 1:
            if C == 1:
                _t_q4_21(codes, scales, biases, x, xs, out, n, 0, ng, 1, N)
            elif C == 2:
                _t_q4_21(codes, scales, biases, x, xs, out, n, 0, ng, 2, N)
            else:
                _t_q4_21(codes, scales, biases, x, xs, out, n, 0, ng, C, N)
        else:
            _q4_row_tiles(codes, scales, biases, x, xs, out, n, M, ng, C, N)
            _q4_row_tiles(codes, scales, biases, x, xs, out, n + 1, M, ng, C, N)
    if N % 2 == 1:
        _q4_row_tiles(codes, scales, biases, x, xs, out, N - 1, M, ng, C, N)


@njit(parallel=True, fastmath=False, cache=True)
def matmul_q8_sym(x, codes, scales, out):
    _check_mm(x, codes, scales, scales, out, 1)
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
            if C == 1:
                _t_s8_21(codes, scales, scales, x, x, out, n, 0, ng, 1, N)
            elif C == 2:
                _t_s8_21(codes, scales, scales, x, x, out, n, 0, ng, 2, N)
            else:
                _t_s8_21(codes, scales, scales, x, x, out, n, 0, ng, C, N)
        else:
            _s8_row_tiles(codes, scales, x, out, n, M, ng, C, N)
            _s8_row_tiles(codes, scales, x, out, n + 1, M, ng, C, N)
    if N % 2 == 1:
        _s8_row_tiles(codes, scales, x, out, N - 1, M, ng, C, N)


@njit(parallel=True, fastmath=False, cache=True)
def matmul_q8_affine(x, codes, scales, biases, out):
    _check_mm(x, codes, scales, biases, out, 1)
    M, K = x.shape
    N = codes.shape[0]
    ng = scales.shape[1]
    G = K // ng
    if G % 16 != 0:
        _matmul_generic(x, codes, scales, biases, out, 2)
        return
    C = G // 16
    xs = _xsums(x, ng, G)
    for p in prange(N // 2):
        n = 2 * p
        if M == 1:
            if C == 1:
                _t_a8_21(codes, scales, biases, x, xs, out, n, 0, ng, 1, N)
            elif C == 2:
                _t_a8_21(codes, scales, biases, x, xs, out, n, 0, ng, 2, N)
            else:
                _t_a8_21(codes, scales, biases, x, xs, out, n, 0, ng, C, N)
        else:
            _a8_row_tiles(codes, scales, biases, x, xs, out, n, M, ng, C, N)
            _a8_row_tiles(codes, scales, biases, x, xs, out, n + 1, M, ng, C, N)
    if N % 2 == 1:
        _a8_row_tiles(codes, scales, biases, x, xs, out, N - 1, M, ng, C, N)


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
    _check_dq(codes, scales, biases, out, 2)
    N, K = out.shape
    ng = scales.shape[1]
    G = K // ng
    if G % 32 != 0:
        for n in prange(N):
            _dq_row_generic(codes, scales, biases, out, n, n, 0)
        return
    C = G // 32
    for n in prange(N):
        if C == 1:
            _dq_q4(codes, scales, biases, out, n, n, ng, 1)
        elif C == 2:
            _dq_q4(codes, scales, biases, out, n, n, ng, 2)
        else:
            _dq_q4(codes, scales, biases, out, n, n, ng, C)


@njit(parallel=True, fastmath=False, cache=True)
def dequantize_q8_sym(codes, scales, out):
    _check_dq(codes, scales, scales, out, 1)
    N, K = out.shape
    ng = scales.shape[1]
    G = K // ng
    if G % 16 != 0:
        for n in prange(N):
            _dq_row_generic(codes, scales, scales, out, n, n, 1)
        return
    C = G // 16
    for n in prange(N):
        if C == 1:
            _dq_s8(codes, scales, scales, out, n, n, ng, 1)
        elif C == 2:
            _dq_s8(codes, scales, scales, out, n, n, ng, 2)
        else:
            _dq_s8(codes, scales, scales, out, n, n, ng, C)


@njit(parallel=True, fastmath=False, cache=True)
def dequantize_q8_affine(codes, scales, biases, out):
    _check_dq(codes, scales, biases, out, 1)
    N, K = out.shape
    ng = scales.shape[1]
    G = K // ng
    if G % 16 != 0:
        for n in prange(N):
            _dq_row_generic(codes, scales, biases, out, n, n, 2)
        return
    C = G // 16
    for n in prange(N):
        if C == 1:
            _dq_a8(codes, scales, biases, out, n, n, ng, 1)
        elif C == 2:
            _dq_a8(codes, scales, biases, out, n, n, ng, 2)
        else:
            _dq_a8(codes, scales, biases, out, n, n, ng, C)


@njit(parallel=True, fastmath=False, cache=True)
def gather_rows_q4_affine(codes, scales, biases, ids, out):
    R, K = out.shape
    N = codes.shape[0]
    ng = scales.shape[1]
    G = K // ng
    if codes.shape[1] * 2 != K or ids.shape[0] != R or biases.shape[0] != N or K % ng != 0:
        raise ValueError("gather_rows: inconsistent shapes")
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
    if codes.shape[1] * 1 != K or ids.shape[0] != R or scales.shape[0] != N or K % ng != 0:
        raise ValueError("gather_rows: inconsistent shapes")
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
    if codes.shape[1] * 1 != K or ids.shape[0] != R or biases.shape[0] != N or K % ng != 0:
        raise ValueError("gather_rows: inconsistent shapes")
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
