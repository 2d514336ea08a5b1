"""One model split across machines, for real: `shoal node` processes on loopback, instances placed
through POST /v1/instances, runners in their own processes, generation through the cluster.

Equivalence: the greedy continuation through pipeline-3, tensor-2 (3 KV heads over 2 ranks),
tensor-3 and hybrid 2x2 placements equals the single-process output token for token, on the bundled
model and on tiny random Llama and Qwen3 checkpoints. Plus: a model that no node can hold alone runs
split with each runner's resident memory close to its planned share; two placements racing for
the same memory never over-commit; a runner crash is recovered (the instance re-placed under its
id), never the daemon's end; the CLI and the OpenAI API reach split models.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from conftest import TEST_API_KEY, NodeLauncher, NodeProc, wait_for

from shoal.catalog import CATALOG, DEFAULT_MODEL, bundled_path
from shoal.runner import timeline
from shoal.runner.timeline import ENV as TIMELINE_ENV

transformers = pytest.importorskip("transformers")

HAS_BUNDLED = bundled_path(CATALOG[DEFAULT_MODEL]) is not None
needs_bundled = pytest.mark.skipif(not HAS_BUNDLED, reason="the bundled model is not installed")
CONTEXT = 256
TINY_PROMPT = [3, 17, 42, 5, 88, 1, 60, 23, 9]
LAYOUTS = {  # name -> (strategy, nodes, tp_size, expected stage sizes)
    "pipeline3": ("pipeline", 3, None, [1, 1, 1]),
    "tensor2": ("tensor", 2, None, [2]),
    "tensor3": ("tensor", 3, None, [3]),
    "hybrid2x2": ("hybrid", 4, 2, [2, 2]),
}


# -- helpers ---------------------------------------------------------------------------------------
def call(node: NodeProc, method: str, path: str, body: Any = None, timeout_s: float = 60.0,
         key: str | None = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(node.url + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def instances(node: NodeProc) -> list[dict[str, Any]]:
    """The live instances."""
    return call(node, "GET", "/v1/instances")[1]["instances"]


def find_instance(node: NodeProc, iid: str) -> dict[str, Any]:
    """An instance, live or recently ended."""
    listing = call(node, "GET", "/v1/instances")[1]
    return next(i for i in listing["instances"] + listing["ended"] if i["id"] == iid)


def place(node: NodeProc, model: str, strategy: str, nodes: int | list[str], tp_size: int | None = None,
          context: int = CONTEXT) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "strategy": strategy, "nodes": nodes, "context": context}
    if tp_size:
        body["tp_size"] = tp_size
    status, out = call(node, "POST", "/v1/instances", body, timeout_s=120)
    assert status == 202, out
    return out["instance"]


def wait_ready(node: NodeProc, iid: str, timeout_s: float = 240.0) -> dict[str, Any]:
    found: dict[str, Any] = {}

    def settled() -> bool:
        found.update(find_instance(node, iid))
        return found["status"] in ("ready", "failed", "stopped")

    wait_for(settled, timeout_s, interval_s=0.3, what=f"instance {iid} ready")
    assert found["status"] == "ready", found["error"]
    return found


def generate(node: NodeProc, iid: str, prompt_ids: list[int], max_tokens: int, **params: Any) -> list[int]:
    body = {"prompt_ids": prompt_ids, "params": {"max_tokens": max_tokens, **params}}
    req = urllib.request.Request(node.url + f"/v1/instances/{iid}/generate", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    tokens = []
    with urllib.request.urlopen(req, timeout=300) as r:
        for line in r:
            ev = json.loads(line)
            assert "error" not in ev, ev
            if ev.get("token") is not None:
                tokens.append(ev["token"])
    return tokens


def delete(node: NodeProc, iid: str) -> None:
    status, out = call(node, "DELETE", f"/v1/instances/{iid}", timeout_s=60)
    assert status == 200, out


def runner_pids(node: NodeProc) -> list[int]:
    assert node.proc is not None
    kids = psutil.Process(node.proc.pid).children()
    return [p.pid for p in kids if "shoal.runner" in " ".join(p.cmdline())]


def single_process_tokens(model: str, prompt: list[int], max_tokens: int, ignore_eos: bool, weights: str = "stored") -> list[int]:
    from shoal.engine.generate import stream_generate
    from shoal.engine.loader import load_model
    from shoal.engine.sampler import SamplingParams

    lm = load_model(model, weights=weights)
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos)
    return [ev.token for ev, _ in stream_generate(lm.model, lm.tokenizer, prompt, params, CONTEXT) if ev.token is not None]


def tiny_checkpoint(root: Path, kind: str) -> Path:
    """A tiny random Llama or Qwen3 (3 KV heads: enough for a 3-way tensor split) with a word-level
    tokenizer, as a Hugging Face directory."""
    torch.manual_seed(1)
    common = dict(vocab_size=97, num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=3,
                  max_position_embeddings=512, rms_norm_eps=1e-5, eos_token_id=2, bos_token_id=1)
    if kind == "llama":
        cfg = transformers.LlamaConfig(**common, hidden_size=96, intermediate_size=160, tie_word_embeddings=False)
    else:
        cfg = transformers.Qwen3Config(**common, hidden_size=64, head_dim=16, intermediate_size=128, tie_word_embeddings=True)
    model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    path = root / f"tiny-{kind}"
    model.save_pretrained(path)
    write_tokenizer(path, 97)
    return path


def write_tokenizer(path: Path, vocab_size: int) -> None:
    """A word-level tokenizer "t0 t1 ..." for a random checkpoint (the runners load one)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "t2", "bos_token": "t1"}))


