"""LLVM IR for the quantized kernels: the tiles the numba entry points of ``kernels.py`` call, as
``numba.extending.intrinsic``s (see ``formats.QuantizedWeight`` for the layouts).

The kernels call them with the kind as a literal (its index in ``formats.KINDS``): ``gemv_tile``,
``batch_tiles``, ``dq_row``, plus ``prefetch_rows``, ``copy8`` and ``group_sums_row``.

Why intrinsics: with ``fastmath=False`` LLVM may not reassociate float reductions, numba keeps
SLP vectorisation off, and the short per-group loops of a hand-written "lane accumulator" loop
need runtime alias checks that cost more than the loop body (measured: 4-7 GB/s, compute bound).
The hot tiles are therefore emitted as explicit LLVM vector IR (``<16 x float>``; the AVX2 batch
tile ``<8 x float>``) through ``numba.extending.intrinsic``: a group is a handful of vector
instructions, accumulators stay in registers, and each weight byte is loaded once per call.  Two
kinds of tile, both over two consecutive weight rows and all groups of the rows:

* M = 1 (one decoding sequence, bound by memory bandwidth): the GEMV tile, one row of x.  It
  computes ``out[n] = sum_g scale[n,g] * (sum_j code_j * x_j) + sum_g bias[n,g] * xs[g]`` with
  ``xs[g]`` (the per-group sums of x) computed once per call: per 32 weights two multiply-adds on
  codes and one with the scale, so the weight stream is never waiting on arithmetic.  16 lanes on
  every target (without AVX-512 LLVM splits the vectors, at no cost to a bandwidth-bound loop).
* M >= 2 (a decode batch, compute bound): the batch tile, T = 2..8 rows of x (M is split into
  ceil(M/8) tiles of near-equal size).  "Dequantize, then dot": each 16-code chunk of a weight
  row becomes float weights once (q4 with AVX-512: a ``vpermps`` lookup in the group's 16-entry
  table ``scale*code + bias``; otherwise convert, multiply, add), then every row of x takes one
  FMA per vector of weights.  Chosen at import by the target (``BATCH_LANES``):
  - AVX-512 (32 zmm registers): 16 lanes, both weight rows in one pass, 2*T accumulators.  Per 32
    q4 weights and 2 weight rows x 8 rows of x that is 32 FMAs and 12 other vector instructions,
    against 3 instructions per 32 weights per row of x in the GEMV form (measured 3072x576, M = 8:
    123 us against 257 us; M = 1: 41 us).
  - AVX2 (16 ymm registers, where the 16-lane tile's accumulators spilled: Zen 3, 2 cores, a
    model step at M = 8 took 45 ms against 11 ms at M = 1): 8 lanes, for T >= 4 one weight row
    after the other against all T rows of x (T accumulators), for T <= 3 both rows at once; x
    packed once per call by ``kernels._pack_x`` so that a chunk's x vectors lie together (one
    pointer, aligned loads, any group size at full speed), and for long rows (T*K > ``X_L1``)
    taken in blocks that stay in L1 from one weight row to the next.  At M = 8 per 32 q4 weights and row
    of x: 4 FMAs and 18/8 decoding instructions.  Measured on the 2-core Zen 3 against the
    16-lane tile (best of interleaved runs, the machine shared): M = 8, 3072x576 q4 250 against
    580 us, 49152x576 q8_sym 3.9 against 6.4 ms; the model step (``bench_kernels.py
    --model-step``) M = 2/4/8/16: 9.3/12.5/19.8/42.5 ms against 9.4/17.4/44/98 ms (M = 1: 5.6 ms).

Both prefetch the codes a few weight rows ahead (``prefetch_rows``): the hardware prefetcher alone
left the DRAM stream partly exposed (measured on 30 layers of the bundled model's q4 weights, cold:
M = 1 3.4 -> 2.9 ms, M = 8 10.4 -> 9.2 ms).  The chunk count per group (G/32 for q4, G/16 for q8)
is a literal or, in the 16-lane tiles, has constant-folded copies for the common cases, so the
chunk loop folds away; the 8-lane batch tile runs one flat loop over the chunks for any count.

Arithmetic (float32, fixed order, deterministic).  GEMV: the first sum keeps 16 lane accumulators
(lane l collects the elements l, l+16, ... of every group, times the group's scale) reduced by a
fixed tree at the end of the row; the bias term is a 16-lane dot over the groups.  Batch tile:
``out[m, n] = sum_k W[n, k] * x[m, k]`` with W exactly the dequantized weights, 16 lane
accumulators per (row, x row) (AVX2: 8 lanes, two accumulators taking alternate vectors at T = 4
and for q8 at T = 2, else one; blocks do not change the order), reduced by a fixed shuffle tree
(``_lane_sums``).  Multiply-adds are ``llvm.fmuladd`` (may fuse).  Dequantisation is
``scale*code + bias`` with separate rounding (fmul then fadd), bit-identical to the numpy
expression.

Fast paths need group_size % 32 == 0 (q4_affine) or % 16 == 0 (q8); other group sizes use plain
numba loops (correct, slower).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import llvmlite.binding as llvm
import llvmlite.ir as ir
from numba import types
from numba.core import cgutils
from numba.core import config as numba_config
from numba.core.errors import TypingError
from numba.extending import intrinsic

from .formats import KINDS

# This file's contents, as a name: kernels.py puts it into the names its compiled functions are
# cached under (numba keys a cache on the file a function is defined in, not on the IR it calls).
DIGEST = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]

_W = 16  # vector lanes
_i8, _i32, _i64, _f32 = ir.IntType(8), ir.IntType(32), ir.IntType(64), ir.FloatType()
_V8 = ir.VectorType(_i8, _W)
_V32 = ir.VectorType(_i32, _W)
_VF = ir.VectorType(_f32, _W)


def _target_has_avx512() -> bool:
    """Whether numba compiles for a CPU with AVX-512F: the host's, unless NUMBA_CPU_NAME /
    NUMBA_CPU_FEATURES name another target (then only if the features list it)."""
    if numba_config.CPU_FEATURES is not None:
        return "+avx512f" in numba_config.CPU_FEATURES.split(",")
    if numba_config.CPU_NAME is not None and numba_config.CPU_NAME != "host":
        return False
    return bool(llvm.get_host_cpu_features().get("avx512f", False))


# q4 codes -> weights by a 16-entry table lookup (vpermps) where the target has AVX-512; elsewhere
# by integer -> float conversion (same values).
PERMUTE = _target_has_avx512()
# Lanes of the batch tile (see _batch_tile_ir): 16 with AVX-512's 32 vector registers, 8 (one ymm
# register) on AVX2 targets, whose 16 registers the 16-lane tile overflowed.
BATCH_LANES = 16 if PERMUTE else 8


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
    builder.store(val, builder.bitcast(p, val.type.as_pointer()), align=4)


# The vector helpers take the lane count from their operands (or a ``lanes`` argument, default 16):
# the batch tile runs with 8 lanes (one ymm register) on targets without AVX-512.
def _splat(builder, s, lanes=_W):
    vty = ir.VectorType(s.type, lanes)
    v = builder.insert_element(ir.Constant(vty, ir.Undefined), s, ir.Constant(_i32, 0))
    zeros = ir.Constant(ir.VectorType(_i32, lanes), [0] * lanes)
    return builder.shuffle_vector(v, ir.Constant(vty, ir.Undefined), zeros)


def _fmuladd(builder, a, b, c):
    vty = a.type
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vty, [vty, vty, vty]),
                                        "llvm.fmuladd.v%df32" % vty.count)
    return builder.call(fn, [a, b, c])


def _hsum(builder, v):
    """Tree sum of the lanes (fixed order: halves, quarters, ...)."""
    n = v.type.count
    while n > 1:
        h = n // 2
        lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_i32, h), list(range(h))))
        hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_i32, h), list(range(h, n))))
        v = builder.fadd(lo, hi)
        n = h
    return builder.extract_element(v, ir.Constant(_i32, 0))


def _decode(builder, kind, ptr, idx, lanes=_W):
    """Load ``lanes`` code bytes at ptr[idx]; return the float vectors (q4: (lo, hi); q8: (c,))."""
    i32v, f32v = ir.VectorType(_i32, lanes), ir.VectorType(_f32, lanes)
    c8 = _vload(builder, ptr, idx, ir.VectorType(_i8, lanes), 1)
    if kind == "q8_sym":
        return (builder.sitofp(builder.sext(c8, i32v), f32v),)
    c32 = builder.zext(c8, i32v)
    if kind == "q8_affine":
        return (builder.sitofp(c32, f32v),)
    lo = builder.sitofp(builder.and_(c32, ir.Constant(i32v, [15] * lanes)), f32v)
    hi = builder.sitofp(builder.lshr(c32, ir.Constant(i32v, [4] * lanes)), f32v)
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
def _tile_ir(kind, R, T):
    """The tile's IR emitter: ``emit(context, builder, tys, args)`` for the arguments (codes,
    scales, biases, x, xs, out, n, m, ng, C, N) and their numba types."""
    has_bias = kind != "q8_sym"
    q4 = kind == "q4_affine"

    def emit(context, builder, tys, args):
        cp = _data(context, builder, tys[0], args[0])
        sp = _data(context, builder, tys[1], args[1])
        bp = _data(context, builder, tys[2], args[2])
        xp = _data(context, builder, tys[3], args[3])
        xsp = _data(context, builder, tys[4], args[4])
        op = _data(context, builder, tys[5], args[5])
        n, m, ng, C, N = args[6:11]
        C = _const_or(tys[9], C)
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

    return emit


# ----------------------------------------------------------------------------------------------
# batch tile ("dequantize, then dot"): 2 weight rows (n, n+1) x T consecutive rows of x (m..m+T-1)
#   per 16-code chunk each weight row is dequantized once to float vectors w = scale*code + bias,
#   then every row of x takes one FMA per vector of weights: acc[r, t] += w * x[t]
# ----------------------------------------------------------------------------------------------
def _permps(builder, table, idx):
    """table[idx & 15] per lane (AVX-512 vpermps)."""
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VF, [_VF, _V32]),
                                        "llvm.x86.avx512.permvar.sf.512")
    return builder.call(fn, [table, idx])


def _shuffle(builder, a, b, lanes):
    return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_i32, len(lanes)), lanes))


def _lane_sums(builder, vecs):
    """The lane sums of T vectors of W lanes, T <= W (fixed order): pairs of vectors are folded
    into one vector holding half-sums of both (interleaved blocks), then the blocks are halved in
    place.  About a third of the shuffles and adds of T separate ``_hsum`` trees."""
    T = len(vecs)
    W = vecs[0].type.count
    P = 1
    while P < T:
        P *= 2
    zero = ir.Constant(vecs[0].type, [0.0] * W)
    cur = list(vecs) + [zero] * (P - T)
    owner = [[t] * W for t in range(P)]             # owner[i][l]: which input lane l of cur[i] sums
    n = W
    while len(cur) > 1:                              # fold pairs: [a.lo | b.lo] + [a.hi | b.hi] per n-block
        h = n // 2
        lo = [blk * n + j if j < h else W + blk * n + j - h for blk in range(W // n) for j in range(n)]
        hi = [blk * n + h + j if j < h else W + blk * n + j for blk in range(W // n) for j in range(n)]
        cur = [builder.fadd(_shuffle(builder, cur[i], cur[i + 1], lo), _shuffle(builder, cur[i], cur[i + 1], hi))
               for i in range(0, len(cur), 2)]
        owner = [[(owner[i] + owner[i + 1])[k] for k in lo] for i in range(0, len(owner), 2)]
        n = h
    v, own = cur[0], owner[0]
    w = W // P                                       # each input now owns one block of w lanes
    while w > 1:                                     # halve every block of w lanes
        h = w // 2
        L = len(own)
        lo = [blk * w + j for blk in range(L // w) for j in range(h)]
        hi = [blk * w + h + j for blk in range(L // w) for j in range(h)]
        v = builder.fadd(_shuffle(builder, v, v, lo), _shuffle(builder, v, v, hi))
        own = [own[k] for k in lo]
        w = h
    return [builder.extract_element(v, ir.Constant(_i32, own.index(t))) for t in range(T)]


# 8-lane batch tile: where a tile's x (T*K floats) is larger than X_L1 (24 KB of the 32 KB L1),
# it is taken in blocks of about X_BLOCK floats (12 KB).  Measured 576x1536 q4 at M = 8 and 16,
# one thread: unblocked 45, blocks of 3072 floats 34-35, of 6144 36-38 ns per weight and row of x.
X_L1 = 6144
X_BLOCK = 3072


def _batch_tile_ir(kind, T, permute=PERMUTE, lanes=BATCH_LANES, x_l1=X_L1):
    """The IR emitter ``emit(context, builder, tys, args)`` of the batch tile for the arguments
    (codes, scales, biases, x, out, n, m, ng, C, N): rows n, n+1 of W against rows m..m+T-1 of x (T <= 8), in vectors of ``lanes`` floats.

    lanes = 16 (AVX-512, 32 vector registers): both weight rows in one pass over the groups, 2*T
    accumulators.  ``x`` is x; ``permute``: q4 decode by table lookup.

    lanes = 8 (AVX2, 16 ymm registers), where the 16-lane tile's 2*T accumulators take 4*T ymm
    registers and spilled at T = 8 (45 ms per model step at M = 8 against 11 ms at M = 1):
    * T >= 4: one weight row after the other, each against all T rows of x: T accumulators + the
      chunk's weight vectors + the constants fit, each x vector an FMA memory operand.
    * T <= 3: both weight rows in one pass (2*T accumulators), each x load serving both
      (measured at M = 3, 960x576 q4: 44 against 60 ns per weight and row of x one row at a time).
    Fewer than 8 independent FMA chains cannot hide the FMA latency (4 cycles, 2 per cycle), so
    T = 4 (and q8 at T = 2) keeps A = 2 accumulators per row of x, the chunk's products alternating
    between them (M = 4, 960x576 q4: 40 against 45 ns per weight and row of x with one; M = 2,
    49152x576 q8: 26 against 28 ns; q4 at T = 2 has no registers left for it).
    ``x`` is the output of ``kernels._pack_x``: the x vectors a chunk multiplies lie together in
    the order used, so one pointer addresses them.  With x itself (a pointer per row of x, two for q4) a
    run-time chunk loop ran out of general registers (55 against 31 ns per weight and row of x at
    M = 8) and needed constant copies of the tile for C = 1, 2: three times the code to compile,
    and still the slow loop for larger groups.  ``x_l1``: see X_L1 (a parameter for the tests).
    """
    has_bias = kind != "q8_sym"
    q4 = kind == "q4_affine"
    lookup = q4 and permute
    if lanes not in (8, 16) or (lookup and lanes != 16) or not 1 <= T <= 8:
        raise ValueError("batch tile: lanes %d, T %d, permute %s" % (lanes, T, permute))
    R = 2 if lanes == 16 or T <= 3 else 1            # weight rows in one pass over the groups
    A = 2 if lanes == 8 and (T == 4 or (T == 2 and not q4)) else 1   # accumulators per (row, x row)
    S = 16 // lanes                                  # vectors per 16-code chunk
    NH = 2 if q4 else 1                              # x vectors per code vector (q4: low, high nibbles)
    VF = ir.VectorType(_f32, lanes)

    def emit(builder, cp, sp, bp, xp, op, n, m, ng, C, N):
        G = builder.mul(C, _i64c(32 if q4 else 16))
        K = builder.mul(ng, G)
        Kc = builder.udiv(K, _i64c(2)) if q4 else K
        H = builder.udiv(G, _i64c(2))
        zero = ir.Constant(VF, [0.0] * lanes)
        iota = ir.Constant(_VF, [float(i) for i in range(_W)])
        nib = ir.Constant(_V32, [4] * _W)
        x_base = []                                  # 16 lanes: x offsets of the rows of x

        def x_at(xq, s, h, t):
            """Index in x of the vector that code vector s (half h: q4 high nibbles) of the chunk
            multiplies, for row m+t of x; xq: the chunk's x offset (in row m for x itself)."""
            if lanes == 16:
                i = builder.add(x_base[t], xq)
                return builder.add(i, H) if h else i
            return builder.add(xq, _i64c(((s * NH + h) * T + t) * lanes))

        def chunk(acc, c_base, sv, bv, table, cq, xq):
            """acc after one 16-code chunk of the weight rows (codes at c_base[r] + cq; x at xq)."""
            R = len(c_base)
            out = list(acc)
            j = 0                                     # products so far of each (row, x row) this chunk
            for s in range(S):
                cidx = builder.add(cq, _i64c(s * lanes))
                w = []                                # w[r]: the weights of row r (q4: lo, hi)
                for r in range(R):
                    if lookup:
                        c32 = builder.zext(_vload(builder, cp, builder.add(c_base[r], cidx), _V8, 1), _V32)
                        w.append([_permps(builder, table[r], c32), _permps(builder, table[r], builder.lshr(c32, nib))])
                        continue
                    wr = []
                    for d in _decode(builder, kind, cp, builder.add(c_base[r], cidx), lanes):
                        v = builder.fmul(sv[r], d)
                        wr.append(builder.fadd(v, bv[r]) if has_bias else v)
                    w.append(wr)
                for t in range(T):
                    xv = [_vload(builder, xp, x_at(xq, s, h, t), VF, 4) for h in range(NH)]
                    for r in range(R):
                        for h in range(NH):
                            i = ((r * T + t) * A) + (j + h) % A
                            out[i] = _fmuladd(builder, w[r][h], xv[h], out[i])
                j += NH
            return out

        def scale_bias(s_base, g):
            """The splat scales and biases (None for q8_sym) of group g of the rows at s_base."""
            sv = [_splat(builder, builder.load(builder.gep(sp, [builder.add(sb, g)])), lanes) for sb in s_base]
            bv = [_splat(builder, builder.load(builder.gep(bp, [builder.add(sb, g)])), lanes) if has_bias else None
                  for sb in s_base]
            return sv, bv

        def store(rows, acc):
            """out[m+t, row] = the lane sum of row's accumulators for row m+t of x."""
            for r, row in enumerate(rows):
                tot = []
                for t in range(T):
                    a = acc[(r * T + t) * A:(r * T + t + 1) * A]
                    while len(a) > 1:
                        a = [builder.fadd(a[i], a[i + 1]) for i in range(0, len(a), 2)]
                    tot.append(a[0])
                for t, v in enumerate(_lane_sums(builder, tot)):
                    o = builder.add(builder.mul(builder.add(m, _i64c(t)), N), row)
                    builder.store(v, builder.gep(op, [o]))

        if lanes == 16:
            # both rows, a loop over the groups, in it one over the chunks (folded for constant C)
            rows = (n, builder.add(n, _i64c(1)))
            c_base = [builder.mul(row, Kc) for row in rows]
            s_base = [builder.mul(row, ng) for row in rows]
            x_base.extend(builder.mul(builder.add(m, _i64c(t)), K) for t in range(T))

            def group(g, vals):
                sv, bv = scale_bias(s_base, g)
                table = None
                if lookup:
                    # the group's 16 possible weights, scale*code + bias for code = 0..15 (fmul, fadd)
                    table = [builder.fadd(builder.fmul(sv[r], iota), bv[r]) for r in range(2)]
                c_g = builder.mul(g, H if q4 else G)  # code offset of the group inside a row
                x_g = builder.mul(g, G)               # x offset of the group

                def chunk_k(k, acc):
                    k16 = builder.mul(k, _i64c(16))
                    return chunk(acc, c_base, sv, bv, table, builder.add(c_g, k16), builder.add(x_g, k16))

                return _loop(builder, C, vals, chunk_k, "bt.c")

            store(rows, _loop(builder, ng, [zero] * (R * T * A), group, "bt.g"))
            return

        TA = T * A
        x_tile = builder.mul(m, K)                   # kernels._pack_x: the tile's T*K floats start here

        def chunks(rows, g0, count, acc):
            """acc after the groups g0..g0+count-1 of the weight rows ``rows``: one flat loop over
            their chunks q = g*C + k, carrying g and k for the scales and biases; codes at 16*q, x
            at x_tile + 16*NH*T*q.  Costs nothing per group at C = 1 (a nested run-time chunk loop
            of one trip measured ~10% slower at M = 2) and serves every C."""
            c_base = [builder.mul(row, Kc) for row in rows]
            s_base = [builder.mul(row, ng) for row in rows]
            q0 = builder.mul(g0, C)

            def body(i, vals):
                acc, g, k = vals[:-2], vals[-2], vals[-1]
                q = builder.add(q0, i)
                sv, bv = scale_bias(s_base, g)
                xq = builder.add(x_tile, builder.mul(q, _i64c(16 * NH * T)))
                acc = chunk(acc, c_base, sv, bv, None, builder.mul(q, _i64c(16)), xq)
                k1 = builder.add(k, _i64c(1))
                wrap = builder.icmp_signed("==", k1, C)
                return acc + [builder.add(g, builder.zext(wrap, _i64)), builder.select(wrap, _i64c(0), k1)]

            return _loop(builder, builder.mul(count, C), list(acc) + [g0, _i64c(0)], body, "bt.q")[:-2]

        if R == 2:                                   # T <= 3: both rows in one pass (x from L1 or L2)
            rows = (n, builder.add(n, _i64c(1)))
            store(rows, chunks(rows, _i64c(0), ng, [zero] * (2 * TA)))
            return
        # T >= 4: rows n and n+1 by a loop of two (not unrolled: half the code to compile)
        with builder.if_else(builder.icmp_signed(">", builder.mul(K, _i64c(T)), _i64c(x_l1))) as (big, small):
            with small:                               # the tile's x stays in L1 from row n to row n+1
                def row(r, vals):
                    store((builder.add(n, r),), chunks((builder.add(n, r),), _i64c(0), ng, [zero] * TA))
                    return []

                _loop(builder, _i64c(2), [], row, "bt.r")
            with big:
                # Blocks of groups, each ~X_BLOCK floats of the tile's x: row n, then row n+1 over
                # each block, so row n+1 finds the block in L1.  Both rows' accumulators live across
                # the blocks, 2*T registers with the T in use: they go through a stack buffer (an
                # empty asm that may touch it keeps LLVM from promoting it back into registers, which
                # spilled inside the chunk loop).  Same arithmetic in the same order: the same bits.
                nb = builder.udiv(builder.add(builder.mul(K, _i64c(T)), _i64c(X_BLOCK - 1)), _i64c(X_BLOCK))
                gb = builder.udiv(builder.add(ng, builder.sub(nb, _i64c(1))), nb)   # groups per block
                buf = cgutils.alloca_once(builder, VF, size=2 * TA)
                for i in range(2 * TA):
                    builder.store(zero, builder.gep(buf, [_i64c(i)]))
                fence = ir.FunctionType(ir.VoidType(), [buf.type])

                def slots(r):
                    base = builder.mul(r, _i64c(TA))
                    return [builder.gep(buf, [builder.add(base, _i64c(i))]) for i in range(TA)]

                def block(b, vals):
                    g0 = builder.mul(b, gb)
                    rest = builder.sub(ng, g0)
                    cnt = builder.select(builder.icmp_signed("<", rest, gb), rest, gb)   # <= 0 past the end

                    def row(r, vals):
                        builder.asm(fence, "", "r,~{memory}", [buf], side_effect=True)
                        sl = slots(r)
                        acc = chunks((builder.add(n, r),), g0, cnt, [builder.load(p) for p in sl])
                        for a, p in zip(acc, sl):
                            builder.store(a, p)
                        return []

                    _loop(builder, _i64c(2), [], row, "bt.r")
                    return []

                _loop(builder, nb, [], block, "bt.b")
                builder.asm(fence, "", "r,~{memory}", [buf], side_effect=True)

                def row_out(r, vals):
                    store((builder.add(n, r),), [builder.load(p) for p in slots(r)])
                    return []

                _loop(builder, _i64c(2), [], row_out, "bt.o")

    def emit_call(context, builder, tys, args):
        ptrs = [_data(context, builder, tys[i], args[i]) for i in range(5)]
        n, m, ng, C, N = args[5:10]
        if isinstance(tys[8], types.IntegerLiteral) or lanes == 8:    # 8 lanes: any C alike
            emit(builder, *ptrs, n, m, ng, _const_or(tys[8], C), N)
            return
        # A run-time chunk count C gets constant copies for the common group sizes (C = 1, 2): the
        # chunk loop then folds away (measured ~20% faster at M = 8 than the loop).
        fn = builder.function
        done = fn.append_basic_block("bt.done")
        cases = [(_i64c(v), fn.append_basic_block("bt.c%d" % v)) for v in (1, 2)]
        other = fn.append_basic_block("bt.cn")
        sw = builder.switch(C, other)
        for v, bb in cases:
            sw.add_case(v, bb)
        for Cv, bb in cases + [(C, other)]:
            builder.position_at_end(bb)
            emit(builder, *ptrs, n, m, ng, Cv, N)
            builder.branch(done)
        builder.position_at_end(done)

    return emit_call


