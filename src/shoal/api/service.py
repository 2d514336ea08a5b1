"""Which model names this node can answer for, and the instance behind each.

`ModelService` maps a requested model name to a running `Instance`, placing one on demand (unless
the node was started with auto-loading off) while concurrent requests for the same name wait on
the same load. Where an instance goes is the `Placer`'s business: `LocalPlacer` loads the whole
model into this process; a cluster placer (placement planner + runners on other nodes) implements
the same two methods and returns a remote instance, and nothing above this file changes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import psutil

from shoal.api.device import DeviceWorker, run_in_fresh_thread, use_threads
from shoal.api.errors import ApiError, internal, not_found, overloaded
from shoal.api.instance import Instance, LocalInstance, ModelCard
from shoal.api.metrics import Metrics, labels
from shoal.catalog import CATALOG, CatalogEntry
from shoal.engine.scheduler import SchedulerLimits

log = logging.getLogger("shoal.api")

# Free memory wanted beyond the weights' size before a load is attempted (activations, KV, slack).
LOAD_MEMORY_FACTOR = 1.3
LOAD_RETRY_AFTER_S = 30.0


@dataclass(frozen=True)
class ServiceConfig:
    preload: tuple[str, ...] = ()  # model references loaded at start (catalog ids or paths)
    auto_load: bool = True  # place a model when a request names one that has no instance yet
    max_tokens_cap: int | None = None  # the most tokens one request may generate (None: up to the context)
    threads: int | None = None  # CPU threads for local models (None: every core)
    device: str = "cpu"  # where local models compute (engine/device.py)
    limits: SchedulerLimits = field(default_factory=SchedulerLimits)


class Placer(Protocol):
    def card(self, name: str) -> ModelCard | None:
        """The model, if this placer could place it (known and its weights reachable); else None."""
        ...

    def names(self) -> list[str]:
        """Every model name it could place."""
        ...

    async def place(self, name: str) -> Instance: ...


class LocalPlacer:
    """Places a whole model in this process: catalog ids whose weights are on this machine, plus the
    references the node was started with (`--model PATH` is served under the file's stem)."""

    def __init__(self, limits: SchedulerLimits, metrics: Metrics, refs: tuple[str, ...] = (), threads: int | None = None,
                 compute_device: str = "cpu"):
        self.limits, self.metrics, self.compute_device = limits, metrics, compute_device
        self.refs: dict[str, str] = {_name_for_ref(r): r for r in refs}  # served name -> reference
        self.device = DeviceWorker("cpu", threads)

    def _ref(self, name: str) -> str | None:
        return self.refs.get(name) or (name if name in CATALOG else None)

    def card(self, name: str) -> ModelCard | None:
        ref = self._ref(name)
        if ref is None:
            return None
        from shoal.engine.loader import resolve_model

        try:
            path = resolve_model(ref)
        except Exception:  # not downloaded, no such file, or no downloader in this build
            return None
        return _card(name, path, CATALOG.get(ref))

    def names(self) -> list[str]:
        return [n for n in dict.fromkeys([*self.refs, *CATALOG]) if self.card(n) is not None]

    async def place(self, name: str) -> Instance:
        from shoal.engine.loader import ModelNotFound, load_model
        from shoal.weights.errors import ModelFileError

        card = self.card(name)
        if card is None:
            raise not_found(f"model {name!r} is not available on this node")
        avail = psutil.virtual_memory().available
        if card.size_bytes * LOAD_MEMORY_FACTOR > avail:
            raise overloaded(
                f"not enough free memory to load {name!r}: it needs about {card.size_bytes * LOAD_MEMORY_FACTOR / 2**30:.1f} GiB, "
                f"{avail / 2**30:.1f} GiB is free", LOAD_RETRY_AFTER_S, status=503)
        t0 = time.perf_counter()
        try:
            ref = self._ref(name)
            lm = await run_in_fresh_thread(lambda: _load_and_warm(load_model, ref, self.device.threads, self.compute_device), f"shoal-load-{name}")
        except (ModelNotFound, FileNotFoundError) as e:
            raise not_found(str(e)) from None
        except (ModelFileError, ValueError) as e:
            log.error("loading %s failed: %s", name, e)
            raise internal(f"model {name!r} could not be loaded: {e}") from None
        seconds = time.perf_counter() - t0
        log.info("loaded %s in %.1f s", name, seconds)
        return LocalInstance(name, lm, card, self.limits, self.metrics, seconds, self.device)


class ModelService:
    def __init__(self, config: ServiceConfig, placer: Placer | None = None, metrics: Metrics | None = None):
        self.config = config
        self.metrics = metrics or Metrics()
        self.placer = placer or LocalPlacer(config.limits, self.metrics, config.preload, config.threads, config.device)
        self.instances: dict[str, Instance] = {}
        self._loading: dict[str, asyncio.Task[Instance]] = {}
        self._preloads: list[asyncio.Task[Instance]] = []
        self._register_gauges()

    # -- life
    async def start(self) -> None:
        """Begin placing the preloaded models and return at once (a node gives each component a few
        seconds to start); requests for them meanwhile wait on the same loads."""
        for ref in self.config.preload:
            name = _name_for_ref(ref)
            if name not in self._loading and name not in self.instances:
                task = self._loading[name] = asyncio.ensure_future(self._load(name))
                task.add_done_callback(lambda t, name=name: _log_failure(t, name))
                self._preloads.append(task)

    async def wait_ready(self) -> None:
        """Wait for the preloads; the first failure is raised."""
        for task in self._preloads:
            await task

    async def close(self) -> None:
        for task in list(self._loading.values()):
            task.cancel()
        for name in list(self.instances):
            await self.unload(name)

    # -- lookups
    @staticmethod
    def canonical(name: str) -> str:
        # Ollama clients add a tag; ours has one version per name.
        return name.removesuffix(":latest")

    def get(self, name: str) -> Instance | None:
        return self.instances.get(self.canonical(name))

    def card(self, name: str) -> ModelCard | None:
        inst = self.get(name)
        return inst.card if inst is not None else self.placer.card(self.canonical(name))

    def models(self) -> list[ModelCard]:
        names = dict.fromkeys([*self.instances, *self.placer.names()])
        return [c for n in names if (c := self.card(n)) is not None]

    # -- placing
    async def acquire(self, name: str, keepalive: Callable[[], Awaitable[None]] | None = None, interval: float = 2.0) -> Instance:
        """The instance serving `name`, placing one if needed. While it loads, `keepalive` is awaited
        every `interval` seconds (it may raise to give up waiting; the load goes on for others)."""
        name = self.canonical(name)
        inst = self.instances.get(name)
        if inst is not None and inst.alive:
            return inst
        if inst is not None:  # its cluster instance is gone: never keep serving from it, place again
            log.info("%s: its instance is gone; placing it again", name)
            self.instances.pop(name, None)
            await inst.close()
        task = self._loading.get(name)  # a preload, or another request's placement
        if task is None:
            if self.placer.card(name) is None:
                raise not_found(f"The model `{name}` does not exist on this node (see GET /v1/models)")
            if not self.config.auto_load:
                raise not_found(f"The model `{name}` is not loaded and this node does not load models on demand "
                                "(it was started with --no-auto-load)", code="model_not_loaded")
            task = self._loading[name] = asyncio.ensure_future(self._load(name))
        while True:
            done, _ = await asyncio.wait({task}, timeout=interval if keepalive else None)
            if done:
                return task.result()
            await keepalive()

    async def _load(self, name: str) -> Instance:
        try:
            inst = await self.placer.place(name)
            self.instances[name] = inst
            return inst
        finally:
            self._loading.pop(name, None)

    async def unload(self, name: str) -> bool:
        inst = self.instances.pop(self.canonical(name), None)
        if inst is None:
            return False
        await inst.close()
        return True

    def is_loaded(self, name: str) -> bool:
        return self.canonical(name) in self.instances

    def must_wait(self, name: str) -> bool:
        """Whether `acquire(name)` would wait for a placement (rather than answer at once)."""
        name = self.canonical(name)
        if name in self.instances:
            return False
        return name in self._loading or (self.config.auto_load and self.placer.card(name) is not None)

    # -- metrics
    def _register_gauges(self) -> None:
        m = self.metrics
        proc = psutil.Process(os.getpid())

        def per_model(fn: Callable[[Instance], float]) -> Callable[[], dict]:
            return lambda: {labels(model=n): fn(i) for n, i in list(self.instances.items())}

        m.add_gauge("shoal_queue_running", "Sequences in the running batch, by model.", per_model(lambda i: i.queue_depth()[0]))
        m.add_gauge("shoal_queue_waiting", "Sequences queued for a place in the batch, by model.", per_model(lambda i: i.queue_depth()[1]))
        m.add_gauge("shoal_kv_cache_bytes", "Bytes of KV cache held by live sequences, by model.", per_model(lambda i: i.kv_bytes()))
        m.add_gauge("shoal_model_weight_bytes", "Bytes of weights of each loaded model.", per_model(lambda i: i.card.size_bytes))
        m.add_gauge("shoal_models_loading", "Models being placed right now.", lambda: {(): len(self._loading)})
        m.add_gauge("shoal_process_resident_bytes", "Resident memory of this process.", lambda: {(): proc.memory_info().rss})
        m.add_gauge("shoal_memory_available_bytes", "Memory available on this machine.", lambda: {(): psutil.virtual_memory().available})


def _log_failure(task: asyncio.Task, name: str) -> None:
    if not task.cancelled() and task.exception() is not None:
        e = task.exception()
        log.error("could not load %s: %s", name, e.message if isinstance(e, ApiError) else e)


def _load_and_warm(load_model, ref: str, threads: int | None, device: str = "cpu"):
    """Load, then run two short sequences batched together so the first client does not pay for
    kernel compilation (numba JIT, first-touch allocations)."""
    from shoal.engine.generate import BatchGenerator
    from shoal.engine.sampler import SamplingParams

    from shoal.engine.device import Device

    use_threads(threads)
    lm = load_model(ref, device=Device(device))
    gen = BatchGenerator(lm.model, lm.tokenizer, lm.args.max_context)
    for text in ("Hello", "Warm up the kernels, please. " * 50):  # one short prompt, one several chunks long
        gen.add(lm.tokenizer.encode(text) or [0], SamplingParams(max_tokens=2, ignore_eos=True))
    while gen.has_work:
        gen.step()
    return lm


def _name_for_ref(ref: str) -> str:
    return ref if ref in CATALOG else Path(os.path.expanduser(ref)).stem


_QUANT_RE = re.compile(r"(?i)[._-](IQ\d_\w+|Q\d_K(?:_[SML])?|Q\d_\d|Q\d|BF16|F16|F32)(?=\.gguf$)")


def _card(name: str, path: Path, entry: CatalogEntry | None) -> ModelCard:
    if path.is_dir():
        files = [p for p in path.iterdir() if p.suffix == ".safetensors"]
        size, fmt, quant = sum(p.stat().st_size for p in files), "safetensors", "BF16"
    else:
        size, fmt = path.stat().st_size, "gguf" if path.suffix == ".gguf" else path.suffix.lstrip(".")
        m = _QUANT_RE.search(path.name)
        quant = m.group(1).upper() if m else "unknown"
    params = ""
    if entry is not None:
        b = entry.params_b
        params = f"{b * 1000:.0f}M" if b < 1 else f"{b:.1f}B"
    return ModelCard(
        name=name,
        path=path,
        size_bytes=size,
        architecture=entry.architecture if entry else "llama",
        parameter_size=params,
        quantization=quant,
        context_length=entry.context_length if entry else 0,
        format=fmt,
        modified_at=path.stat().st_mtime,
    )
