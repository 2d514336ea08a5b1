"""`shoal place`, `shoal instances`, `shoal stop` and `shoal generate --cluster`: clients of a node's
/v1/instances routes.

Plain urllib and json, so these commands import neither torch nor aiohttp.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from shoal.config import DEFAULT_PORT, client_headers, refusal_message

READY_TIMEOUT_S = 600.0


def _default_cluster() -> str:
    return os.environ.get("SHOAL_CLUSTER") or f"http://127.0.0.1:{DEFAULT_PORT}"


def add_cluster_placement_arguments(p: argparse.ArgumentParser, cluster_default: str | None) -> None:
    p.add_argument("--cluster", default=cluster_default, metavar="URL", help="any node of the cluster")
    p.add_argument("--strategy", default="auto", choices=["auto", "pipeline", "tensor", "hybrid", "expert"],
                   help="how to split the model (default: auto, the fastest predicted that fits)")
    p.add_argument("--nodes", default=None, metavar="N|A,B,..",
                   help="how many nodes, or which (names or ids, in stage order; the first is the entry)")
    p.add_argument("--context", type=int, default=None, help="tokens of KV cache to reserve memory for (default 2048)")
    p.add_argument("--tp-size", type=int, default=None, help="ranks per tensor group (tensor/hybrid)")


def add_place_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="catalog id or a path the nodes can read")
    add_cluster_placement_arguments(p, _default_cluster())
    p.add_argument("--weights", default="stored", choices=["stored", "q8"],
                   help="how to hold bf16/fp16/fp32 matrices: as stored (bf16 as bf16), or q8 (8-bit, ~half of bf16)")
    p.add_argument("--collective", default="shoal", choices=["shoal", "mlx-ring"],
                   help="what a group's all-reduces travel on: shoal's own links (default), or for a group of MLX "
                        "nodes MLX's ring, every partial sealed")
    p.add_argument("--dry-run", action="store_true", help="only show the plan and prediction of each strategy")
    p.add_argument("--cluster-spec", default=None, metavar="FILE",
                   help="with --dry-run: plan for the machines and links FILE describes (JSON), no node needed")
    p.add_argument("--no-wait", action="store_true", help="return once placed, without waiting for it to load")
    p.add_argument("--replica", action="store_true",
                   help="place another instance even if the model already has one (default: answer with that one)")
    p.add_argument("--json", action="store_true", help="print JSON")


class ClusterError(Exception):
    pass


def _url(base: str, path: str) -> str:
    base = base.rstrip("/")
    if not base.startswith(("http://", "https://")):
        base = "http://" + base
    return base + path


def _request(base: str, method: str, path: str, body: dict[str, Any] | None = None, timeout_s: float = 60.0) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(_url(base, path), data=data, method=method,
                                 headers={**client_headers(), **({"Content-Type": "application/json"} if data else {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise ClusterError(refusal_message(e)) from None
    except (urllib.error.URLError, OSError) as e:
        raise ClusterError(f"cannot reach {base}: {getattr(e, 'reason', e)}") from None


def _nodes(text: str | None) -> list[str] | int | None:
    if not text:
        return None
    return int(text) if text.isdigit() else [x for x in text.split(",") if x]


def create_instance(base: str, model: str, strategy: str = "auto", nodes: str | None = None,
                    context: int | None = None, tp_size: int | None = None, replica: bool = False,
                    weights: str = "stored", collective: str = "shoal") -> dict[str, Any]:
    """The model's live instance, or a new one (always a new one with `replica`)."""
    body: dict[str, Any] = {"model": model, "strategy": strategy, "replica": replica, "weights": weights,
                            "collective": collective}
    for k, v in (("nodes", _nodes(nodes)), ("context", context), ("tp_size", tp_size)):
        if v is not None:
            body[k] = v
    return _request(base, "POST", "/v1/instances", body, timeout_s=120.0)["instance"]


def list_instances(base: str, ended: bool = False) -> list[dict[str, Any]]:
    """The live instances (or the recently ended ones)."""
    return _request(base, "GET", "/v1/instances")["ended" if ended else "instances"]


def wait_ready(base: str, iid: str, timeout_s: float = READY_TIMEOUT_S, progress: bool = False) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        listing = _request(base, "GET", "/v1/instances")
        inst = next((i for i in listing["instances"] if i["id"] == iid), None)
        if inst is None:
            gone = next((i for i in listing["ended"] if i["id"] == iid), None)
            why = f"{gone['status']}: {gone.get('error') or 'no reason given'}" if gone else "disappeared"
            raise ClusterError(f"instance {iid} {why}")
        if inst["status"] == "ready":
            return inst
        if progress:
            print(".", end="", file=sys.stderr, flush=True)
        time.sleep(0.5)
    raise ClusterError(f"instance {iid} not ready after {timeout_s:.0f} s")


