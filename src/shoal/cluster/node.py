"""The node daemon: one aiohttp app on one port for clients, the dashboard and peers.

Order of life (each step bounded, so a stuck part cannot hang start or exit):

    start   1. lock <home> (one daemon per home: the node id in it is an identity)
            2. profile: cached, else measured in a worker thread (≤ ~6 s; cached only if trusted)
            3. open the peer HTTP session; bind the port (fails fast if it is taken)
            4. start components in order: membership (hello to seeds), links, discovery
            5. log "ready"
    run     wait for SIGINT/SIGTERM (a second signal exits at once)
    stop    0. drain: move this node's work elsewhere first (≤ 60 s; the instances it hosts)
            1. announce leave to the members (≤ 1 s)
            2. stop components in reverse order (≤ 2 s each)
            3. close the HTTP server (≤ 3 s) and the session; unlock <home>

Extending the node (shoal/assembly.py mounts the instances, the API and the dashboard): before `serve()`, call
`node.add_routes(...)` for plain routes, or `node.add_component(c)` for anything with its own
routes and background tasks (`c.routes()`, `await c.start()`, `await c.stop()`); components start
in the order they were added and stop in reverse. `node.cluster_view()` is the live, typed view
of the cluster for whoever needs it (the placement planner).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from contextlib import suppress
from typing import IO, Any, Protocol

import aiohttp
from aiohttp import web

from shoal.cluster import status
from shoal.cluster.auth import PeerCipher, cluster_id
from shoal.cluster.discovery import Discovery
from shoal.cluster.links import LinkProber, LinkTable
from shoal.cluster.membership import Membership, Timings
from shoal.cluster.messages import NodeProfile
from shoal.cluster.peer import CIPHER_KEY, OwnAddresses, PeerClient, peer_auth_middleware
from shoal.cluster.profile import load_or_measure
from shoal.cluster.topology import ClusterView, LinkView
from shoal.config import NodeConfig
from shoal.engine.device import collectives

log = logging.getLogger("shoal.node")

PROFILE_BUDGET_S = 4.0
LEAVE_TIMEOUT_S = 1.0
DRAIN_TIMEOUT_S = 60.0  # a leaving node waits this long at most for its work to move elsewhere
COMPONENT_TIMEOUT_S = 2.0
SERVER_CLOSE_TIMEOUT_S = 3.0
# Client bodies (future: prompts, uploads) may be larger than peer ones; /peer/* has its own limits.
CLIENT_MAX_BODY = 64 << 20


class Component(Protocol):
    """A part of the node with routes and a lifetime."""

    name: str

    def routes(self) -> Iterable[web.AbstractRouteDef]: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class ListenError(OSError):
    """The node cannot listen where it was asked to: the one line to say, no traceback."""


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or a ListenError that says why in words."""
    where = f"{host}:{port}"
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, OverflowError, UnicodeError) as e:
        raise ListenError(f"cannot listen on {where}: {getattr(e, 'strerror', None) or e}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(256)
    except (OSError, OverflowError) as e:
        sock.close()
        why = getattr(e, "strerror", None) or str(e)
        if getattr(e, "errno", None) == errno.EADDRINUSE:
            why += " (another program or shoal node has it: choose another --port)"
        raise ListenError(f"cannot listen on {where}: {why}") from None
    sock.setblocking(False)
    return sock


class HomeLockedError(RuntimeError):
    pass


class Node:
    def __init__(self, config: NodeConfig, timings: Timings | None = None) -> None:
        self.config = config
        # A request names its recipient: this node's id, or one of its addresses with its port.
        own = OwnAddresses(config.node_id, config.port, (config.host, config.advertise_host))
        self.cipher = PeerCipher.from_cluster_key(config.node_id, config.cluster_key, is_recipient=own)
        self.cluster_id = cluster_id(config.cluster_key)
        self.profile: NodeProfile | None = None
        self.app = web.Application(middlewares=[peer_auth_middleware], client_max_size=CLIENT_MAX_BODY)
        self.app[CIPHER_KEY] = self.cipher
        self.components: list[Component] = []

        self.links = LinkTable()
        self.membership = Membership(config, self.links, timings or Timings())
        self.prober = LinkProber(config.node_id, self.links)
        self.prober.membership = self.membership
        self.membership.subscribe(self.prober.on_membership)
        self.add_component(self.membership)
        self.add_component(self.prober)
        if config.discovery:
            self.add_component(Discovery(config, self.membership.add_seed, self.membership.remove_seed))
        self.add_routes(status.routes(self.cluster_view))
        # Filled by whoever mounts instances on the node (shoal/assembly.py): the instances for /v1/cluster.
        self.instances_view: Callable[[], list[dict[str, Any]]] = list

        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self._started: list[Component] = []
        self._stop = asyncio.Event()
        self._drains: list[Callable[[], Awaitable[None]]] = []
        self._lock_file: IO[str] | None = None

    # -- extension points ---------------------------------------------------------------------------
    def add_routes(self, routes: Iterable[web.AbstractRouteDef]) -> None:
        self.app.add_routes(list(routes))

    def add_component(self, component: Component) -> None:
        self.components.append(component)
        self.add_routes(component.routes())

    def add_drain(self, drain: Callable[[], Awaitable[None]]) -> None:
        """Work to move elsewhere before this node leaves (on SIGTERM): awaited, at most
        DRAIN_TIMEOUT_S in all, while the node is still a member and still serves."""
        self._drains.append(drain)

    def set_profile(self, profile: NodeProfile) -> None:
        """This node's profile with a learned figure changed (the decode correction of
        placement/feedback.py); peers get it with the next heartbeat."""
        self.profile = self.membership.profile = profile

    def cluster_view(self) -> ClusterView:
        now = time.time()
        links = [
            LinkView(
                a=lk.a,
                b=lk.b,
                rtt_ms=lk.rtt_ms,
                bandwidth_mbps=lk.bandwidth_mbps,
                measured_at=lk.measured_at,
                age_s=round(now - lk.measured_at, 1),
                kind=lk.kind,
            )
            for lk in sorted(self.links.records(), key=lambda lk: (lk.a, lk.b))
        ]
        return ClusterView(
            self_id=self.config.node_id,
            cluster=self.cluster_id,
            nodes=self.membership.views(),
            links=links,
            instances=self.instances_view(),
            seeds=self.membership.seed_views(),
        )

    def request_stop(self) -> None:
        self._stop.set()

    # -- life ---------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._lock_home()
        # Bound before profiling: a port in use is said in a second, not after the measuring.
        listener = listen(self.config.host, self.config.port)
        loop = asyncio.get_running_loop()
        self.profile, cached = await loop.run_in_executor(
            None, load_or_measure, self.config.profile_file, PROFILE_BUDGET_S
        )
        # Where shards compute is this start's setting (--device), whatever the cached profile says.
        self.profile = p = self.profile.model_copy(update={"device": self.config.device,
                                                           "collectives": collectives(self.config.device)})
        log.info(
            "profile (%s): %s, %d cores, %.1f GiB RAM, %.0f GFLOP/s fp32, %.1f GB/s memory%s; shards compute on %s",
            "cached" if cached else f"measured in {p.measure_seconds:.1f} s"
            + ("" if p.reliable else ", unreliable: not cached, measured again at the next start"),
            p.cpu_model,
            p.cpu_cores_logical,
            p.ram_total_bytes / 2**30,
            p.gflops_fp32,
            p.memory_bandwidth_gbps,
            "".join(f"; {a.kind} {a.name} {a.memory_total_bytes / 2**30:.0f} GiB" for a in p.accelerators),
            p.device,
        )
        self.membership.profile = p

        # Short connect timeout: a peer that does not accept within a second is as good as down.
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=10, sock_connect=1.0),
            connector=aiohttp.TCPConnector(limit=64, limit_per_host=8),
        )
        client = PeerClient(self.cipher, self._session)
        self.membership.client = client
        self.prober.client = client

        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=SERVER_CLOSE_TIMEOUT_S)
        await self._runner.setup()
        site = web.SockSite(self._runner, listener, shutdown_timeout=SERVER_CLOSE_TIMEOUT_S)
        await site.start()

        for c in self.components:
            await asyncio.wait_for(c.start(), COMPONENT_TIMEOUT_S)
            self._started.append(c)
        log.info(
            "node %s (%s) ready on %s:%d, cluster %s, %s",
            self.config.name,
            self.config.node_id[:8],
            self.config.host,
            self.config.port,
            self.cluster_id,
            f"peers {', '.join(f'{h}:{p}' for h, p in self.config.peers)}" if self.config.peers else "no --peer seeds",
        )

    async def shutdown(self) -> None:
        if self._session is None:  # it never got past its home and port: nothing to stop or say
            self._unlock_home()
            return
        log.info("shutting down")
        if self._drains and self._started:
            try:
                await asyncio.wait_for(asyncio.gather(*(d() for d in self._drains)), DRAIN_TIMEOUT_S)
            except Exception as e:  # noqa: BLE001 - including TimeoutError: leave anyway
                log.warning("draining: %s", e or type(e).__name__)
        with suppress(Exception):
            await asyncio.wait_for(self.membership.leave(LEAVE_TIMEOUT_S), LEAVE_TIMEOUT_S + 0.5)
        for c in reversed(self._started):
            try:
                await asyncio.wait_for(c.stop(), COMPONENT_TIMEOUT_S)
            except Exception as e:  # noqa: BLE001 - including TimeoutError: carry on closing the rest
                log.warning("stopping %s: %s", c.name, e or type(e).__name__)
        self._started.clear()
        if self._runner is not None:
            with suppress(Exception):
                await asyncio.wait_for(self._runner.cleanup(), SERVER_CLOSE_TIMEOUT_S + 1)
        if self._session is not None:
            await self._session.close()
        self._unlock_home()
        log.info("stopped")

    async def serve(self) -> None:
        """start → wait for a signal (or `request_stop`) → shutdown."""
        loop = asyncio.get_running_loop()
        signals = (signal.SIGINT, signal.SIGTERM)
        for sig in signals:
            with suppress(NotImplementedError):  # Windows: KeyboardInterrupt still works
                loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            await self.start()
            await self._stop.wait()
        finally:
            await self.shutdown()
            for sig in signals:
                with suppress(NotImplementedError):
                    loop.remove_signal_handler(sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        if self._stop.is_set():
            log.warning("second %s: exiting now", sig.name)
            raise SystemExit(1)
        log.info("%s received", sig.name)
        self._stop.set()

    def _lock_home(self) -> None:
        try:
            import fcntl  # POSIX only
        except ImportError:
            return
        f = open(self.config.home / "node.lock", "w")  # noqa: SIM115 - held for the node's life
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            raise HomeLockedError(f"another shoal node is running with --home {self.config.home}") from None
        self._lock_file = f

    def _unlock_home(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None