# -- fixtures --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {k: tiny_checkpoint(root, k) for k in ("llama", "qwen3")}


@pytest.fixture(scope="module")
def cluster4(tmp_path_factory: pytest.TempPathFactory, cached_profile: Path):
    """Four nodes on loopback, shared by the equivalence tests (each test removes its instances).
    Their runners record their steps' timelines (runner/timeline.py): the equivalence tests show
    that recording changes nothing, and test_a_step_timeline_follows_a_token reads them."""
    root = tmp_path_factory.mktemp("cluster4")
    (root / "timeline").mkdir()
    nl = NodeLauncher(root, cached_profile)
    try:
        yield nl.start_cluster([f"n{i}" for i in range(4)], env={TIMELINE_ENV: str(root / "timeline")})
    finally:
        nl.close()


@pytest.fixture(scope="module")
def references(tiny_models: dict[str, Path]) -> dict[str, tuple[list[int], list[int]]]:
    """model -> (prompt ids, the single-process greedy continuation)."""
    out = {}
    for kind, path in tiny_models.items():
        out[str(path)] = (TINY_PROMPT, single_process_tokens(str(path), TINY_PROMPT, 16, ignore_eos=True))
    if HAS_BUNDLED:
        from shoal.engine.loader import load_model

        tok = load_model(DEFAULT_MODEL).tokenizer
        prompt = tok.encode_chat([{"role": "user", "content": "Write a haiku about the sea."}])
        out[DEFAULT_MODEL] = (prompt, single_process_tokens(DEFAULT_MODEL, prompt, 20, ignore_eos=False))
    return out


def check_layout(inst: dict[str, Any], layout: str) -> None:
    strategy, n, _, stage_sizes = LAYOUTS[layout]
    assert inst["strategy"] == strategy
    stages: dict[int, list[dict[str, Any]]] = {}
    for s in inst["shards"]:
        stages.setdefault(s["stage"], []).append(s)
    assert [len(stages[i]) for i in sorted(stages)] == stage_sizes
    assert len({s["node_id"] for s in inst["shards"]}) == n  # one rank per node
    for st in stages.values():
        assert len({tuple(s["layers"]) for s in st}) == 1  # a tensor group shares its layers
        heads = sorted(tuple(s["kv_heads"]) for s in st)
        assert heads[0][0] == 0 and all(heads[i][1] == heads[i + 1][0] for i in range(len(heads) - 1))


