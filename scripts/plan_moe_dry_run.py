#!/usr/bin/env python
"""Planner dry run for the real mixture-of-experts models: Kimi-K2-Thinking and DeepSeek-V3 on an
invented shoal (default: four 512 GB nodes). Nothing is downloaded: the models' published
config.json figures live in `shoal.synthetic.PUBLISHED`; the plans come from the same
`shoal.placement.planner.plan` the nodes run, on the ClusterView of a cluster spec made of the figures
given here (placement/cluster_spec.py, as `shoal place --dry-run --cluster-spec` builds it).

    python scripts/plan_moe_dry_run.py [--nodes 4] [--memory-gb 512] [--bandwidth-gbs 800] [--device cpu|mlx]
                                       [--gflops 4000] [--link-gbps 10] [--rtt-ms 0.3] [--link-kind tcp|rdma]
                                       [--context 32768]
    python scripts/plan_moe_dry_run.py --published   # the catalog's MLX 4-bit models on 1/2/4 M3 Ultra
                                                     # against exo's published decode (ARCHITECTURE.md)

For each model and each way of holding its weights it prints the parameter census (total vs active
per token, expert memory, MLA cache per token), then the best plan of each strategy — pipeline,
expert parallel over one group, and hybrid (expert groups as pipeline stages) — with every rank's
layers, experts and memory, and the predicted decode tokens/s; or the refusal with what is missing.

Holdings (bytes per parameter in memory):
  as-shipped  what the loader does: bf16 tensors become float32 (4 B/param); FP8 ones 8-bit codes
              with a float32 scale per 32 (1.125 B/param); INT4 experts stay packed (4-bit codes +
              float32 scale and bias per 32 = 0.75 B/param).
  mlx 4-bit   the mlx-community conversions (what exo runs): every linear layer 4-bit, group 64,
              held packed (0.625 B/param).
  8-bit       Kimi's bf16 dense weights held as 8-bit codes + a scale per 32 (1.125 B/param),
              experts INT4. The loader does not convert bf16 to it yet.
`--bandwidth-gbs` is what a node's profile would measure (copy bandwidth); the planner's
calibration (measured on the 2-core reference machine) turns it into the weight-read rate.
"""

from __future__ import annotations

import argparse

from shoal.cluster.topology import ClusterView
from shoal.placement.cluster_spec import cluster_view, dry_run, parse_cluster_spec
from shoal.placement.contract import Placement, PlacementError, PlacementRequest
from shoal.placement.planner import plan_each_strategy
from shoal.placement.spec import (
    FP8_HELD_BYTES_PER_PARAM,
    Q4_BYTES_PER_PARAM,
    moe_census,
    moe_spec,
)
from shoal.synthetic import PUBLISHED

GB = 1e9
MLX4 = 0.5 + 8 / 64  # mlx-community 4-bit: codes + float32 scale and bias per 64
FP8 = FP8_HELD_BYTES_PER_PARAM
HOLDINGS = {  # model -> [(name, dense bytes/param, expert bytes/param, built); the embedding and head of
    # the as-shipped releases are bf16, held as float32
    "kimi-k2": [("as-shipped: INT4 experts packed, the rest float32", 4.0, Q4_BYTES_PER_PARAM, True),
                ("mlx-community 4-bit: every linear layer 4-bit", MLX4, MLX4, True),
                ("8-bit dense, INT4 experts", 1.125, Q4_BYTES_PER_PARAM, False)],
    "deepseek-v3": [("as-shipped: FP8 held as 8-bit codes, embedding and head float32", FP8, FP8, True),
                    ("mlx-community 4-bit: every linear layer 4-bit", MLX4, MLX4, True)],
}


def invented_spec(n: int, memory_gb: float, bandwidth_gbs: float, gflops: float, link_gbps: float, rtt_ms: float,
                  device: str = "cpu", link_kind: str = "tcp") -> dict:
    """A cluster spec (placement/cluster_spec.py) of n identical machines, fully connected."""
    names = [f"studio{i}" for i in range(n)]
    return {"nodes": [{"name": x, "device": device, "memory_gb": memory_gb, "bandwidth_gbs": bandwidth_gbs,
                       "tflops": gflops / 1e3, "cores": 24} for x in names],
            "links": [{"a": a, "b": b, "kind": link_kind, "latency_us": rtt_ms * 1e3 / 2, "bandwidth_gbps": link_gbps}
                      for i, a in enumerate(names) for b in names[i + 1 :]]}


def invented_cluster(n: int, memory_gb: float, bandwidth_gbs: float, gflops: float, link_gbps: float, rtt_ms: float,
                     device: str = "cpu", link_kind: str = "tcp") -> ClusterView:
    return cluster_view(parse_cluster_spec(invented_spec(n, memory_gb, bandwidth_gbs, gflops, link_gbps, rtt_ms, device, link_kind)))


# exo's published decode tokens/s on 1, 2 and 4 M3 Ultra Mac Studios (tensor parallel over Thunderbolt 5 RDMA).
EXO = {"qwen3-235b-a22b-4bit": (19.5, 26.2, 31.9), "deepseek-v3.1-4bit": (21.1, 27.8, 32.5)}


