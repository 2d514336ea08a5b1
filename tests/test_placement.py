"""The placement planner on invented clusters: pure function in, Placement (or a clear refusal) out."""

from __future__ import annotations

import json
import math

import pytest

from shoal.cluster.messages import NodeProfile
from shoal.cluster.topology import ClusterView, LinkView, NodeView
from shoal.placement.contract import Placement, PlacementError, PlacementRequest
from shoal.placement.planner import apportion, plan, plan_each_strategy
from shoal.placement.spec import ModelSpec

GiB = 2**30


def spec(layers: int = 32, layer_gib: float = 0.25, embed_gib: float = 0.5, kv_heads: int = 8, ffn: int = 14336) -> ModelSpec:
    """An 8B-like model: `layers` layers of `layer_gib` each, an embedding (tied head)."""
    lb = int(layer_gib * GiB)
    return ModelSpec(
        name="m", architecture="llama", num_layers=layers, hidden_size=4096, intermediate_size=ffn, num_heads=32,
        num_kv_heads=kv_heads, head_dim=128, vocab_size=128256, max_context=8192, attn_bytes=lb // 5,
        mlp_bytes=lb - lb // 5 - 32768, norm_bytes=32768, embed_bytes=int(embed_gib * GiB),
        head_bytes=int(embed_gib * GiB), tied=True, quant_group=32,
    )


def node(name: str, mem_gib: float, bw: float = 20.0, gflops: float = 200.0, host: str | None = None, me: bool = False) -> NodeView:
    prof = NodeProfile(os="Linux", hostname=host or name, cpu_model="cpu", cpu_cores_logical=8, cpu_cores_physical=8,
                       ram_total_bytes=64 * GiB, gflops_fp32=gflops, memory_bandwidth_gbps=bw, measured_with="torch",
                       measured_at=0.0, measure_seconds=1.0, fingerprint=host or name)
    nid = (name.encode().hex() + "0" * 32)[:32]
    return NodeView(id=nid, name=name, address=f"10.0.0.{len(name)}:52600", status="up", is_self=me, last_seen_s=0.0,
                    incarnation=1, memory_available_bytes=int(mem_gib * GiB), memory_offered_bytes=int(mem_gib * GiB),
                    profile=prof)


def link(a: NodeView, b: NodeView, rtt_ms: float, mbps: float) -> LinkView:
    return LinkView(a=min(a.id, b.id), b=max(a.id, b.id), rtt_ms=rtt_ms, bandwidth_mbps=mbps, measured_at=0.0, age_s=0.0)


def cluster(nodes: list[NodeView], links: list[LinkView] | None = None, rtt_ms: float = 0.3, mbps: float = 10_000) -> ClusterView:
    links = links or []
    have = {frozenset((lk.a, lk.b)) for lk in links}
    for i, a in enumerate(nodes):
        for b in nodes[i + 1 :]:
            if frozenset((a.id, b.id)) not in have:
                links.append(link(a, b, rtt_ms, mbps))
    return ClusterView(self_id=nodes[0].id, cluster="c", nodes=nodes, links=links)


def layers_of(p: Placement) -> dict[str, int]:
    return {s.node_name: s.layers[1] - s.layers[0] for s in p.shards}


def check_memory(p: Placement, view: ClusterView) -> None:
    for nid, used in p.memory_by_node().items():
        assert used <= view.node(nid).memory_offered_bytes, (nid, used)


def test_fits_on_one_node_over_a_slow_lan_means_single():
    small = spec(layer_gib=0.03, embed_gib=0.1)  # ~1 GiB: 50 ms per token at 20 GB/s
    view = cluster([node("a", 64, me=True), node("b", 64)], rtt_ms=2.0, mbps=1000)
    p = plan(small, view)
    assert p.strategy == "single" and len(p.shards) == 1
    s = p.shards[0]
    assert s.layers == (0, 32) and s.vocab == (0, 128256) and s.memory_bytes < 64 * GiB
    assert p.prediction.decode_tokens_per_s > 0 and p.prediction.ttft_s > 0 and p.reason.startswith("single")
    # On a fast link, two machines reading half the weights each beat one: auto takes the tensor split.
    fast = plan(small, cluster([node("a", 64, me=True), node("b", 64)], rtt_ms=0.02, mbps=40_000))
    assert fast.strategy == "tensor" and fast.prediction.decode_tokens_per_s > p.prediction.decode_tokens_per_s


def test_heterogeneous_memory_caps_each_stage():
    # 9.0 GiB of weights; a: room for ~3 GiB, b: ~6 GiB, c: plenty; equal speeds.
    view = cluster([node("a", 3.6), node("b", 6.6), node("c", 40)])
    p = plan(spec(), view, PlacementRequest(strategy="pipeline", node_count=3, context=1024))
    check_memory(p, view)
    n = layers_of(p)
    assert sum(n.values()) == 32 and n["a"] < n["b"] <= n["c"]
    assert [s.layers for s in p.shards] == sorted(s.layers for s in p.shards)  # contiguous, in stage order
    assert p.shards[0].layers[0] == 0 and p.shards[-1].layers[1] == 32


def test_a_fast_node_with_room_takes_more_layers():
    view = cluster([node("fast", 32, bw=40), node("slow", 32, bw=10)])
    p = plan(spec(), view, PlacementRequest(strategy="pipeline"))
    n = layers_of(p)
    assert n["fast"] > 2 * n["slow"]  # about 4:1 by speed (the entry's head shifts it a little)
    # ...unless it has no room.
    view = cluster([node("fast", 4.5, bw=40), node("slow", 32, bw=10)])
    p = plan(spec(), view, PlacementRequest(strategy="pipeline"))
    check_memory(p, view)
    assert layers_of(p)["fast"] < layers_of(p)["slow"]


