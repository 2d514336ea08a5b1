"""The cluster as one node sees it: nodes with their profiles and free memory, and measured links.

`ClusterView` is what GET /v1/cluster returns and what the placement planner reads
(`Node.cluster_view()`); it is a snapshot, immutable, safe to hand to a pure function.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from shoal.cluster.messages import NodeProfile


class NodeView(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    name: str
    address: str  # host:port, reachable from the viewing node
    status: Literal["up", "down"]
    is_self: bool = False
    last_seen_s: float  # seconds since its heartbeat last advanced, as seen from here
    incarnation: int
    memory_available_bytes: int  # RAM available on the node, at its last heartbeat
    memory_offered_bytes: int  # min(available, --memory-limit): what placement may use
    profile: NodeProfile | None = None


class SeedView(BaseModel):
    """An address this node says hello to (a --peer, an invite's, or found by mDNS)."""

    model_config = ConfigDict(frozen=True)

    address: str  # host:port
    from_peer: bool  # given (--peer, --join), not found by mDNS
    status: Literal["pending", "answered", "unreachable"]
    node_id: str | None = None  # who answered there last
    problem: str | None = None  # why the last hello failed, e.g. "the cluster key does not match"


class LinkView(BaseModel):
    model_config = ConfigDict(frozen=True)

    a: str
    b: str
    rtt_ms: float
    bandwidth_mbps: float | None
    measured_at: float  # unix time
    age_s: float  # how long ago, as seen from here
    kind: Literal["tcp", "rdma"] = "tcp"  # TCP (the kernel's stack) or RDMA (Thunderbolt 5, user space)


class ClusterView(BaseModel):
    model_config = ConfigDict(frozen=True)

    self_id: str
    cluster: str  # public fingerprint of the cluster key
    nodes: list[NodeView]
    links: list[LinkView]
    instances: list[dict[str, Any]] = []  # filled once placement lands
    seeds: list[SeedView] = []

    def node(self, node_id: str) -> NodeView | None:
        return next((n for n in self.nodes if n.id == node_id), None)

    def up_nodes(self) -> list[NodeView]:
        return [n for n in self.nodes if n.status == "up"]

    def link(self, a: str, b: str) -> LinkView | None:
        """The measured link between two nodes, in either order."""
        return next((lk for lk in self.links if {lk.a, lk.b} == {a, b}), None)
