"""A process that serves only the API (no cluster): for tests, benchmarks and single-machine use.

    python -m shoal.api.serve --port 8000 [--model smollm2-135m] [--api-key KEY] [--no-auto-load]

Behind the same front door as a node (api/guard.py): with --api-key every client needs the key,
loopback ones too (this server listens on loopback by default, so an exemption would void it);
without it no key is asked, and the Host, Origin and Content-Type checks still hold.

Prints one line `shoal-api ready on http://HOST:PORT` on standard output once any --model has
loaded (it accepts requests from the start; they wait for the load), and stops cleanly on
SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys

from aiohttp import web

from shoal.api.app import setup_api
from shoal.api.guard import FrontDoor
from shoal.api.service import ModelService, ServiceConfig
from shoal.engine.scheduler import SchedulerLimits

# The node allows client bodies this large; the API handlers apply their own, smaller limit.
CLIENT_MAX_BODY = 64 << 20
SHUTDOWN_TIMEOUT_S = 3.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m shoal.api.serve", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model", "-m", action="append", default=[], help="load this model at start (repeatable)")
    p.add_argument("--api-key", default=None,
                   help="require the key ('Authorization: Bearer KEY' or 'x-api-key: KEY') on every route but /healthz")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="answer to this Host name too (repeatable; '*': any)")
    p.add_argument("--no-auto-load", action="store_true", help="refuse models that are not loaded instead of loading them")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for the model (default: all cores)")
    p.add_argument("--max-running", type=int, default=SchedulerLimits.max_running, help="sequences batched together per model")
    p.add_argument("--max-waiting", type=int, default=SchedulerLimits.max_waiting, help="sequences queued per model before 429")
    p.add_argument("--prefix-cache-mb", type=int, default=SchedulerLimits.prefix_cache_bytes >> 20,
                   help="MiB of recent prompts' K/V kept for prompts that start the same way (0: off)")
    p.add_argument("--max-tokens-cap", type=int, default=None, help="most tokens one request may generate")
    p.add_argument("--log-level", default="INFO")
    return p


def config_from_args(args: argparse.Namespace) -> ServiceConfig:
    limits = SchedulerLimits(max_running=args.max_running, max_waiting=args.max_waiting,
                            prefix_cache_bytes=args.prefix_cache_mb << 20)
    return ServiceConfig(preload=tuple(args.model), auto_load=not args.no_auto_load, max_tokens_cap=args.max_tokens_cap,
                         threads=args.threads, limits=limits)


async def serve(args: argparse.Namespace) -> None:
    door = FrontDoor(args.api_key, port=args.port, hosts=[args.host, *args.allowed_host], loopback_exempt=False)
    app = web.Application(client_max_size=CLIENT_MAX_BODY, middlewares=[door.middleware])
    app.add_routes(door.routes())
    service = ModelService(config_from_args(args))
    setup_api(app, service)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    await runner.setup()  # runs on_startup: starts loading --model
    site = web.TCPSite(runner, args.host, args.port)
    await site.start()
    try:
        await service.wait_ready()
    except Exception as e:
        await runner.cleanup()
        raise SystemExit(f"shoal-api: cannot start: {getattr(e, 'message', e)}") from None
    print(f"shoal-api ready on http://{args.host}:{args.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await asyncio.wait_for(runner.cleanup(), SHUTDOWN_TIMEOUT_S + 5)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        asyncio.run(serve(args))
    except OSError as e:
        print(f"shoal-api: cannot start: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