def test_uneven_tensor_split_three_kv_heads_over_two():
    m = spec(layers=30, layer_gib=0.01, embed_gib=0.03, kv_heads=3, ffn=1536)
    view = cluster([node("a", 8, me=True), node("b", 8)])
    p = plan(m, view, PlacementRequest(strategy="tensor"))
    assert p.strategy == "tensor" and [s.tp_size for s in p.shards] == [2, 2]
    heads = [s.kv_heads for s in p.shards]
    assert heads in ([(0, 2), (2, 3)], [(0, 1), (1, 3)])
    ffn = [s.ffn for s in p.shards]
    assert ffn[0][0] == 0 and ffn[0][1] == ffn[1][0] and ffn[1][1] == 1536
    assert all(a % 32 == 0 for a, _ in ffn)  # cuts of down_proj on quantization-group boundaries
    # The rank with two KV heads gets fewer MLP columns: both read about the same bytes.
    w = [s.weight_bytes for s in p.shards]
    assert abs(w[0] - w[1]) / max(w) < 0.1
    assert p.shards[0].vocab[0] == 0 and p.shards[0].vocab[1] == p.shards[1].vocab[0]


def test_mlp_of_1536_over_three():
    m = spec(layers=30, layer_gib=0.01, embed_gib=0.03, kv_heads=3, ffn=1536)
    view = cluster([node(x, 8) for x in "abc"])
    p = plan(m, view, PlacementRequest(strategy="tensor", node_count=3))
    assert [s.kv_heads for s in p.shards] == [(0, 1), (1, 2), (2, 3)]
    cuts = [s.ffn for s in p.shards]
    assert cuts[0][0] == 0 and cuts[-1][1] == 1536 and all(a % 32 == 0 for a, _ in cuts)
    assert all(cuts[i][1] == cuts[i + 1][0] for i in range(2))


def test_more_ranks_than_kv_heads_is_refused():
    m = spec(kv_heads=2)
    view = cluster([node(x, 64) for x in "abc"])
    with pytest.raises(PlacementError, match="tensor group needs 2 to 2 nodes"):
        plan(m, view, PlacementRequest(strategy="tensor", node_count=3))


def test_one_slow_link_hybrid_keeps_all_reduces_on_fast_links():
    # Two racks of two: fast inside (0.05 ms, 40 Gbit/s), one slow link between (5 ms, 100 Mbit/s).
    a, b, c, d = (node(x, 3.5) for x in "abcd")  # all four are needed
    fast = [link(a, b, 0.05, 40_000), link(c, d, 0.05, 40_000)]
    slow = [link(x, y, 5.0, 100) for x in (a, b) for y in (c, d)]
    view = cluster([a, b, c, d], fast + slow)
    p = plan(spec(), view, PlacementRequest(strategy="hybrid"))
    groups = [{s.node_name for s in st} for st in p.stages]
    assert sorted(map(sorted, groups)) == [["a", "b"], ["c", "d"]]
    check_memory(p, view)
    # auto on the same cluster: needs all four nodes (memory), and the hybrid beats tensor over the slow link.
    best = plan(spec(), view)
    assert best.strategy in ("hybrid", "pipeline")
    t = plan(spec(), view, PlacementRequest(strategy="tensor", node_count=4))
    assert t.prediction.decode_tokens_per_s < best.prediction.decode_tokens_per_s


def test_a_node_too_small_to_be_useful_is_left_out():
    view = cluster([node("big1", 6), node("big2", 6), node("tiny", 0.3)])
    p = plan(spec(), view)
    assert "tiny" not in {s.node_name for s in p.shards}
    with pytest.raises(PlacementError, match="tiny cannot hold even one layer") as e:
        plan(spec(), view, PlacementRequest(strategy="pipeline", nodes=["big1", "big2", "tiny"]))
    assert e.value.missing_bytes > 0


def test_a_cluster_too_small_is_refused_with_the_missing_bytes():
    m = spec()  # ~8.5 GiB of weights
    view = cluster([node("a", 3), node("b", 3)])
    with pytest.raises(PlacementError) as e:
        plan(m, view, PlacementRequest(context=1024))
    need = m.weight_bytes + m.num_layers * m.kv_bytes_per_token_layer * 1024
    assert "missing" in str(e.value) and "cannot place m" in str(e.value)
    assert e.value.missing_bytes >= need - 6 * GiB
    assert e.value.missing_bytes < need  # not just "everything"


def test_reservations_are_subtracted():
    m = spec(layer_gib=0.1, embed_gib=0.2)  # 3.4 GiB
    view = cluster([node("a", 5, me=True), node("b", 5)], rtt_ms=10.0, mbps=1000)  # slow link: no tensor split
    p = plan(m, view)
    assert p.strategy == "single" and p.shards[0].node_name == "a"
    p = plan(m, view, reserved={node("a", 0).id: 3 * GiB})
    assert p.strategy == "single" and p.shards[0].node_name == "b"
    p = plan(m, view, reserved={node("a", 0).id: 2 * GiB, node("b", 0).id: 2 * GiB})
    assert len(p.shards) == 2
    with pytest.raises(PlacementError):
        plan(m, view, reserved={node("a", 0).id: 4 * GiB, node("b", 0).id: 4 * GiB})


def test_named_nodes_keep_their_order_and_unknown_ones_are_refused():
    view = cluster([node("a", 64, me=True), node("b", 64), node("c", 64)])
    p = plan(spec(), view, PlacementRequest(strategy="pipeline", nodes=["c", "a"]))
    assert [s.node_name for s in p.shards] == ["c", "a"] and p.shards[0].vocab is not None
    with pytest.raises(PlacementError, match="unknown node 'zz'"):
        plan(spec(), view, PlacementRequest(nodes=["zz"]))


