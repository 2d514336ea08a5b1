"""`shoal generate` and `shoal bench` as a user runs them, and their errors on bad model files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from shoal.catalog import CATALOG, DEFAULT_MODEL, bundled_path

GGUF = bundled_path(CATALOG[DEFAULT_MODEL])
needs_model = pytest.mark.skipif(GGUF is None, reason="bundled model not installed")


def shoal(*args, input=None, timeout=300):
    # No node of this machine's (one on the default port, say) may take the in-process runs over.
    env = dict(os.environ, PYTHONUNBUFFERED="1", SHOAL_CLUSTER="http://127.0.0.1:9")
    return subprocess.run([sys.executable, "-m", "shoal.cli", *args], capture_output=True, text=True, input=input, timeout=timeout, env=env)


@needs_model
def test_generate_streams_text_and_prints_speeds():
    r = shoal("generate", "--max-tokens", "16", "What is the capital of France?")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "TTFT" in r.stderr and "decode" in r.stderr and "tok/s" in r.stderr


@needs_model
def test_generate_raw_and_stdin():
    r = shoal("generate", "--raw", "--max-tokens", "8", "-", input="The quick brown fox")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()


@needs_model
def test_bench_json():
    r = shoal("bench", "--prompt-tokens", "32", "--gen-tokens", "8", "--repeats", "1", "--no-llama-cpp", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["prefill_tokens_per_s"] > 0 and out["decode_tokens_per_s"] > 0 and out["peak_rss_mb"] > 0


def _assert_clean_error(r, *needles):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_missing_model_file(tmp_path):
    _assert_clean_error(shoal("generate", "--model", str(tmp_path / "nope.gguf"), "hi"), "nope.gguf")


@needs_model
def test_truncated_gguf(tmp_path):
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(GGUF.read_bytes()[: 5_000_000])
    _assert_clean_error(shoal("generate", "--model", str(bad), "hi"), "truncated.gguf")


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(os.urandom(4096))
    _assert_clean_error(shoal("generate", "--model", str(bad), "hi"), "garbage.gguf", "not a GGUF")


def test_corrupt_gguf_header(tmp_path):
    bad = tmp_path / "corrupt.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(4092))
    _assert_clean_error(shoal("generate", "--model", str(bad), "hi"), "corrupt.gguf")


@needs_model
def test_unsupported_architecture(tmp_path):
    import gguf

    path = tmp_path / "mamba.gguf"
    w = gguf.GGUFWriter(str(path), "mamba")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", __import__("numpy").zeros((4, 4), dtype="float32"))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _assert_clean_error(shoal("generate", "--model", str(path), "hi"), "mamba.gguf", "unsupported architecture")


def test_model_dir_without_config(tmp_path):
    _assert_clean_error(shoal("generate", "--model", str(tmp_path), "hi"), "config.json")


def test_corrupt_safetensors(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 64)
    _assert_clean_error(shoal("generate", "--model", str(tmp_path), "hi"), "model.safetensors")


def test_unknown_model_id():
    _assert_clean_error(shoal("generate", "--model", "no-such-model-xyz", "hi"), "no-such-model-xyz")


@needs_model
def test_prompt_longer_than_context(tmp_path):
    r = shoal("generate", "--raw", "--max-tokens", "4", "-", input="word " * 9000)
    _assert_clean_error(r, "context")


def test_generate_flags_all_say_what_they_do():
    import argparse

    from shoal.engine.cli import add_generate_arguments

    p = argparse.ArgumentParser()
    add_generate_arguments(p)
    assert [a.dest for a in p._actions if not a.help] == []


def test_commands_say_when_what_answered_is_not_a_node():
    import http.server
    import threading

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        for args in (["status"], ["instances"], ["place", DEFAULT_MODEL], ["generate", "hi"]):
            r = shoal(*args, "--cluster", url, timeout=60)
            said = r.stdout + r.stderr
            assert r.returncode == 1 and url in said and "not a shoal node" in said and "52600" in said, (args, said)
    finally:
        httpd.shutdown()