def _describe(inst: dict[str, Any]) -> str:
    held = (f"  weights {inst['weights']}" if inst.get("weights", "stored") != "stored" else "") + (
        f"  groups sum over {inst['collective']}" if inst.get("collective", "shoal") != "shoal" else "")
    lines = [f"instance {inst['id']}  model {inst['model']}  strategy {inst['strategy']}{held}  status {inst['status']}"]
    for s in inst["shards"]:
        tp = f"  tp {s['tp_rank']}/{s['tp_size']} kv heads {s['kv_heads'][0]}-{s['kv_heads'][1]} mlp {s['ffn'][0]}-{s['ffn'][1]}" if s["tp_size"] > 1 else ""
        if s.get("expert_cols") and s["tp_size"] > 1:
            tp = (f"  tp {s['tp_rank']}/{s['tp_size']} kv heads {s['kv_heads'][0]}-{s['kv_heads'][1]} "
                  f"expert cols {s['expert_cols'][0]}-{s['expert_cols'][1]}")
        elif s.get("experts") and s["tp_size"] > 1:
            tp = f"  ep {s['tp_rank']}/{s['tp_size']} experts {s['experts'][0]}-{s['experts'][1] - 1}"
        rss = f"  rss {s['rss_bytes'] / 2**20:.0f} MiB" if s.get("rss_bytes") else ""
        lines.append(f"  rank {s['rank']}  {s['node_name']:<12} layers {s['layers'][0]}-{s['layers'][1]}{tp}"
                     f"  planned {s['planned_bytes'] / 2**20:.0f} MiB{rss}")
    p = inst.get("prediction") or {}
    if p:
        lines.append(f"  predicted: {p['decode_tokens_per_s']:.1f} tok/s decode, TTFT {p['ttft_s'] * 1000:.0f} ms "
                     f"for {p['prompt_tokens']} tokens; comm {p['comm_s'] * 1000:.2f} ms/token")
    if inst.get("reason"):
        lines.append(f"  why: {inst['reason']}")
    return "\n".join(lines)


def run_place(args: argparse.Namespace) -> int:
    try:
        if args.cluster_spec is not None:
            return _dry_run_spec(args)
        if args.dry_run:
            q = f"/v1/placement?model={urllib.request.quote(args.model)}&strategy={args.strategy}&weights={args.weights}&collective={args.collective}"
            for k, v in (("nodes", args.nodes), ("context", args.context), ("tp_size", args.tp_size)):
                if v is not None:
                    q += f"&{k}={urllib.request.quote(str(v))}"
            _print_preview(_request(args.cluster, "GET", q), args.json)
            return 0
        inst = create_instance(args.cluster, args.model, args.strategy, args.nodes, args.context, args.tp_size,
                               args.replica, args.weights, args.collective)
        if not args.no_wait:
            inst = wait_ready(args.cluster, inst["id"], progress=not args.json)
            if not args.json:
                print(file=sys.stderr)
        print(json.dumps(inst, indent=2) if args.json else _describe(inst))
        return 0
    except ClusterError as e:
        print(f"shoal place: {e}", file=sys.stderr)
        return 1


def _print_preview(preview: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(preview, indent=2))
        return
    for kind, p in preview["plans"].items():
        if "error" in p:
            print(f"{kind:<9} -  {p['error']}")
        else:
            print(f"{kind:<9} {p['strategy']:<9} {p['prediction']['decode_tokens_per_s']:7.1f} tok/s  "
                  f"TTFT {p['prediction']['ttft_s'] * 1000:6.0f} ms  {p['reason']}")


def _dry_run_spec(args: argparse.Namespace) -> int:
    """`shoal place MODEL --dry-run --cluster-spec FILE`: the planner on described machines, here."""
    from pathlib import Path

    from pydantic import ValidationError

    from shoal.placement.cluster_spec import (
        ClusterSpecError,
        dry_run,
        load_cluster_spec,
    )
    from shoal.placement.contract import PlacementRequest

    if not args.dry_run:
        print("shoal place: --cluster-spec describes machines no node runs on: give --dry-run too", file=sys.stderr)
        return 2
    try:
        spec = load_cluster_spec(Path(args.cluster_spec))
        nodes = _nodes(args.nodes)
        request = PlacementRequest(strategy=args.strategy, nodes=nodes if isinstance(nodes, list) else None,
                                   node_count=nodes if isinstance(nodes, int) else None, context=args.context,
                                   tp_size=args.tp_size, weights=args.weights, collective=args.collective)
        preview = dry_run(args.model, spec, request)
    except ClusterSpecError as e:
        print(f"shoal place: {args.cluster_spec}: {e}", file=sys.stderr)
        return 2
    except (ValidationError, ValueError, OSError) as e:
        print(f"shoal place: {e}".splitlines()[0], file=sys.stderr)
        return 2
    _print_preview(preview, args.json)
    return 0