def published() -> None:
    """The table in ARCHITECTURE.md: the dry run's best plan on M3 Ultras (512 GB, 800 GB/s, 28 TFLOP/s;
    Thunderbolt 5 RDMA 5 us / 75 Gbit/s, or TCP 300 us / 40 Gbit/s) against exo's figures."""
    print("| model | nodes | exo tok/s | predicted (RDMA) | error | best plan (RDMA) | predicted (TCP) | best plan (TCP) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for model, figures in EXO.items():
        for n, exo in zip((1, 2, 4), figures):
            row = []
            for kind, latency_us, gbps in (("rdma", 5, 75), ("tcp", 300, 40)):
                best = dry_run(model, parse_cluster_spec(invented_spec(n, 512, 800, 28e3, gbps, 2 * latency_us / 1e3, "mlx", kind)))
                row.append(best["plans"]["auto"])
            rdma, tcp = (p["prediction"]["decode_tokens_per_s"] for p in row)
            print(f"| {model} | {n} | {exo} | {rdma:.1f} | {rdma / exo - 1:+.0%} | {row[0]['strategy']} x{len(row[0]['shards'])} "
                  f"| {tcp:.1f} | {row[1]['strategy']} x{len(row[1]['shards'])} |")


def census(name: str) -> None:
    cfg = PUBLISHED[name]
    c = moe_census(cfg)
    print(f"\n=== {name}  ({cfg['model_type']}, {c['layers']} layers: {c['layers'] - c['moe_layers']} dense + {c['moe_layers']} MoE)")
    print(f"  parameters: {c['total'] / 1e9:,.0f}B total, {c['active'] / 1e9:,.1f}B active per token "
          f"({c['top_k']} of {c['experts']} routed experts + the shared ones)")
    print(f"  routed experts: {c['moe_layers'] * c['experts'] * c['expert'] / 1e9:,.0f}B params ({c['expert'] / 1e6:.1f}M each)")
    full_kv = 2 * c["heads"] * c["head_dim"] * 4 * c["layers"]
    print(f"  MLA cache: {c['cache_values']} values/token/layer = {c['cache_values'] * 4 * c['layers'] / 1024:.0f} KiB/token "
          f"(float32); full K/V would be {full_kv / 2**20:.1f} MiB/token")


def show(kind: str, p: Placement | PlacementError) -> None:
    if isinstance(p, PlacementError):
        print(f"    {kind:<9} refused: {p}")
        return
    pred = p.prediction
    print(f"    {kind:<9} {p.strategy}: {pred.decode_tokens_per_s:.2f} tok/s decode (comm {pred.comm_s * 1e3:.1f} ms/token), "
          f"TTFT {pred.ttft_s:.1f} s for {pred.prompt_tokens} tokens")
    for s in p.shards:
        ex = f" experts {s.experts[0]}-{s.experts[1] - 1}" if s.experts and s.tp_size > 1 else ""
        print(f"      rank {s.rank} {s.node_name}: stage {s.stage} layers {s.layers[0]}-{s.layers[1]}{ex}, "
              f"{s.memory_bytes / GB:.0f} GB ({s.weight_bytes / GB:.0f} weights + {s.kv_bytes / GB:.1f} cache)")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--memory-gb", type=float, default=512)
    ap.add_argument("--bandwidth-gbs", type=float, default=800.0, help="copy bandwidth a node's profile would measure")
    ap.add_argument("--gflops", type=float, default=4000.0)
    ap.add_argument("--link-gbps", type=float, default=10.0)
    ap.add_argument("--rtt-ms", type=float, default=0.3)
    ap.add_argument("--context", type=int, default=32768, help="tokens of cache to reserve")
    ap.add_argument("--device", default="cpu", choices=["cpu", "mlx"], help="cpu: shoal's CPU engine; mlx: an Apple GPU")
    ap.add_argument("--link-kind", default="tcp", choices=["tcp", "rdma"])
    ap.add_argument("--published", action="store_true", help="only the table against exo's published figures")
    a = ap.parse_args(argv)
    if a.published:
        published()
        return
    view = invented_cluster(a.nodes, a.memory_gb, a.bandwidth_gbs, a.gflops, a.link_gbps, a.rtt_ms, a.device, a.link_kind)
    print(f"{a.nodes} {a.device} nodes x {a.memory_gb:.0f} GB, {a.bandwidth_gbs:.0f} GB/s memory, {a.gflops:.0f} GFLOP/s, "
          f"{a.link_gbps:.0f} Gb/s {a.link_kind} links with {a.rtt_ms} ms RTT; {a.context} tokens of context")
    for name in ("kimi-k2", "deepseek-v3"):
        census(name)
        for holding, dense_bpp, expert_bpp, built in HOLDINGS[name]:
            embed_bpp = None if holding.startswith("mlx") else 4.0
            spec = moe_spec(PUBLISHED[name], name, dense_bpp, expert_bpp, 32, embed_bpp)
            print(f"  holding {holding}{'' if built else '  [not built yet]'}: {spec.weight_bytes / GB:,.0f} GB of weights")
            request = PlacementRequest(context=a.context, nodes=None)
            for kind, p in plan_each_strategy(spec, view, request, hypothetical=True).items():
                show(kind, p)


if __name__ == "__main__":
    main()
