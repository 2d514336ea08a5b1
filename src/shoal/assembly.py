"""The one place that assembles a node: the cluster core, then what is mounted on it — the instances
component (placement, runners, requests through the cluster), the OpenAI/Ollama API on top of it,
and the dashboard, all behind one front door (api/guard.py: key, Host, Origin, Content-Type) that
stands before every route but the peers' own. The cluster core imports none of them.

Order matters: components start in the order added and stop in reverse, so the API (which holds
remote instances) stops before the instances component (which stops the runners).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
from typing import TYPE_CHECKING

# `shoal node`'s arguments are the cluster core's (cheap to import: `shoal --help` stays light).
from shoal.cluster.cli import add_node_arguments, api_key_banner, node_config
from shoal.config import NodeConfig

if TYPE_CHECKING:
    from shoal.cluster.node import Node

log = logging.getLogger("shoal.node")

__all__ = ["add_node_arguments", "build", "run", "run_node"]


def build(config: NodeConfig) -> Node:
    from shoal.api.app import ApiComponent
    from shoal.api.guard import FrontDoor
    from shoal.api.metrics import Metrics
    from shoal.api.service import ModelService, ServiceConfig
    from shoal.cluster.node import Node
    from shoal.cluster.peer import PEER_PREFIX
    from shoal.daemon.instances import InstancesComponent
    from shoal.daemon.placer import ClusterPlacer
    from shoal.daemon.routes import ADMIN_ROUTES
    from shoal.dashboard import Dashboard

    node = Node(config)
    # Before the API's middleware (which shapes aiohttp's own 404/405), so a refusal comes first.
    door = FrontDoor(config.api_key, port=config.port, loopback_exempt=config.loopback_exempt,
                     hosts=[config.host, config.advertise_host, *config.allowed_hosts],
                     admin_routes=ADMIN_ROUTES, skip_prefixes=(PEER_PREFIX,), banner=api_key_banner(config))
    node.app.middlewares.append(door.middleware)
    node.add_component(door)
    metrics = Metrics()
    instances = InstancesComponent(config, node.cluster_view, lambda: node.membership.client, metrics)
    node.membership.subscribe(instances.on_member)
    node.add_component(instances)
    node.add_drain(instances.drain)
    instances.request_leave = node.request_stop
    instances.set_profile = node.set_profile
    node.instances_view = instances.cluster_instances

    service_config = ServiceConfig(device=config.device)
    if config.kv_budget_bytes is not None:
        service_config = dataclasses.replace(
            service_config, limits=dataclasses.replace(service_config.limits, kv_budget_bytes=config.kv_budget_bytes))
    service = ModelService(service_config, metrics=metrics)
    service.placer = ClusterPlacer(instances, service_config.limits, service.metrics)
    api = ApiComponent(service)
    node.add_component(api)
    node.app.middlewares.append(api.middleware)
    node.add_component(Dashboard())
    return node


def run(config: NodeConfig) -> int:
    """Run a node until it is told to stop; the exit status."""
    from shoal.cluster.node import HomeLockedError

    try:
        asyncio.run(build(config).serve())
    except HomeLockedError as e:
        log.error("%s", e)
        return 1
    except OSError as e:  # typically: the port is taken
        log.error("cannot start: %s", e)
        return 1
    return 0


def run_node(args: argparse.Namespace) -> int:
    config = node_config(args)
    return 2 if config is None else run(config)
