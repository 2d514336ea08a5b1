"""When each step reaches each point of a runner's path: for finding where a token's time goes
between the processes of an instance. Off unless asked for.

`SHOAL_STEP_TIMELINE=DIR` in a node's environment makes its runners record, per step, the moment
(`time.perf_counter`, CLOCK_MONOTONIC on Linux: one clock for every process of a machine) it
reaches each point below, and append them to `DIR/timeline-PID.jsonl`.
`scripts/bench_distributed.py --timeline` merges the files of the instances it runs on loopback
into one token's path through the stages. Off, a mark costs one test.

    step     rank 0 begins a step (the scheduler has picked its batch)
    recv     a later stage has its step message and hidden states (wire, wake-up and decode done)
    compute  the step's caches and layout are ready; the embedding and layers start
    layers   this rank's layers are done
    send     the hidden states (or the final rows) are about to go to the next stage
    final    rank 0 has the last stage's final rows
    logits   rank 0 has the step's logits
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import time
from pathlib import Path

ENV = "SHOAL_STEP_TIMELINE"
FLUSH_EVERY = 512  # marks: ~70 decode steps of a pipeline stage between appends


class Timeline:
    def __init__(self, directory: str | None):
        self.path = Path(directory) / f"timeline-{os.getpid()}.jsonl" if directory else None
        self.marks: list[tuple[str, float]] = []

    def mark(self, point: str) -> None:
        if self.path is not None:
            self.marks.append((point, time.perf_counter()))
            if len(self.marks) >= FLUSH_EVERY:
                self.flush()

    def flush(self) -> None:
        if self.path is None or not self.marks:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(self.marks) + "\n")
        self.marks.clear()


TIMELINE = Timeline(os.environ.get(ENV))


def read(directory: Path) -> dict[int, list[tuple[str, float]]]:
    """Every runner's marks in `directory`, by pid."""
    out: dict[int, list[tuple[str, float]]] = {}
    for f in sorted(directory.glob("timeline-*.jsonl")):
        pid = int(f.stem.split("-")[1])
        for line in f.read_text().splitlines():
            out.setdefault(pid, []).extend((p, t) for p, t in json.loads(line))
    return out


def legs(marks: dict[int, list[tuple[str, float]]], windows: list[tuple[float, float]]) -> tuple[list[tuple[str, float]], int]:
    """The median of each leg of a decode step through one instance's runners, from their marks
    inside `windows` (its requests): [(leg, seconds)], and the number of steps behind them. Steps
    are cut at the entry's "step" marks; only those whose legs follow the most common sequence (a
    decode step; a prefill or a control step has its own) are counted. Stages are numbered in the
    order a step reaches them: one rank per stage (a tensor group's ranks would interleave)."""
    def inside(t: float) -> bool:
        return any(a <= t <= b for a, b in windows)

    events = sorted((t, pid, point) for pid, ms in marks.items() for point, t in ms if inside(t))
    entry = next((pid for _, pid, point in events if point == "step"), None)
    if entry is None:
        return [], 0
    steps: list[list[tuple[float, int, str]]] = []
    for e in events:
        if e[1] == entry and e[2] == "step":
            steps.append([])
        if steps:
            steps[-1].append(e)

    def shape(step: list[tuple[float, int, str]]) -> tuple[tuple[int, str], ...]:
        stage_of: dict[int, int] = {}
        return tuple((stage_of.setdefault(pid, len(stage_of)), point) for _, pid, point in step)

    shapes = [shape(st) for st in steps[:-1]]  # the last one has no next step to end it
    if not shapes:
        return [], 0
    common = statistics.mode(shapes)
    kept = [(st, nxt) for st, nxt, sh in zip(steps, steps[1:], shapes) if sh == common]
    out = []
    for i, ((a, pa), (b, pb)) in enumerate(itertools.pairwise(common)):
        name = f"stage {a}: {pa} -> {pb}" if a == b else f"stage {a} {pa} -> stage {b} {pb}"
        out.append((name, statistics.median(st[i + 1][0] - st[i][0] for st, _ in kept)))
    out.append((f"stage 0: {common[-1][1]} -> next step", statistics.median(nxt[0][0] - st[-1][0] for st, nxt in kept)))
    out.append(("the whole step", statistics.median(nxt[0][0] - st[0][0] for st, nxt in kept)))
    return out, len(kept)
