"""GET /v1/cluster (the node's view, for the dashboard and the CLI; behind the front door like every
client route) and `shoal status`, which shows that view as tables ($SHOAL_API_KEY for a node elsewhere)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from shoal.config import client_headers, refusal_message

if TYPE_CHECKING:  # `shoal status` must not pay for aiohttp and pydantic
    from aiohttp import web

    from shoal.cluster.topology import ClusterView


def routes(view: Callable[[], ClusterView]) -> list[web.RouteDef]:
    from aiohttp import web

    async def get_cluster(request: web.Request) -> web.Response:
        return web.Response(text=view().model_dump_json(), content_type="application/json")

    return [web.get("/v1/cluster", get_cluster)]


def fetch(url: str, timeout_s: float = 5.0) -> dict[str, Any]:
    """The JSON of /v1/cluster at a node's base URL (plain urllib: `shoal status` stays light)."""
    url = url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        url = "http://" + url
    req = urllib.request.Request(url + "/v1/cluster", headers=client_headers())
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        return json.loads(resp.read())


def _size(n: float | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**30:.1f} GiB"


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def render(data: dict[str, Any]) -> str:
    """The view as three tables: nodes, links, instances."""
    nodes = data.get("nodes", [])
    names = {n["id"]: n["name"] for n in nodes}
    rows = []
    for n in nodes:
        p = n.get("profile") or {}
        accels = ", ".join(
            f"{a['kind']}:{a['name']} {_size(a['memory_total_bytes'])}" for a in p.get("accelerators", [])
        )
        rows.append(
            [
                n["name"] + (" *" if n.get("is_self") else ""),
                n["id"][:8],
                n["address"],
                n["status"],
                str(p.get("cpu_cores_logical", "-")),
                f"{p['gflops_fp32']:.0f}" if p else "-",
                f"{p['memory_bandwidth_gbps']:.1f}" if p else "-",
                _size(p.get("ram_total_bytes")) if p else "-",
                _size(n.get("memory_available_bytes")),
                _size(n.get("memory_offered_bytes")),
                accels or "-",
                (p.get("cpu_model") or "-")[:40],
            ]
        )
    out = [f"cluster {data.get('cluster', '?')}: {len(nodes)} nodes, {sum(n['status'] == 'up' for n in nodes)} up"]
    out += [f"seed {sd['address']} unreachable: {sd.get('problem') or '?'}"
            for sd in data.get("seeds", []) if sd.get("status") == "unreachable"]
    out.append(
        table(
            [
                "NAME",
                "ID",
                "ADDRESS",
                "STATUS",
                "CORES",
                "GFLOP/S",
                "MEM GB/S",
                "RAM",
                "AVAILABLE",
                "OFFERED",
                "ACCELERATORS",
                "CPU",
            ],
            rows,
        )
    )
    now = time.time()
    link_rows = [
        [
            f"{names.get(lk['a'], lk['a'][:8])} <-> {names.get(lk['b'], lk['b'][:8])}",
            f"{lk['rtt_ms']:.2f}",
            f"{lk['bandwidth_mbps']:.0f}" if lk.get("bandwidth_mbps") is not None else "-",
            f"{now - lk['measured_at']:.0f} s ago",
        ]
        for lk in data.get("links", [])
    ]
    out += ["", table(["LINK", "RTT MS", "MBIT/S", "MEASURED"], link_rows)]
    out += ["", instance_table(data.get("instances", []))]
    return "\n".join(out)


def instance_table(instances: list[dict[str, Any]]) -> str:
    """Model instances, one line each: the shards' nodes and layers in the last column."""
    rows = []
    for i in instances:
        p = i.get("prediction") or {}
        tps = f"{p['decode_tokens_per_s']:.1f} tok/s" if p.get("decode_tokens_per_s") else "-"
        shards = ", ".join(f"{s['node_name']} {s['layers'][0]}-{s['layers'][1]}" for s in i["shards"])
        rows.append([i["id"], i["model"], i["status"], i["strategy"], tps, shards])
    if not rows:
        return "no model instances (`shoal place MODEL` starts one)"
    return table(["INSTANCE", "MODEL", "STATUS", "STRATEGY", "PREDICTED", "SHARDS (NODE LAYERS)"], rows)


def run(url: str, as_json: bool = False) -> int:
    try:
        data = fetch(url)
    except urllib.error.HTTPError as e:
        print(f"shoal status: {refusal_message(e)}")
        return 1
    except (urllib.error.URLError, OSError, ValueError) as e:
        print(f"shoal status: cannot read {url}/v1/cluster: {e}")
        return 1
    print(json.dumps(data, indent=2) if as_json else render(data))
    return 0
