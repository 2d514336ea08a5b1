"""CPU threads for the engine.

torch and numba each bring their own OpenMP runtime (torch ships its own libgomp; numba's `omp`
layer links the system one), so each has its own pool of worker threads, and an idle OpenMP worker
spins for a while before it sleeps. When decode alternates tiny torch ops with numba GEMVs every
few microseconds, the two pools' spinning workers steal the cores from each other. So a decode
step runs torch on one thread (its ops there are microseconds long anyway) and gives all cores to
the numba kernels; a prefill step, where torch's BLAS does the heavy matmuls, gets every thread.
"""

from __future__ import annotations

import os

import torch

# A step with at most this many tokens is "decode-like": its matmuls go to the numba kernels.
DECODE_LIKE_TOKENS = 12

_configured = 0
_current = 0


def available_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def configure(n: int | None = None) -> int:
    """Use n threads (default: every core available to this process) in torch and numba."""
    global _configured, _current
    import numba

    n = n or available_cores()
    torch.set_num_threads(n)
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    _configured = _current = n
    return n


def for_step(tokens: int) -> None:
    """Set torch's threads for a step of `tokens` tokens (see the module docstring)."""
    global _current
    if not _configured:
        configure()
    want = 1 if tokens <= DECODE_LIKE_TOKENS else _configured
    if want != _current:
        torch.set_num_threads(want)
        _current = want