def run_equivalence(cluster: list[NodeProc], models: list[str], layout: str,
                    references: dict[str, tuple[list[int], list[int]]]) -> None:
    strategy, n, tp, _ = LAYOUTS[layout]
    # Several instances at once: every model of this layout placed together, from different nodes.
    placed = [place(cluster[i % len(cluster)], m, strategy, n, tp) for i, m in enumerate(models)]
    try:
        for inst in placed:
            inst = wait_ready(cluster[0], inst["id"])
            check_layout(inst, layout)
            prompt, expected = references[inst["model"]]
            ignore_eos = inst["model"] != DEFAULT_MODEL
            # Asked at the last node: the request travels to the entry and the tokens come back.
            got = generate(cluster[-1], inst["id"], prompt, len(expected), ignore_eos=ignore_eos)
            assert got == expected, (inst["model"], layout, got, expected)
            # The entry keeps each request's prompt and tokens (what a replay elsewhere would need),
            # shown to the key holder who asks for the text.
            entry = next(nd for nd in cluster if nd.node_id == inst["entry"])
            kept = call(entry, "GET", f"/v1/instances/{inst['id']}/requests?text=1", key=TEST_API_KEY)[1]["requests"]
            assert [(r["prompt_ids"], r["output_ids"], r["done"]) for r in kept] == [(prompt, expected, True)]
    finally:
        for inst in placed:
            delete(cluster[0], inst["id"])
    wait_for(lambda: not any(runner_pids(nd) for nd in cluster), 30, what="runners gone")


