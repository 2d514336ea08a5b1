#!/usr/bin/env python
"""Benchmark the shoal.quant kernels: GEMV (M=1) against the memory-bandwidth limit and torch,
and batches (M>1) against dequantize + BLAS and against M=1.

    python scripts/bench_kernels.py [--threads 2] [--kinds q4_affine,q8_sym,q8_affine]
                                    [--stream-mb 256] [--threshold] [--model-step] [--ms 1,8]
                                    [--overhead] [--no-gemv]

For each kind and (N, K) shape it prints the kernel's throughput in GB/s of weight bytes
(codes + float32 scales/biases) in two regimes:
  hot    - the same weight every call (small shapes stay in L2: an upper bound)
  stream - cycling through copies of the weight totalling --stream-mb MB, so most bytes come
           from outside the core's caches (what decode sees: every weight once per token)
and the ratio to --peak-gbs (13 GB/s, the machine's physical limit as given) and the speed-up over
torch.nn.functional.linear on the dequantized fp32 weight (hot, same M=1 input).
Timings are the best of several batches (the machine is shared; best-of filters interference).

--threshold sweeps M to compare the numba kernel with dequantize + F.linear (QuantLinear.small_m).
--model-step times the kernels of one decode step of the bundled model's shapes (weights cold) for
  batch sizes M, and prints each against M=1: what batching can gain before attention and Python.
--overhead measures QuantLinear.forward's per-call cost at M=1 on a (576, 576) weight.
"""
from __future__ import annotations

import argparse
import time

import numba
import numpy as np
import torch
import torch.nn.functional as F

from shoal.quant import kernels as K
from shoal.quant.formats import QuantizedWeight
from shoal.quant.linear import QuantLinear

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576), (960, 576), (3072, 576)]


def random_qw(kind, N, Kd, G, rng):
    ng = Kd // G
    if kind == "q4_affine":
        codes = rng.integers(0, 256, (N, Kd // 2), dtype=np.uint8)
    elif kind == "q8_sym":
        codes = rng.integers(-128, 128, (N, Kd), dtype=np.int8)
    else:
        codes = rng.integers(0, 256, (N, Kd), dtype=np.uint8)
    scales = (rng.standard_normal((N, ng)) * 0.01).astype(np.float32)
    biases = None if kind == "q8_sym" else (rng.standard_normal((N, ng)) * 0.1).astype(np.float32)
    return QuantizedWeight(kind, codes, scales, biases, G)


def best_time(fn, reps, batches=7):
    fn()
    best = float("inf")
    for _ in range(batches):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t) / reps)
    return best


def kernel_fn(qw):
    k, (c, s, b) = K.MATMUL[qw.kind], K.operands(qw)
    return lambda x, o: k(x, c, s, b, o)


