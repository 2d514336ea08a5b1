"""The one thread that runs every local model of a device.

Why one thread per device and not one per model: the engine's kernels are OpenMP parallel regions
(numba, torch), and libgomp only spin-waits its worker threads while it manages no more threads
than there are cores. A second thread launching parallel regions gives it a second team, and every
launch then pays a futex wake-up: measured on the bundled model (2 cores), a q4 matmul went from
28 us to 92 us and decode from 70 to 36 tokens/s. So one thread does all stepping on a device,
round-robin over its models, and loading happens in a short-lived thread whose team dies with it.

Models plug in as `Steppable`s: the thread calls `handle` for each command sent to a model, then
`step` on every model with work, blocking on its inbox only when none has any. The
thread starts with the first model attached and ends when the last one is detached.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

log = logging.getLogger("shoal.api")

T = TypeVar("T")
DETACH_TIMEOUT_S = 5.0


class Steppable(Protocol):
    def handle(self, kind: str, arg: Any) -> None: ...

    def has_work(self) -> bool: ...

    def step(self) -> None: ...

    def detached(self) -> None:
        """Called on the device thread once the model is removed; fails whatever it still holds."""
        ...


class DeviceWorker:
    """Started by the first model attached; its thread ends when the last one is detached."""

    def __init__(self, name: str = "cpu", threads: int | None = None):
        """`threads`: CPU threads for the engine on this device (None: every core)."""
        self.name, self.threads = name, threads
        self._inbox: queue.SimpleQueue[tuple[Steppable, str, Any]] = queue.SimpleQueue()
        self._models: list[Steppable] = []
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # orders thread start/exit against commands, so none is lost

    def send(self, model: Steppable, kind: str, arg: Any = None) -> None:
        """A command for `model`, handled on the device thread before its next step."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"shoal-device-{self.name}", daemon=True)
                self._thread.start()
            self._inbox.put((model, kind, arg))

    def attach(self, model: Steppable) -> None:
        self.send(model, "_attach")

    async def detach(self, model: Steppable) -> None:
        """Remove a model (its sequences are failed); waits until the device thread has let go of it."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self.send(model, "_detach", lambda: loop.call_soon_threadsafe(_set_done, done))
        await asyncio.wait_for(done, DETACH_TIMEOUT_S)

    # -- the device thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        use_threads(self.threads)
        while self._drain(block=not any(m.has_work() for m in self._models)):
            for m in self._models:
                try:
                    if m.has_work():
                        m.step()
                except Exception:  # a bug in one model's bookkeeping must not stop the others
                    log.exception("device %s: stepping a model failed", self.name)

    def _drain(self, block: bool) -> bool:
        """Handle queued commands (waiting for one if `block`); False when the thread should end."""
        while True:
            try:
                model, kind, arg = self._inbox.get(block=block)
            except queue.Empty:
                return True
            block = False
            if kind == "_attach":
                self._models.append(model)
            elif kind == "_detach":
                if model in self._models:
                    self._models.remove(model)
                model.detached()
                arg()
                if not self._models:
                    with self._lock:
                        if self._inbox.empty():  # nothing left to run: end, so no idle OpenMP team lingers
                            self._thread = None
                            return False
            else:
                model.handle(kind, arg)


def use_threads(n: int | None) -> None:
    # OpenMP thread counts are per calling thread (in torch's runtime and numba's): set them here.
    from shoal.engine import threads

    threads.configure(n)


def _settle(fut: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


def _set_done(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


async def run_in_fresh_thread(fn: Callable[[], T], name: str) -> T:
    """Run `fn` in a thread that exits afterwards (unlike the default executor's), so any OpenMP
    team it created goes with it and stops competing with the device thread."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def target() -> None:
        try:
            result = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting task
            loop.call_soon_threadsafe(_settle, fut, None, e)
        else:
            loop.call_soon_threadsafe(_settle, fut, result, None)

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    try:
        return await fut
    finally:
        while thread.is_alive():  # gone, with its OpenMP team, before the device thread steps again
            await asyncio.sleep(0.005)
