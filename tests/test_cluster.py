"""The control plane: real `shoal node` processes on loopback ports, plus in-process checks of the
pieces (config, auth, membership rules) that are faster to test without a network."""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from conftest import TEST_KEY, NodeLauncher, NodeProc, free_port, wait_for

from shoal.cluster.auth import H_NODE, H_TIME, H_TO, AuthError, NonceCache, PeerCipher
from shoal.cluster.identity import NodeIdentity, node_id_of
from shoal.cluster.links import LinkTable
from shoal.cluster.membership import Membership, Timings, record_bytes, record_problem
from shoal.cluster.messages import Gossip, LinkRecord, MemberRecord
from shoal.config import NodeConfig, parse_hostport, parse_size

# -- the pieces, in-process ---------------------------------------------------------------------------


def test_parse_size() -> None:
    assert parse_size("8GB") == 8 * 10**9
    assert parse_size("8GiB") == parse_size("8G") == parse_size("8g") == 8 * 2**30
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("1.5TB") == 1_500_000_000_000
    assert parse_size("4096") == 4096
    for bad in ("", "GB", "8XB", "-1GB", "8iB"):
        with pytest.raises(ValueError):
            parse_size(bad)
    assert parse_hostport("10.0.0.1:7000") == ("10.0.0.1", 7000)
    assert parse_hostport("[::1]:7000") == ("::1", 7000)


def test_config_home_id_and_key(tmp_path: Path) -> None:
    args = argparse.Namespace(home=str(tmp_path / "h"), port=1234, memory_limit="2GiB")
    c1 = NodeConfig.from_args(args, environ={})  # no --peer: a node given peers makes no key (test_join.py)
    args.peer = ["a:1", "b"]
    assert c1.key_source == "generated" and len(c1.cluster_key) >= 32
    key_file = tmp_path / "h" / "cluster.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert c1.memory_limit_bytes == 2 * 2**30
    assert c1.cluster_key not in repr(c1)  # the key never lands in a log through repr
    node_key = tmp_path / "h" / "node.key"
    assert stat.S_IMODE(node_key.stat().st_mode) == 0o600
    c2 = NodeConfig.from_args(args, environ={})
    assert (c2.node_id, c2.cluster_key, c2.key_source) == (c1.node_id, c1.cluster_key, "home")
    assert c2.peers == (("a", 1), ("b", 52600))
    # the id is the key's: derived, not stored
    assert c1.node_id == NodeIdentity.from_seed(bytes.fromhex(node_key.read_text().strip())).node_id
    c3 = NodeConfig.from_args(args, environ={"SHOAL_CLUSTER_KEY": "x" * 20})
    assert (c3.cluster_key, c3.key_source) == ("x" * 20, "env")
    args.cluster_key = "y" * 20
    assert NodeConfig.from_args(args, environ={"SHOAL_CLUSTER_KEY": "x" * 20}).cluster_key == "y" * 20
    args.cluster_key = "short"
    with pytest.raises(ValueError):
        NodeConfig.from_args(args, environ={})


