"""The daemon's side of one runner process: start it, read its events, send it commands, stop it.

A runner is a child process (`python -m shoal.runner`) with three pipes: its config and commands go
in on stdin, events come out on stdout (both typed: runner/contract.py), its log goes to a file in
the node's home. Whatever the
runner does — crash, hang, get killed — the daemon only sees its pipes close or its process exit,
so a runner never takes the daemon down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from pydantic import ValidationError

from shoal.runner.contract import (
    RUNNER_EVENT,
    Command,
    Loaded,
    PortBound,
    Ready,
    RunnerConfig,
    RunnerEvent,
    StageStats,
    Stop,
)

log = logging.getLogger("shoal.instances")

STOP_GRACE_S = 3.0
MAX_LINE = 16 << 20  # an event line (prompt ids, logprobs) is far smaller
# OpenMP workers (numba's and torch's libgomp) spin ~300k pause loops (~3 ms) after each parallel
# region before they sleep. Runners on one machine take turns (pipeline stages): a worker still
# spinning after its stage ended steals a core from the next stage. ~0.2 ms still bridges the gaps
# between one stage's kernels. The node's own environment overrides it.
RUNNER_ENV = {"GOMP_SPINCOUNT": "20000"}


class RunnerProcess:
    def __init__(self, config: RunnerConfig, log_path: Path, on_event: Callable[[RunnerEvent], None],
                 on_exit: Callable[[int | None], None], env: dict[str, str] | None = None):
        self.config = config
        self.log_path = log_path
        self.on_event, self.on_exit = on_event, on_exit
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None
        self.port: asyncio.Future[int] | None = None
        self.rss = 0
        self.stats: StageStats | None = None
        self._reader: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        loop = asyncio.get_running_loop()
        self.port = loop.create_future()
        env = {**RUNNER_ENV, **os.environ, "PYTHONUNBUFFERED": "1", **(self.env or {})}
        # 0600 from the start: a runner's log may quote a prompt in an error.
        with os.fdopen(os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab") as logf:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "shoal.runner",
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=logf, env=env, limit=MAX_LINE,
            )
        assert self.proc.stdin is not None
        self.proc.stdin.write((self.config.model_dump_json() + "\n").encode())
        await self.proc.stdin.drain()
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        try:
            while True:
                line = await self.proc.stdout.readline()
                if not line:
                    break
                try:
                    ev = RUNNER_EVENT.validate_json(line)
                except ValidationError:
                    log.warning("runner %s/%d: malformed event line", self.config.instance_id, self.config.rank)
                    continue
                if isinstance(ev, PortBound) and self.port is not None and not self.port.done():
                    self.port.set_result(ev.port)
                if isinstance(ev, (Loaded, Ready)):
                    self.rss = ev.rss
                if isinstance(ev, StageStats):
                    self.stats = ev
                try:
                    self.on_event(ev)
                except Exception:  # noqa: BLE001 - a consumer's bug must not stop the reader
                    log.exception("handling a runner event")
        except (ConnectionError, ValueError) as e:  # ValueError: a line longer than MAX_LINE
            log.warning("runner %s/%d: %s", self.config.instance_id, self.config.rank, e)
        code = await self.proc.wait()
        if self.port is not None and not self.port.done():
            self.port.set_exception(RuntimeError(f"runner exited with {code} before binding its port"))
            self.port.exception()  # whoever waits for the port sees it; nobody waiting is no error
        self.on_exit(code)

    def send(self, command: Command) -> bool:
        """Write a command line; False if the runner is gone."""
        if not self.running or self.proc is None or self.proc.stdin is None:
            return False
        try:
            self.proc.stdin.write(command.model_dump_json().encode() + b"\n")
        except (ConnectionError, RuntimeError):
            return False
        return True

    async def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """Ask (a stop command: the entry then stops the whole group), then SIGTERM, then SIGKILL."""
        if self.proc is None:
            return
        if self.running:
            self.send(Stop())
            with contextlib.suppress(ConnectionError, RuntimeError, AttributeError):
                self.proc.stdin.close()  # type: ignore[union-attr]
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            if not self.running:
                break
            if sig is not None:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.send_signal(sig)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.proc.wait()), grace_s)
        if self._reader is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._reader), 1.0)