def make_batch_tile(kind, T, permute=PERMUTE, lanes=BATCH_LANES, x_l1=X_L1):
    """One batch tile as an intrinsic ``tile(codes, scales, biases, x, out, n, m, ng, C, N)``, for
    any of its variants (the kernels take the target's through ``batch_tiles``)."""
    emit = _batch_tile_ir(kind, T, permute, lanes, x_l1)

    def codegen(context, builder, sig, args):
        emit(context, builder, sig.args, args)
        return context.get_dummy_value()

    def typer(typingctx, codes, scales, biases, x, out, n, m, ng, C, N):
        _check_c(codes, scales, biases, x, out)
        return types.void(codes, scales, biases, x, out, n, m, ng, C, N), codegen

    typer.__name__ = "_batch_tile_%s_t%d_w%d%s%s" % (kind, T, lanes, "_lookup" if permute and kind == "q4_affine" else "",
                                                     "" if x_l1 == X_L1 else "_l1_%d" % x_l1)
    return intrinsic(prefer_literal=True)(typer)


def _make_prefetch():
    """prefetch_rows(a, n0, n1): hint the CPU to fetch rows [n0, n1) of the 2-D array ``a`` (rows
    past the end are skipped) into L1, one prefetch per 64-byte line; a no-op on targets without.
    Why: the hardware prefetcher alone leaves the weight stream from DRAM partly exposed, both for
    the GEMV (bound by memory latency more than bandwidth) and for the compute-bound batch tiles
    (measured, 49152x576 q8_sym from DRAM: M=1 1.8 -> 1.2 ms, M=8 3.3 -> 2.0 ms; in cache 0.7 /
    1.9 ms).  The matmuls prefetch the codes only: prefetching the scales and biases too (1/8 of
    the bytes, which the hardware prefetcher keeps up with) measured no better."""

    def codegen(context, builder, sig, args):
        aty = sig.args[0]
        ary = context.make_array(aty)(context, builder, args[0])
        n0, n1 = args[1], args[2]
        rows = builder.extract_value(ary.shape, 0)
        n1 = builder.select(builder.icmp_signed("<", n1, rows), n1, rows)
        row_bytes = builder.extract_value(ary.strides, 0)
        base = builder.bitcast(ary.data, ir.IntType(8).as_pointer())
        start = builder.mul(n0, row_bytes)
        count = builder.sdiv(builder.add(builder.sub(builder.mul(n1, row_bytes), start), _i64c(63)), _i64c(64))
        fnty = ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer(), _i32, _i32, _i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")

        def line(i, vals):
            p = builder.gep(base, [builder.add(start, builder.mul(i, _i64c(64)))])
            builder.call(fn, [p, ir.Constant(_i32, 0), ir.Constant(_i32, 3), ir.Constant(_i32, 1)])
            return []

        _loop(builder, count, [], line, "pf")
        return context.get_dummy_value()

    def typer(typingctx, a, n0, n1):
        _check_c(a)
        return types.void(a, n0, n1), codegen

    typer.__name__ = "prefetch_rows"
    return intrinsic(typer)


