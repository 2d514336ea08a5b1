"""Signed calls to other nodes by node id: the narrow way the daemon's instance parts reach peers."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from pydantic import ValidationError

from shoal.cluster.messages import Message
from shoal.cluster.peer import PeerClient, PeerError
from shoal.cluster.topology import ClusterView
from shoal.config import parse_hostport
from shoal.daemon.records import InstanceError

R = TypeVar("R", bound=Message)

CALL_TIMEOUT_S = 5.0


class Peers:
    def __init__(self, self_id: str, cluster_view: Callable[[], ClusterView], client: Callable[[], PeerClient | None]):
        self.self_id = self_id
        self.cluster_view = cluster_view
        self._client = client

    def name(self, node_id: str) -> str:
        """A node as people know it: its name (and short id), for logs and error texts."""
        n = self.cluster_view().node(node_id)
        return f"{n.name} ({node_id[:8]})" if n is not None else f"node {node_id[:8]}"

    async def call(self, node_id: str, path: str, msg: Message, reply: type[R], timeout_s: float = CALL_TIMEOUT_S) -> R:
        body = await self.fetch(node_id, path, msg, timeout_s)
        try:
            return reply.model_validate_json(body)
        except ValidationError as e:
            raise PeerError(f"{self.name(node_id)}{path}: malformed {reply.__name__}: {e.errors()[0]['msg']}") from None

    async def fetch(self, node_id: str, path: str, msg: Message, timeout_s: float = CALL_TIMEOUT_S) -> bytes:
        """The reply's bytes as they came (a Message's JSON, or raw bytes such as a file's slice)."""
        client = self._client()
        if client is None:
            raise InstanceError(503, "the node is still starting")
        n = self.cluster_view().node(node_id)
        if n is None:
            raise InstanceError(503, f"node {node_id[:8]} is not a member of this cluster (yet)")
        host, port = parse_hostport(n.address)
        got, replier = await client.post(host, port, path, msg.model_dump_json().encode(), timeout_s, node_id=node_id)
        if replier != node_id:
            raise PeerError(f"{host}:{port} answered as {replier[:8]}, not {self.name(node_id)}")
        return got
