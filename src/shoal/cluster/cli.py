"""`shoal node` and `shoal status`: arguments and bodies. Importing this module is cheap (no
aiohttp, zeroconf or torch): the daemon's modules are imported inside `run_node`."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from shoal.config import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    HOME_ENV,
    KEY_ENV,
    NodeConfig,
    parse_size,
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
        "--kv-budget", type=_size, metavar="SIZE",
        help="KV cache the running requests of each model entered here may hold together, e.g. 2GiB; "
        "requests beyond it wait, and past a bounded queue get 429 (default: half the free memory)",
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
    if config.key_source in ("generated", "home"):
        # Printed (not logged) so it is easy to copy to the other machines.
        what = "new cluster key, saved in" if config.key_source == "generated" else "cluster key from"
        print(f"{what} {config.key_file}:\n\n    {config.cluster_key}\n", flush=True)
        print(f"start the other nodes with  {KEY_ENV}=<key> shoal node  (or --cluster-key-file)\n", flush=True)
    return config


def add_status_arguments(parser: argparse.ArgumentParser) -> None:
    default = os.environ.get("SHOAL_CLUSTER") or f"http://127.0.0.1:{DEFAULT_PORT}"
    parser.add_argument(
        "--cluster", default=default, metavar="URL", help=f"any node of the cluster (default {default})"
    )
    parser.add_argument("--json", action="store_true", help="print the raw /v1/cluster JSON")


def run_status(args: argparse.Namespace) -> int:
    from shoal.cluster import status

    return status.run(args.cluster, as_json=args.json)