def test_auth_seal_open_replay_and_skew() -> None:
    a = PeerCipher.from_cluster_key("a" * 32, TEST_KEY)
    b = PeerCipher.from_cluster_key("b" * 32, TEST_KEY)
    body = b'{"x": 1}'
    h, sealed = a.seal_request("POST", "/peer/gossip", "b" * 32, body)
    assert body not in sealed and len(sealed) == len(body) + 28
    assert b.open_request("POST", "/peer/gossip", h, sealed) == ("a" * 32, body)
    with pytest.raises(AuthError, match="replayed"):
        b.open_request("POST", "/peer/gossip", h, sealed)
    # the method, the path and every header are bound to the body; so is every byte of it
    h, sealed = a.seal_request("POST", "/peer/gossip", "b" * 32, body)
    flipped = sealed[:-1] + bytes([sealed[-1] ^ 1])
    for method, path, headers, data in (
        ("POST", "/peer/leave", h, sealed),
        ("GET", "/peer/gossip", h, sealed),
        ("POST", "/peer/gossip", {**h, H_NODE: "c" * 32}, sealed),
        ("POST", "/peer/gossip", {**h, H_TIME: f"{float(h[H_TIME]) + 1:.3f}"}, sealed),
        ("POST", "/peer/gossip", {**h, H_TO: "c" * 32}, sealed),
        ("POST", "/peer/gossip", h, flipped),
        ("POST", "/peer/gossip", h, sealed[:10]),
    ):
        with pytest.raises(AuthError, match="bad tag"):
            b.open_request(method, path, headers, data)
    assert b.open_request("POST", "/peer/gossip", h, sealed)[1] == body  # none of that spent the nonce
    # addressed to another node: refused even though it authenticates
    h, sealed = a.seal_request("POST", "/peer/gossip", "c" * 32, body)
    with pytest.raises(AuthError, match="not addressed"):
        b.open_request("POST", "/peer/gossip", h, sealed)
    stale = a.seal_request("POST", "/peer/gossip", "b" * 32, body, now=time.time() - 120)
    with pytest.raises(AuthError, match="skew"):
        b.open_request("POST", "/peer/gossip", *stale)
    other = PeerCipher.from_cluster_key("c" * 32, "another-cluster-key-0000")
    with pytest.raises(AuthError, match="bad tag"):
        b.open_request("POST", "/peer/gossip", *other.seal_request("POST", "/peer/gossip", "b" * 32, body))
    with pytest.raises(AuthError, match="unsigned"):
        b.open_request("POST", "/peer/gossip", {}, body)
    # replies are bound to the request (its nonce, path, sender, recipient) and to their status
    h, sealed = a.seal_request("POST", "/peer/gossip", "b" * 32, body)
    rh, rsealed = b.seal_reply("POST", "/peer/gossip", h, 200, b"{}")
    assert a.open_reply("POST", "/peer/gossip", h, 200, rh, rsealed) == ("b" * 32, b"{}")
    h2, _ = a.seal_request("POST", "/peer/gossip", "b" * 32, body)
    for path, req, status in (("/peer/gossip", h2, 200), ("/peer/leave", h, 200), ("/peer/gossip", h, 400)):
        with pytest.raises(AuthError, match="bad reply tag"):
            a.open_reply("POST", path, req, status, rh, rsealed)
    with pytest.raises(AuthError, match="unsigned reply"):
        a.open_reply("POST", "/peer/gossip", h, 200, {}, rsealed)
    cache = NonceCache(ttl_s=10, max_entries=2)
    cache.check_and_add("n1", now=0)
    cache.check_and_add("n2", now=1)
    with pytest.raises(AuthError, match="full"):
        cache.check_and_add("n3", now=2)
    cache.check_and_add("n3", now=10.5)  # n1 expired


def _membership(tmp_path: Path, clock: list[float]) -> Membership:
    me = NodeIdentity.from_seed(os.urandom(32))
    cfg = NodeConfig(home=tmp_path, node_id=me.node_id, name="me", cluster_key=TEST_KEY)
    return Membership(cfg, LinkTable(), Timings(), clock=lambda: clock[0], identity=me)


IDENTITIES = [NodeIdentity.from_seed(bytes([i]) * 32) for i in range(4)]
BY_ID = {i.node_id: i for i in IDENTITIES}


def _rec(nid: str, inc: int = 1, hb: int = 1, age: float = 0.0, host: str = "10.0.0.9") -> MemberRecord:
    """A record signed by its node, one of IDENTITIES."""
    me = BY_ID[nid]
    rec = MemberRecord(node_id=nid, public_key=me.public_key, name=nid[:4], host=host, port=1000,
                       incarnation=inc, heartbeat=hb, age_s=age, signature="0" * 128)
    return rec.model_copy(update={"signature": me.sign(record_bytes(rec))})


