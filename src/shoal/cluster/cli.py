"""`shoal node`, `shoal status` and `shoal key`: arguments and bodies. Importing this module is cheap
(no aiohttp, zeroconf or torch): the daemon's modules are imported inside `run_node`."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from pathlib import Path

from shoal.config import (
    API_KEY_ENV,
    API_KEY_FILE_NAME,
    DEFAULT_HOST,
    DEFAULT_PORT,
    HOME_ENV,
    JOIN_ENV,
    KEY_ENV,
    KEY_FILE_NAME,
    NodeConfig,
    loose_permissions,
    parse_size,
    resolve_home,
)


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_node_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST})")
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"HTTP port for clients and peers (default {DEFAULT_PORT})"
    )
    parser.add_argument(
        "--advertise", metavar="HOST", help="address other nodes should use for this one (default: what they see)"
    )
    parser.add_argument(
        "--peer",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="a node to join through (repeatable); one is enough, the rest is learned",
    )
    parser.add_argument(
        "--cluster-key",
        help=f"shared secret of the cluster (visible in `ps`: prefer ${KEY_ENV} or --cluster-key-file); "
        "default: <home>/cluster.key, generated on first start",
    )
    parser.add_argument("--cluster-key-file", metavar="FILE", help="read the cluster key from FILE")
    parser.add_argument(
        "--join", metavar="TOKEN",
        help=f"join the cluster of an invite (`shoal invite` on a member prints one; or ${JOIN_ENV}): its key "
        "and addresses, kept in <home> so later starts need no token",
    )
    parser.add_argument(
        "--api-key",
        help=f"the key clients on other machines send (visible in `ps`: prefer ${API_KEY_ENV}); "
        "default: <home>/api.key, generated on first start (`shoal key` prints it)",
    )
    parser.add_argument(
        "--no-loopback-exemption", action="store_true",
        help="ask clients on this machine's loopback for the API key too (behind a local reverse proxy, "
        "or where other users share the machine)",
    )
    parser.add_argument(
        "--allowed-host", action="append", default=[], metavar="NAME",
        help="a Host name clients may use for this node besides its addresses, hostname and localhost "
        "(repeatable; '*' allows any, giving up the guard against DNS rebinding)",
    )
    parser.add_argument(
        "--kv-budget", type=_size, metavar="SIZE",
        help="KV cache the running requests of each model entered here may hold together, e.g. 2GiB; "
        "requests beyond it wait, and past a bounded queue get 429 (default: half the free memory)",
    )
    parser.add_argument(
        "--device", default="auto", metavar="DEVICE",
        help="where this node's shards compute: auto (the GPU torch sees, else cpu), cpu (the numba engine), "
        "torch-cpu (torch on the CPU), cuda, cuda:N, mps, or mlx (Apple's MLX; auto picks it on Apple Silicon)",
    )
    parser.add_argument(
        "--memory-limit", type=_size, metavar="SIZE", help="cap the memory this node offers, e.g. 8GB, 12GiB"
    )
    parser.add_argument("--no-discovery", action="store_true", help="no mDNS: only --peer seeds and what they tell")
    parser.add_argument("--home", help=f"node state: id, key, profile, models (default ${HOME_ENV} or ~/.shoal)")
    parser.add_argument("--name", help="display name (default: the hostname)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], type=str.upper)


def _setup_logging(level: str, name: str) -> None:
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s %(levelname)-7s {name} %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    if level != "DEBUG":
        # zeroconf logs every malformed packet it sees on the LAN at WARNING; not our news.
        logging.getLogger("zeroconf").setLevel(logging.ERROR)


def node_config(args: argparse.Namespace) -> NodeConfig | None:
    """The node's config from its flags (None, said on stderr, if they are wrong); sets up logging."""
    try:
        config = NodeConfig.from_args(args)
    except (OSError, ValueError) as e:
        print(f"shoal node: {e}", file=sys.stderr)
        return None
    _setup_logging(config.log_level, config.name)
    for warning in loose_permissions(config.home):
        logging.getLogger("shoal.node").warning("%s", warning)
    if config.key_source == "generated":
        # Printed (not logged) once, on the start that made it, so it is easy to copy to the other
        # machines; later starts do not put the secret on the console (`shoal key`, `shoal invite`).
        from shoal.cluster.invite import node_invite

        invite = node_invite(config.host, config.advertise_host, config.port, config.cluster_key)
        print(f"new cluster key, saved in {config.key_file}:\n\n    {config.cluster_key}\n", flush=True)
        print(f"to add another machine, run there (the invite holds the key: keep it secret):\n\n"
              f"    shoal node --join {invite.encode()}\n", flush=True)
    elif config.key_source == "join":
        logging.getLogger("shoal.node").info("joining through %s; the invite's cluster key is saved in %s",
                                             ", ".join(f"{h}:{p}" for h, p in config.peers), config.key_file)
    elif config.key_source == "home":
        logging.getLogger("shoal.node").info("cluster key from %s", config.key_file)
    if config.api_key_source != "generated":  # a new one is shown once the node listens (api_key_banner)
        logging.getLogger("shoal.node").info(
            "clients on other machines need the API key%s (`shoal key` prints it and the dashboard's login link)",
            f" from {config.api_key_file}" if config.api_key_source == "home" else "")
    return config


