"""One-command join: the invite token (`shoal invite`, printed by the start that makes a cluster
key), `shoal node --join TOKEN`, and the node that is given peers without the key, or with the
wrong one, saying so instead of forming a cluster of its own."""

from __future__ import annotations

import argparse
import os
import re
import socket
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import NODE_CMD, TEST_KEY, NodeLauncher, NodeProc, free_port, wait_for

from shoal.cluster import invite as invite_mod
from shoal.cluster.invite import Invite, InviteError, invite_hosts
from shoal.cluster.status import render
from shoal.config import NodeConfig

KEY = "k" * 43
TOKEN_RE = re.compile(r"shoal node --join (shoal1\.[A-Za-z0-9_-]+)")
WRONG_KEY_LINE = "the cluster key does not match"


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("SHOAL_CLUSTER_KEY", "SHOAL_JOIN", "SHOAL_API_KEY")}


def _shoal(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shoal.cli", *args], capture_output=True, text=True, timeout=60,
                          env=_env(), check=False)


def _up(node: NodeProc) -> set[str]:
    return {n["id"] for n in node.cluster()["nodes"] if n["status"] == "up"}


# -- the token -------------------------------------------------------------------------------------------
def test_invite_round_trips_and_a_damaged_one_is_refused() -> None:
    inv = Invite(("10.0.0.7", "fd00::7"), 7000, KEY)
    token = inv.encode()
    assert token.startswith("shoal1.") and re.fullmatch(r"shoal1\.[A-Za-z0-9_-]+", token)
    assert Invite.parse(token) == inv
    assert inv.addresses == (("10.0.0.7", 7000), ("fd00::7", 7000))
    assert KEY not in repr(inv)
    wrapped = f"  {token[:30]}\n{token[30:60]} \n{token[60:]}\n"  # copied from a wrapped terminal line
    assert Invite.parse(wrapped) == inv

    # Every single-character mistype, and every cut, is said to be one (the checksum), never a join.
    body = len("shoal1.")
    for i in range(body, len(token)):
        swapped = "A" if token[i] != "A" else "B"
        with pytest.raises(InviteError, match="mistyped or cut short"):
            Invite.parse(token[:i] + swapped + token[i + 1:])
    for cut in (len(token) - 1, len(token) - 5, body + 3, body):
        with pytest.raises(InviteError, match="mistyped or cut short"):
            Invite.parse(token[:cut])
    with pytest.raises(InviteError, match="not a shoal invite"):
        Invite.parse(KEY)
    with pytest.raises(InviteError, match="another version"):
        Invite.parse("shoal9." + token[body:])


def test_invite_names_where_the_node_listens(monkeypatch: pytest.MonkeyPatch) -> None:
    assert invite_hosts("0.0.0.0", "box.lan") == ("box.lan",)
    assert invite_hosts("10.1.2.3", None) == ("10.1.2.3",)

    def addr(family: socket.AddressFamily, address: str) -> SimpleNamespace:
        return SimpleNamespace(family=family, address=address)

    interfaces = {
        "lo": [addr(socket.AF_INET, "127.0.0.1"), addr(socket.AF_INET6, "::1")],
        "eth0": [addr(socket.AF_INET6, "fe80::1%eth0"), addr(socket.AF_INET6, "2001:db8::5"),
                 addr(socket.AF_INET, "192.168.1.5")],
        "wg0": [addr(socket.AF_INET, "10.8.0.2"), addr(socket.AF_PACKET, "aa:bb:cc:dd:ee:ff")],
    }
    monkeypatch.setattr(invite_mod.psutil, "net_if_addrs", lambda: interfaces)
    # Every interface: the machine's non-loopback addresses, IPv4 first; no link-local (its zone is local).
    assert invite_hosts("0.0.0.0", None) == ("192.168.1.5", "10.8.0.2", "2001:db8::5")
    monkeypatch.setattr(invite_mod.psutil, "net_if_addrs", lambda: {"lo": interfaces["lo"]})
    assert invite_hosts("::", None) == ("127.0.0.1",)  # nothing else: nodes on this one machine