def instance_for(base: str, model: str, strategy: str = "auto", nodes: str | None = None, context: int | None = None,
                 tp_size: int | None = None) -> dict[str, Any]:
    """The cluster's ready (or loading) instance of `model` — of `strategy`, if one is named —
    placing one if there is none."""
    live = [i for i in list_instances(base) if i["model"] == model and i["status"] in ("ready", "loading")
            and (strategy == "auto" or i["strategy"] == strategy)]
    inst = min(live, key=lambda i: (i["status"] != "ready", i["created_at"])) if live else None
    if inst is None:
        inst = create_instance(base, model, strategy, nodes, context, tp_size)
    return wait_ready(base, inst["id"]) if inst["status"] != "ready" else inst


def generate_on_cluster(args: argparse.Namespace, prompt: str, params: dict[str, Any]) -> int:
    """`shoal generate --cluster URL`: stream the text of one request run on the cluster."""
    from shoal.catalog import DEFAULT_MODEL

    model = args.model or DEFAULT_MODEL
    try:
        inst = instance_for(args.cluster, model, args.strategy, args.nodes, args.context, getattr(args, "tp_size", None))
        if args.raw:
            body: dict[str, Any] = {"prompt": prompt}
        else:
            body = {"messages": ([{"role": "system", "content": args.system}] if args.system else [])
                    + [{"role": "user", "content": prompt}]}
        body["params"] = params
        req = urllib.request.Request(_url(args.cluster, f"/v1/instances/{inst['id']}/generate"),
                                     data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", **client_headers()})
        stats = None
        try:
            with urllib.request.urlopen(req, timeout=600) as r:
                for line in r:
                    ev = json.loads(line)
                    if "error" in ev:
                        raise ClusterError(ev["error"]["message"])
                    sys.stdout.write(ev.get("text", ""))
                    sys.stdout.flush()
                    stats = ev.get("stats") or stats
        except urllib.error.HTTPError as e:
            raise ClusterError(refusal_message(e)) from None
        sys.stdout.write("\n")
        if stats:
            ranks = len(inst["shards"])
            print(f"[{model} on {ranks} rank{'' if ranks == 1 else 's'}, {inst['strategy']}] prompt {stats['prompt_tokens']} tokens, "
                  f"generated {stats['generation_tokens']} | TTFT {1000 * (stats['ttft_s'] or 0):.0f} ms | "
                  f"decode {stats['decode_tps']:.1f} tok/s", file=sys.stderr)
        return 0
    except (ClusterError, urllib.error.URLError, OSError) as e:
        print(f"shoal generate: {e}", file=sys.stderr)
        return 1


# -------------------------------------------------------------------------------- instances, stop
def add_instances_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cluster", default=_default_cluster(), metavar="URL", help="any node of the cluster")
    p.add_argument("--json", action="store_true", help="print the raw /v1/instances JSON")


def instance_table(instances: list[dict[str, Any]], ended: list[dict[str, Any]]) -> str:
    from shoal.cluster.status import instance_table as live_table

    lines = [live_table(instances)]
    if ended:
        lines += ["", "recently ended:"]
        for i in ended:
            when = time.strftime("%H:%M:%S", time.localtime(i["ended_at"])) if i.get("ended_at") else "?"
            lines.append(f"  {i['id']}  {i['model']}  {i['status']} at {when}" + (f": {i['error']}" if i.get("error") else ""))
    return "\n".join(lines)


def run_instances(args: argparse.Namespace) -> int:
    try:
        listing = _request(args.cluster, "GET", "/v1/instances")
    except ClusterError as e:
        print(f"shoal instances: {e}", file=sys.stderr)
        return 1
    print(json.dumps(listing, indent=2) if args.json else instance_table(listing["instances"], listing["ended"]))
    return 0


def add_stop_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", metavar="ID|MODEL", help="an instance id, or a model name (stops every instance of it)")
    p.add_argument("--cluster", default=_default_cluster(), metavar="URL", help="any node of the cluster")


def run_stop(args: argparse.Namespace) -> int:
    try:
        live = list_instances(args.cluster)
        chosen = [i for i in live if i["id"] == args.what] or [i for i in live if i["model"] == args.what]
        if not chosen:
            print(f"shoal stop: no running instance with id or model {args.what!r}", file=sys.stderr)
            return 1
        for inst in chosen:
            out = _request(args.cluster, "DELETE", f"/v1/instances/{inst['id']}", timeout_s=60.0)
            print(f"{inst['id']}  {inst['model']}  {out['status']}")
        return 0
    except ClusterError as e:
        print(f"shoal stop: {e}", file=sys.stderr)
        return 1


def add_drain_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("node", metavar="NODE", help="the node's name or id")
    p.add_argument("--cluster", default=_default_cluster(), metavar="URL", help="any node of the cluster")


def run_drain(args: argparse.Namespace) -> int:
    try:
        out = _request(args.cluster, "POST", f"/v1/nodes/{urllib.request.quote(args.node)}/drain", {}, timeout_s=30.0)
    except ClusterError as e:
        print(f"shoal drain: {e}", file=sys.stderr)
        return 1
    print(f"{out['node']} is moving its shards elsewhere, then leaving")
    return 0
