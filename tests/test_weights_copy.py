"""Model files move between nodes: two `shoal node` processes on loopback with their own models
folders, a tiny random checkpoint in only one of them, placed as a pipeline over both. The node
that lacks it copies it from the other over the peer channel — resuming a partial copy left by an
earlier try, refusing bytes that do not match the source's sha256 — and the instance's greedy
output equals the single-process run on the original files."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest
from conftest import NodeLauncher, NodeProc, wait_for
from test_distributed import TINY_PROMPT, call, delete, find_instance, generate, single_process_tokens, tiny_checkpoint

from shoal.daemon.messages import WeightsManifest, WeightsRead
from shoal.daemon.records import InstanceError
from shoal.daemon.weights import WeightsCopier, WeightsSource

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def two_folders(tmp_path_factory: pytest.TempPathFactory, cached_profile: Path):
    """Nodes a (whose models folder has tiny-llama and tiny-qwen3) and b (whose folder is empty)."""
    root = tmp_path_factory.mktemp("copy")
    have, empty = root / "models-a", root / "models-b"
    for kind in ("llama", "qwen3"):
        tiny_checkpoint(have, kind)
    empty.mkdir()
    nl = NodeLauncher(root, cached_profile)
    try:
        a = nl.start("a", env={"SHOAL_MODELS": str(have)})
        b = nl.start("b", peers=[a], env={"SHOAL_MODELS": str(empty)})
        wait_for(lambda: all(len([x for x in n.cluster()["nodes"] if x["status"] == "up"]) == 2 for n in (a, b)), 30,
                 what="two nodes up")
        yield a, b, have, empty
    finally:
        nl.close()


def place_over_both(a: NodeProc, model: str) -> dict:
    status, out = call(a, "POST", "/v1/instances", {"model": model, "strategy": "pipeline", "nodes": ["a", "b"],
                                                    "context": 128}, timeout_s=120)
    assert status == 202, out
    iid = out["instance"]["id"]
    found: dict = {}

    def settled() -> bool:
        found.update(find_instance(a, iid))
        return found["status"] in ("ready", "failed", "stopped")

    wait_for(settled, 240, interval_s=0.3, what=f"instance {iid} settled")
    return found


def test_a_node_without_the_files_copies_them_and_resumes_a_partial_copy(two_folders) -> None:
    a, b, have, empty = two_folders
    source = have / "tiny-llama"
    weights = (source / "model.safetensors").read_bytes()
    (empty / "tiny-llama").mkdir()
    (empty / "tiny-llama" / "model.safetensors.partial").write_bytes(weights[: len(weights) // 2])  # an earlier try

    inst = place_over_both(a, "tiny-llama")
    assert inst["status"] == "ready", inst
    assert [s["node_name"] for s in inst["shards"]] == ["a", "b"], inst["events"]
    try:
        expected = single_process_tokens(str(source), TINY_PROMPT, 12, ignore_eos=True)
        assert generate(b, inst["id"], TINY_PROMPT, 12, ignore_eos=True) == expected
        for f in source.iterdir():
            assert (empty / "tiny-llama" / f.name).read_bytes() == f.read_bytes(), f.name
        assert not list((empty / "tiny-llama").glob("*.partial"))
        events = " | ".join(e["text"] for e in inst["events"])
        assert "b (" in events and "copying" in events and "copied to" in events, events
        assert inst["prediction"]["copy_s"] > 0
        log = b.log()
        assert "going on from" in log and "copied tiny-llama from a" in log, log[-3000:]
        assert "copying tiny-llama from a (" in log and "% (" in log, log[-3000:]  # progress, every tenth
        assert inst["copying"] == []  # the listing's live progress: none once ready
    finally:
        delete(a, inst["id"])


def test_bytes_that_do_not_match_are_not_kept_and_the_next_placement_copies_anew(two_folders) -> None:
    a, b, have, empty = two_folders
    source = have / "tiny-qwen3"
    weights = (source / "model.safetensors").read_bytes()
    (empty / "tiny-qwen3").mkdir()
    bad = bytes(x ^ 0xFF for x in weights[:4096])  # a partial copy whose bytes were altered
    (empty / "tiny-qwen3" / "model.safetensors.partial").write_bytes(bad)

    inst = place_over_both(a, "tiny-qwen3")
    assert inst["status"] == "failed" and "does not match its sha256" in inst["error"], inst
    assert not (empty / "tiny-qwen3" / "model.safetensors.partial").exists()
    assert not (empty / "tiny-qwen3" / "model.safetensors").exists()
    assert a.proc.poll() is None and b.proc.poll() is None

    inst = place_over_both(a, "tiny-qwen3")
    assert inst["status"] == "ready", inst
    assert [s["node_name"] for s in inst["shards"]] == ["a", "b"], inst["events"]
    try:
        assert hashlib.sha256((empty / "tiny-qwen3" / "model.safetensors").read_bytes()).digest() == \
            hashlib.sha256(weights).digest()
        expected = single_process_tokens(str(source), TINY_PROMPT, 12, ignore_eos=True)
        assert generate(a, inst["id"], TINY_PROMPT, 12, ignore_eos=True) == expected
    finally:
        delete(a, inst["id"])


def test_a_source_gives_only_the_files_of_the_model_it_was_asked_for(tmp_path: Path, monkeypatch) -> None:
    models = tmp_path / "models"
    (models / "m").mkdir(parents=True)
    (models / "m" / "model.safetensors").write_bytes(b"w" * 1000)
    (models / "m" / "config.json").write_text("{}")
    (tmp_path / "secret.key").write_text("not for peers")
    monkeypatch.setenv("SHOAL_MODELS", str(models))
    src = WeightsSource()
    manifest = asyncio.run(src.manifest(WeightsManifest(model="m")))
    assert [f.name for f in manifest.files] == ["config.json", "model.safetensors"] and manifest.folder
    assert asyncio.run(src.read(WeightsRead(model="m", file="model.safetensors", offset=990, length=100))) == b"w" * 10
    for model, file in [("m", "../../secret.key"), ("m", "../secret.key"), (str(tmp_path), "secret.key"),
                        ("/etc", "passwd"), ("m", ".complete")]:
        with pytest.raises(InstanceError) as e:
            asyncio.run(src.read(WeightsRead(model=model, file=file, offset=0, length=10)))
        assert e.value.status == 404


def test_a_copy_shows_how_far_it_is(tmp_path: Path, monkeypatch) -> None:
    """The copier's progress (what the instance listing and the dashboard show) rises from the
    start to the whole size while the slices arrive; the source and the copier are the real ones,
    each seeing its own models folder."""
    have, empty = tmp_path / "a", tmp_path / "b"
    (have / "m").mkdir(parents=True)
    (have / "m" / "config.json").write_text("{}")
    (have / "m" / "model.safetensors").write_bytes(bytes(range(256)) * 8192)  # 2 MiB: three slices
    empty.mkdir()
    source, seen = WeightsSource(), []

    async def manifest(src: str, msg: WeightsManifest):
        monkeypatch.setenv("SHOAL_MODELS", str(have))
        try:
            return await source.manifest(msg)
        finally:
            monkeypatch.setenv("SHOAL_MODELS", str(empty))

    async def read(src: str, msg: WeightsRead) -> bytes:
        seen.extend(copier.states())
        monkeypatch.setenv("SHOAL_MODELS", str(have))
        try:
            return await source.read(msg)
        finally:
            monkeypatch.setenv("SHOAL_MODELS", str(empty))

    copier = WeightsCopier(manifest, read)
    monkeypatch.setenv("SHOAL_MODELS", str(empty))
    fetched = asyncio.run(copier.copy("m", ["a"], lambda n: f"node {n}"))
    total = 2 + 2 * 1024 * 1024
    assert fetched == total and copier.states() == []
    assert (empty / "m" / "model.safetensors").read_bytes() == (have / "m" / "model.safetensors").read_bytes()
    assert {s.model for s in seen} == {"m"} and {s.source for s in seen} == {"node a"} and {s.total_bytes for s in seen} == {total}
    done = [s.done_bytes for s in seen]
    assert done == sorted(done) and done[0] < total and any(0 < d < total for d in done), done