def bench_gemv(kinds, G, stream_mb, peak):
    rng = np.random.default_rng(0)
    print(f"{'kind':10s} {'N x K':>12s} {'MB':>6s} | {'hot us':>8s} {'GB/s':>6s} | {'stream us':>9s} {'GB/s':>6s} "
          f"{'%peak':>6s} | {'torch us':>8s} {'speedup':>7s}")
    for kind in kinds:
        for N, Kd in SHAPES:
            qw = random_qw(kind, N, Kd, G, rng)
            nb = qw.nbytes
            x = rng.standard_normal((1, Kd)).astype(np.float32)
            out = np.empty((1, N), np.float32)
            f = kernel_fn(qw)
            reps = max(10, int(3e8 / nb))
            t_hot = best_time(lambda: f(x, out), reps)
            copies = max(2, int(stream_mb * 1e6 / nb))
            fns = [f] + [kernel_fn(QuantizedWeight(kind, qw.codes.copy(), qw.scales.copy(),
                                                   None if qw.biases is None else qw.biases.copy(), G))
                         for _ in range(copies - 1)]
            it = [0]

            def step():
                i = it[0]
                fns[i](x, out)
                it[0] = i + 1 if i + 1 < copies else 0
            t_str = best_time(step, max(reps, copies), batches=5)
            del fns
            W = torch.from_numpy(K.dequantize(qw))
            xt = torch.from_numpy(x)
            with torch.inference_mode():
                t_torch = best_time(lambda: F.linear(xt, W), max(10, reps // 4))
            print(f"{kind:10s} {N:6d}x{Kd:<5d} {nb / 1e6:6.2f} | {t_hot * 1e6:8.1f} {nb / t_hot / 1e9:6.1f} | "
                  f"{t_str * 1e6:9.1f} {nb / t_str / 1e9:6.1f} {100 * nb / t_str / 1e9 / peak:5.0f}% | "
                  f"{t_torch * 1e6:8.1f} {t_torch / t_hot:6.1f}x")


def bench_threshold(kinds, G, Ms):
    rng = np.random.default_rng(1)
    print("\nM sweep (us per call): numba kernel vs dequantize + F.linear;  '*' = faster")
    for kind in kinds:
        for N, Kd in [(576, 576), (960, 576), (3072, 576), (576, 1536)]:
            qw = random_qw(kind, N, Kd, G, rng)
            mod = QuantLinear(qw)
            row = []
            for M in Ms:
                x = torch.randn(M, Kd)
                with torch.inference_mode():
                    tk = td = float("inf")
                    for _ in range(3):          # interleave the two paths (shared, noisy machine)
                        mod.small_m = 10 ** 6
                        tk = min(tk, best_time(lambda: mod(x), 10, 3))
                        mod.small_m = 0
                        td = min(td, best_time(lambda: mod(x), 10, 3))
                row.append(f"{M}:{tk * 1e6:.0f}{'*' if tk <= td else ''}/{td * 1e6:.0f}{'*' if td < tk else ''}")
            print(f"{kind:10s} {N:5d}x{Kd:<5d} " + " ".join(row))


def bench_model_step(kind, G, layers, Ms):
    """The kernels of one decode step of a SmolLM2-135M-shaped model (per layer: fused q/k/v 960x576,
    o 576x576, fused gate/up 3072x576, down 576x1536; then a q8_sym 49152x576 head), weights cold
    as in decode (each weight once per step, ~110 MB), for batch sizes M."""
    rng = np.random.default_rng(3)
    ws = [random_qw(kind, N, Kd, G, rng) for _ in range(layers)
          for N, Kd in [(960, 576), (576, 576), (3072, 576), (576, 1536)]]
    ws.append(random_qw("q8_sym", 49152, 576, 32, rng))
    fns = [kernel_fn(w) for w in ws]
    mb = sum(w.nbytes for w in ws) / 1e6
    print(f"\nmodel step: {layers} layers of {kind} G={G} + q8_sym head, {mb:.0f} MB of weights per step")
    base = None
    for M in Ms:
        xs = {Kd: rng.standard_normal((M, Kd)).astype(np.float32) for Kd in (576, 1536)}
        outs = [np.empty((M, w.shape[0]), np.float32) for w in ws]
        args = [(xs[w.shape[1]], o) for w, o in zip(ws, outs)]

        def step():
            for f, (x, o) in zip(fns, args):
                f(x, o)
        t = best_time(step, 1, 9)
        base = base or t
        print(f"  M={M:2d}: {t * 1e3:6.2f} ms  ({t / base:4.2f}x the time of M={Ms[0]}, "
              f"{M * base / t:4.2f}x its tokens/s)")


def bench_overhead(G):
    rng = np.random.default_rng(2)
    qw = random_qw("q4_affine", 576, 576, G, rng)
    mod = QuantLinear(qw)
    x = torch.randn(1, 576)
    xn = x.numpy()
    out = np.empty((1, 576), np.float32)
    with torch.inference_mode():
        t_fwd = best_time(lambda: mod(x), 3000)
        x3 = torch.randn(1, 1, 576)
        t_fwd3 = best_time(lambda: mod(x3), 3000)
    t_k = best_time(lambda: K.MATMUL["q4_affine"](xn, qw.codes, qw.scales, qw.biases, out), 3000)
    lin = torch.nn.Linear(576, 576, bias=False)
    with torch.inference_mode():
        t_lin = best_time(lambda: lin(x), 3000)
    print(f"\nQuantLinear (576x576 q4_affine) M=1: forward {t_fwd * 1e6:.1f} us (3-D input {t_fwd3 * 1e6:.1f} us), "
          f"raw kernel call {t_k * 1e6:.1f} us -> Python/torch overhead {(t_fwd - t_k) * 1e6:.1f} us; "
          f"nn.Linear fp32 {t_lin * 1e6:.1f} us")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kinds", default="q4_affine,q8_sym,q8_affine")
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--stream-mb", type=float, default=256)
    ap.add_argument("--peak-gbs", type=float, default=13.0)
    ap.add_argument("--threshold", action="store_true")
    ap.add_argument("--ms", default=None, help="batch rows M, comma-separated (defaults: --threshold "
                    "1,2,4,...,64; --model-step 1,2,4,8,16)")
    ap.add_argument("--overhead", action="store_true")
    ap.add_argument("--model-step", action="store_true",
                    help="kernels of one decode step of the bundled model's shapes")
    ap.add_argument("--no-gemv", action="store_true")
    a = ap.parse_args()
    ms = [int(m) for m in a.ms.split(",")] if a.ms else None
    numba.set_num_threads(a.threads)
    torch.set_num_threads(a.threads)
    print(f"threads={a.threads} numba threading layer: ", end="")
    K.matmul(random_qw("q8_sym", 2, 32, 32, np.random.default_rng(0)), np.zeros((1, 32), np.float32))
    print(numba.threading_layer())
    if not a.no_gemv:
        bench_gemv(a.kinds.split(","), a.group_size, a.stream_mb, a.peak_gbs)
    if a.overhead:
        bench_overhead(a.group_size)
    if a.model_step:
        bench_model_step("q4_affine", a.group_size, 30, ms or [1, 2, 4, 8, 16])
    if a.threshold:
        bench_threshold(a.kinds.split(","), a.group_size, ms or [1, 2, 4, 6, 8, 10, 12, 14, 16, 20, 24, 32, 48, 64])


if __name__ == "__main__":
    main()
