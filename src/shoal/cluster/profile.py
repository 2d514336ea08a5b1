"""Device profiling: what this machine is and how fast it is, measured rather than guessed.

Taken once at start within several seconds and cached in <home>/profile.json; the cache is reused
while it is younger than a day and was taken on the same machine (same CPU, core count, RAM,
accelerators). torch is imported here only, lazily, and only if installed: a node whose cache is
valid never imports it.

A profile steers placement for as long as it is cached, so only one that can be trusted is: each
timed figure is the best of several tries, and a profile taken while other processes kept the cores
busy (watched before and while measuring), whose probe rounds disagree, or with a figure no real
machine gives, is marked unreliable — used for this run, never written, measured again next start.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from shoal.cluster.messages import Accelerator, NodeProfile

log = logging.getLogger("shoal.profile")

CACHE_MAX_AGE_S = 24 * 3600
MATMUL_N = 1024  # 2.1 GFLOP per product: long enough to time, short enough on a slow laptop
COPY_BYTES = 256 << 20  # well past any CPU cache, so the copy measures DRAM

# Figures no machine shoal runs on gives (the reference VM: 360 GFLOP/s, 27 GB/s copy, 22 GB/s of
# q4 reads, 21 us a probe layer): a probe that returns one was starved or broken, not measuring.
PLAUSIBLE: dict[str, tuple[float, float]] = {
    "gflops_fp32": (0.1, 1e6),
    "memory_bandwidth_gbps": (0.2, 1e4),
    "q4_read_gbps": (0.1, 1e4),
    "layer_overhead_us": (1.5, 20_000.0),  # the probe floors it at 1 us when noise swallows it
}
LOAD_SAMPLE_S = 0.25  # the machine watched before measuring, this process idle
BUSY_SHARE = 0.25  # others using this share of the cores (and at least half a core) is load
SPREAD_LIMIT = 0.5  # the probe's worst round 1.5x its best: something else ran meanwhile


def cpu_model() -> str:
    system = platform.system()
    try:
        if system == "Linux":
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                # x86 says "model name"; many ARM kernels only give "Hardware" or nothing.
                if line.lower().startswith(("model name", "hardware")):
                    return line.split(":", 1)[1].strip()
        elif system == "Darwin":
            out = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=2, check=False
            )
            if out.stdout.strip():
                return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine() or "unknown"


def _static_facts() -> dict[str, Any]:
    return {
        "os": f"{platform.system()} {platform.release()} ({platform.machine()})",
        "hostname": socket.gethostname(),
        "cpu_model": cpu_model(),
        "cpu_cores_logical": psutil.cpu_count(logical=True) or 1,
        "cpu_cores_physical": psutil.cpu_count(logical=False),
        "ram_total_bytes": psutil.virtual_memory().total,
    }


def _fingerprint(facts: dict[str, Any], accel_hint: str) -> str:
    keys = ("hostname", "cpu_model", "cpu_cores_logical", "ram_total_bytes")
    text = "|".join(str(facts[k]) for k in keys) + "|" + accel_hint
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _accelerator_hint() -> str:
    """Cheap machine identity for accelerators, without importing torch: the NVIDIA device nodes
    present. A card added or removed invalidates the cache."""
    try:
        return ",".join(sorted(p for p in os.listdir("/dev") if p.startswith("nvidia") and p[6:].isdigit()))
    except OSError:
        return ""


def _import_torch() -> Any | None:
    try:
        import torch  # deliberately lazy: ~1.5 s, and optional
    except Exception:  # noqa: BLE001 - ImportError, or a broken install: fall back to numpy
        return None
    return torch


def _time_best(fn: Any, budget_s: float, sync: Any = None) -> tuple[float, int]:
    """Best single-call time of fn() within budget_s (after one warm-up call); also the count."""
    fn()
    if sync:
        sync()
    best, n, start = float("inf"), 0, time.perf_counter()
    while n < 1 or time.perf_counter() - start < budget_s:
        t = time.perf_counter()
        fn()
        if sync:
            sync()
        best = min(best, time.perf_counter() - t)
        n += 1
        if n >= 50:
            break
    return best, n


def _measure_cpu(torch: Any | None, budget_s: float, copy_bytes: int) -> tuple[float, float, str]:
    """(gflops_fp32, memory_bandwidth_gbps, measured_with)."""
    n = MATMUL_N
    if torch is not None:
        a, b = torch.randn(n, n), torch.randn(n, n)
        mm_t, _ = _time_best(lambda: torch.mm(a, b), budget_s / 2)
        src = torch.ones(copy_bytes // 4)  # touch every page now so the copy does not fault
        dst = torch.zeros_like(src)
        cp_t, _ = _time_best(lambda: dst.copy_(src), budget_s / 2)
        with_ = f"torch {torch.__version__.split('+')[0]}"
    else:
        import numpy as np

        rng = np.random.default_rng(0)
        a = rng.standard_normal((n, n), dtype=np.float32)
        b = rng.standard_normal((n, n), dtype=np.float32)
        mm_t, _ = _time_best(lambda: a @ b, budget_s / 2)
        src = np.ones(copy_bytes // 4, dtype=np.float32)
        dst = np.zeros_like(src)
        cp_t, _ = _time_best(lambda: np.copyto(dst, src), budget_s / 2)
        with_ = f"numpy {np.__version__}"
    gflops = 2 * n**3 / mm_t / 1e9
    gbps = 2 * copy_bytes / cp_t / 1e9  # a copy reads and writes every byte
    return gflops, gbps, with_


def _measure_accelerators(torch: Any | None, budget_s: float) -> list[Accelerator]:
    if torch is None:
        return []
    out: list[Accelerator] = []
    try:
        if torch.cuda.is_available():
            count = torch.cuda.device_count()
            for i in range(count):
                props = torch.cuda.get_device_properties(i)
                out.append(
                    Accelerator(
                        kind="cuda",
                        name=props.name,
                        memory_total_bytes=props.total_memory,
                        gflops_fp32=_device_gflops(torch, f"cuda:{i}", budget_s / count, torch.cuda.synchronize),
                    )
                )
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            # MPS shares the unified memory: its budget is the machine's RAM.
            out.append(
                Accelerator(
                    kind="mps",
                    name="Apple GPU (MPS)",
                    memory_total_bytes=psutil.virtual_memory().total,
                    gflops_fp32=_device_gflops(torch, "mps", budget_s, torch.mps.synchronize),
                )
            )
    except Exception as e:  # noqa: BLE001 - a broken driver must not stop the node from starting
        log.warning("accelerator detection failed: %s", e)
    return out


def _device_gflops(torch: Any, device: str, budget_s: float, sync: Any) -> float | None:
    try:
        n = 4096
        a = torch.randn(n, n, device=device)
        b = torch.randn(n, n, device=device)
        t, _ = _time_best(lambda: torch.mm(a, b), budget_s, sync)
        return round(2 * n**3 / t / 1e9, 1)
    except Exception as e:  # noqa: BLE001 - e.g. out of device memory: report no figure
        log.warning("could not time matmul on %s: %s", device, e)
        return None


def _measure_decode(budget_s: float, timeout_s: float = 300.0) -> dict[str, float]:
    """The engine's decode speed (engine/probe.py), in a child process so that its kernels and
    buffers never live in the daemon. The first run on a machine also compiles the kernels (cached
    on disk afterwards). {} if the engine cannot run here."""
    import sys

    log.info("measuring decode speed with the engine's kernels (the first run compiles them)")
    try:
        out = subprocess.run([sys.executable, "-m", "shoal.engine.probe", str(budget_s)], capture_output=True, text=True,
                             timeout=timeout_s, check=False)
        got = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError, ValueError) as e:
        log.warning("decode probe failed: %s", e)
        return {}
    if not isinstance(got, dict):
        log.warning("decode probe failed: %s", (out.stderr or "").strip().splitlines()[-1:])
        return {}
    return {k: float(got[k]) for k in ("layer_overhead_us", "q4_read_gbps", "spread") if isinstance(got.get(k), (int, float))}


# -- is the measurement to be trusted --------------------------------------------------------------
def _busy_seconds() -> tuple[float, float]:
    """(CPU seconds the whole machine has been busy, those of this process and the children it
    waited for)."""
    t = psutil.cpu_times()
    # guest time is already inside user time on Linux; iowait is idle.
    machine = sum(getattr(t, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq", "steal"))
    try:
        import resource
    except ImportError:  # Windows: no children's times, so the probe's child counts as load there
        own = psutil.Process().cpu_times()
        return machine, own.user + own.system
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return machine, me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


class LoadMeter:
    """How many cores other processes kept busy since it was made: the machine's busy CPU time
    minus this process's (all its threads, and the probe's child once waited for)."""

    def __init__(self) -> None:
        self._start = time.perf_counter()
        self._machine, self._own = _busy_seconds()

    def others(self) -> float:
        machine, own = _busy_seconds()
        wall = max(time.perf_counter() - self._start, 1e-3)
        return max(0.0, (machine - self._machine) - (own - self._own)) / wall


def busy_limit(cores: int) -> float:
    """Cores others may keep busy before a measurement counts as taken under load."""
    return max(0.5, BUSY_SHARE * cores)


def other_load(seconds: float = LOAD_SAMPLE_S) -> float:
    """Cores other processes keep busy, watched for `seconds` while this process sleeps."""
    meter = LoadMeter()
    time.sleep(seconds)
    return meter.others()


def implausible(prof: NodeProfile) -> list[str]:
    """The figures of `prof` that no real machine gives (non-finite included), said in words."""
    out = []
    for name, (lo, hi) in PLAUSIBLE.items():
        v = getattr(prof, name)
        if v is not None and not (math.isfinite(v) and lo <= v <= hi):
            out.append(f"{name} {v} outside [{lo:g}, {hi:g}]")
    return out


def untrusted(prof: NodeProfile) -> list[str]:
    """Why `prof` must not be cached or taken from the cache; [] if it may."""
    return (["marked unreliable when measured"] if not prof.reliable else []) + implausible(prof)


# -- measuring and caching ---------------------------------------------------------------------------
def measure_profile(budget_s: float = 4.0, decode_budget_s: float | None = 6.0) -> NodeProfile:
    """Measure now, in about budget_s on an idle machine (torch import included): the timed loops
    get whatever the import and allocations leave, at least a few calls each. Then the engine's
    decode (about decode_budget_s more, plus compiling the kernels on a machine's first run; None
    skips it and leaves the cost model to its reference constants). Marked unreliable if others
    loaded the machine before or during it, or a figure is absurd (an absurd decode figure is
    dropped: the cost model's reference constants are better than it)."""
    start = time.perf_counter()
    before = other_load()
    during = LoadMeter()
    deadline = time.perf_counter() + budget_s
    facts = _static_facts()
    torch = _import_torch()

    def left() -> float:
        return max(0.2, deadline - time.perf_counter())

    accels = _measure_accelerators(torch, left() / 3)
    avail = psutil.virtual_memory().available
    copy_bytes = max(16 << 20, min(COPY_BYTES, avail // 8))  # two buffers; never crowd a small box
    gflops, gbps, with_ = _measure_cpu(torch, min(1.5, left() * 0.8), copy_bytes)
    decode = _measure_decode(decode_budget_s) if decode_budget_s else {}
    spread = decode.pop("spread", 0.0)
    load = max(before, during.others())
    prof = NodeProfile(
        **decode,
        **facts,
        accelerators=accels,
        gflops_fp32=round(gflops, 1),
        memory_bandwidth_gbps=round(gbps, 2),
        measured_with=with_,
        measured_at=time.time(),
        measure_seconds=round(time.perf_counter() - start, 2),
        fingerprint=_fingerprint(facts, _accelerator_hint()),
    )
    problems = implausible(prof)
    dropped = {k: None for k in ("q4_read_gbps", "layer_overhead_us") if any(p.startswith(k + " ") for p in problems)}
    cores = facts["cpu_cores_logical"]
    if load > busy_limit(cores):
        problems.append(f"other processes kept {load:.1f} of {cores} cores busy")
    if spread > SPREAD_LIMIT:
        problems.append(f"the probe's rounds disagree (the worst {1 + spread:.1f}x slower than the best)")
    if problems:
        log.warning("profile not to be trusted, used for this run only and measured again at the next start: %s",
                    "; ".join(problems))
    return prof.model_copy(update={**dropped, "reliable": not problems})


def load_cached(path: Path) -> NodeProfile | None:
    """The cached profile if it is for this machine, fresh and trustworthy, else None."""
    try:
        prof = NodeProfile.model_validate_json(path.read_bytes())
    except (OSError, ValueError):
        return None
    if time.time() - prof.measured_at > CACHE_MAX_AGE_S:
        return None
    if prof.fingerprint != _fingerprint(_static_facts(), _accelerator_hint()):
        return None
    why = untrusted(prof)
    if why:
        log.warning("cached profile %s ignored, measuring again: %s", path, "; ".join(why))
        return None
    return prof


def write_cache(path: Path, prof: NodeProfile) -> None:
    try:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(prof.model_dump(), indent=1))
        tmp.replace(path)  # atomic: a node killed mid-write leaves the old cache or none
    except OSError as e:
        log.warning("could not cache the profile in %s: %s", path, e)


def load_or_measure(path: Path, budget_s: float = 4.0,
                    measure: Callable[[float], NodeProfile] = measure_profile) -> tuple[NodeProfile, bool]:
    """(profile, from_cache). Writes the cache after measuring, unless the profile is untrusted."""
    cached = load_cached(path)
    if cached is not None:
        return cached, True
    prof = measure(budget_s)
    if not untrusted(prof):
        write_cache(path, prof)
    return prof, False