def api_key_banner(config: NodeConfig) -> str | None:
    """What the start that made the API key prints once the node listens (never again: `shoal
    key` shows it): the key and the dashboard's login link."""
    if config.api_key_source != "generated":
        return None
    link = login_link(link_host(config.host, config.advertise_host), config.port, config.api_key)
    return (f"new API key for clients on other machines, saved in {config.api_key_file}:\n\n    {config.api_key}\n\n"
            f"dashboard:  {link}\n(`shoal key` prints them again)\n")


# The front door's login route (api/guard.py LOGIN_PATH), named here so this module stays light.
LOGIN_PATH = "/login"
_WILDCARD_HOSTS = ("", "0.0.0.0", "::")


def login_link(host: str, port: int, key: str) -> str:
    """The URL that opens the dashboard with `key` (its cookie is set, the key leaves the URL)."""
    name = f"[{host}]" if ":" in host else host
    return f"http://{name}:{port}{LOGIN_PATH}?key={key}"


def link_host(bind: str, advertise: str | None) -> str:
    """The name to put in a login link: what other machines know this node by."""
    if advertise:
        return advertise
    return socket.gethostname() if bind in _WILDCARD_HOSTS else bind


def add_key_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--home", help=f"the node's home (default ${HOME_ENV} or ~/.shoal)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"the node's port, for the link (default {DEFAULT_PORT})")
    parser.add_argument("--host", default=None, metavar="NAME", help="the name to put in the link (default: the hostname)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--api", action="store_true", help="print only the API key (for scripts)")
    which.add_argument("--cluster", action="store_true", help="print only the cluster key (for scripts)")


def run_key(args: argparse.Namespace) -> int:
    """Print the node's keys from its home (or the environment, as the node reads them); makes none."""
    home = resolve_home(args.home, os.environ)
    api_key = _read_key(os.environ.get(API_KEY_ENV), home / API_KEY_FILE_NAME)
    cluster_key = _read_key(os.environ.get(KEY_ENV), home / KEY_FILE_NAME)
    if args.api or args.cluster:
        key = api_key if args.api else cluster_key
        if key is None:
            print(f"shoal key: no {'API' if args.api else 'cluster'} key in {home} yet (a node makes one on its first start)",
                  file=sys.stderr)
            return 1
        print(key)
        return 0
    if api_key is None and cluster_key is None:
        print(f"shoal key: no keys in {home} yet (a node makes them on its first start)", file=sys.stderr)
        return 1
    if api_key is not None:
        link = login_link(args.host or socket.gethostname(), args.port, api_key)
        print(f"API key (clients: 'Authorization: Bearer KEY' or 'x-api-key: KEY'):\n\n    {api_key}\n\n"
              f"dashboard:  {link}\n")
    if cluster_key is not None:
        print(f"cluster key (the other nodes: {KEY_ENV}=<key> shoal node; or `shoal invite`, then "
              f"`shoal node --join TOKEN` there):\n\n    {cluster_key}\n")
    return 0


def _read_key(env_value: str | None, path: Path) -> str | None:
    if env_value:
        return env_value.strip()
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None


def add_status_arguments(parser: argparse.ArgumentParser) -> None:
    default = os.environ.get("SHOAL_CLUSTER") or f"http://127.0.0.1:{DEFAULT_PORT}"
    parser.add_argument(
        "--cluster", default=default, metavar="URL", help=f"any node of the cluster (default {default})"
    )
    parser.add_argument("--json", action="store_true", help="print the raw /v1/cluster JSON")


def run_status(args: argparse.Namespace) -> int:
    from shoal.cluster import status

    return status.run(args.cluster, as_json=args.json)
