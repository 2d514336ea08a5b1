"""Runner threads pinned to a core each: the main thread to one core, the OpenMP workers (the
threads that compute when a parallel kernel runs) to the others; and nothing pinned when told not
to. Run in child processes so that the test process keeps its own placement."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = r"""
import json, os, threading
from shoal.engine import threads
threads.configure()
pinned = threads.pin()
workers = threads._workers_of(lambda: threads._fill(threads.np.empty(1 << 20, threads.np.int64)))
print(json.dumps({"pinned": pinned, "main": sorted(os.sched_getaffinity(threading.get_native_id())),
                  "workers": [sorted(os.sched_getaffinity(t)) for t in workers], "all": sorted(os.sched_getaffinity(0))}))
"""

needs_two_cores = pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                                     reason="needs Linux and two cores")


def run_probe(**env: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120,
                         env={**os.environ, **env}, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@needs_two_cores
def test_main_thread_and_workers_get_a_core_each():
    got = run_probe()
    assert got["pinned"] is True
    assert len(got["main"]) == 1
    assert got["workers"], "the parallel kernel ran on no worker thread"
    for cpus in got["workers"]:
        assert len(cpus) == 1 and cpus != got["main"]
    assert len({c[0] for c in got["workers"]}) == min(len(got["workers"]), len(os.sched_getaffinity(0)) - 1)


@needs_two_cores
def test_pinning_can_be_turned_off():
    got = run_probe(SHOAL_PIN_THREADS="0")
    assert got["pinned"] is False
    assert got["main"] == sorted(os.sched_getaffinity(0))
    assert all(cpus == sorted(os.sched_getaffinity(0)) for cpus in got["workers"])


@needs_two_cores
def test_a_runner_given_fewer_cores_is_not_pinned():
    """Several runners each given a share of the cores must not all be pinned to the first ones."""
    code = PROBE.replace("threads.configure()", "threads.configure(1)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["pinned"] is False and got["main"] == sorted(os.sched_getaffinity(0))
