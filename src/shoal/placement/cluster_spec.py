"""Clusters described rather than running: `shoal place MODEL --dry-run --cluster-spec FILE`.

FILE is JSON naming invented machines and the links between them:

    {"nodes": [{"name": "s1", "device": "mlx", "memory_gb": 512, "bandwidth_gbs": 800, "tflops": 28}, ...],
     "links": [{"a": "s1", "b": "s2", "kind": "rdma", "latency_us": 5, "bandwidth_gbps": 75}, ...]}

`cluster_view` turns it into the `ClusterView` a node would see (profiles, free memory, measured
links), so the plans and predictions come from the same planner (placement/planner.py) the nodes
run; `dry_run` plans it as `hypothetical`, which also prices what the engine cannot run yet.
Unknown keys are ignored, so files written for later versions still load. Figures: `memory_gb`
GiB offered; `bandwidth_gbs` the memory bandwidth (for a cpu node: the copy bandwidth its profile
would measure); `tflops` fp32 (prefill); `latency_us` one way; `bandwidth_gbps` Gbit/s.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from shoal.cluster.messages import Accelerator, NodeProfile
from shoal.cluster.topology import ClusterView, LinkView, NodeView
from shoal.placement.contract import PlacementError, PlacementRequest
from shoal.placement.planner import plan, plan_each_strategy, preview_json
from shoal.placement.spec import ModelSpec

GiB = 2**30


class ClusterSpecError(ValueError):
    """The cluster spec cannot be read; the message is one line naming the field."""


class SpecNode(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    name: str = Field(min_length=1, max_length=64)
    device: Literal["cpu", "cuda", "mlx"]
    memory_gb: float = Field(gt=0)
    bandwidth_gbs: float = Field(gt=0)
    tflops: float = Field(default=1.0, gt=0)
    cores: int = Field(default=16, ge=1)  # a cpu node's cores (its per-layer cost is per core)


class SpecLink(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    a: str
    b: str
    kind: Literal["tcp", "rdma"] = "tcp"
    latency_us: float = Field(ge=0)
    bandwidth_gbps: float = Field(gt=0)


class ClusterSpec(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    nodes: list[SpecNode] = Field(min_length=1, max_length=64)
    links: list[SpecLink] = []  # pairs not listed are priced with a LAN guess (cost.py Calibration)

    @model_validator(mode="after")
    def _names(self) -> ClusterSpec:
        names = [n.name for n in self.nodes]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup is not None:
            raise ValueError(f"node name {dup!r} is used twice")
        pairs = set()
        for i, lk in enumerate(self.links):
            for end in (lk.a, lk.b):
                if end not in names:
                    raise ValueError(f"links[{i}] names unknown node {end!r}")
            if lk.a == lk.b:
                raise ValueError(f"links[{i}] joins {lk.a!r} to itself")
            if frozenset((lk.a, lk.b)) in pairs:
                raise ValueError(f"links[{i}]: {lk.a}-{lk.b} is given twice")
            pairs.add(frozenset((lk.a, lk.b)))
        return self


def parse_cluster_spec(data: Any) -> ClusterSpec:
    """The spec from parsed JSON, or a one-line ClusterSpecError naming the first bad field."""
    try:
        return ClusterSpec.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".")
        msg = err["msg"].removeprefix("Value error, ")
        raise ClusterSpecError(f"{where}: {msg}" if where else msg) from None


def load_cluster_spec(path: Path) -> ClusterSpec:
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise ClusterSpecError(f"cannot read {path}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise ClusterSpecError(f"{path} is not JSON: {e.msg} at line {e.lineno}") from None
    return parse_cluster_spec(data)


def cluster_view(spec: ClusterSpec) -> ClusterView:
    """The ClusterView a node of this cluster would see: each machine up, with the profile its
    figures describe, and each listed link measured as given (RTT = twice the latency)."""
    nodes = []
    for i, n in enumerate(spec.nodes):
        mem = int(n.memory_gb * GiB)
        cards = [Accelerator(kind="cuda", name=n.name, memory_total_bytes=mem, gflops_fp32=n.tflops * 1e3,
                             memory_bandwidth_gbps=n.bandwidth_gbs)] if n.device == "cuda" else []
        prof = NodeProfile(os="described", hostname=n.name, cpu_model="described", cpu_cores_logical=n.cores,
                           cpu_cores_physical=n.cores, ram_total_bytes=mem, accelerators=cards,
                           gflops_fp32=n.tflops * 1e3, memory_bandwidth_gbps=n.bandwidth_gbs, measured_with="cluster spec",
                           measured_at=0.0, measure_seconds=0.0, fingerprint=n.name, device=n.device,
                           collectives=["mlx-ring"] if n.device == "mlx" else [])
        nodes.append(NodeView(id=f"{i + 1:032x}", name=n.name, address=f"{n.name}:52600", status="up", is_self=i == 0,
                              last_seen_s=0.0, incarnation=1, memory_available_bytes=mem, memory_offered_bytes=mem,
                              profile=prof))
    ids = {n.name: n.id for n in nodes}
    links = [LinkView(a=ids[lk.a], b=ids[lk.b], rtt_ms=2 * lk.latency_us / 1e3, bandwidth_mbps=lk.bandwidth_gbps * 1e3,
                      measured_at=0.0, age_s=0.0, kind=lk.kind) for lk in spec.links]
    return ClusterView(self_id=nodes[0].id, cluster="cluster spec", nodes=nodes, links=links)


def model_spec(model: str, weights: str = "stored") -> ModelSpec:
    """A catalog id's spec from its published figures (no torch needed), else the local checkpoint's."""
    from shoal.catalog import CATALOG

    if model in CATALOG:
        return ModelSpec.from_catalog(CATALOG[model], weights)
    from shoal.placement.spec import spec_for

    return spec_for(model, weights)


def dry_run(model: str, spec: ClusterSpec, request: PlacementRequest | None = None) -> dict:
    """The preview GET /v1/placement answers, for the described cluster instead of the live one."""
    request = request or PlacementRequest()
    mspec, view = model_spec(model, request.weights), cluster_view(spec)
    if request.strategy == "auto":
        plans = plan_each_strategy(mspec, view, request, hypothetical=True)
    else:
        try:
            plans = {request.strategy: plan(mspec, view, request, hypothetical=True)}
        except PlacementError as e:
            plans = {request.strategy: e}
    return preview_json(model, mspec, plans)