prefetch_rows = _make_prefetch()


def _dq_row_ir(kind):
    """The IR emitter of out[i, :] = dequantized weight row n (fmul then fadd: bit-exact
    ``scale*code + bias``), for the arguments (codes, scales, biases, out, n, i, ng, C)."""
    has_bias = kind != "q8_sym"
    q4 = kind == "q4_affine"

    def emit(context, builder, tys, args):
        codes_t, scales_t, biases_t, out_t = tys[:4]
        cp = _data(context, builder, codes_t, args[0])
        sp = _data(context, builder, scales_t, args[1])
        bp = _data(context, builder, biases_t, args[2])
        op = _data(context, builder, out_t, args[3])
        n, i, ng, C = args[4:8]
        C = _const_or(tys[7], C)
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

    return emit


def _make_copy8():
    """copy8(dst, i, src, j): dst.flat[i:i+8] = src.flat[j:j+8] as one 8-float vector (``kernels._pack_x``:
    numba keeps SLP vectorisation off, and the scalar copy took 5 us for 8 x 576 floats)."""
    vty = ir.VectorType(_f32, 8)

    def codegen(context, builder, sig, args):
        dp = _data(context, builder, sig.args[0], args[0])
        sp = _data(context, builder, sig.args[2], args[2])
        v = _vload(builder, sp, args[3], vty, 4)
        builder.store(v, builder.bitcast(builder.gep(dp, [args[1]]), vty.as_pointer()), align=4)
        return context.get_dummy_value()

    def typer(typingctx, dst, i, src, j):
        _check_c(dst, src)
        return types.void(dst, i, src, j), codegen

    typer.__name__ = "copy8"
    return intrinsic(typer)


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

    typer.__name__ = "group_sums_row"
    return intrinsic(typer)


