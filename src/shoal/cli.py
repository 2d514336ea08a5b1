"""The `shoal` command. Each subcommand's arguments and body live next to the code they drive;
this file only wires them together, importing lazily so `shoal status` never pays for torch."""

from __future__ import annotations

import argparse
import sys


def _engine_cli():
    from shoal.engine import cli as engine_cli

    return engine_cli


def _chat():
    from shoal.engine import chat

    return chat


def _cluster_cli():
    from shoal.cluster import cli as cluster_cli

    return cluster_cli


def _daemon_cli():
    from shoal.daemon import cli as daemon_cli

    return daemon_cli


def _invite():
    from shoal.cluster import invite

    return invite


def _assembly():
    from shoal import assembly

    return assembly


# name -> (help, module getter); each module has add_<name>_arguments(parser) and run_<name>(args) -> int
SUBCOMMANDS = {
    "run": ("chat with a model in the terminal (through the node on this machine when one is running)", _chat),
    "generate": ("generate text from a prompt (chat template applied unless --raw; on this machine's node when one runs)", _engine_cli),
    "bench": ("measure prefill and decode speed (and llama.cpp's, when installed)", _engine_cli),
    "download": ("download a catalog model from the hub (resumable)", _engine_cli),
    "node": ("run a shoal node daemon", _assembly),
    "status": ("show a cluster's nodes, links and instances", _cluster_cli),
    "key": ("print this machine's node keys: the API key and dashboard login link, and the cluster key", _cluster_cli),
    "invite": ("print a token that joins another machine to this node's cluster (`shoal node --join TOKEN`)", _invite),
    "place": ("place a model on the cluster (split over nodes as the planner decides) and show the plan", _daemon_cli),
    "instances": ("list the cluster's model instances (and the recently ended ones)", _daemon_cli),
    "stop": ("stop a model instance, by its id or its model's name", _daemon_cli),
    "drain": ("have a node move its model shards elsewhere, then leave the cluster", _daemon_cli),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shoal", description="Run LLMs on a shoal of ordinary machines.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, module) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        getattr(module(), f"add_{name}_arguments")(sp)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module = SUBCOMMANDS[args.command][1]()
    try:
        return int(getattr(module, f"run_{args.command}")(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
