"""The node's care with what it keeps on this machine and what it tells: model references from the
network stay inside the models folder, a home others can read is warned about, the cluster key is
printed once, and a port it cannot have is said in one line — each with real `shoal node`
processes where a node is involved."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest
from conftest import NODE_CMD, TEST_KEY, NodeLauncher, free_port

from shoal.engine.loader import ModelNotFound, check_network_reference


# -- model references -------------------------------------------------------------------------------
def test_network_references_are_catalog_ids_or_files_in_the_models_folder(tmp_path: Path, monkeypatch) -> None:
    models = tmp_path / "models"
    (models / "org" / "tiny").mkdir(parents=True)
    (models / "small.gguf").write_bytes(b"GGUF")
    outside = tmp_path / "outside.gguf"
    outside.write_bytes(b"GGUF")
    (models / "linked.gguf").symlink_to(outside)  # a link the owner made is the owner's choice
    monkeypatch.setenv("SHOAL_MODELS", str(models))

    for ok in ("smollm2-135m", "small.gguf", "org/tiny", str(models / "small.gguf"), "linked.gguf"):
        check_network_reference(ok)
    messages = set()
    for bad in (str(outside), "/etc/passwd", "/etc", "../outside.gguf", "org/../../outside.gguf", "missing.gguf",
                str(models), "", "~/x", str(models / "small.gguf") + "\0"):
        with pytest.raises(ModelNotFound) as e:
            check_network_reference(bad)
        messages.add(str(e.value).replace(repr(bad), "<ref>"))
    assert len(messages) == 1, messages


# -- the home and the key ---------------------------------------------------------------------------
def run_node_briefly(home: Path, *args: str, seconds: float = 60) -> subprocess.CompletedProcess[str]:
    """A node that exits by itself: `--port` taken or refused, or stopped by `timeout` after a start."""
    env = {k: v for k, v in os.environ.items() if k != "SHOAL_CLUSTER_KEY"}
    return subprocess.run([*NODE_CMD, "--home", str(home), "--host", "127.0.0.1", "--no-discovery", *args],
                          capture_output=True, text=True, timeout=seconds, env=env, check=False)


def test_a_loose_home_is_warned_about_and_the_node_serves(launcher: NodeLauncher) -> None:
    home = launcher.root / "loose"
    home.mkdir(mode=0o755)
    home.chmod(0o755)
    key = home / "cluster.key"
    key.write_text(TEST_KEY + "\n")
    key.chmod(0o644)
    node = launcher.start("loose")
    log = node.log()
    assert f"{home} is readable or writable by other users (mode 755)" in log, log
    assert f"{key} is readable by other users (mode 644)" in log, log
    assert home.stat().st_mode & 0o777 == 0o755  # warned, not silently changed
    assert node.cluster()["nodes"]


def test_the_cluster_key_is_printed_on_the_start_that_made_it_only(tmp_path: Path, cached_profile: Path) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    (home / "profile.json").write_bytes(cached_profile.read_bytes())
    port = free_port()
    with socket.socket() as blocker:  # each start stops at the port, after the key is settled
        blocker.bind(("127.0.0.1", port))
        blocker.listen()
        first = run_node_briefly(home, "--port", str(port))
        key = (home / "cluster.key").read_text().strip()
        assert (home / "cluster.key").stat().st_mode & 0o777 == 0o600
        assert key in first.stdout + first.stderr
        second = run_node_briefly(home, "--port", str(port))
    assert key not in second.stdout + second.stderr
    assert "cluster key from" in second.stderr


def test_a_port_in_use_is_said_in_one_line_before_profiling(tmp_path: Path) -> None:
    home = tmp_path / "home"  # no cached profile: a node that got past the port would measure one
    port = free_port()
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", port))
        blocker.listen()
        out = run_node_briefly(home, "--port", str(port), "--cluster-key", TEST_KEY)
    text = out.stdout + out.stderr
    assert out.returncode == 1, text
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in text, text
    assert "choose another --port" in text and "Traceback" not in text, text
    assert "profile" not in text and not (home / "profile.json").exists(), text


@pytest.mark.parametrize("args", [["--port", "70000"], ["--port", "0"], ["--host", "no-such-host.invalid"]])
def test_a_port_or_host_that_cannot_be_had_is_one_line(tmp_path: Path, args: list[str]) -> None:
    out = run_node_briefly(tmp_path / "home", *args, "--cluster-key", TEST_KEY)
    text = out.stdout + out.stderr
    assert out.returncode != 0 and "Traceback" not in text, text
    assert ("not a TCP port" in text) if args[0] == "--port" else ("cannot listen on no-such-host.invalid" in text), text
    said = [line for line in text.splitlines() if "not a TCP port" in line or "cannot listen" in line]
    assert len(said) == 1 and "profile" not in text, text
