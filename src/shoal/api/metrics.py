"""Prometheus metrics in the text exposition format, without a client library.

Counters and histograms are updated from the event loop thread only (the model workers report
through the loop), so they need no locks. Gauges that describe live state (queue depth, memory)
are read at scrape time by a callback, so they are never stale.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

Labels = tuple[tuple[str, str], ...]

# Time to first token spans a few ms (a warm tiny model) to minutes (a cold large one).
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
RECOVERY_BUCKETS = (1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0)


def _labels(labels: dict[str, str]) -> Labels:
    return tuple(sorted(labels.items()))


def _fmt_labels(labels: Labels, extra: tuple[tuple[str, str], ...] = ()) -> str:
    items = labels + extra
    if not items:
        return ""
    esc = lambda v: str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')  # noqa: E731
    return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in items) + "}"


def _fmt_value(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


class Counter:
    kind = "counter"

    def __init__(self, name: str, help: str):
        self.name, self.help = name, help
        self.values: dict[Labels, float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = _labels(labels)
        self.values[key] = self.values.get(key, 0.0) + amount

    def get(self, **labels: str) -> float:
        return self.values.get(_labels(labels), 0.0)

    def samples(self) -> Iterable[str]:
        for labels, v in sorted(self.values.items()):
            yield f"{self.name}{_fmt_labels(labels)} {_fmt_value(v)}"


class Histogram:
    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: tuple[float, ...]):
        self.name, self.help, self.buckets = name, help, buckets
        self.counts: dict[Labels, list[int]] = {}
        self.sums: dict[Labels, float] = {}

    def observe(self, value: float, **labels: str) -> None:
        key = _labels(labels)
        counts = self.counts.setdefault(key, [0] * (len(self.buckets) + 1))
        for i, b in enumerate(self.buckets):
            if value <= b:
                counts[i] += 1
                break
        else:
            counts[-1] += 1
        self.sums[key] = self.sums.get(key, 0.0) + value

    def samples(self) -> Iterable[str]:
        for labels, counts in sorted(self.counts.items()):
            cum = 0
            for b, c in zip((*self.buckets, math.inf), counts, strict=True):
                cum += c
                yield f"{self.name}_bucket{_fmt_labels(labels, (('le', _fmt_value(b)),))} {cum}"
            yield f"{self.name}_sum{_fmt_labels(labels)} {_fmt_value(self.sums[labels])}"
            yield f"{self.name}_count{_fmt_labels(labels)} {cum}"


class Gauge:
    """A gauge read at scrape time: `read()` returns {labels: value}."""

    kind = "gauge"

    def __init__(self, name: str, help: str, read: Callable[[], dict[Labels, float]]):
        self.name, self.help, self.read = name, help, read

    def samples(self) -> Iterable[str]:
        for labels, v in sorted(self.read().items()):
            yield f"{self.name}{_fmt_labels(labels)} {_fmt_value(v)}"


class Metrics:
    """Every metric the API exports. Created once per service and passed to whoever counts."""

    def __init__(self) -> None:
        self.requests = Counter("shoal_requests_total", "API requests answered, by endpoint and HTTP status.")
        self.prompt_tokens = Counter("shoal_prompt_tokens_total", "Prompt tokens read, by model.")
        self.cached_prompt_tokens = Counter("shoal_prompt_tokens_cached_total",
                                            "Prompt tokens whose K/V was reused from an earlier prompt instead of prefilled, by model.")
        self.generation_tokens = Counter("shoal_generation_tokens_total", "Tokens generated, by model.")
        self.cancelled = Counter("shoal_requests_cancelled_total", "Generations stopped because the client went away, by model.")
        self.rejected = Counter("shoal_requests_rejected_total", "Requests refused by admission control, by model and reason.")
        self.steps = Counter("shoal_engine_steps_total", "Batched forward passes, by model.")
        self.step_sequences = Counter("shoal_engine_step_sequences_total", "Sequences summed over all forward passes, by model.")
        self.ttft = Histogram("shoal_time_to_first_token_seconds", "Time from request arrival to its first token, by model.", TTFT_BUCKETS)
        self.duration = Histogram("shoal_request_duration_seconds", "Time from request arrival to its last token, by model.",
                                  DURATION_BUCKETS)
        self.batch = Histogram("shoal_engine_batch_sequences", "Sequences in one batched forward pass, by model.", BATCH_BUCKETS)
        self.resumed = Counter("shoal_requests_resumed_total",
                               "Streams resumed on a new placement after their model lost a node, by model.")
        self.recoveries = Counter("shoal_instance_recoveries_total",
                                  "Instances coordinated here that lost a node or a runner and were re-placed, by model.")
        self.recovery = Histogram("shoal_instance_recovery_seconds",
                                  "Time from a loss to the re-placed instance being ready, by model.", RECOVERY_BUCKETS)
        self.gauges: list[Gauge] = []

    def add_gauge(self, name: str, help: str, read: Callable[[], dict[Labels, float]]) -> None:
        self.gauges.append(Gauge(name, help, read))

    def render(self) -> str:
        lines: list[str] = []
        for m in (self.requests, self.prompt_tokens, self.cached_prompt_tokens, self.generation_tokens, self.cancelled, self.rejected, self.steps,
                  self.step_sequences, self.ttft, self.duration, self.batch, self.resumed, self.recoveries, self.recovery,
                  *self.gauges):
            lines.append(f"# HELP {m.name} {m.help}")
            lines.append(f"# TYPE {m.name} {m.kind}")
            lines.extend(m.samples())
        return "\n".join(lines) + "\n"


def labels(**kw: str) -> Labels:
    return _labels(kw)