def test_join_keeps_the_key_and_the_addresses_in_the_home(tmp_path: Path) -> None:
    token = Invite(("10.0.0.7",), 7000, KEY).encode()
    home = tmp_path / "h"

    def config(environ: dict[str, str] | None = None, **flags: object) -> NodeConfig:
        return NodeConfig.from_args(argparse.Namespace(home=str(home), **flags), environ=environ or {})

    joined = config(join=token)
    assert (joined.cluster_key, joined.key_source, joined.peers) == (KEY, "join", (("10.0.0.7", 7000),))
    assert stat.S_IMODE(joined.key_file.stat().st_mode) == 0o600 and joined.key_file.read_text().strip() == KEY
    later = config()  # a restart: no token, same key, same seeds
    assert (later.cluster_key, later.key_source, later.peers) == (KEY, "home", (("10.0.0.7", 7000),))
    assert config({"SHOAL_JOIN": token}, peer=["10.0.0.9:7000"]).peers == (("10.0.0.9", 7000), ("10.0.0.7", 7000))
    assert config(join=token, cluster_key=KEY).key_source == "flag"  # the same key twice is no conflict

    with pytest.raises(ValueError, match="another cluster key than --cluster-key"):
        config(join=token, cluster_key=TEST_KEY)
    with pytest.raises(ValueError, match="another cluster's key"):
        config(join=Invite(("10.0.0.7",), 7000, TEST_KEY).encode())
    with pytest.raises(ValueError, match="mistyped"):
        config(join=token[:-2])

    # Peers but no key anywhere: refused, and no key of its own is made.
    fresh = tmp_path / "fresh"
    with pytest.raises(ValueError, match=r"--peer needs the cluster's key: start with --join TOKEN"):
        NodeConfig.from_args(argparse.Namespace(home=str(fresh), peer=["10.0.0.7:7000"]), environ={})
    assert not (fresh / "cluster.key").exists()


# -- real nodes ------------------------------------------------------------------------------------------
def test_a_node_with_peers_and_no_key_exits_with_one_line(tmp_path: Path) -> None:
    home = tmp_path / "lone"
    out = subprocess.run(
        [*NODE_CMD, "--home", str(home), "--host", "127.0.0.1", "--port", str(free_port()), "--no-discovery",
         "--peer", f"127.0.0.1:{free_port()}"],
        capture_output=True, text=True, timeout=60, env=_env(), check=False,
    )
    assert out.returncode == 2, out
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    assert "--join TOKEN" in lines[0] and "shoal invite" in lines[0] and "SHOAL_CLUSTER_KEY" in lines[0]
    assert not (home / "cluster.key").exists()
    # A mistyped invite is said to be one, in one line, too.
    token = Invite(("127.0.0.1",), 7000, KEY).encode()
    bad = _shoal("node", "--home", str(home), "--no-discovery", "--join", token[:-1] + ("A" if token[-1] != "A" else "B"))
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "mistyped" in bad.stderr, bad


def test_a_node_joins_with_the_invite_alone(launcher: NodeLauncher) -> None:
    a = launcher.start("a", key=None)  # makes the cluster key, and prints it with an invite
    match = TOKEN_RE.search(a.log())
    assert match, a.log()
    printed = match.group(1)
    key = (a.home / "cluster.key").read_text().strip()
    made = _shoal("invite", "--home", str(a.home))
    assert made.returncode == 0 and made.stdout.strip() == printed, made
    assert "keep it secret" in made.stderr and key not in made.stderr
    inv = Invite.parse(printed)
    assert (inv.addresses, inv.cluster_key) == ((("127.0.0.1", a.port),), key)

    b = launcher.start("b", key=None, extra=["--join", printed])  # no --cluster-key, no --peer
    ids = {a.cluster()["self_id"], b.cluster()["self_id"]}
    wait_for(lambda: _up(a) == ids and _up(b) == ids, 30, what="both nodes up on both")
    assert (b.home / "cluster.key").read_text().strip() == key
    assert stat.S_IMODE((b.home / "cluster.key").stat().st_mode) == 0o600
    assert key not in b.log()  # the joining node never puts the key on its console

    # A restart needs no token: the key and the invite's address are in the home.
    b.stop()
    b2 = launcher.start("b", key=None)
    assert "--join" not in b2.args
    wait_for(lambda: _up(a) == ids and _up(b2) == ids, 30, what="the restarted node up again on both")


def test_a_node_with_the_wrong_key_says_so_and_stays_out(launcher: NodeLauncher) -> None:
    a = launcher.start("a")
    c = launcher.start("c", peers=[a], key="another-cluster-key-0123456789")

    def tries() -> list[str]:
        return [line for line in c.log().splitlines() if f"{a.address}" in line and
                ("hello to" in line or "refuses this node" in line)]

    # The refusal is said at once, then retried quietly (debug) rather than said on every try.
    wait_for(lambda: len(tries()) >= 3, 60, interval_s=0.2, what="three hellos to the seed")
    warnings = [line for line in c.log().splitlines() if "WARNING" in line and WRONG_KEY_LINE in line]
    assert len(warnings) == 1, c.log()
    assert f"seed {a.address} refuses this node: {WRONG_KEY_LINE}" in warnings[0]
    assert "--join TOKEN" in warnings[0] and "retrying" in warnings[0]

    assert c.proc is not None and c.proc.poll() is None  # still up, still trying
    view = c.cluster()
    assert [n["id"] for n in view["nodes"]] == [view["self_id"]]
    (seed,) = view["seeds"]
    assert (seed["address"], seed["status"], seed["problem"]) == (a.address, "unreachable", WRONG_KEY_LINE)
    assert f"seed {a.address} unreachable: {WRONG_KEY_LINE}" in render(view)
    assert view["self_id"] not in {n["id"] for n in a.cluster()["nodes"]}
    assert "bad tag" in a.log()  # the seed refused it, and said so in its own log
