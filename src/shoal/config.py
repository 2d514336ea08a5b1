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
import json
import os
import re
import secrets
import socket
import sys
import urllib.error
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_PORT = 52600
DEFAULT_HOST = "0.0.0.0"
KEY_ENV = "SHOAL_CLUSTER_KEY"
HOME_ENV = "SHOAL_HOME"
KEY_FILE_NAME = "cluster.key"
JOIN_ENV = "SHOAL_JOIN"
SEEDS_FILE_NAME = "seeds"  # the addresses a --join invite named, one HOST:PORT a line
API_KEY_ENV = "SHOAL_API_KEY"
API_KEY_FILE_NAME = "api.key"
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


def split_hostport(text: str) -> tuple[str, str]:
    """ "host:port", "host", "[v6]:port", a bare v6 address -> (host, port as written or '')."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, rest[1:] if rest.startswith(":") else ""
    if text.count(":") == 1:
        host, port = text.split(":")
        return host, port
    return text, ""  # plain host or bare IPv6 address


def parse_hostport(text: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """ "host:port", "host", "[v6]:port" -> (host, port)."""
    host, port = split_hostport(text)
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
    node_id: str  # persistent: derived from the node's key in <home>/node.key, made on first start
    name: str
    cluster_key: str = field(repr=False)
    key_source: str = "given"  # "flag", "env", "file", "join", "home" or "generated": decides what start prints
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    advertise_host: str | None = None  # None: peers use the address they see us from
    peers: tuple[tuple[str, int], ...] = ()
    discovery: bool = True
    memory_limit_bytes: int | None = None
    # KV cache the sequences of a model whose entry runs here may reserve together (prompt +
    # max_tokens each); None: half the memory free when the model starts.
    kv_budget_bytes: int | None = None
    device: str = "cpu"  # where shards compute (engine/device.py): cpu, torch-cpu, cuda[:N], mps; auto resolved
    # The front door (api/guard.py): the key clients send, and who may skip it. The API key is not
    # the cluster key: it lets a client use the node, never act as a member of the cluster.
    api_key: str = field(default="", repr=False)  # "": no key matches, only loopback gets in
    api_key_source: str = "given"  # "flag", "env", "home" or "generated": decides what start prints
    loopback_exempt: bool = True  # requests from this machine's loopback need no key
    allowed_hosts: tuple[str, ...] = ()  # Host names beyond the node's own; "*" allows any
    log_level: str = "INFO"

    @property
    def key_file(self) -> Path:
        return self.home / KEY_FILE_NAME

    @property
    def api_key_file(self) -> Path:
        return self.home / API_KEY_FILE_NAME

    @property
    def profile_file(self) -> Path:
        return self.home / "profile.json"

    @property
    def decode_correction_file(self) -> Path:
        return self.home / "decode_correction.json"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    def replace(self, **changes: object) -> NodeConfig:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    @classmethod
    def from_args(cls, args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> NodeConfig:
        """The one place that turns flags + environment + home files into a config.

        Creates the home folder and the persistent node id (and the cluster key, if none is
        given anywhere) on first start. A --join invite's key and addresses are kept in the home
        (cluster.key, seeds), so later starts need no token.
        """
        from shoal.cluster.invite import Invite  # the module reads constants of this one

        env = os.environ if environ is None else environ
        home = resolve_home(getattr(args, "home", None), env)
        home.mkdir(parents=True, exist_ok=True, mode=0o700)
        token = getattr(args, "join", None) or env.get(JOIN_ENV)
        invite = Invite.parse(token) if token else None
        flag_peers = tuple(parse_hostport(p) for p in (getattr(args, "peer", None) or []))
        key, source = resolve_cluster_key(
            flag=getattr(args, "cluster_key", None),
            key_file=getattr(args, "cluster_key_file", None),
            environ=env,
            home=home,
            joined=invite.cluster_key if invite else None,
            has_peers=bool(flag_peers),
        )
        if invite is not None:
            _write_private(home / SEEDS_FILE_NAME, "".join(f"{_hostport_text(h, p)}\n" for h, p in invite.addresses))
        seeds = invite.addresses if invite is not None else _read_seeds(home / SEEDS_FILE_NAME)
        api_key, api_key_source = resolve_api_key(flag=getattr(args, "api_key", None), environ=env, home=home)
        port = getattr(args, "port", None)
        port = DEFAULT_PORT if port is None else int(port)
        if not 0 < port < 65536:
            raise ValueError(f"--port {port} is not a TCP port (1-65535)")
        limit = getattr(args, "memory_limit", None)
        kv_budget = getattr(args, "kv_budget", None)
        from shoal.engine.device import parse_device  # torch: only for a node that starts

        device = parse_device(getattr(args, "device", None) or "auto").name
        return cls(
            home=home,
            node_id=load_or_create_node_id(home),
            name=getattr(args, "name", None) or socket.gethostname(),
            cluster_key=key,
            key_source=source,
            host=getattr(args, "host", None) or DEFAULT_HOST,
            port=port,
            advertise_host=getattr(args, "advertise", None),
            peers=tuple(dict.fromkeys(flag_peers + seeds)),
            discovery=not getattr(args, "no_discovery", False),
            memory_limit_bytes=parse_size(limit) if isinstance(limit, str) else limit,
            kv_budget_bytes=parse_size(kv_budget) if isinstance(kv_budget, str) else kv_budget,
            device=device,
            api_key=api_key,
            api_key_source=api_key_source,
            loopback_exempt=not getattr(args, "no_loopback_exemption", False),
            allowed_hosts=tuple(h.strip().lower() for h in (getattr(args, "allowed_host", None) or []) if h.strip()),
            log_level=(getattr(args, "log_level", None) or "INFO").upper(),
        )


def refusal_message(e: urllib.error.HTTPError) -> str:
    """What a node said when it refused a `shoal` command (its JSON error), or, when what answered
    is no shoal node, what it was and where a node is."""
    try:
        err = json.loads(e.read())["error"]
        return err["message"] if isinstance(err, dict) else str(err)
    except (ValueError, KeyError, TypeError):
        server = f" ({e.headers['Server']})" if e.headers and e.headers.get("Server") else ""
        return (f"{e.url} answered HTTP {e.code} {e.reason}{server}, which is not a shoal node: give --cluster the "
                f"address of a node (port {DEFAULT_PORT} unless it was started with --port)")


def client_headers(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """What the `shoal` client commands send a node: the API key from $SHOAL_API_KEY, if set (a
    node on this machine's loopback needs none, one elsewhere does)."""
    key = (os.environ if environ is None else environ).get(API_KEY_ENV, "").strip()
    return {"Authorization": f"Bearer {key}"} if key else {}


def resolve_home(flag: str | None, environ: Mapping[str, str]) -> Path:
    """--home, else $SHOAL_HOME, else ~/.shoal (not created here)."""
    given = flag or environ.get(HOME_ENV)
    return Path(given).expanduser() if given else default_home()


def load_or_create_node_id(home: Path) -> str:
    """The node's identity survives restarts, so a restarted node rejoins as itself. The id is
    derived from the node's own key (<home>/node.key, made on first start; cluster/identity.py)."""
    from shoal.cluster.identity import load_or_create_identity  # cryptography: only when a node starts

    identity, note = load_or_create_identity(home)
    if note:
        # Said before logging is set up (the config comes first), and only on the start that changed it.
        print(f"shoal: {note}", file=sys.stderr)
    return identity.node_id


def resolve_cluster_key(
    *, flag: str | None, key_file: str | None, environ: Mapping[str, str], home: Path,
    joined: str | None = None, has_peers: bool = False,
) -> tuple[str, str]:
    """(key, source), in order of precedence: --cluster-key, $SHOAL_CLUSTER_KEY,
    --cluster-key-file, <home>/cluster.key, else a new key written to <home>/cluster.key (0600).

    joined: the key of a --join invite, written to <home>/cluster.key like a generated one; it
    may not contradict a key given or kept there. has_peers: the node was given --peer seeds,
    which with a key of its own it could never join, so it gets none and the start is refused."""
    given: tuple[str, str] | None = None
    if flag:
        given = _check_key(flag, "--cluster-key"), "flag"
    elif environ.get(KEY_ENV):
        given = _check_key(environ[KEY_ENV], KEY_ENV), "env"
    elif key_file:
        given = _check_key(Path(key_file).expanduser().read_text().strip(), key_file), "file"
    if given is not None:
        if joined is not None and given[0] != joined:
            raise ValueError(f"the --join invite holds another cluster key than {_KEY_FLAGS[given[1]]}: give only one")
        return given
    path = home / KEY_FILE_NAME
    if path.exists():
        key = _check_key(path.read_text().strip(), str(path))
        if joined is not None and key != joined:
            raise ValueError(f"{path} holds another cluster's key than the --join invite's "
                             f"(this home was started before): move that file away to join with this invite")
        return key, "home"
    if joined is not None:
        _write_private(path, joined + "\n")
        return joined, "join"
    if has_peers:
        raise ValueError(f"--peer needs the cluster's key: start with --join TOKEN (`shoal invite` on a member "
                         f"prints one), or give the key (${KEY_ENV}, --cluster-key-file, --cluster-key)")
    key = secrets.token_urlsafe(32)
    _write_private(path, key + "\n")
    return key, "generated"


_KEY_FLAGS = {"flag": "--cluster-key", "env": f"${KEY_ENV}", "file": "--cluster-key-file"}


def _hostport_text(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _read_seeds(path: Path) -> tuple[tuple[str, int], ...]:
    try:
        lines = path.read_text().split()
    except FileNotFoundError:
        return ()
    return tuple(parse_hostport(line) for line in lines)


def resolve_api_key(*, flag: str | None, environ: Mapping[str, str], home: Path) -> tuple[str, str]:
    """(key, source), in order of precedence: --api-key, $SHOAL_API_KEY, <home>/api.key, else a new
    key written to <home>/api.key (0600). As long as the cluster key's minimum: it guards the
    node from the whole network."""
    if flag:
        return _check_key(flag, "--api-key", "API key"), "flag"
    if environ.get(API_KEY_ENV):
        return _check_key(environ[API_KEY_ENV], API_KEY_ENV, "API key"), "env"
    path = home / API_KEY_FILE_NAME
    if path.exists():
        return _check_key(path.read_text().strip(), str(path), "API key"), "home"
    key = secrets.token_urlsafe(32)
    _write_private(path, key + "\n")
    return key, "generated"


def _check_key(key: str, where: str, what: str = "cluster key") -> str:
    key = key.strip()
    if len(key) < MIN_KEY_CHARS:
        raise ValueError(f"{what} from {where} is too short ({len(key)} < {MIN_KEY_CHARS} characters)")
    return key


def loose_permissions(home: Path) -> list[str]:
    """What of a node's home other users of this machine could read or change: the folder itself
    and its secrets (*.key). Said as warnings, never fixed silently: the owner may have a reason,
    and should know either way."""
    out = []
    try:
        mode = home.stat().st_mode & 0o777
        if mode & 0o077:
            out.append(f"{home} is readable or writable by other users (mode {mode:o}); run `chmod 700 {home}`")
        for f in sorted(home.glob("*.key")):
            mode = f.stat().st_mode & 0o777
            if mode & 0o077:
                out.append(f"{f} is readable by other users (mode {mode:o}); run `chmod 600 {f}`")
    except OSError:
        pass
    return out


def _write_private(path: Path, text: str) -> None:
    # Created 0600 from the start, not chmod-ed afterwards, so the secret is never world-readable.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