def test_colocated_nodes_share_a_machine():
    # Two nodes on one machine: a tensor group there gains nothing; threads are split between them.
    view = cluster([node("a", 32, host="box", me=True), node("b", 32, host="box")])
    t = plan(spec(), view, PlacementRequest(strategy="tensor"))
    single = plan(spec(), view, PlacementRequest(node_count=1))
    assert t.prediction.decode_tokens_per_s < single.prediction.decode_tokens_per_s
    assert [s.threads for s in t.shards] == [4, 4]
    pipe = plan(spec(), view, PlacementRequest(strategy="pipeline"))
    assert [s.threads for s in pipe.shards] == [8, 8]  # stages take turns: each may use every core


def test_preview_of_each_strategy():
    view = cluster([node("a", 6, me=True), node("b", 6), node("c", 6)])
    out = plan_each_strategy(spec(kv_heads=8), view)
    assert set(out) == {"auto", "pipeline", "tensor", "hybrid"}
    assert all(isinstance(v, Placement) for v in out.values())
    assert out["auto"].prediction.decode_tokens_per_s >= max(v.prediction.decode_tokens_per_s for v in out.values()) - 1e-9


@pytest.mark.parametrize("total,weights,unit", [(1536, [1, 1, 1], 32), (3, [2, 1], 1), (100, [5, 1, 1], 1), (96, [1, 1], 32)])
def test_apportion(total, weights, unit):
    parts = apportion(total, weights, unit)
    assert sum(parts) == total and all(p >= unit for p in parts)
    assert all(p % unit == 0 for p in parts[:-1])


