"""Invites: everything a new machine needs to join a cluster, in one token it can be started with
(`shoal node --join TOKEN`).

    shoal1.<base64url, no padding, of: payload ‖ checksum>

payload  compact JSON {"k": cluster key, "h": [host, ...], "p": port} — the addresses one member
         listens on (its --advertise or --host when that names one address, else its non-loopback
         interface addresses) and its port.
checksum the first 4 bytes of SHA-256("shoal invite v1\\0" ‖ payload): a mistyped or cut token is
         said to be one instead of joining nowhere. It is no MAC: the token carries the cluster key
         itself, so it is as secret as the key.

`shoal invite` makes one from a node's home (the key in <home>/cluster.key, the address the node
last listened on in <home>/address.json, which membership writes on start); the start that
generates a cluster key prints one beside it. Importing this module is cheap (no aiohttp).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import ipaddress
import json
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil

from shoal.config import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    HOME_ENV,
    JOIN_ENV,
    KEY_ENV,
    KEY_FILE_NAME,
    MIN_KEY_CHARS,
    resolve_home,
)

PREFIX = "shoal1."
CHECKSUM_BYTES = 4
ADDRESS_FILE_NAME = "address.json"
MAX_HOSTS = 8  # a machine with many interfaces: the first ones, IPv4 before IPv6
_CHECKSUM_CONTEXT = b"shoal invite v1\0"
_WILDCARD_HOSTS = ("", "0.0.0.0", "::")


class InviteError(ValueError):
    """A token that is not a usable invite; the message says what is wrong with it."""


@dataclass(frozen=True)
class Invite:
    hosts: tuple[str, ...]
    port: int
    cluster_key: str

    def __repr__(self) -> str:  # the key never lands in a log through repr
        return f"Invite(hosts={self.hosts!r}, port={self.port})"

    @property
    def addresses(self) -> tuple[tuple[str, int], ...]:
        return tuple((h, self.port) for h in self.hosts)

    def encode(self) -> str:
        payload = json.dumps({"k": self.cluster_key, "h": list(self.hosts), "p": self.port}, separators=(",", ":"))
        data = payload.encode()
        return PREFIX + base64.urlsafe_b64encode(data + _checksum(data)).rstrip(b"=").decode()

    @classmethod
    def parse(cls, token: str) -> Invite:
        # Whitespace anywhere is dropped: a token copied from a wrapped terminal line still parses.
        token = "".join(token.split())
        if not token.startswith(PREFIX):
            if token.startswith("shoal") and "." in token:
                raise InviteError(f"this invite is of another version ({token.split('.')[0]}.), not one this shoal reads")
            raise InviteError(f"not a shoal invite: it should start with {PREFIX!r} (`shoal invite` on a member makes one)")
        body = token[len(PREFIX):]
        try:
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        except (binascii.Error, ValueError):
            raw = b""
        if base64.urlsafe_b64encode(raw).rstrip(b"=").decode() != body:
            raw = b""  # a character outside the alphabet, or one that changed only the padding bits
        data, check = raw[:-CHECKSUM_BYTES], raw[-CHECKSUM_BYTES:]
        if len(raw) <= CHECKSUM_BYTES or _checksum(data) != check:
            raise InviteError("the invite is mistyped or cut short (its checksum does not match): copy it again")
        try:
            fields = json.loads(data)
            key, hosts, port = fields["k"], fields["h"], fields["p"]
        except (ValueError, KeyError, TypeError):
            raise InviteError("the invite's contents are not an invite's (made by another program?)") from None
        if not (isinstance(key, str) and len(key.strip()) >= MIN_KEY_CHARS):
            raise InviteError("the invite holds no usable cluster key")
        if not (isinstance(hosts, list) and hosts and all(isinstance(h, str) and h for h in hosts)):
            raise InviteError("the invite holds no address")
        if not (isinstance(port, int) and 0 < port < 65536):
            raise InviteError("the invite holds no usable port")
        return cls(tuple(hosts), port, key.strip())


def _checksum(data: bytes) -> bytes:
    return hashlib.sha256(_CHECKSUM_CONTEXT + data).digest()[:CHECKSUM_BYTES]


def invite_hosts(host: str, advertise: str | None) -> tuple[str, ...]:
    """Where other machines can reach a node: what it advertises, else the one address it binds,
    else (bound to every interface) the machine's non-loopback addresses; loopback only when there
    is nothing else, which is right for nodes on one machine."""
    if advertise:
        return (advertise,)
    if host not in _WILDCARD_HOSTS:
        return (host,)
    v4, v6 = [], []
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            try:
                ip = ipaddress.ip_address(a.address.split("%")[0])
            except ValueError:
                continue
            # A link-local IPv6 address needs the interface's zone, which differs on the other machine.
            if ip.is_loopback or ip.is_link_local or ip.is_unspecified:
                continue
            (v4 if ip.version == 4 else v6).append(ip.compressed)
    found = list(dict.fromkeys(v4 + v6))[:MAX_HOSTS]
    return tuple(found) or ("127.0.0.1",)


def node_invite(host: str, advertise: str | None, port: int, cluster_key: str) -> Invite:
    return Invite(invite_hosts(host, advertise), port, cluster_key)


def remember_address(home: Path, host: str, advertise: str | None, port: int) -> None:
    """Where the node of this home listens, for `shoal invite` (not secret: no key in it)."""
    (home / ADDRESS_FILE_NAME).write_text(json.dumps({"host": host, "advertise": advertise, "port": port}) + "\n")


def _read_address(home: Path) -> tuple[str, str | None, int]:
    try:
        saved = json.loads((home / ADDRESS_FILE_NAME).read_text())
        return str(saved["host"]), saved.get("advertise") or None, int(saved["port"])
    except (OSError, ValueError, KeyError, TypeError):
        return DEFAULT_HOST, None, DEFAULT_PORT


# -- `shoal invite` -----------------------------------------------------------------------------------
INVITE_HELP = f"""\
The token, {PREFIX}<base64url>, holds the cluster key and where this node listens — its --advertise
or --host address, or, when it listens on every interface, this machine's non-loopback addresses —
with its port (from <home>/{ADDRESS_FILE_NAME}, which the node writes on start; else {DEFAULT_PORT}),
and a checksum, so a mistyped token is said to be one. On another machine,
`shoal node --join TOKEN` (or ${JOIN_ENV}=TOKEN) joins with nothing else to copy, and keeps the
key in that node's home, so later starts need no token.

