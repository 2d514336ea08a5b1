"""The hub download code against a real HTTP server on loopback that speaks the hub's endpoints,
serving a tiny checkpoint this test makes: file list, download, resume, errors, then loading."""

from __future__ import annotations

import pytest
from api_helpers import FakeHub

from shoal.catalog import CatalogEntry
from shoal.weights import download as dl


@pytest.fixture
def hub(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    import torch

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    repo = tmp_path / "hub" / "tiny-org" / "tiny-llama"
    transformers.LlamaForCausalLM(cfg).save_pretrained(repo)
    (repo / "README.md").write_text("not needed by shoal")
    h = FakeHub(tmp_path / "hub")
    monkeypatch.setenv("SHOAL_HF_ENDPOINT", f"http://127.0.0.1:{h.port}")
    monkeypatch.setenv("SHOAL_MODELS", str(tmp_path / "models"))
    yield h, repo
    h.stop()


def entry(repo="tiny-org/tiny-llama", filename=None):
    return CatalogEntry("tiny", "llama", repo, filename, 2, 32, 64, 4, 2, 8, 64, 64, 0.0001, 4.0)


def test_download_and_load(hub):
    from shoal.engine.loader import load_model

    h, repo = hub
    e = entry()
    assert dl.cached_model_path(e) is None
    seen = []
    path = dl.download(e, progress=lambda f, done, total: seen.append((f, done, total)))
    assert dl.cached_model_path(e) == path
    assert (path / "model.safetensors").read_bytes() == (repo / "model.safetensors").read_bytes()
    assert not (path / "README.md").exists()  # only what a model needs
    assert any(f == "model.safetensors" and done == total for f, done, total in seen)
    lm = load_model(str(path), with_tokenizer=False)
    assert lm.args.num_hidden_layers == 2


def test_resume_uses_range(hub):
    h, repo = hub
    e = entry()
    dest = dl.model_dir(e) / "model.safetensors"
    dest.parent.mkdir(parents=True)
    data = (repo / "model.safetensors").read_bytes()
    dest.with_name("model.safetensors.partial").write_bytes(data[:1000])  # an interrupted download
    dl.download_file(e.hf_repo, dl.list_files(e.hf_repo)["model.safetensors"], dest)
    assert dest.read_bytes() == data
    assert ("model.safetensors", "bytes=1000-") in h.requests


def test_single_gguf_file(hub, tmp_path):
    h, repo = hub
    (repo / "model.gguf").write_bytes(b"GGUF" + bytes(100))
    path = dl.download(entry(filename="model.gguf"))
    assert path.name == "model.gguf" and path.read_bytes()[:4] == b"GGUF"


def test_unknown_repo_is_a_clear_error(hub):
    with pytest.raises(dl.DownloadError, match="404"):
        dl.download(entry(repo="tiny-org/missing"))


def test_unreachable_hub(monkeypatch, tmp_path):
    monkeypatch.setenv("SHOAL_HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    monkeypatch.setenv("SHOAL_MODELS", str(tmp_path))
    with pytest.raises(dl.DownloadError, match="cannot read the file list"):
        dl.download(entry())


def test_a_file_that_does_not_match_the_hubs_hash_is_not_kept(hub):
    h, repo = hub
    h.lie.add("model.safetensors")
    with pytest.raises(dl.DownloadError, match="do not match the hub's sha256"):
        dl.download(entry())
    d = dl.model_dir(entry())
    assert not (d / "model.safetensors").exists() and not (d / "model.safetensors.partial").exists()
    assert dl.cached_model_path(entry()) is None
    h.lie.clear()  # the next run starts over and keeps the good bytes
    assert (dl.download(entry()) / "model.safetensors").read_bytes() == (repo / "model.safetensors").read_bytes()


def test_small_files_are_checked_by_their_git_hash(hub):
    h, repo = hub
    h.lie.add("config.json")
    with pytest.raises(dl.DownloadError, match="config.json.*git hash"):
        dl.download(entry())


def test_a_file_without_a_listed_hash_is_refused(hub):
    h, repo = hub
    (repo / "model.gguf").write_bytes(b"GGUF" + bytes(100))
    h.unhashed.add("model.gguf")
    with pytest.raises(dl.DownloadError, match="no hash"):
        dl.download(entry(filename="model.gguf"))
    assert dl.cached_model_path(entry(filename="model.gguf")) is None
