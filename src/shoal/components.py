"""The one place that decides what a node runs beside its cluster core: the instances component
(placement, runners, generation through the cluster) and the OpenAI/Ollama API on top of it.

Order matters: components start in the order added and stop in reverse, so the API (which holds
remote instances) stops before the instances component (which stops the runners).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shoal.cluster.node import Node


def mount(node: Node) -> None:
    from shoal.api.app import ApiComponent
    from shoal.api.service import ModelService, ServiceConfig
    from shoal.runner.placer import ClusterPlacer
    from shoal.runner.supervisor import InstancesComponent

    instances = InstancesComponent(node)
    node.add_component(instances)
    node.instances_view = instances.cluster_instances

    config = ServiceConfig()
    service = ModelService(config)
    service.placer = ClusterPlacer(instances, config.limits, service.metrics)
    api = ApiComponent(service)
    node.add_component(api)
    node.app.middlewares.append(api.middleware)

    from shoal.dashboard import Dashboard

    node.add_component(Dashboard())
