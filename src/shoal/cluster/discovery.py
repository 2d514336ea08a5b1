"""LAN discovery with mDNS / DNS-SD (python-zeroconf): each node announces `_shoal._tcp.local.`
and browses for the others; every address found becomes a membership seed.

The TXT record carries the node id, a random salt (new on every start) and the fingerprint of the
cluster key under that salt (auth.py `cluster_fingerprint`: PBKDF2 over the stretched key), so
nodes of another cluster on the same LAN are skipped quietly instead of being greeted and refused,
while a listener cannot test guesses of the key against the broadcast without paying the
stretching for every guess, announcement by announcement. Checking a fingerprint costs ~20 ms; it
runs in a worker thread, once per salt (cached), and at most `CHECKS_PER_S` new salts a second,
so a flood of made-up announcements costs a bounded share of one core.

Discovery only proposes addresses: being let in still takes a hello sealed with the key, and the
hello carries nothing but the sender's own record.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from typing import Any

import psutil
from aiohttp import web
from zeroconf import InterfaceChoice, IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from shoal import __version__
from shoal.cluster.auth import cluster_fingerprint, new_fingerprint_salt
from shoal.cluster.peer import spawn
from shoal.config import NodeConfig

log = logging.getLogger("shoal.discovery")

SERVICE_TYPE = "_shoal._tcp.local."
WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})
CHECKS_PER_S = 5  # new salts checked per second, at ~20 ms each
KNOWN_SALTS = 1024  # salts whose expected fingerprint is remembered
_HEX32 = re.compile(r"[0-9a-f]{32}")


def lan_addresses() -> list[str]:
    """This machine's IPv4 addresses other than loopback and link-local, from psutil."""
    out = []
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family.name == "AF_INET":
                ip = ipaddress.ip_address(a.address)
                if not (ip.is_loopback or ip.is_link_local):
                    out.append(a.address)
    return sorted(set(out))


class Discovery:
    """Announce this node and report the others. A node component."""

    name = "discovery"

    def __init__(
        self, config: NodeConfig, on_found: Callable[[str, int], None], on_lost: Callable[[str, int], None]
    ) -> None:
        self.config = config
        self.on_found = on_found
        self.on_lost = on_lost
        self._found: dict[str, list[tuple[str, int]]] = {}  # service name -> addresses it gave
        self.salt = new_fingerprint_salt()
        self.fingerprint = cluster_fingerprint(config.cluster_key, self.salt)
        self._expected: OrderedDict[str, str] = OrderedDict({self.salt: self.fingerprint})  # salt -> tag
        self._check_lock = asyncio.Lock()
        self._checks: list[float] = []  # monotonic times of the last second's checks
        self._azc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: AsyncServiceInfo | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def routes(self) -> list[web.RouteDef]:
        return []

    def _addresses(self) -> list[str]:
        if self.config.advertise_host:
            return [self.config.advertise_host]
        if self.config.host not in WILDCARD_HOSTS:
            return [self.config.host]
        return lan_addresses()

    async def start(self) -> None:
        addrs = self._addresses()
        if not addrs:
            log.warning("mDNS discovery off: no LAN address to announce (use --peer)")
            return
        # Bound to one address when the node is: several nodes on one machine (or namespaces)
        # each speak mDNS on their own interface.
        interfaces = [self.config.host] if self.config.host not in WILDCARD_HOSTS else InterfaceChoice.All
        try:
            self._azc = AsyncZeroconf(interfaces=interfaces, ip_version=IPVersion.V4Only)
        except OSError as e:  # no multicast here: the node still works with --peer
            log.warning("mDNS discovery off: %s (use --peer)", e)
            return
        short = self.config.node_id[:12]
        self._info = AsyncServiceInfo(
            SERVICE_TYPE,
            f"shoal-{short}.{SERVICE_TYPE}",
            addresses=[ipaddress.ip_address(a).packed for a in addrs],
            port=self.config.port,
            properties={
                "id": self.config.node_id,
                "cluster": self.fingerprint,
                "salt": self.salt,
                "v": __version__,
                "name": self.config.name[:60],
            },
            server=f"shoal-{short}.local.",
        )
        self._spawn(self._register())
        self._browser = AsyncServiceBrowser(self._azc.zeroconf, SERVICE_TYPE, handlers=[self._on_change])
        log.info("mDNS: announcing %s on %s", SERVICE_TYPE, ", ".join(addrs))

    async def _register(self) -> None:
        assert self._azc is not None and self._info is not None
        try:
            # Registration probes the name for ~1 s; it runs beside startup, not before it.
            await (await self._azc.async_register_service(self._info, allow_name_change=True))
        except Exception as e:  # noqa: BLE001 - discovery is optional: the node still runs on --peer
            log.warning("mDNS registration failed: %s", e)

    def _on_change(self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if state_change in (ServiceStateChange.Added, ServiceStateChange.Updated):
            self._spawn(self._resolve(service_type, name))
        elif state_change is ServiceStateChange.Removed:
            for host, port in self._found.pop(name, []):
                self.on_lost(host, port)

    async def _resolve(self, service_type: str, name: str) -> None:
        assert self._azc is not None
        info = AsyncServiceInfo(service_type, name)
        if not await info.async_request(self._azc.zeroconf, 3000):
            return
        props = {k.decode(): (v or b"").decode(errors="replace") for k, v in info.properties.items()}
        if props.get("id") == self.config.node_id:
            return
        if not await self._same_cluster(props.get("salt", ""), props.get("cluster", "")):
            log.debug("mDNS: %s belongs to another cluster; skipped", name)
            return
        if not info.port:
            return
        addrs = [(addr, info.port) for addr in info.parsed_addresses(IPVersion.V4Only)]
        self._found[name] = addrs
        for host, port in addrs:
            log.debug("mDNS: found %s at %s:%d", props.get("name", name), host, port)
            self.on_found(host, port)

    async def _same_cluster(self, salt: str, tag: str) -> bool:
        """Whether an announcement's (salt, fingerprint) was made with our cluster key."""
        if not (_HEX32.fullmatch(salt) and _HEX32.fullmatch(tag)):
            return False
        expected = self._expected.get(salt)
        if expected is None:
            async with self._check_lock:  # one check at a time: a flood costs one thread, not all
                now = time.monotonic()
                self._checks = [t for t in self._checks if now - t < 1.0]
                if len(self._checks) >= CHECKS_PER_S:
                    log.debug("mDNS: more than %d new announcements a second; one skipped", CHECKS_PER_S)
                    return False
                self._checks.append(now)
                expected = await asyncio.to_thread(cluster_fingerprint, self.config.cluster_key, salt)
            self._expected[salt] = expected
            while len(self._expected) > KNOWN_SALTS:
                self._expected.popitem(last=False)
        return hmac.compare_digest(expected, tag)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        spawn(coro, self._tasks, log)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._azc is None:
            return
        try:
            if self._browser is not None:
                await self._browser.async_cancel()
            if self._info is not None:
                await self._azc.async_unregister_service(self._info)  # sends the goodbye packet
        except Exception as e:  # noqa: BLE001 - best effort on the way out
            log.debug("mDNS unregister: %s", e)
        await self._azc.async_close()
