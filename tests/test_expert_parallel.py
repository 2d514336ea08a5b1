"""Expert parallelism across real nodes: `shoal node` processes on loopback, mixture-of-experts
models placed through POST /v1/instances with strategy expert (2 and 3 ranks) and hybrid (an expert
group as one pipeline stage, a single node as the other), runners in their own processes. The
greedy continuation equals the single-process run token for token, on synthetic Kimi-K2-shaped
(DeepSeek-V3 architecture: MLA, grouped sigmoid routing, shared experts) and Qwen3-MoE checkpoints.
Each rank reads only its routed experts: its resident memory follows its planned share.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import NodeLauncher, NodeProc, wait_for
from test_distributed import call, delete, generate, instances, place, runner_pids, single_process_tokens, wait_ready, write_tokenizer

from shoal.synthetic import make_checkpoint

pytest.importorskip("transformers")

PROMPT = [3, 17, 42, 5, 88, 1, 60, 23, 9]
TOKENS = 12


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe-ep")
    out = {
        # 12 experts (3 ranks get 4 each), 2 shared-expert columns groups, one dense layer first.
        "kimi-k2": make_checkpoint("kimi-k2", root / "kimi", experts=12, layers=3, hidden=64, fmt="fp32", seed=4),
        "qwen3-moe": make_checkpoint("qwen3-moe", root / "qwen", experts=8, layers=3, hidden=64, fmt="fp32", seed=5),
    }
    for path in out.values():
        write_tokenizer(path, 160)
    return out


@pytest.fixture(scope="module")
def references(moe_models: dict[str, Path]) -> dict[str, list[int]]:
    return {str(p): single_process_tokens(str(p), PROMPT, TOKENS, ignore_eos=True) for p in moe_models.values()}


@pytest.fixture(scope="module")
def cluster3(tmp_path_factory: pytest.TempPathFactory, cached_profile: Path):
    nl = NodeLauncher(tmp_path_factory.mktemp("cluster3"), cached_profile)
    try:
        yield nl.start_cluster(["e0", "e1", "e2"])
    finally:
        nl.close()


def stages_of(inst: dict[str, Any]) -> list[list[dict[str, Any]]]:
    stages: dict[int, list[dict[str, Any]]] = {}
    for s in inst["shards"]:
        stages.setdefault(s["stage"], []).append(s)
    return [stages[i] for i in sorted(stages)]


def check_expert_groups(inst: dict[str, Any], num_experts: int) -> None:
    """Every stage's ranks hold disjoint runs of the routed experts that together are all of them."""
    for st in stages_of(inst):
        runs = sorted(tuple(s["experts"]) for s in st)
        assert runs[0][0] == 0 and runs[-1][1] == num_experts, runs
        assert all(runs[i][1] == runs[i + 1][0] for i in range(len(runs) - 1)), runs
        assert len({tuple(s["layers"]) for s in st}) == 1  # an expert group shares its layers


@pytest.mark.parametrize("layout", ["expert2", "expert3", "hybrid", "tensor2"])
def test_expert_parallel_equals_single_process(cluster3: list[NodeProc], moe_models, references, layout: str) -> None:
    """Expert groups, expert groups as pipeline stages, and a tensor group inside the MoE (each rank
    its heads and every expert's columns)."""
    strategy, n = {"expert2": ("expert", 2), "expert3": ("expert", 3), "hybrid": ("hybrid", 3), "tensor2": ("tensor", 2)}[layout]
    models = moe_models
    placed = [place(cluster3[i % 3], str(p), strategy, n) for i, p in enumerate(models.values())]
    try:
        for inst, kind in zip(placed, models):
            inst = wait_ready(cluster3[0], inst["id"])
            assert inst["strategy"] == strategy
            sizes = [len(st) for st in stages_of(inst)]
            assert sizes == [n] if strategy in ("expert", "tensor") else sorted(sizes) == [1, 2], sizes  # hybrid: expert x pipeline
            if strategy == "tensor":
                cols = sorted(tuple(s["expert_cols"]) for s in inst["shards"])
                experts = 12 if kind == "kimi-k2" else 8
                assert cols[0][0] == 0 and cols[0][1] == cols[1][0] and all(s["experts"] == [0, experts] for s in inst["shards"])
            else:
                check_expert_groups(inst, 12 if kind == "kimi-k2" else 8)
            got = generate(cluster3[-1], inst["id"], PROMPT, TOKENS, ignore_eos=True)
            assert got == references[inst["model"]], (kind, layout, got, references[inst["model"]])
    finally:
        for inst in placed:
            delete(cluster3[0], inst["id"])
    wait_for(lambda: not any(runner_pids(nd) for nd in cluster3), 30, what="runners gone")


