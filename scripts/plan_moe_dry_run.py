#!/usr/bin/env python
"""Planner dry run for the real mixture-of-experts models: Kimi-K2-Thinking and DeepSeek-V3 on a
shoal of nodes (default: four 512 GB machines). Nothing is downloaded: the models' published
config.json figures live in `shoal.synthetic.PUBLISHED`.

    python scripts/plan_moe_dry_run.py [--nodes 4] [--memory-gb 512] [--bandwidth-gbs 100]
                                       [--link-gbps 10] [--link-latency-ms 0.15] [--context 32768]

For each model it prints the parameter census (total vs active per token, expert memory, MLA cache
per token), then the candidate plans — pipeline only, expert parallel over all nodes, and expert ×
pipeline — with each node's memory and the predicted decode tokens/s (batch 1), and picks the
fastest plan that fits. The cost model is the engine's: decode is memory-bandwidth bound, a node
reads the weights it uses once per token at `--efficiency` of its bandwidth (the numba kernels
reach ~0.9 here), every MoE layer costs one all-reduce of a hidden vector across its expert group,
and every pipeline boundary one hop. An expert group waits for its busiest node: the expected
maximum, over nodes, of the routed experts a token picks there (simulated).

Holdings ("how the engine keeps the weights in memory"):
  as-shipped  what the loader does today: dense bf16/fp8 tensors become float32 (4 B/param);
              INT4 experts stay packed (q4_affine: 4-bit codes + float32 scale and bias per 32
              = 0.75 B/param).
  q8-dense    dense weights re-quantized to q8_sym per 32 (1.125 B/param), experts as shipped or
              q4 (needs an FP8 -> q8 converter at load: not implemented yet).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np

from shoal.models.moe import split_experts
from shoal.synthetic import PUBLISHED

GB = 1e9


# ----------------------------------------------------------------------------- census


@dataclass(frozen=True)
class Census:
    """Parameter counts of a DeepSeek-V3-architecture model, from its config."""

    layers: int
    moe_layers: int
    hidden: int
    attn: int  # per layer (MLA projections + their norms)
    dense_mlp: int  # per dense layer
    router: int  # per MoE layer
    shared: int  # per MoE layer, all shared experts
    shared_size: int  # their intermediate width (split by columns across an expert group)
    expert: int  # one routed expert
    experts: int
    top_k: int
    embed: int
    head: int
    cache_values: int  # MLA cache values per token per layer

    @classmethod
    def of(cls, c: dict) -> "Census":
        h, H = c["hidden_size"], c["num_attention_heads"]
        nope, rope, v, r, qr = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"], c["kv_lora_rank"], c["q_lora_rank"]
        attn = h * qr + qr + qr * H * (nope + rope) + h * (r + rope) + r + r * H * (nope + v) + H * v * h + 2 * h
        moe = sum(1 for i in range(c["num_hidden_layers"]) if i >= c["first_k_dense_replace"] and i % c["moe_layer_freq"] == 0)
        mi = c["moe_intermediate_size"]
        return cls(
            layers=c["num_hidden_layers"], moe_layers=moe, hidden=h, attn=attn, dense_mlp=3 * h * c["intermediate_size"],
            router=c["n_routed_experts"] * (h + 1), shared=3 * h * mi * c["n_shared_experts"],
            shared_size=mi * c["n_shared_experts"], expert=3 * h * mi,
            experts=c["n_routed_experts"], top_k=c["num_experts_per_tok"], embed=c["vocab_size"] * h,
            head=c["vocab_size"] * h, cache_values=r + rope,
        )

    @property
    def dense_layers(self) -> int:
        return self.layers - self.moe_layers

    @property
    def total(self) -> int:
        return (self.layers * self.attn + self.dense_layers * self.dense_mlp
                + self.moe_layers * (self.router + self.shared + self.experts * self.expert) + self.embed + self.head + self.hidden)

    @property
    def active(self) -> int:
        """Parameters read per decoded token (the embedding contributes one row)."""
        return (self.layers * self.attn + self.dense_layers * self.dense_mlp
                + self.moe_layers * (self.router + self.shared + self.top_k * self.expert) + self.hidden + self.head)


@dataclass(frozen=True)
class Holding:
    name: str
    dense_bpp: float  # bytes per parameter in memory: attention, dense MLP, shared experts, head
    expert_bpp: float  # routed experts
    implemented: bool


HOLDINGS = {
    "kimi-k2": [Holding("as-shipped (experts INT4 packed, rest float32)", 4.0, 0.75, True),
                Holding("q8-dense (experts INT4, rest q8)", 1.125, 0.75, False)],
    "deepseek-v3": [Holding("as-shipped (FP8 decoded to float32)", 4.0, 4.0, True),
                    Holding("q8-dense (FP8 -> q8 everywhere)", 1.125, 1.125, False),
                    Holding("q4 experts (FP8 -> q8 dense, q4 experts)", 1.125, 0.75, False)],
}


# ----------------------------------------------------------------------------- cost model


@dataclass(frozen=True)
class Cluster:
    nodes: int
    memory: float  # bytes per node
    bandwidth: float  # bytes/s per node, effective
    link_bw: float  # bytes/s
    link_latency: float  # s
    context: int  # tokens of MLA cache reserved per node's layers
    overhead: float = 4 * GB  # runtime, activations, scratch buffers


def expected_max_load(experts: int, top_k: int, slices: list[tuple[int, ...]], trials: int = 20000) -> float:
    """E[max over nodes of the routed experts a token picks on that node], uniform routing."""
    rng = np.random.default_rng(0)
    owner = np.empty(experts, np.int64)
    for r, s in enumerate(slices):
        owner[list(s)] = r
    picks = np.argsort(rng.random((trials, experts)), axis=1)[:, :top_k]
    counts = np.zeros((trials, len(slices)), np.int64)
    np.add.at(counts, (np.repeat(np.arange(trials), top_k), owner[picks].ravel()), 1)
    return float(counts.max(axis=1).mean())


def plan(c: Census, hold: Holding, cl: Cluster, stages: int) -> dict:
    """`stages` pipeline stages (layers split evenly), each an expert group of nodes/stages nodes."""
    ep = cl.nodes // stages
    cache_tok = c.cache_values * 4  # float32 MLA cache
    bounds = np.linspace(0, c.layers, stages + 1).round().astype(int)
    slices = split_experts(c.experts, [1.0] * ep, c.shared_size, align=32)
    max_load = expected_max_load(c.experts, c.top_k, [s.experts for s in slices]) if ep > 1 else c.top_k
    stage_rows, t_token = [], 0.0
    for s in range(stages):
        a, b = int(bounds[s]), int(bounds[s + 1])
        n_moe = sum(1 for i in range(a, b) if i >= c.dense_layers)  # DeepSeek: the dense layers come first
        n_dense = (b - a) - n_moe
        replicated = (b - a) * c.attn + n_dense * c.dense_mlp + n_moe * c.router
        replicated += (c.embed if s == 0 else 0) + (c.head if s == stages - 1 else 0)
        mem_w = replicated * hold.dense_bpp + n_moe * (c.shared / ep * hold.dense_bpp + c.experts / ep * c.expert * hold.expert_bpp)
        mem = mem_w + (b - a) * cache_tok * cl.context + cl.overhead
        read = ((b - a) * c.attn + n_dense * c.dense_mlp + n_moe * (c.router + c.shared / ep)) * hold.dense_bpp
        read += n_moe * max_load * c.expert * hold.expert_bpp + (c.head * hold.dense_bpp if s == stages - 1 else 0)
        allreduce = 0.0
        if ep > 1:  # ring all-reduce of one float32 hidden vector per MoE layer
            allreduce = n_moe * 2 * (ep - 1) * (cl.link_latency + c.hidden * 4 / ep / cl.link_bw)
        t_stage = read / cl.bandwidth + allreduce
        t_token += t_stage + (cl.link_latency + c.hidden * 4 / cl.link_bw if s < stages - 1 else 0)
        stage_rows.append(dict(layers=(a, b), memory=mem, experts_per_node=c.experts // ep, read=read, t=t_stage, allreduce=allreduce))
    fits = all(r["memory"] <= cl.memory for r in stage_rows)
    return dict(stages=stages, ep=ep, rows=stage_rows, tps=1.0 / t_token, fits=fits, max_load=max_load)


# ----------------------------------------------------------------------------- report


def report(name: str, cfg: dict, cl: Cluster) -> None:
    c = Census.of(cfg)
    print(f"\n=== {name}  ({cfg['model_type']}, {c.layers} layers: {c.dense_layers} dense + {c.moe_layers} MoE)")
    print(f"  parameters: {c.total / 1e9:,.0f}B total, {c.active / 1e9:,.1f}B active per token "
          f"({c.top_k} of {c.experts} routed experts + {cfg['n_shared_experts']} shared)")
    print(f"  routed experts: {c.moe_layers * c.experts * c.expert / 1e9:,.0f}B params "
          f"({c.expert / 1e6:.1f}M each); attention {c.layers * c.attn / 1e9:.1f}B; embedding+head {(c.embed + c.head) / 1e9:.1f}B")
    print(f"  MLA cache: {c.cache_values} values/token/layer = {c.cache_values * 4 * c.layers / 1024:.0f} KiB/token (float32); "
          f"full K/V would be {2 * cfg['num_attention_heads'] * (cfg['qk_nope_head_dim'] + cfg['qk_rope_head_dim']) * 4 * c.layers / 2**20:.1f} MiB/token")
    best: dict[bool, tuple] = {}  # implemented? -> (holding, plan, kind)
    for hold in HOLDINGS[name]:
        print(f"  holding: {hold.name}{'' if hold.implemented else '  [not implemented yet]'}")
        for stages in sorted({1, 2, cl.nodes}):
            if cl.nodes % stages:
                continue
            p = plan(c, hold, cl, stages)
            kind = "pipeline" if p["ep"] == 1 else ("expert parallel" if stages == 1 else "expert x pipeline")
            mems = ", ".join(f"{r['memory'] / GB:.0f}" for r in p["rows"])
            print(f"    {kind:<18} {stages} stage(s) x {p['ep']} node(s): memory/node GB [{mems}] "
                  f"{'fits' if p['fits'] else 'DOES NOT FIT'}; {p['tps']:.2f} tok/s"
                  + (f" (busiest node {p['max_load']:.2f} of {c.top_k} experts/token)" if p["ep"] > 1 else ""))
            if p["fits"] and (hold.implemented not in best or p["tps"] > best[hold.implemented][1]["tps"]):
                best[hold.implemented] = (hold, p, kind)
    for implemented in (True, False):
        if implemented not in best:
            print(f"  -> {'today' if implemented else 'with the missing converters'}: no plan fits")
            continue
        hold, p, kind = best[implemented]
        print(f"  -> {'today' if implemented else 'with the missing converters'}: {kind}, {p['stages']} stage(s) x "
              f"{p['ep']} node(s), holding '{hold.name}': {p['tps']:.2f} tokens/s")
        for s, r in enumerate(p["rows"]):
            print(f"     stage {s}: layers [{r['layers'][0]}, {r['layers'][1]}), {r['experts_per_node']} routed experts per node, "
                  f"{r['memory'] / GB:.0f} GB per node, reads {r['read'] / GB:.1f} GB per token, "
                  f"{r['t'] * 1e3:.0f} ms per token ({r['allreduce'] * 1e3:.1f} ms all-reduce)")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--memory-gb", type=float, default=512)
    ap.add_argument("--bandwidth-gbs", type=float, default=100.0, help="memory bandwidth of a node")
    ap.add_argument("--efficiency", type=float, default=0.85, help="fraction of it the kernels reach")
    ap.add_argument("--link-gbps", type=float, default=10.0)
    ap.add_argument("--link-latency-ms", type=float, default=0.15)
    ap.add_argument("--context", type=int, default=32768, help="tokens of MLA cache to reserve")
    a = ap.parse_args(argv)
    cl = Cluster(a.nodes, a.memory_gb * GB, a.bandwidth_gbs * GB * a.efficiency, a.link_gbps * 1e9 / 8,
                 a.link_latency_ms / 1e3, a.context)
    print(f"{a.nodes} nodes x {a.memory_gb:.0f} GB, {a.bandwidth_gbs:.0f} GB/s memory ({a.efficiency:.0%} reached), "
          f"{a.link_gbps:.0f} Gb/s links with {a.link_latency_ms} ms latency, {a.context} tokens of context reserved")
    for name in ("kimi-k2", "deepseek-v3"):
        report(name, PUBLISHED[name], cl)


if __name__ == "__main__":
    main()
