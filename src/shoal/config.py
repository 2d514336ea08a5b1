"""The node's configuration: one frozen `NodeConfig`, built once from command-line arguments, the
environment and the files in the node's home, then passed explicitly to whatever needs it.

Everything that reads the environment or the home folder for *settings* does so here, in
`NodeConfig.from_args`, so nothing deeper in the daemon has hidden inputs. Every field has a
default, and `from_args` reads flags with `getattr(args, name, default)`, so a caller may build an
argparse namespace with only the flags it cares about.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import secrets
import socket
import sys
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_PORT = 52600
DEFAULT_HOST = "0.0.0.0"
KEY_ENV = "SHOAL_CLUSTER_KEY"
HOME_ENV = "SHOAL_HOME"
KEY_FILE_NAME = "cluster.key"
NODE_ID_FILE_NAME = "node_id"
MIN_KEY_CHARS = 16

_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?)\s*([kmgtp]?)(i?)(b?)\s*$", re.IGNORECASE)
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5}


def parse_size(text: str) -> int:
    """Bytes from a human size: "8GB" = 8e9, "8GiB" = "8G" = 8 * 2**30, "512MB", "1.5TB", "4096".

    A bare unit letter is binary (as in docker/ulimit); "B" after it means the SI unit.
    """
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"not a size: {text!r} (examples: 8GB, 512MiB, 16G, 1048576)")
    number, unit, binary, b = m.groups()
    power = _POWERS[unit.lower()]
    if binary and not unit:
        raise ValueError(f"not a size: {text!r}")
    base = 1024 if (binary or (unit and not b)) else 1000
    return int(float(number) * base**power)


def format_size(n: float) -> str:
    """Short human form with binary units, e.g. 8.0 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def parse_hostport(text: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """ "host:port", "host", "[v6]:port" -> (host, port)."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:  # plain host or bare IPv6 address
        host, port = text, ""
    if not host:
        raise ValueError(f"no host in {text!r}")
    p = int(port) if port else default_port
    if not 0 < p < 65536:
        raise ValueError(f"bad port in {text!r}")
    return host, p


def default_home() -> Path:
    return Path.home() / ".shoal"


@dataclass(frozen=True)
class NodeConfig:
    """Everything a node daemon is told. Built by `from_args`; never edited in place (use
    `dataclasses.replace` to derive a variant, e.g. in tests)."""

    home: Path
    node_id: str  # persistent: read from <home>/node_id, generated on first start
    name: str
    cluster_key: str = field(repr=False)
    key_source: str = "given"  # "flag", "env", "file", "home" or "generated": decides what start prints
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    advertise_host: str | None = None  # None: peers use the address they see us from
    peers: tuple[tuple[str, int], ...] = ()
    discovery: bool = True
    memory_limit_bytes: int | None = None
    # KV cache the sequences of a model whose entry runs here may reserve together (prompt +
    # max_tokens each); None: half the memory free when the model starts.
    kv_budget_bytes: int | None = None
    log_level: str = "INFO"

    @property
    def key_file(self) -> Path:
        return self.home / KEY_FILE_NAME

    @property
    def profile_file(self) -> Path:
        return self.home / "profile.json"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    def replace(self, **changes: object) -> NodeConfig:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    @classmethod
    def from_args(cls, args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> NodeConfig:
        """The one place that turns flags + environment + home files into a config.

        Creates the home folder and the persistent node id (and the cluster key, if none is
        given anywhere) on first start.
        """
        env = os.environ if environ is None else environ
        home_arg = getattr(args, "home", None) or env.get(HOME_ENV)
        home = Path(home_arg).expanduser() if home_arg else default_home()
        home.mkdir(parents=True, exist_ok=True, mode=0o700)
        key, source = resolve_cluster_key(
            flag=getattr(args, "cluster_key", None),
            key_file=getattr(args, "cluster_key_file", None),
            environ=env,
            home=home,
        )
        limit = getattr(args, "memory_limit", None)
        kv_budget = getattr(args, "kv_budget", None)
        return cls(
            home=home,
            node_id=load_or_create_node_id(home),
            name=getattr(args, "name", None) or socket.gethostname(),
            cluster_key=key,
            key_source=source,
            host=getattr(args, "host", None) or DEFAULT_HOST,
            port=int(getattr(args, "port", None) or DEFAULT_PORT),
            advertise_host=getattr(args, "advertise", None),
            peers=tuple(parse_hostport(p) for p in (getattr(args, "peer", None) or [])),
            discovery=not getattr(args, "no_discovery", False),
            memory_limit_bytes=parse_size(limit) if isinstance(limit, str) else limit,
            kv_budget_bytes=parse_size(kv_budget) if isinstance(kv_budget, str) else kv_budget,
            log_level=(getattr(args, "log_level", None) or "INFO").upper(),
        )


def load_or_create_node_id(home: Path) -> str:
    """The node's identity survives restarts, so a restarted node rejoins as itself."""
    path = home / NODE_ID_FILE_NAME
    if path.exists():
        node_id = path.read_text().strip()
        if re.fullmatch(r"[0-9a-f]{32}", node_id):
            return node_id
        print(f"shoal: ignoring malformed node id in {path}", file=sys.stderr)
    node_id = uuid.uuid4().hex
    _write_private(path, node_id + "\n")
    return node_id


def resolve_cluster_key(
    *, flag: str | None, key_file: str | None, environ: Mapping[str, str], home: Path
) -> tuple[str, str]:
    """(key, source), in order of precedence: --cluster-key, $SHOAL_CLUSTER_KEY,
    --cluster-key-file, <home>/cluster.key, else a new key written to <home>/cluster.key (0600)."""
    if flag:
        return _check_key(flag, "--cluster-key"), "flag"
    if environ.get(KEY_ENV):
        return _check_key(environ[KEY_ENV], KEY_ENV), "env"
    if key_file:
        return _check_key(Path(key_file).expanduser().read_text().strip(), key_file), "file"
    path = home / KEY_FILE_NAME
    if path.exists():
        return _check_key(path.read_text().strip(), str(path)), "home"
    key = secrets.token_urlsafe(32)
    _write_private(path, key + "\n")
    return key, "generated"


def _check_key(key: str, where: str) -> str:
    key = key.strip()
    if len(key) < MIN_KEY_CHARS:
        raise ValueError(f"cluster key from {where} is too short ({len(key)} < {MIN_KEY_CHARS} characters)")
    return key


def _write_private(path: Path, text: str) -> None:
    # Created 0600 from the start, not chmod-ed afterwards, so the secret is never world-readable.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