The token is a secret: it holds the cluster key, which makes a machine a member, able to read
what the nodes say to each other and to run their work. Give it only to machines you trust, over
a private channel. The token alone goes to stdout; where it points goes to stderr."""


def add_invite_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = INVITE_HELP
    parser.add_argument("--home", help=f"the node's home (default ${HOME_ENV} or ~/.shoal)")
    parser.add_argument("--port", type=int, help="the node's port (default: where it last listened)")
    parser.add_argument("--advertise", metavar="HOST", help="the address other machines should use (default: "
                        "the node's --advertise or --host, else this machine's addresses)")


def run_invite(args: argparse.Namespace) -> int:
    home = resolve_home(args.home, os.environ)
    key = os.environ.get(KEY_ENV, "").strip()
    if not key:
        try:
            key = (home / KEY_FILE_NAME).read_text().strip()
        except OSError:
            key = ""
    if not key:
        print(f"shoal invite: no cluster key in {home} yet (a node makes one on its first start)", file=sys.stderr)
        return 1
    host, advertise, port = _read_address(home)
    invite = node_invite(host, args.advertise or advertise, args.port or port, key)
    where = ", ".join(f"{h}:{p}" for h, p in invite.addresses)
    print(f"invite through {where} (it holds the cluster key: keep it secret); "
          "on another machine:  shoal node --join TOKEN", file=sys.stderr)
    print(invite.encode())
    return 0