group_sums_row = _make_group_sums_row()
copy8 = _make_copy8()


# ----------------------------------------------------------------------------------------------
# the tiles as the kernels call them: the kind a literal (its index in formats.KINDS)
# ----------------------------------------------------------------------------------------------
def _literal(ty, what):
    if not isinstance(ty, types.IntegerLiteral):
        raise TypingError("quant kernels: %s must be a compile-time constant, got %s" % (what, ty))
    return ty.literal_value


@intrinsic(prefer_literal=True)
def gemv_tile(typingctx, kind, rows, codes, scales, biases, x, xs, out, n, m, ng, C, N):
    """out[m, n..n+rows-1]: weight rows n.. (rows = 1 or 2) against row m of x; ``xs``: the group
    sums of x (affine kinds; any float32 C array for q8_sym, which has no biases)."""
    _check_c(codes, scales, biases, x, xs, out)
    emit = _tile_ir(KINDS[_literal(kind, "kind")], _literal(rows, "rows"), 1)

    def codegen(context, builder, sig, args):
        emit(context, builder, sig.args[2:], args[2:])
        return context.get_dummy_value()

    return types.void(kind, rows, codes, scales, biases, x, xs, out, n, m, ng, C, N), codegen


@intrinsic(prefer_literal=True)
def batch_tiles(typingctx, kind, codes, scales, biases, x, out, n, M, ng, C, N):
    """Weight rows n, n+1 against all M >= 2 rows of x, in ceil(M/8) tiles of 4-8 rows (2-8 if
    M < 8), each the target's tile for its T (a switch over T = 2..8); ``x`` as ``kernels._batch_x``
    lays it out.  A loop here, not in numba: called from the kernels' parallel loop, the tiles then
    sit in its body (a numba function called there per weight row pair measured 5-10% slower)."""
    _check_c(codes, scales, biases, x, out)
    emits = {t: _batch_tile_ir(KINDS[_literal(kind, "kind")], t) for t in range(2, 9)}

    def codegen(context, builder, sig, args):
        tys = sig.args[1:7] + (types.int64,) + sig.args[8:]   # the tile's: (codes .. out, n, m, ng, C, N)
        ptrs, n, M = args[1:6], args[6], args[7]
        rest = args[8:]
        nt = builder.sdiv(builder.add(M, _i64c(7)), _i64c(8))
        fn = builder.function

        def tile(i, vals):
            (m,) = vals
            T = builder.sdiv(builder.sub(M, m), builder.sub(nt, i))
            done = fn.append_basic_block("bt.tdone")
            blocks = {t: fn.append_basic_block("bt.t%d" % t) for t in range(2, 9)}
            sw = builder.switch(T, blocks[2])
            for t in range(3, 9):
                sw.add_case(_i64c(t), blocks[t])
            for t, bb in blocks.items():
                builder.position_at_end(bb)
                emits[t](context, builder, tys, [*ptrs, n, m, *rest])
                builder.branch(done)
            builder.position_at_end(done)
            return [builder.add(m, T)]

        _loop(builder, nt, [_i64c(0)], tile, "bt.m")
        return context.get_dummy_value()

    return types.void(kind, codes, scales, biases, x, out, n, M, ng, C, N), codegen


@intrinsic(prefer_literal=True)
def dq_row(typingctx, kind, codes, scales, biases, out, n, i, ng, C):
    """out[i, :] = dequantized weight row n."""
    _check_c(codes, scales, biases, out)
    emit = _dq_row_ir(KINDS[_literal(kind, "kind")])

    def codegen(context, builder, sig, args):
        emit(context, builder, sig.args[1:], args[1:])
        return context.get_dummy_value()

    return types.void(kind, codes, scales, biases, out, n, i, ng, C), codegen