# -- mixture of experts ---------------------------------------------------------------------------------
def test_moe_census_counts_every_parameter_of_a_checkpoint(tmp_path):
    from safetensors import safe_open

    from shoal.synthetic import make_checkpoint

    for kind in ("kimi-k2", "deepseek-v3", "qwen3-moe", "mixtral"):
        path = make_checkpoint(kind, tmp_path / kind, experts=8, layers=3, fmt="fp32")
        with safe_open(path / "model.safetensors", framework="pt") as st:
            stored = sum(math.prod(st.get_slice(n).get_shape()) for n in st.keys())
        s = ModelSpec.from_checkpoint(path)
        assert s.moe is not None and s.moe.total_params == stored, kind
        # fp32 on disk and in memory: the planner's bytes are the file's bytes (to a router bias or so)
        assert abs(s.weight_bytes - 4 * stored) <= 0.02 * 4 * stored, kind
        if kind in ("kimi-k2", "deepseek-v3"):  # MLA: the latent and the rope key per token per layer
            cfg = json.loads((path / "config.json").read_text())
            assert s.kv_bytes_per_token_layer == 4 * (cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"])


def _kimi(dense_bpp: float = 1.125):
    from shoal.placement.spec import moe_spec
    from shoal.synthetic import PUBLISHED

    return moe_spec(PUBLISHED["kimi-k2"], "kimi-k2", dense_bpp, 0.75, 32)


def test_moe_expert_parallel_places_experts_by_speed_and_memory():
    kimi = _kimi()
    assert 1.0e12 < kimi.moe.total_params < 1.1e12 and 3.0e10 < kimi.moe.active_params < 3.4e10
    view = cluster([node(f"n{i}", 512, bw=400) for i in range(4)])
    p = plan(kimi, view, PlacementRequest(strategy="expert", node_count=4, context=8192))
    check_memory(p, view)
    runs = [s.experts for s in p.shards]
    assert runs[0][0] == 0 and runs[-1][1] == 384 and all(runs[i][1] == runs[i + 1][0] for i in range(3))
    assert all(s.layers == (0, 61) for s in p.shards)  # one expert group: every rank runs every layer
    assert [s.shared for s in p.shards][-1][1] == 2048  # the shared expert's columns are split too
    # A faster node takes more experts; a node with little room takes fewer.
    view = cluster([node("fast", 512, bw=800), node("b", 512, bw=400), node("small", 150, bw=400)])
    p = plan(kimi, view, PlacementRequest(strategy="expert", node_count=3, context=8192))
    check_memory(p, view)
    n = {s.node_name: s.experts[1] - s.experts[0] for s in p.shards}
    assert n["fast"] > n["b"] > n["small"], n
    # Decode reads only the picked experts: far faster than the bytes held would suggest.
    held = max(s.weight_bytes for s in p.shards)
    assert p.prediction.decode_tokens_per_s > 3 * 0.38 * 400e9 / held


def test_moe_strategies_and_refusals():
    kimi = _kimi()
    view = cluster([node(f"n{i}", 512, bw=400) for i in range(4)])
    every = plan_each_strategy(kimi, view, PlacementRequest(context=8192))
    assert set(every) == {"auto", "pipeline", "tensor", "expert", "hybrid"}
    assert every["auto"].strategy in ("expert", "hybrid", "pipeline", "tensor")
    hybrid = every["hybrid"]
    assert any(len(st) > 1 for st in hybrid.stages) and len(hybrid.stages) > 1  # expert groups as stages
    tensor = every["tensor"]  # inside the MoE: every rank its heads and every expert's columns
    assert all(s.expert_cols is not None and s.experts == (0, kimi.moe.num_experts) for s in tensor.shards)
    with pytest.raises(PlacementError, match="for mixture-of-experts"):
        plan(spec(), view, PlacementRequest(strategy="expert"))
    # Too big: the refusal says how much is missing.
    with pytest.raises(PlacementError, match="missing") as e:
        plan(_kimi(dense_bpp=4.0), cluster([node(f"n{i}", 128) for i in range(4)]), PlacementRequest(context=8192))
    assert e.value.missing_bytes > 200 * GiB


def probed(name: str, read_gbps: float, overhead_us: float, **kw) -> NodeView:
    """A node whose profile carries the engine's measured decode figures (engine/probe.py)."""
    n = node(name, 64, **kw)
    assert n.profile is not None
    return n.model_copy(update={"profile": n.profile.model_copy(update={"q4_read_gbps": read_gbps,
                                                                         "layer_overhead_us": overhead_us})})


def test_measured_decode_speed_prices_the_layers():
    """A node's measured 4-bit read rate and per-layer cost, not its copy bandwidth, price its layers:
    the prediction moves with them, and a pipeline gives the faster reader more layers."""
    from shoal.placement.cost import CALIBRATION

    m = spec()
    slow = plan(m, cluster([probed("a", 10.0, 100.0, me=True)]))
    fast = plan(m, cluster([probed("a", 20.0, 100.0, me=True)]))
    lean = plan(m, cluster([probed("a", 10.0, 20.0, me=True)]))
    # Twice the read rate halves the weight-reading part of a step; less fixed cost per layer saves
    # exactly that cost on every layer.
    per_layer_read = (m.attn_bytes + m.mlp_bytes + m.norm_bytes) / 10e9
    saved = slow.prediction.step_s - fast.prediction.step_s
    assert saved == pytest.approx(m.num_layers * per_layer_read / 2 + (m.head_bytes / 10e9) / 2, rel=0.05)
    assert slow.prediction.step_s - lean.prediction.step_s == pytest.approx(
        m.num_layers * 80e-6 * CALIBRATION.probe_overhead_scale, rel=1e-6)
    # Same copy bandwidth everywhere, but b's kernels read 3x faster: b takes most layers.
    view = cluster([probed("a", 8.0, 100.0, me=True), probed("b", 24.0, 100.0)], rtt_ms=0.2)
    p = plan(m, view, PlacementRequest(strategy="pipeline", node_count=2))
    n = layers_of(p)
    assert n["b"] >= 2 * n["a"], n


def test_probe_measures_this_machine():
    """The probe runs the engine's kernels for real: a positive per-layer cost and read rate, and
    the bytes of the wide layer it times are what its shapes say (4-bit codes + two float32 per 32)."""
    from shoal.engine.probe import WIDE, measure

    got = measure(budget_s=1.5)
    H, F = WIDE["hidden_size"], WIDE["intermediate_size"]
    kv = WIDE["num_key_value_heads"] * H // WIDE["num_attention_heads"]
    params = H * H * 2 + 2 * kv * H + 3 * H * F
    assert got["q4_layer_bytes"] == params // 2 + params // 32 * 8
    # What the probe returns, not how fast this machine is: a busy machine gives other figures
    # (the per-layer cost is a difference of two timings, floored at 1 µs), but always usable ones.
    assert math.isfinite(got["layer_overhead_us"]) and got["layer_overhead_us"] >= 1.0
    assert math.isfinite(got["q4_read_gbps"]) and got["q4_read_gbps"] > 0.0
    assert math.isfinite(got["spread"]) and got["spread"] >= 0.0  # the worst round / the best - 1


# -- profiles that can be trusted -----------------------------------------------------------------------
def _measured_here() -> NodeProfile:
    """A profile of this machine as measured (fingerprint included), without the decode probe's
    child process; marked reliable whatever the machine was doing, for the cache tests below."""
    from shoal.cluster.profile import measure_profile

    return measure_profile(budget_s=0.5, decode_budget_s=None).model_copy(update={"reliable": True})


def test_a_profile_with_absurd_figures_is_not_cached_and_measured_again(tmp_path):
    """Figures no machine gives (the issue's 128 ms per layer, a read rate of a few MB/s, a NaN) are
    named; such a profile is used for the run but never written, so the next start measures again;
    and a cache holding one, or one marked unreliable, is ignored."""
    from shoal.cluster.profile import implausible, load_cached, load_or_measure, untrusted, write_cache

    good = _measured_here()
    absurd = good.model_copy(update={"layer_overhead_us": 128_000.0, "q4_read_gbps": 0.003})
    assert untrusted(good) == []
    assert [w.split()[0] for w in implausible(absurd)] == ["q4_read_gbps", "layer_overhead_us"]
    assert [w.split()[0] for w in implausible(good.model_copy(update={"memory_bandwidth_gbps": math.nan}))] == [
        "memory_bandwidth_gbps"]

    path = tmp_path / "profile.json"
    measured: list[NodeProfile] = []

    def measure(budget_s: float) -> NodeProfile:
        measured.append(absurd)
        return absurd

    for start in (1, 2):  # two node starts: each measures, neither caches
        prof, cached = load_or_measure(path, measure=measure)
        assert (prof, cached, len(measured)) == (absurd, False, start)
        assert not path.exists()

    write_cache(path, good)
    assert load_cached(path) == good
    for bad in (absurd, good.model_copy(update={"reliable": False})):
        write_cache(path, bad)  # as an older version, or a hand, might have left it
        assert load_cached(path) is None
    prof, cached = load_or_measure(path, measure=measure)
    assert (prof, cached, len(measured)) == (absurd, False, 3)


def test_a_profile_measured_while_other_processes_load_the_cpu_is_not_cached(tmp_path):
    """Busy loops on every core: the load meter sees them, the profile measured meanwhile is marked
    unreliable and not cached, and the next start (the loops gone) measures again. What the detection
    returns for the load made here is checked, not how fast anything ran."""
    import os
    import subprocess
    import sys
    import time

    import psutil

    from shoal.cluster.profile import busy_limit, load_or_measure, measure_profile, other_load

    path = tmp_path / "profile.json"
    cores = psutil.cpu_count(logical=True) or 1

    def measure(budget_s: float) -> NodeProfile:
        return measure_profile(budget_s, decode_budget_s=None)  # the load check, without the probe's child

    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
    try:
        # Until every loop is spinning (past the interpreter's start), whatever the machine's speed.
        deadline = time.monotonic() + 60
        while min(psutil.Process(p.pid).cpu_times().user for p in loops) < 0.2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert other_load(0.5) > busy_limit(cores)
        prof, cached = load_or_measure(path, 1.0, measure=measure)
    finally:
        for p in loops:
            p.kill()
        for p in loops:
            p.wait()
    assert not cached and not prof.reliable
    assert not path.exists()
    again, cached = load_or_measure(path, 1.0, measure=measure)
    assert not cached and again.measured_at > prof.measured_at


# -- measured decode speeds feed back into the plans ------------------------------------------------------
def test_a_measured_decode_corrects_the_next_plan_for_that_node(tmp_path):
    """A single-node instance that decoded at 60% of its prediction: the correction it gives makes
    the next plan on that node predict what was measured; measuring that again changes nothing (the
    plan says which correction it was priced with, so corrections do not compound); it is bounded,
    learned from one node's placements only, and kept in <home> for the profile it was learned on."""
    from shoal.placement.cost import CORRECTION_BOUNDS
    from shoal.placement.feedback import DecodeFeedback, target_correction

    m = spec()
    a = probed("a", 10.0, 100.0, me=True)
    first = plan(m, cluster([a]))
    assert first.strategy == "single" and first.shards[0].decode_correction == 1.0
    measured = 0.6 * first.prediction.decode_tokens_per_s
    target = target_correction(first, a.id, measured)
    assert target is not None and target < 0.6  # the entry's fixed per-step cost is not the node's speed

    fb = DecodeFeedback(tmp_path / "decode_correction.json")
    assert a.profile is not None
    c = fb.add(a.profile, target)
    assert c == pytest.approx(target)
    corrected = a.model_copy(update={"profile": a.profile.model_copy(update={"decode_correction": c})})
    second = plan(m, cluster([corrected]))
    assert second.prediction.decode_tokens_per_s == pytest.approx(measured, rel=1e-3)
    assert second.shards[0].decode_correction == c and "measured decodes" in second.reason
    assert target_correction(second, a.id, measured) == pytest.approx(c, rel=1e-3)

    # Bounded both ways; only a placement held whole by the node teaches it anything.
    assert target_correction(first, a.id, 1e6 * measured) == CORRECTION_BOUNDS[1]
    assert target_correction(first, a.id, 1e-6 * measured) == CORRECTION_BOUNDS[0]
    two = cluster([a, probed("b", 10.0, 100.0)], rtt_ms=0.2)
    pipe = plan(m, two, PlacementRequest(strategy="pipeline", node_count=2))
    assert target_correction(pipe, a.id, measured) is None
    assert target_correction(first, "another node", measured) is None

    # Kept for the next start of the same profile; a profile measured again starts from 1.
    assert DecodeFeedback(tmp_path / "decode_correction.json").load(a.profile) == pytest.approx(c)
    remeasured = a.profile.model_copy(update={"measured_at": a.profile.measured_at + 60})
    assert DecodeFeedback(tmp_path / "decode_correction.json").load(remeasured) == 1.0
    # The median of the last few: one odd request does not swing the next plan.
    assert fb.add(a.profile, CORRECTION_BOUNDS[1]) == pytest.approx((c + CORRECTION_BOUNDS[1]) / 2)
    assert fb.add(a.profile, target) == pytest.approx(c)


def test_a_node_learns_its_decode_speed_from_the_instance_it_runs(launcher):
    """For real: a node runs the bundled model alone, a request decodes 40 tokens, and the node's
    profile now carries the correction that makes its next plan predict the measured speed (the
    relation between what was measured and what is predicted, not how fast this machine is)."""
    import urllib.request

    from conftest import wait_for

    from shoal.catalog import CATALOG, DEFAULT_MODEL, bundled_path
    from shoal.placement.cost import CORRECTION_BOUNDS

    if bundled_path(CATALOG[DEFAULT_MODEL]) is None:
        pytest.skip("the bundled model is not installed")

    def call(method: str, path: str, body: dict | None = None) -> tuple[int, str]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(a.url + path, data=data, method=method, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, r.read().decode()

    a = launcher.start("a")
    status, out = call("POST", "/v1/instances", {"model": DEFAULT_MODEL, "context": 256})
    assert status == 202, out
    inst = json.loads(out)["instance"]
    assert inst["strategy"] == "single"
    predicted = inst["prediction"]["decode_tokens_per_s"]

    def ready() -> bool:
        listed = json.loads(call("GET", "/v1/instances")[1])["instances"]
        return next(i for i in listed if i["id"] == inst["id"])["status"] == "ready"

    wait_for(ready, 240, interval_s=0.3, what="the instance ready")
    _, out = call("POST", f"/v1/instances/{inst['id']}/generate",
                  {"prompt_ids": [504, 3575, 282], "params": {"max_tokens": 40, "ignore_eos": True}})
    stats = json.loads(out.splitlines()[-1])["stats"]
    assert stats["generation_tokens"] == 40

    def correction() -> float:
        me = next(n for n in a.cluster()["nodes"] if n["is_self"])
        return me["profile"]["decode_correction"]

    wait_for(lambda: correction() != 1.0, 10, what="the node's decode correction")
    c = correction()
    kept = json.loads((a.home / "decode_correction.json").read_text())
    assert kept["targets"] == [c]
    _, out = call("GET", f"/v1/placement?model={DEFAULT_MODEL}&context=256")
    again = json.loads(out)["plans"]["auto"]
    assert again["strategy"] == "single" and again["shards"][0]["decode_correction"] == c
    now = again["prediction"]["decode_tokens_per_s"]
    if CORRECTION_BOUNDS[0] < c < CORRECTION_BOUNDS[1]:
        assert now == pytest.approx(stats["decode_tps"], rel=0.02), (predicted, stats["decode_tps"], c)
    else:  # a measurement beyond the bounds moves the prediction only part of the way
        assert min(predicted, stats["decode_tps"]) <= now <= max(predicted, stats["decode_tps"])


# -- nodes that compute on a card ------------------------------------------------------------------
def carded(name: str, card_gib: float, card_gbs: float, ram_gib: float = 32, me: bool = False) -> NodeView:
    """A node started with `--device cuda` on a machine with one card (its profile as such a node's)."""
    from shoal.cluster.messages import Accelerator

    n = node(name, ram_gib, me=me)
    assert n.profile is not None
    card = Accelerator(kind="cuda", name="GeForce RTX 4090", memory_total_bytes=int(card_gib * GiB), gflops_fp32=80_000.0,
                       memory_bandwidth_gbps=card_gbs)
    return n.model_copy(update={"profile": n.profile.model_copy(update={"accelerators": [card], "device": "cuda"})})


def test_a_node_with_a_24gb_card_takes_the_layers_and_is_priced_by_its_card():
    from shoal.placement.cost import CALIBRATION as cal

    m = spec()  # 8B-like: 8.5 GiB as the CPU engine holds its 4.5-bit weights; ~2x that in bf16 on a card
    cpu, gpu = node("cpu", 64, me=True), carded("gpu", 24, 1000)
    p = plan(m, cluster([cpu, gpu]))
    assert p.strategy == "single" and [s.node_name for s in p.shards] == ["gpu"] and p.shards[0].device == "cuda"
    # Priced by the card: weights read at its bandwidth (as bf16), not at the CPU's 20 GB/s.
    per_param = m.embed_bytes / (m.vocab_size * m.hidden_size)
    read_s = m.weight_bytes * 2 / per_param / (1000e9 * cal.gpu_read_efficiency)
    assert p.prediction.step_s == pytest.approx(read_s + m.num_layers * cal.gpu_layer_overhead_s, rel=0.1)
    alone = plan(m, cluster([node("cpu", 64, me=True)]))
    assert p.prediction.decode_tokens_per_s > 5 * alone.prediction.decode_tokens_per_s
    # A model too big for the card: a pipeline with most layers on the card, the rest on the CPU node.
    big = spec(layers=48)
    q = plan(big, cluster([cpu, gpu]))
    n = layers_of(q)
    assert q.strategy == "pipeline" and n["gpu"] > 3 * n["cpu"] and sum(n.values()) == 48, n
    card_bytes = sum(s.weight_bytes for s in q.shards if s.node_name == "gpu") * 2 / per_param
    assert card_bytes <= 24 * GiB * 0.9  # what the card holds, in bf16, fits in it
    # Nothing fits: refused, saying what is missing.
    with pytest.raises(PlacementError, match="GiB"):
        plan(spec(layers=400), cluster([carded("gpu", 24, 1000, me=True)]))


# -- planner against published clusters (placement/cluster_spec.py) -------------------------------------
# exo's published decode tokens/s on 1, 2 and 4 M3 Ultra Mac Studios (512 GB, ~800 GB/s), tensor
# parallel over Thunderbolt 5 RDMA (~5 us, ~75 Gbit/s); TCP over the same cable: ~300 us.
EXO = {"qwen3-235b-a22b-4bit": {1: 19.5, 2: 26.2, 4: 31.9}, "deepseek-v3.1-4bit": {1: 21.1, 2: 27.8, 4: 32.5}}


def studios(n: int, kind: str = "rdma", device: str = "mlx") -> dict:
    names = [f"s{i + 1}" for i in range(n)]
    latency, gbps = (5, 75) if kind == "rdma" else (300, 40)
    return {"nodes": [{"name": x, "device": device, "memory_gb": 512, "bandwidth_gbs": 800, "tflops": 28} for x in names],
            "links": [{"a": a, "b": b, "kind": kind, "latency_us": latency, "bandwidth_gbps": gbps}
                      for i, a in enumerate(names) for b in names[i + 1 :]]}


def test_a_cluster_spec_becomes_the_view_a_node_would_see():
    from shoal.placement.cluster_spec import cluster_view, parse_cluster_spec

    view = cluster_view(parse_cluster_spec({**studios(2), "future_field": 1}))
    s1, s2 = view.nodes
    assert (s1.name, s1.profile.device, s1.memory_offered_bytes) == ("s1", "mlx", 512 * GiB) and s1.is_self
    lk = view.link(s1.id, s2.id)
    assert lk.kind == "rdma" and lk.rtt_ms == pytest.approx(0.010) and lk.bandwidth_mbps == 75_000
    cuda = cluster_view(parse_cluster_spec({"nodes": [{"name": "g", "device": "cuda", "memory_gb": 80, "bandwidth_gbs": 3350}]}))
    assert cuda.nodes[0].profile.accelerators[0].memory_bandwidth_gbps == 3350


@pytest.mark.parametrize("data, message", [
    ([], "Input should be a valid dictionary"),
    ({"nodes": []}, "nodes: List should have at least 1 item"),
    ({"nodes": [{"name": "a", "device": "tpu", "memory_gb": 1, "bandwidth_gbs": 1}]}, "nodes[0].device: Input should be 'cpu', 'cuda' or 'mlx'"),
    ({"nodes": [{"name": "a", "device": "mlx", "memory_gb": -1, "bandwidth_gbs": 1}]}, "nodes[0].memory_gb: Input should be greater than 0"),
    ({"nodes": [{"name": "a", "device": "mlx", "memory_gb": 1}]}, "nodes[0].bandwidth_gbs: Field required"),
    ({**studios(2), "links": [{"a": "s1", "b": "s9", "latency_us": 5, "bandwidth_gbps": 1}]}, "links[0] names unknown node 's9'"),
    ({**studios(2), "links": [{"a": "s1", "b": "s2", "kind": "udp", "latency_us": 5, "bandwidth_gbps": 1}]}, "links[0].kind: Input should be 'tcp' or 'rdma'"),
    ({"nodes": studios(2)["nodes"] * 2}, "node name 's1' is used twice"),
])
def test_a_bad_cluster_spec_is_refused_in_one_line(data, message):
    from shoal.placement.cluster_spec import ClusterSpecError, parse_cluster_spec

    with pytest.raises(ClusterSpecError) as e:
        parse_cluster_spec(data)
    assert str(e.value) == message or str(e.value).startswith(message), str(e.value)
    assert "\n" not in str(e.value)


def test_cluster_spec_file_errors_and_the_cli_json(tmp_path, capsys):
    import argparse

    from shoal.daemon.cli import add_place_arguments, run_place
    from shoal.placement.cluster_spec import ClusterSpecError, load_cluster_spec

    bad = tmp_path / "bad.json"
    bad.write_text("{nodes: 1}")
    with pytest.raises(ClusterSpecError, match="is not JSON"):
        load_cluster_spec(bad)
    good = tmp_path / "studios.json"
    good.write_text(json.dumps(studios(2)))
    ap = argparse.ArgumentParser()
    add_place_arguments(ap)
    assert run_place(ap.parse_args(["deepseek-v3.1-4bit", "--dry-run", "--json", "--cluster-spec", str(good)])) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["plans"]["auto"]["strategy"] == "tensor" and out["plans"]["auto"]["prediction"]["decode_tokens_per_s"] > 20
    assert set(out["plans"]) == {"auto", "pipeline", "tensor", "expert", "hybrid"}
    # --weights q8: a bf16 model's matrices (and Kimi-K2-Thinking's bf16 dense part) priced at 8 bits.
    for model, below in (("llama-3.1-70b", 0.6), ("kimi-k2-thinking", 0.99)):  # Kimi: ~10 GB of its 784
        held = {}
        for weights in ("stored", "q8"):
            assert run_place(ap.parse_args([model, "--dry-run", "--json", "--cluster-spec", str(good), "--weights", weights])) == 0
            plan_ = json.loads(capsys.readouterr().out)["plans"]["pipeline"]
            assert plan_["weights"] == weights
            held[weights] = sum(s["weight_bytes"] for s in plan_["shards"])
        assert held["q8"] < below * held["stored"], (model, held)
    assert run_place(ap.parse_args(["deepseek-v3.1-4bit", "--cluster-spec", str(good)])) == 2  # needs --dry-run
    assert run_place(ap.parse_args(["deepseek-v3.1-4bit", "--dry-run", "--cluster-spec", str(bad)])) == 2
    assert "is not JSON" in capsys.readouterr().err


def _preview(model: str, n: int, kind: str = "rdma") -> dict:
    from shoal.placement.cluster_spec import dry_run, parse_cluster_spec

    return dry_run(model, parse_cluster_spec(studios(n, kind)))["plans"]


@pytest.mark.parametrize("model, n", [(m, n) for m in EXO for n in (1, 2, 4)])
def test_the_dry_run_predicts_exo_published_decode_within_20_percent(model, n):
    best = _preview(model, n)["auto"]
    predicted, published = best["prediction"]["decode_tokens_per_s"], EXO[model][n]
    assert abs(predicted / published - 1) <= 0.20, (model, n, predicted, published)
    # Tensor parallel over RDMA is what pays on 2 and 4 nodes, over all of them.
    assert best["strategy"] == ("single" if n == 1 else "tensor") and len(best["shards"]) == n
    assert "priced only" not in best["reason"]  # the engine runs it for both families


@pytest.mark.parametrize("model", list(EXO))
def test_over_tcp_tensor_does_not_pay_and_no_pipeline_beats_one_whole_node(model):
    one = _preview(model, 1)["auto"]["prediction"]["decode_tokens_per_s"]
    for n in (2, 4):
        for kind in ("rdma", "tcp"):
            plans = _preview(model, n, kind)
            assert plans["pipeline"]["prediction"]["decode_tokens_per_s"] <= one
        tcp, rdma = _preview(model, n, "tcp"), _preview(model, n, "rdma")
        # ~300 us per all-reduce, two per layer: tensor over TCP is slower than one node alone.
        assert tcp["tensor"]["prediction"]["decode_tokens_per_s"] < one < rdma["tensor"]["prediction"]["decode_tokens_per_s"]
        assert tcp["auto"]["strategy"] == "single"


def test_a_real_placement_chooses_tensor_inside_an_moe_only_where_the_engine_runs_it():
    from shoal.catalog import CATALOG
    from shoal.placement.cluster_spec import cluster_view, parse_cluster_spec

    # CPU nodes: the numba engine runs these groups (an MLX node holds whole stages of an MoE).
    view = cluster_view(parse_cluster_spec(studios(4, device="cpu")))
    for model in ("qwen3-235b-a22b-4bit", "deepseek-v3.1-4bit"):  # models/mixtral.py and deepseek.py run it
        spec = ModelSpec.from_catalog(CATALOG[model])
        p = plan(spec, view)
        assert p.strategy == "tensor" and "priced only" not in p.reason, model
        assert all(s.expert_cols is not None and s.experts == (0, spec.moe.num_experts) for s in p.shards)
    # A family the engine does not split so: priced for a dry run only, never placed.
    other = ModelSpec.from_catalog(CATALOG["qwen3-235b-a22b-4bit"]).model_copy(update={"architecture": "some_moe"})
    assert plan(other, view).strategy != "tensor" and "tensor" not in plan_each_strategy(other, view)
    with pytest.raises(PlacementError, match="use strategy expert"):
        plan(other, view, PlacementRequest(strategy="tensor"))
    dry = plan(other, view, hypothetical=True)
    assert dry.strategy == "tensor" and "priced only" in dry.reason
    # The same Macs as a live cluster: their MLX ranks join the tensor group inside the MoE too.
    macs = cluster_view(parse_cluster_spec(studios(4)))
    assert plan(ModelSpec.from_catalog(CATALOG["deepseek-v3.1-4bit"]), macs).strategy == "tensor"


def test_link_kinds_are_priced_differently():
    from shoal.cluster.messages import LinkRecord
    from shoal.placement.cost import CALIBRATION as cal
    from shoal.placement.cost import Link, allreduce_time, message_time

    tcp, rdma = Link(10e-6, 9.4e9, "tcp"), Link(10e-6, 9.4e9, "rdma")
    assert message_time(rdma, 8192) == pytest.approx(cal.rdma_message_overhead_s + 5e-6 + 8192 / 9.4e9)
    assert message_time(tcp, 8192) - message_time(rdma, 8192) == pytest.approx(cal.message_overhead_s - cal.rdma_message_overhead_s)
    assert allreduce_time([rdma] * 3, 4, 16384) < allreduce_time([tcp] * 3, 4, 16384) / 10
    # A link record from a peer that predates link kinds reads as TCP.
    old = LinkRecord.model_validate({"a": "0" * 32, "b": "1" * 32, "rtt_ms": 0.3, "measured_at": 0.0})
    assert old.kind == "tcp"


def test_mlx_nodes_hold_weights_as_stored_and_read_at_their_gpu_bandwidth():
    from shoal.catalog import CATALOG
    from shoal.placement.cluster_spec import cluster_view, parse_cluster_spec
    from shoal.placement.cost import CALIBRATION as cal
    from shoal.placement.cost import held_as, node_resources

    m = ModelSpec.from_catalog(CATALOG["deepseek-v3.1-4bit"])
    assert m.stored_bytes < m.weight_bytes  # bf16 scales as stored, float32 as the CPU engine holds them
    (mlx,) = node_resources(cluster_view(parse_cluster_spec(studios(1))))
    assert mlx.read_Bps == pytest.approx(800e9 * cal.mlx_read_efficiency) and mlx.device == "mlx" and not mlx.on_card
    (held,) = held_as([mlx], m)
    assert held.free_bytes == pytest.approx(mlx.free_bytes * m.weight_bytes / m.stored_bytes, rel=1e-3)
    kimi = ModelSpec.from_catalog(CATALOG["kimi-k2-thinking"])
    assert kimi.moe.num_experts == 384 and kimi.stored_bytes / kimi.weight_bytes < 0.8  # bf16 dense part, not float32


def test_mlx_nodes_join_the_groups_of_the_families_their_backend_cuts():
    """On a live cluster an MLX node joins tensor and expert groups of the families whose layers its
    backend cuts (engine/mlx_backend.py); of any other family it holds whole stages only, since its
    runner would refuse a group's share: those plans group the other nodes, and asking for a group
    of MLX nodes says why."""

    def mlx(name: str) -> NodeView:
        n = node(name, 512, bw=400)
        return n.model_copy(update={"profile": n.profile.model_copy(update={"device": "mlx"})})

    view = cluster([mlx("m1"), mlx("m2"), node("c1", 512, bw=400), node("c2", 512, bw=400)])
    dense = plan(spec(), view, PlacementRequest(strategy="tensor", nodes=["m1", "c1"]))
    assert [s.node_name for s in dense.shards] == ["m1", "c1"] and dense.shards[0].device == "mlx"
    for strategy in ("tensor", "expert"):
        macs = plan(_kimi(), view, PlacementRequest(strategy=strategy, nodes=["m1", "m2"], context=8192))
        assert [s.device for s in macs.shards] == ["mlx", "mlx"]
    other = spec().model_copy(update={"architecture": "phi3"})
    every = plan_each_strategy(other, view, PlacementRequest())
    for p in (every["tensor"], every["hybrid"]):
        assert any(len(st) > 1 for st in p.stages)  # the CPU nodes still make groups
        assert all(len(st) == 1 or all(s.device != "mlx" for s in st) for st in p.stages), (p.strategy, p.stages)
    with pytest.raises(PlacementError, match="MLX node joins the groups of llama"):
        plan(other, view, PlacementRequest(strategy="tensor", nodes=["m1", "m2"]))


def test_a_group_sums_on_mlx_ring_only_where_every_node_offers_it():
    """`collective` mlx-ring: a group placed only on nodes whose profile offers MLX's ring (an MLX
    node does), and asking for it with a node that does not says why."""

    def mac(name: str, *offers: str) -> NodeView:
        n = node(name, 512, bw=400)
        return n.model_copy(update={"profile": n.profile.model_copy(update={"device": "mlx", "collectives": list(offers)})})

    view = cluster([mac("m1", "mlx-ring"), mac("m2", "mlx-ring"), mac("m3"), node("c1", 512, bw=400)])
    ring = plan(spec(), view, PlacementRequest(strategy="tensor", nodes=["m1", "m2"], collective="mlx-ring"))
    assert ring.collective == "mlx-ring" and [s.node_name for s in ring.shards] == ["m1", "m2"]
    for nodes in (["m1", "c1"], ["m1", "m3"]):
        with pytest.raises(PlacementError, match="collective mlx-ring: every node of a group must offer it"):
            plan(spec(), view, PlacementRequest(strategy="tensor", nodes=nodes, collective="mlx-ring"))
    auto = plan(spec(), view, PlacementRequest(collective="mlx-ring"))
    assert all(len(st) == 1 or {s.node_name for s in st} <= {"m1", "m2"} for st in auto.stages)


def test_bf16_parts_are_priced_as_held_two_bytes_a_parameter():
    """The engine holds bf16 matrices as stored (quant/linear.BF16Linear): Kimi-K2-Thinking's bf16
    dense part (attention, shared experts, embedding, head) at 2 bytes a parameter beside its INT4
    experts, and a bf16 dense model at 2 bytes a parameter."""
    from shoal.catalog import CATALOG
    from shoal.placement.spec import Q4_BYTES_PER_PARAM, moe_census

    kimi = ModelSpec.from_catalog(CATALOG["kimi-k2-thinking"])
    census = moe_census(dict(CATALOG["kimi-k2-thinking"].config))
    assert kimi.attn_bytes == int(census["attn"] * 2) and kimi.embed_bytes == int(census["embed"] * 2)
    assert kimi.moe.shared_bytes == int(census["shared"] * 2)
    assert kimi.moe.expert_bytes == int(census["expert"] * Q4_BYTES_PER_PARAM)
    llama = ModelSpec.from_catalog(CATALOG["llama-3.1-8b"])
    params = llama.num_layers * (llama.attn_params + llama.mlp_params) + 2 * llama.vocab_size * llama.hidden_size
    assert llama.weight_bytes == pytest.approx(2 * params, rel=0.01)
