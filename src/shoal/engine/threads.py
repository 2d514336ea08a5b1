"""CPU threads for the engine.

torch and numba each bring their own OpenMP runtime (torch ships its own libgomp; numba's `omp`
layer links the system one), so each has its own pool of worker threads, and an idle OpenMP worker
spins for a while before it sleeps. When decode alternates tiny torch ops with numba GEMVs every
few microseconds, the two pools' spinning workers steal the cores from each other. So a decode
step runs torch on one thread (its ops there are microseconds long anyway) and gives all cores to
the numba kernels; a prefill step, where torch's BLAS does the heavy matmuls, gets every thread.
A runner also pins its main thread and its OpenMP workers to a core each (`pin`).
"""

from __future__ import annotations

import os

import numpy as np
import torch
from numba import njit, prange

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


def _cpu_ns() -> dict[int, int]:
    """CPU time so far of each thread of this process (ns, from /proc/self/task/*/schedstat)."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                out[int(tid)] = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return out


def _workers_of(run) -> list[int]:
    """The threads besides the calling one that compute when `run()` does (its runtime's pool)."""
    import threading
    import time

    run()  # the pool exists and is warm
    time.sleep(0.02)  # every pool's workers have stopped spinning and gone to sleep
    before = _cpu_ns()
    for _ in range(3):
        run()
    time.sleep(0.02)  # ...and again: a thread's CPU time is brought up to date when it stops running
    after = _cpu_ns()
    me = threading.get_native_id()
    return sorted(t for t, ns in after.items() if t != me and ns - before.get(t, ns) > 0)


@njit(parallel=True, cache=True)
def _fill(out):
    for i in prange(out.shape[0]):
        out[i] = i * 3 + 1


def pin() -> bool:
    """Give each compute thread of this process a core of its own: the main thread the first
    available core, numba's and torch's OpenMP workers the next ones, in order (Linux only).

    Why: the Linux scheduler, on a small VM especially, can leave the main thread and an OpenMP
    worker of one runner time-sliced on one core while another core idles, for a whole tick or
    more (seen: 11 ms with the other vCPU idle); every parallel kernel then waits at its barrier.
    Runners sharing a machine take turns (pipeline stages), so the same pinning in each of them
    costs nothing; on the 2-core reference machine it took pipeline-3 from ~0.71x to ~0.81x of
    one node (the slowest tenth of its steps from >20 ms to 13 ms) and left one node as it was.
    OMP_PROC_BIND=close (OMP_PLACES=cores) instead cut one node from 110 to 67 tokens/s there:
    the main thread, bound first, took the workers' core with it. The workers are found by what
    they do: the threads that gain CPU time while a parallel kernel runs (numba's and torch's
    pools, the same threads where both use one OpenMP runtime).
    Only a process that uses every core it may run on pins (the default); one given fewer threads
    shares the machine with others, and pinning them all alike would crowd the first cores.
    Set SHOAL_PIN_THREADS=0 to leave placement to the scheduler."""
    import threading

    if os.environ.get("SHOAL_PIN_THREADS", "1") == "0" or not hasattr(os, "sched_setaffinity"):
        return False
    if not os.path.isdir("/proc/self/task"):
        return False
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return False
    n = _configured or configure()
    if n < len(cpus):
        return False  # a runner given only some of the cores shares the machine: the scheduler places it
    numba_workers = _workers_of(lambda: _fill(np.empty(1 << 20, np.int64)))
    a = torch.ones(1 << 22)
    torch.set_num_threads(n)
    torch_workers = _workers_of(lambda: a.mul_(1.0))
    torch.set_num_threads(_current or n)
    try:
        os.sched_setaffinity(threading.get_native_id(), {cpus[0]})
        for workers in (numba_workers, torch_workers):
            for i, tid in enumerate(workers):
                os.sched_setaffinity(tid, {cpus[(i + 1) % len(cpus)]})
    except OSError:
        return False
    return True