def test_each_rank_holds_only_its_experts(launcher: NodeLauncher, tmp_path: Path) -> None:
    # Experts are ~90% of this model's 230 MB of float32 weights: ranks of an expert group should
    # each hold about half of them (and the attention, router and embedding whole).
    path = make_checkpoint("qwen3-moe", tmp_path / "fat-moe", experts=32, layers=4, hidden=512, fmt="bf16", seed=6)
    write_tokenizer(path, 160)
    from shoal.placement.spec import ModelSpec

    spec = ModelSpec.from_checkpoint(path)
    assert spec.moe is not None and spec.routed_bytes * spec.num_layers > 0.85 * spec.weight_bytes
    a = launcher.start("a")
    b = launcher.start("b", peers=[a])
    wait_for(lambda: len(a.cluster()["nodes"]) == 2, 30, what="two nodes")
    inst = wait_ready(a, place(a, str(path), "expert", 2, context=128)["id"])
    assert generate(b, inst["id"], PROMPT, 4, ignore_eos=True)
    inst = next(i for i in instances(a) if i["id"] == inst["id"])
    whole = spec.weight_bytes
    for s in inst["shards"]:
        planned = s["planned_bytes"]
        held = (s["experts"][1] - s["experts"][0]) / 32
        print(f"rank {s['rank']} experts {s['experts']}: planned {planned / 2**20:.0f} MiB, resident {s['rss_bytes'] / 2**20:.0f} MiB")
        assert 0.4 <= held <= 0.6
        # Its weights are about its share of the experts plus the replicated rest, not the whole model...
        assert 0.45 * whole <= s["weight_bytes"] <= 0.62 * whole, (s["weight_bytes"], whole)
        # ...and that is what it holds: the other experts' bytes were never read.
        assert 0.8 * planned <= s["rss_bytes"] <= 1.15 * planned, (s["rss_bytes"] / 2**20, planned / 2**20)
    status, preview = call(a, "GET", f"/v1/placement?model={path}&strategy=tensor")
    assert status == 200 and all(s["expert_cols"] for s in preview["plans"]["tensor"]["shards"]), preview
    delete(a, inst["id"])


def test_mla_model_served_by_the_api(moe_models, references) -> None:
    """One process (`shoal.api.serve`) serving the Kimi-shaped model (its admission control sizes the
    compressed MLA cache, not K and V): the OpenAI completions endpoint gives the single-process
    greedy tokens."""
    from api_helpers import running_server

    path = moe_models["kimi-k2"]
    with running_server("--model", str(path)) as server:
        body = {"model": path.name, "prompt": " ".join(f"t{i}" for i in PROMPT), "max_tokens": TOKENS, "temperature": 0,
                "ignore_eos": True}
        req = urllib.request.Request(server.url + "/v1/completions", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            out = json.loads(r.read())
        expected = " ".join(f"t{i}" for i in references[str(path)])
        assert out["choices"][0]["text"].split() == expected.split(), (out, expected)
        assert out["usage"]["completion_tokens"] == TOKENS