def test_float_matrices_held_as_q8_where_an_instance_asks(cluster4, tiny_models):
    """`shoal place --weights q8` (`"weights": "q8"` on POST /v1/instances): the preview prices the
    float32 matrices at 8 bits, the instance records it, and both stages' runners load so — the
    greedy tokens equal one process loading the checkpoint with weights="q8"."""
    model = str(tiny_models["llama"])
    node = cluster4[0]

    def planned(weights: str) -> int:
        q = f"/v1/placement?model={urllib.request.quote(model)}&strategy=pipeline&nodes=2&weights={weights}"
        return sum(s["weight_bytes"] for s in call(node, "GET", q)[1]["plans"]["pipeline"]["shards"])

    assert planned("q8") < 0.45 * planned("stored")
    out = subprocess.run([sys.executable, "-m", "shoal.cli", "place", model, "--cluster", node.url, "--strategy", "pipeline",
                          "--nodes", "2", "--context", str(CONTEXT), "--weights", "q8"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert out.returncode == 0, out.stderr
    assert "weights q8" in out.stdout and "status ready" in out.stdout, out.stdout
    iid = out.stdout.split()[1]
    try:
        inst = next(i for i in instances(node) if i["id"] == iid)
        assert inst["weights"] == "q8" and len(inst["shards"]) == 2
        logs = [p.read_text() for nd in cluster4 for p in (nd.home / "runners").glob(f"{iid}-*.log")]
        assert len(logs) == 2 and all("weights q8" in text for text in logs), logs
        want = single_process_tokens(model, TINY_PROMPT, 16, ignore_eos=True, weights="q8")
        assert generate(cluster4[-1], iid, TINY_PROMPT, 16, ignore_eos=True) == want
    finally:
        delete(node, iid)
    wait_for(lambda: not any(runner_pids(nd) for nd in cluster4), 30, what="runners gone")


def test_a_step_timeline_follows_a_token_through_the_stages(cluster4, tiny_models):
    """With SHOAL_STEP_TIMELINE set (as on these nodes), each runner of a pipeline-3 records every
    step's path, and `timeline.legs` lays a decode step out stage by stage: the entry's layers,
    each hop to the next stage and its layers, the final rows back to the entry, the head."""
    model = str(tiny_models["llama"])
    node = cluster4[0]
    t0 = time.perf_counter()
    iid = place(node, model, "pipeline", 3)["id"]
    try:
        wait_ready(node, iid)
        pids = [pid for nd in cluster4 for pid in runner_pids(nd)]
        assert len(pids) == 3
        assert generate(node, iid, TINY_PROMPT, 12, ignore_eos=True) == single_process_tokens(model, TINY_PROMPT, 12, True)
    finally:
        delete(node, iid)
    wait_for(lambda: not any(runner_pids(nd) for nd in cluster4), 30, what="runners gone")  # each wrote what it held
    marks = {pid: ms for pid, ms in timeline.read(cluster4[0].home.parent / "timeline").items() if pid in pids}
    assert len(marks) == 3
    follower = [[p for p, _ in ms] for ms in marks.values() if "step" not in {p for p, _ in ms}]
    assert len(follower) == 2 and all(ms[:4] == ["recv", "compute", "layers", "send"] for ms in follower)
    legs, steps = timeline.legs(marks, [(t0, time.perf_counter())])
    assert steps >= 8  # 12 tokens: the prompt's step, then decode steps
    assert [name for name, _ in legs] == [
        "stage 0: step -> compute", "stage 0: compute -> layers", "stage 0: layers -> send", "stage 0 send -> stage 1 recv",
        "stage 1: recv -> compute", "stage 1: compute -> layers", "stage 1: layers -> send", "stage 1 send -> stage 2 recv",
        "stage 2: recv -> compute", "stage 2: compute -> layers", "stage 2: layers -> send", "stage 2 send -> stage 0 final",
        "stage 0: final -> logits", "stage 0: logits -> next step", "the whole step",
    ]
    assert all(sec >= 0 for _, sec in legs)


# -- in-process: the tensor-parallel slicing itself -----------------------------------------------------
class ThreadGroup:
    """Ranks as threads of this process; all-reduce by a barrier. Enough to check the slicing."""

    def __init__(self, size: int):
        self.slots: list[torch.Tensor | None] = [None] * size
        self.barrier = threading.Barrier(size)

    def member(self, rank: int) -> Any:
        group = self

        class Member:
            def allreduce(self, tensors: list[torch.Tensor]) -> Any:
                group.slots[rank] = tensors[0].clone()
                group.barrier.wait()
                total = sum(group.slots)  # type: ignore[arg-type]
                group.barrier.wait()
                tensors[0].copy_(total)
                return self

            def wait(self) -> None:
                pass

        return Member()


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_tensor_slices_sum_to_the_whole_model(tmp_path: Path, kind: str) -> None:
    from test_models import IDS, make_checkpoint  # 4 heads over 2 KV heads; qwen2 has q/k/v biases

    from shoal.engine.loader import load_model, load_shard
    from shoal.models.base import BatchLayout, Part

    path, _ = make_checkpoint(tmp_path, kind)
    whole = load_model(str(path), with_tokenizer=False).model
    n = len(IDS)
    with torch.inference_mode():
        expected = whole(torch.tensor(IDS), BatchLayout([n], torch.arange(n), [whole.make_cache()]), torch.arange(n))
    # Uneven on purpose: KV heads 1+1, MLP columns 64+32, vocabulary 60+37.
    parts = [Part(rank=0, size=2, kv_heads=(0, 1), ffn=(0, 64), vocab=(0, 60)),
             Part(rank=1, size=2, kv_heads=(1, 2), ffn=(64, 96), vocab=(60, 97))]
    group = ThreadGroup(2)
    shards = [load_shard(str(path), p).model.shard(group.member(p.rank)) for p in parts]
    outs: list[torch.Tensor | None] = [None, None]

    def run(r: int) -> None:
        m = shards[r]
        with torch.inference_mode():
            h = m.run_layers(m.embed(torch.tensor(IDS)), BatchLayout([n], torch.arange(n), [m.make_cache()]))
            outs[r] = m.logits(h)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    torch.testing.assert_close(torch.cat(outs, dim=1), expected, atol=1e-4, rtol=1e-4)  # type: ignore[arg-type]


# -- real nodes: equivalence -----------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["pipeline3", "tensor2", "tensor3", "hybrid2x2"])
def test_tiny_models_split_equal_single_process(cluster4, tiny_models, references, layout: str) -> None:
    run_equivalence(cluster4, [str(p) for p in tiny_models.values()], layout, references)


@needs_bundled
@pytest.mark.parametrize("layout", [
    "pipeline3", "tensor2",
    pytest.param("tensor3", marks=pytest.mark.heavy), pytest.param("hybrid2x2", marks=pytest.mark.heavy),
])
def test_bundled_model_split_equals_single_process(cluster4, references, layout: str) -> None:
    run_equivalence(cluster4, [DEFAULT_MODEL], layout, references)


@needs_bundled
def test_cli_and_api_reach_a_split_model(cluster4) -> None:
    url = cluster4[1].url
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "shoal.cli"]
    out = subprocess.run([*cmd, "place", DEFAULT_MODEL, "--cluster", url, "--dry-run"], capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert "pipeline" in out.stdout and "tok/s" in out.stdout
    out = subprocess.run([*cmd, "place", DEFAULT_MODEL, "--cluster", url, "--strategy", "pipeline", "--nodes", "2",
                          "--context", str(CONTEXT)], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    assert "strategy pipeline" in out.stdout and "status ready" in out.stdout
    iid = out.stdout.split()[1]
    try:
        # From another node: the CLI finds the cluster's pipeline instance instead of placing one.
        out = subprocess.run([*cmd, "generate", "--cluster", cluster4[3].url, "--strategy", "pipeline", "--max-tokens", "8",
                              "What is the capital of France?"], capture_output=True, text=True, timeout=300, env=env)
        assert out.returncode == 0, out.stderr
        assert "Paris" in out.stdout and "pipeline" in out.stderr
        live = [i["id"] for i in instances(cluster4[0])]
        assert live == [iid]  # the earlier tests' instances are only in the "ended" list
        # The OpenAI API on any node serves the model through the same instance.
        status, reply = call(cluster4[2], "POST", "/v1/chat/completions", {
            "model": DEFAULT_MODEL, "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]}, timeout_s=300)
        assert status == 200, reply
        assert "Paris" in reply["choices"][0]["message"]["content"]
        # Shape of the listings.
        listed = next(i for i in instances(cluster4[2]) if i["id"] == iid)
        assert {"id", "model", "strategy", "status", "shards"} <= set(listed)
        assert {"node_id", "layers", "tp_rank", "tp_size"} <= set(listed["shards"][0])
        assert iid in [i["id"] for i in cluster4[0].cluster()["instances"] if i["status"] == "ready"]
    finally:
        delete(cluster4[0], iid)
    ended = call(cluster4[0], "GET", "/v1/instances")[1]["ended"]
    assert [i["status"] for i in ended if i["id"] == iid] == ["stopped"] and iid not in [i["id"] for i in instances(cluster4[0])]


# -- memory ------------------------------------------------------------------------------------------------
@needs_bundled
def test_model_larger_than_any_node_runs_split_and_reservations_hold(launcher: NodeLauncher) -> None:
    # One runner with the whole bundled model needs ~520 MB (weights, KV for 256 tokens, the runner
    # itself); each node offers 500 MB: it must be split, and then nothing else fits.
    limit = ["--memory-limit", "500MB"]
    a = launcher.start("a", extra=limit)
    b = launcher.start("b", peers=[a], extra=limit)
    wait_for(lambda: len(a.cluster()["links"]) == 1, 30, what="link measured")
    status, preview = call(a, "GET", f"/v1/placement?model={DEFAULT_MODEL}&context={CONTEXT}")
    assert status == 200 and preview["plans"]["auto"]["strategy"] != "single", preview
    # Two placements race from two nodes; the nodes' reservations let exactly one through.
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        body = {"model": DEFAULT_MODEL, "context": CONTEXT, "replica": True}
        results = list(pool.map(lambda n: call(n, "POST", "/v1/instances", body, timeout_s=120), [a, b]))
    codes = sorted(r[0] for r in results)
    assert codes[0] == 202 and codes[1] in (409, 507), results
    refused = next(r[1] for r in results if r[0] != 202)
    assert "missing" in refused["error"]["message"] or "reserve" in refused["error"]["message"]
    inst = next(r[1]["instance"] for r in results if r[0] == 202)
    inst = wait_ready(a, inst["id"])
    assert inst["strategy"] in ("pipeline", "tensor") and len(inst["shards"]) == 2
    got = generate(b, inst["id"], [504, 3575, 282], 8)  # runs, and fills the KV and scratch buffers
    assert len(got) >= 1
    time.sleep(1.0)
    inst = next(i for i in instances(a) if i["id"] == inst["id"])
    for s in inst["shards"]:
        planned = s["planned_bytes"]
        print(f"rank {s['rank']} layers {s['layers']}: planned {planned / 2**20:.0f} MiB, resident {s['rss_bytes'] / 2**20:.0f} MiB")
        assert planned <= 500e6
        # Resident memory of the runner: close to its planned share (weights + KV + runner overhead).
        assert 0.8 * planned <= s["rss_bytes"] <= 1.1 * planned, (s["rss_bytes"] / 2**20, planned / 2**20)
    delete(a, inst["id"])


# -- failures ----------------------------------------------------------------------------------------------
def test_a_runner_crash_is_recovered_not_the_daemons_end(launcher: NodeLauncher, tiny_models) -> None:
    a = launcher.start("a")
    b = launcher.start("b", peers=[a])
    wait_for(lambda: len(a.cluster()["nodes"]) == 2, 30, what="two nodes")
    inst = place(a, str(tiny_models["llama"]), "pipeline", 2)
    wait_ready(a, inst["id"])
    victim = b if inst["shards"][1]["node_id"] == b.node_id else a
    (pid,) = runner_pids(victim)
    os.kill(pid, signal.SIGKILL)

    def recovered() -> bool:
        got = find_instance(a, inst["id"])
        return got["status"] == "ready" and got["epoch"] == 1

    wait_for(recovered, 60, what="instance re-placed")
    got = find_instance(a, inst["id"])
    assert any("rank 1" in e["text"] and "failed" in e["text"] for e in got["events"]), got["events"]
    assert pid not in runner_pids(victim)
    assert a.proc.poll() is None and b.proc.poll() is None  # the daemons still run...
    assert generate(b, inst["id"], TINY_PROMPT, 4, ignore_eos=True)  # ...and so does the instance, under its id
    delete(b, inst["id"])
    wait_for(lambda: not runner_pids(a) and not runner_pids(b), 30, what="runners stopped")


@pytest.mark.heavy
def test_weights_larger_than_any_node_limit(launcher: NodeLauncher, tmp_path: Path) -> None:
    # 14 layers of 51 MB of float32 weights (~720 MB) against nodes that each offer 650 MB.
    torch.manual_seed(2)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=1024, intermediate_size=2816, num_hidden_layers=14,
                                   num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    model = model.to_empty(device="cpu").float()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    path = tmp_path / "fat"
    model.save_pretrained(path)
    write_tokenizer(path, 256)
    del model
    from shoal.placement.spec import ModelSpec

    weights = ModelSpec.from_checkpoint(path).weight_bytes
    assert weights > 650e6
    nodes = [launcher.start("a", extra=["--memory-limit", "650MB"])]
    nodes += [launcher.start(x, peers=[nodes[0]], extra=["--memory-limit", "650MB"]) for x in "bcd"]
    wait_for(lambda: len(nodes[0].cluster()["nodes"]) == 4, 30, what="four nodes")
    inst = wait_ready(nodes[0], place(nodes[0], str(path), "pipeline", 4, context=128)["id"])
    assert generate(nodes[1], inst["id"], [1, 2, 3], 4, ignore_eos=True)
    time.sleep(1.0)
    inst = next(i for i in instances(nodes[0]) if i["id"] == inst["id"])
    for s in inst["shards"]:
        planned = s["planned_bytes"]
        print(f"rank {s['rank']} layers {s['layers']}: planned {planned / 2**20:.0f} MiB, resident {s['rss_bytes'] / 2**20:.0f} MiB")
        assert planned <= 650e6 and 0.8 * planned <= s["rss_bytes"] <= 1.1 * planned
    delete(nodes[0], inst["id"])
