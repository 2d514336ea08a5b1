"""Ollama's model management on a real node, driven by the official `ollama` client: /api/pull with
progress from a hub served over HTTP on loopback, /api/delete, /api/copy, and their errors."""

from __future__ import annotations

import hashlib

import pytest
from api_helpers import FakeHub
from conftest import TEST_API_KEY

from shoal.catalog import CATALOG, DEFAULT_MODEL, bundled_path

ollama = pytest.importorskip("ollama")

MODEL = "smollm2-1.7b"  # a catalog id whose repository the fake hub serves, as a tiny checkpoint
NEEDED = {"config.json", "generation_config.json", "model.safetensors"}


@pytest.fixture
def hub(tmp_path):
    transformers = pytest.importorskip("transformers")
    import torch

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    repo = tmp_path / "hub" / CATALOG[MODEL].hf_repo
    transformers.LlamaForCausalLM(cfg).save_pretrained(repo)
    (repo / "README.md").write_text("not needed by shoal")
    h = FakeHub(tmp_path / "hub")
    yield h, repo
    h.stop()


@pytest.fixture
def node(launcher, hub, tmp_path):
    h, _ = hub
    return launcher.start("puller", env={"SHOAL_HF_ENDPOINT": f"http://127.0.0.1:{h.port}",
                                         "SHOAL_MODELS": str(tmp_path / "models")})


def _client(node) -> ollama.Client:
    return ollama.Client(host=node.url, headers={"Authorization": f"Bearer {TEST_API_KEY}"})


def _names(client: ollama.Client) -> set[str]:
    return {m.model for m in client.list().models}


def test_pull_streams_progress_then_delete_removes_the_files(node, hub, tmp_path):
    h, repo = hub
    client = _client(node)
    assert f"{MODEL}:latest" not in _names(client)

    updates = list(client.pull(MODEL, stream=True))
    statuses = [u.status for u in updates]
    assert statuses[0] == "pulling manifest"
    assert statuses[-3:] == ["verifying sha256 digest", "writing manifest", "success"]
    layers = updates[1:-3]
    # One digest per needed file, named by the hash the hub lists (sha256 for LFS files, git blob id else).
    want = {}
    for name in NEEDED:
        data = (repo / name).read_bytes()
        listed = h.listing(repo / name)
        want[listed["lfs"]["sha256"] if "lfs" in listed else listed["blobId"]] = len(data)
    got: dict[str, list[tuple[int, int]]] = {}
    for u in layers:
        algo, hexdigest = u.digest.split(":")
        assert algo == ("sha256" if len(hexdigest) == 64 else "sha1")
        assert u.status == f"pulling {hexdigest[:12]}"
        got.setdefault(hexdigest, []).append((u.completed, u.total))
    assert set(got) == set(want)
    for hexdigest, progress in got.items():
        done = [c for c, _ in progress]
        assert done == sorted(done) and progress[-1] == (want[hexdigest], want[hexdigest])

    models = tmp_path / "models" / CATALOG[MODEL].hf_repo
    assert {p.name for p in models.iterdir() if not p.name.startswith(".")} == NEEDED  # not the README
    for name in NEEDED:
        assert (models / name).read_bytes() == (repo / name).read_bytes()
    assert hashlib.sha256((models / "model.safetensors").read_bytes()).hexdigest() in got
    assert f"{MODEL}:latest" in _names(client)

    # Pulled again: already here, so one final record per file and nothing fetched.
    fetched = len(h.requests)
    again = list(client.pull(MODEL, stream=True))
    assert [u.status for u in again][-1] == "success" and len(h.requests) == fetched
    assert client.pull(MODEL, stream=False).status == "success"

    assert client.delete(MODEL).status == "success"
    assert not models.exists()
    assert f"{MODEL}:latest" not in _names(client)
    with pytest.raises(ollama.ResponseError) as e:
        client.delete(MODEL)
    assert e.value.status_code == 404 and MODEL in e.value.error


def test_pull_errors(node, hub):
    h, _ = hub
    client = _client(node)
    with pytest.raises(ollama.ResponseError) as e:
        list(client.pull("no-such-model", stream=True))
    assert e.value.status_code == 404 and "not in shoal's catalog" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client.pull("no-such-model", stream=False)
    assert e.value.status_code == 404

    h.lie.add("model.safetensors")  # the bytes served are not the ones the hub lists: nothing is kept
    with pytest.raises(ollama.ResponseError) as e:
        list(client.pull(MODEL, stream=True))
    assert "do not match" in e.value.error
    assert f"{MODEL}:latest" not in _names(client)

    with pytest.raises(ollama.ResponseError) as e:
        client.copy(MODEL, "my-model")
    assert e.value.status_code == 400 and "cannot be copied" in e.value.error


@pytest.mark.skipif(bundled_path(CATALOG[DEFAULT_MODEL]) is None, reason="bundled model not installed")
def test_the_bundled_model_pulls_at_once_and_is_never_deleted(node):
    client = _client(node)
    assert [u.status for u in client.pull(DEFAULT_MODEL, stream=True)] == ["pulling manifest", "success"]
    with pytest.raises(ollama.ResponseError) as e:
        client.delete(DEFAULT_MODEL)
    assert e.value.status_code == 400 and "ships with shoal" in e.value.error
    assert bundled_path(CATALOG[DEFAULT_MODEL]) is not None