def test_membership_rules(tmp_path: Path) -> None:
    clock = [100.0]
    m = _membership(tmp_path, clock)
    events: list[tuple[str, str]] = []
    m.subscribe(lambda kind, nid: events.append((kind, nid)))
    x, y, z = (i.node_id for i in IDENTITIES[1:])
    assert node_id_of(IDENTITIES[1].public_key) == x
    # a record with no host takes the address we dialled its node at (a sealed reply to us) ...
    m.merge(Gossip(sender=x, members=[_rec(x, host="")]), dialled_host="10.0.0.7")
    assert m.members[x].status == "up" and m.members[x].record.host == "10.0.0.7"
    assert m.members[x].wire.host == ""  # ... locally: what it relays is the record as signed
    # a second-hand record of a long-silent node arrives as down; a very old one not at all
    m.merge(Gossip(sender=x, members=[_rec(x, hb=2, host=""), _rec(y, age=4.0), _rec(z, age=40.0)]))
    assert m.members[y].status == "down" and z not in m.members
    assert m.members[x].record.host == "10.0.0.7"  # kept while the node still advertises none
    assert events == [("join", x)]
    clock[0] += 3.2
    m.detect()
    assert m.members[x].status == "down" and ("down", x) in events
    m.merge(Gossip(sender=y, members=[_rec(x, hb=3)]))  # relayed heartbeat: x is alive
    assert m.members[x].status == "up"
    assert m.links.merge(LinkRecord(a=min(x, y), b=max(x, y), rtt_ms=1.0, measured_at=1.0))
    clock[0] += 31
    m.detect()
    assert not m.members and not m.links.records()  # dropped, with their links
    m.merge(Gossip(sender=y, members=[_rec(x, hb=3)]))
    assert x not in m.members  # the tombstone stops old gossip from reviving it
    m.merge(Gossip(sender=x, members=[_rec(x, inc=2, hb=1)]))
    assert m.members[x].status == "up"  # a restart (new incarnation) rejoins
    # links with an unknown end are not taken; non-canonical links are refused
    stray = LinkRecord(a=x, b="9" * 32, rtt_ms=1, measured_at=2)
    m.merge(Gossip(sender=x, members=[_rec(x, inc=2, hb=2)], links=[stray]))
    assert not m.links.records()
    lo, hi = sorted((x, y))
    assert not m.links.merge(LinkRecord(a=hi, b=lo, rtt_ms=1, measured_at=3))
    # a record altered on the way (another host, same signature) or made by another key is not taken
    moved = _rec(x, inc=2, hb=9).model_copy(update={"host": "10.6.6.6"})
    stolen = _rec(x, inc=2, hb=9).model_copy(update={"public_key": IDENTITIES[0].public_key})
    m.merge(Gossip(sender=y, members=[moved, stolen]))
    assert m.members[x].record.host == "10.0.0.9" and m.members[x].version == (2, 2)
    # our own record is signed, and verifies; a newer "us" that we did not sign moves nothing
    me = m.self_record()
    assert me.node_id == m.node_id and record_problem(me) is None
    fake_me = me.model_copy(update={"incarnation": me.incarnation + 5})
    m.merge(Gossip(sender=y, members=[fake_me]))
    assert m.incarnation == me.incarnation


def test_cli_modules_import_light() -> None:
    code = (
        "import sys; import shoal.cluster.cli, shoal.cluster.status; "
        "assert 'torch' not in sys.modules and 'aiohttp' not in sys.modules, 'heavy import'; "
        "import shoal.cluster.node; assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# -- real nodes on loopback ------------------------------------------------------------------------------


def _view(node: NodeProc) -> dict[str, dict[str, Any]]:
    """node id -> node entry, as `node` sees the cluster."""
    return {n["id"]: n for n in node.cluster()["nodes"]}


def _sees(observer: NodeProc, expected: dict[str, str]) -> bool:
    """observer's view has exactly these node ids with these statuses."""
    view = _view(observer)
    return {nid: n["status"] for nid, n in view.items()} == expected


def test_three_nodes_kill_and_rejoin(launcher: NodeLauncher) -> None:
    a = launcher.start("a")
    b = launcher.start("b", peers=[a])
    c = launcher.start("c", peers=[b])  # c knows only b, and must learn a through it
    nodes = [a, b, c]
    all_up = {n.node_id: "up" for n in nodes}
    # join within 3 s of the last node being up, on every node
    for n in nodes:
        wait_for(
            lambda n=n: _sees(n, all_up), timeout_s=3.0 - (time.monotonic() - c.ready_at), what=f"{n.name} sees 3 up"
        )
    print(f"joined: all see 3 up {time.monotonic() - c.ready_at:.2f} s after c was up")

    view = c.cluster()
    assert view["instances"] == []
    by_id = {n["id"]: n for n in view["nodes"]}
    assert by_id[a.node_id]["address"] == a.address and by_id[a.node_id]["name"] == "a"
    prof = by_id[a.node_id]["profile"]
    assert prof["gflops_fp32"] > 0 and prof["memory_bandwidth_gbps"] > 0 and prof["cpu_cores_logical"] >= 1
    assert prof["ram_total_bytes"] > 0 and by_id[a.node_id]["memory_offered_bytes"] > 0

    # every pair measured, and every node ends up with all three links
    def links_everywhere() -> bool:
        for n in nodes:
            links = n.cluster()["links"]
            if len(links) != 3 or any(lk["bandwidth_mbps"] is None for lk in links):
                return False
        return True

    wait_for(links_everywhere, timeout_s=20.0, what="3 links on every node")
    for lk in a.cluster()["links"]:
        assert 0 < lk["rtt_ms"] < 100 and lk["bandwidth_mbps"] > 10, lk

    out = subprocess.run(
        [sys.executable, "-m", "shoal.cli", "status", "--cluster", a.url],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "GFLOP/S" in out.stdout and "RTT MS" in out.stdout and out.stdout.count(" up ") >= 3, out.stdout
    print(out.stdout)

    # SIGKILL b: a and c mark it down within 5 s
    b_id = b.node_id
    b.kill()
    killed = time.monotonic()
    for n in (a, c):
        wait_for(
            lambda n=n: _view(n)[b_id]["status"] == "down",
            timeout_s=5.0 - (time.monotonic() - killed),
            what=f"{n.name} sees b down",
        )
    print(f"down: b marked down on a and c {time.monotonic() - killed:.2f} s after SIGKILL")
    assert _view(a)[c.node_id]["status"] == "up"  # a and c learned each other, so they stay joined

    # restarted with the same home and port: same id, back up everywhere within 3 s
    b.start().wait_ready()
    assert b.node_id == b_id
    for n in nodes:
        wait_for(
            lambda n=n: _sees(n, all_up), timeout_s=3.0 - (time.monotonic() - b.ready_at), what=f"{n.name} sees b back"
        )
    print(f"rejoin: b up everywhere {time.monotonic() - b.ready_at:.2f} s after its restart")

    # clean stop: leave is announced and the others drop c at once, not after a timeout
    assert c.stop() == 0
    c_id = c.node_id
    for n in (a, b):
        wait_for(lambda n=n: c_id not in _view(n), timeout_s=2.0, what=f"{n.name} drops c after its leave")
    assert "announced leave" in c.log()


def test_wrong_key_is_refused(launcher: NodeLauncher) -> None:
    a = launcher.start("a")
    intruder = launcher.start("intruder", peers=[a], key="a-different-key-0123456789")
    b = launcher.start("b", peers=[a, intruder])  # b is also told to greet the intruder
    good = {a.node_id: "up", b.node_id: "up"}
    for n in (a, b):
        wait_for(lambda n=n: _sees(n, good), timeout_s=5.0, what=f"{n.name} sees a and b")
    # let several hellos and gossip rounds pass, then check again: never a member anywhere
    wait_for(lambda: "refused POST /peer/hello from 127.0.0.1: bad tag" in a.log(), 10.0, what="refusal logged on a")
    wait_for(
        lambda: f"hello to {intruder.address} failed" in b.log() and "HTTP 401 (unauthenticated): bad tag" in b.log(),
        10.0,
        what="b's hello refused by the intruder",
    )
    time.sleep(1.0)
    for n in (a, b):
        assert _sees(n, good), _view(n)
        assert all(lk["a"] != intruder.node_id and lk["b"] != intruder.node_id for lk in n.cluster()["links"])
    assert set(_view(intruder)) == {intruder.node_id}


def _post(node: NodeProc, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(node.host, node.port, timeout=10)
    try:
        conn.request("POST", path, body=body, headers=headers)
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def test_bad_peer_messages_are_refused(launcher: NodeLauncher) -> None:
    a = launcher.start("a")
    me = uuid.uuid4().hex
    cipher = PeerCipher.from_cluster_key(me, TEST_KEY)

    def sealed(path: str, body: bytes, now: float | None = None) -> tuple[dict[str, str], bytes]:
        return cipher.seal_request("POST", path, a.node_id, body, now=now)

    ping = b'{"seq": 1}'
    ok = sealed("/peer/ping", ping)
    assert _post(a, "/peer/ping", ok[1], ok[0])[0] == 200
    tampered = sealed("/peer/ping", ping)
    guesser = PeerCipher.from_cluster_key(me, "wrong-key-0123456789")
    cases = {
        "unsigned": (401, "/peer/gossip", {}, b'{"sender": "x", "members": []}'),
        "replayed": (401, "/peer/ping", *ok),
        "wrong key": (401, "/peer/ping", *guesser.seal_request("POST", "/peer/ping", a.node_id, ping)),
        "stale": (401, "/peer/ping", *sealed("/peer/ping", ping, now=time.time() - 300)),
        "tampered": (401, "/peer/ping", tampered[0], tampered[1][:-1] + bytes([tampered[1][-1] ^ 1])),
        "misaddressed": (401, "/peer/ping", *cipher.seal_request("POST", "/peer/ping", "f" * 32, ping)),
        "not json": (400, "/peer/gossip", *sealed("/peer/gossip", b"\x00\xffnot json")),
        "wrong shape": (400, "/peer/gossip", *sealed("/peer/gossip", b'{"sender": "zz", "members": "no"}')),
        "extra field": (400, "/peer/ping", *sealed("/peer/ping", b'{"seq": 1, "evil": true}')),
        "forged sender": (
            400,
            "/peer/leave",
            *sealed("/peer/leave", json.dumps({"sender": "f" * 32, "incarnation": 1, "signature": "0" * 128}).encode()),
        ),
        "unknown path": (404, "/peer/nothing", *sealed("/peer/nothing", b"{}")),
        "oversized": (413, "/peer/gossip", *sealed("/peer/gossip", b"{" + b" " * (2 << 20) + b"}")),
        "oversized probe": (413, "/peer/probe", *sealed("/peer/probe", b"x" * (17 << 20))),
    }
    for name, (status, path, headers, body) in cases.items():
        got, reply_headers, reply = _post(a, path, body, headers)
        assert got == status, (name, got, reply)
        if status in (400, 404):  # refused after the request proved the key: the refusal is sealed
            assert b"error" not in reply, name
            _, plain = cipher.open_reply("POST", path, headers, got, reply_headers, reply)
            assert json.loads(plain)["error"], name
        else:  # refused before: plaintext, and only which check failed
            assert H_NODE not in reply_headers and json.loads(reply)["error"], (name, reply)

    # junk that is not HTTP at all, and a client that hangs up mid-body
    with socket.create_connection((a.host, a.port), timeout=5) as s:
        s.sendall(b"\x16\x03\x01 garbage\r\n\r\n")
        s.recv(1024)
    with socket.create_connection((a.host, a.port), timeout=5) as s:
        s.sendall(b"POST /peer/gossip HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n{")

    # still serving, still alone, and it said why it refused
    assert a.proc is not None and a.proc.poll() is None
    view = a.cluster()
    assert [n["id"] for n in view["nodes"]] == [a.node_id]
    log = a.log()
    for reason in ("unsigned", "replayed nonce", "bad tag", "clock skew", "not addressed", "malformed", "larger than"):
        assert reason in log, reason
    assert "refused POST /peer/gossip from 127.0.0.1" in log


def test_node_flags_and_home(launcher: NodeLauncher, tmp_path: Path) -> None:
    """--memory-limit caps the offer; a second daemon on the same --home is refused; SIGTERM exits 0."""
    a = launcher.start("a", extra=["--memory-limit", "1GiB"])
    me = _view(a)[a.node_id]
    assert me["memory_offered_bytes"] == 2**30 <= me["memory_available_bytes"]
    assert (a.home / "profile.json").exists()
    twin = NodeProc("a-twin", "127.0.0.1", free_port(), a.home, ["--cluster-key", TEST_KEY, "--no-discovery"], tmp_path)
    twin.start()
    assert twin.proc is not None and twin.proc.wait(30) == 1
    assert "another shoal node is running" in twin.log()
    assert a.stop() == 0
    assert "stopped" in a.log()
