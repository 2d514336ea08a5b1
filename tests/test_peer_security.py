"""The peer channel against an eavesdropper, a tamperer and a peer that holds the key: real nodes on
loopback ports, a TCP proxy that records (or alters) the bytes between a `PeerClient` and a node,
and messages made by hand with the cluster key, as a compromised node could make them."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
from conftest import TEST_KEY, NodeLauncher, NodeProc, free_port, wait_for

from shoal.cluster.auth import (
    H_NONCE,
    H_TIME,
    H_TO,
    PeerCipher,
    cluster_fingerprint,
    new_fingerprint_salt,
)
from shoal.cluster.discovery import Discovery
from shoal.cluster.identity import NodeIdentity, load_or_create_identity
from shoal.cluster.membership import leave_bytes, record_bytes
from shoal.cluster.messages import Ack, Gossip, Hello, HelloReply, Leave, MemberRecord, Ping, Pong
from shoal.cluster.peer import OwnAddresses, PeerClient, PeerError
from shoal.config import NodeConfig, load_or_create_node_id

MARKER = "marker-7f3a: my bank PIN is 4921"
# Keys long enough that ciphertext does not hold them by chance (two bytes such as `{"` turn up in
# a few kilobytes of random bytes about once in four captures).
JSON_KEYS = (b'"members"', b'"node_id"', b'"sender"', b'"name"', b'"seq"', b'"public_key"')

Edit = Callable[[bytes, bytes], tuple[bytes, bytes]]  # (head, body) -> (head, body)


# -- helpers -------------------------------------------------------------------------------------
class Proxy:
    """An HTTP/1.1-aware TCP proxy on a loopback port in front of a node: keeps every message that
    passes (head and body, each direction) and lets a test alter the next one."""

    def __init__(self, target: NodeProc) -> None:
        self.target = target
        self.requests: list[tuple[bytes, bytes]] = []
        self.replies: list[tuple[bytes, bytes]] = []
        self.edit_request: Edit | None = None
        self.edit_reply: Edit | None = None
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Proxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    def wire(self) -> bytes:
        return b"".join(h + b for h, b in [*self.requests, *self.replies])

    async def _serve(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        nr, nw = await asyncio.open_connection(self.target.host, self.target.port)
        try:
            while True:
                req = await _read_message(cr)
                if req is None:
                    break
                self.requests.append(req)
                edit, self.edit_request = self.edit_request, None
                nw.write(b"".join(edit(*req) if edit else req))
                rep = await _read_message(nr)
                if rep is None:
                    break
                self.replies.append(rep)
                edit, self.edit_reply = self.edit_reply, None
                cw.write(b"".join(edit(*rep) if edit else rep))
        finally:
            nw.close()
            cw.close()


async def _read_message(r: asyncio.StreamReader) -> tuple[bytes, bytes] | None:
    try:
        head = await r.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head, await r.readexactly(length)


def _set_header(head: bytes, name: str, value: str) -> bytes:
    lines = [
        f"{name}: {value}".encode() if ln.lower().startswith(name.lower().encode() + b":") else ln
        for ln in head.split(b"\r\n")
    ]
    return b"\r\n".join(lines)


def _header(head: bytes, name: str) -> str:
    for ln in head.split(b"\r\n"):
        if ln.lower().startswith(name.lower().encode() + b":"):
            return ln.split(b":", 1)[1].strip().decode()
    raise KeyError(name)


def _flip_last(head: bytes, body: bytes) -> tuple[bytes, bytes]:
    return head, body[:-1] + bytes([body[-1] ^ 1])


def _record(me: NodeIdentity, name: str = "peer", host: str = "127.0.0.1", port: int = 9,
            incarnation: int = 1, heartbeat: int = 1) -> MemberRecord:
    """A member record signed by `me`, as a node makes its own."""
    rec = MemberRecord(node_id=me.node_id, public_key=me.public_key, name=name, host=host, port=port,
                       incarnation=incarnation, heartbeat=heartbeat, signature="0" * 128)
    return rec.model_copy(update={"signature": me.sign(record_bytes(rec))})


async def _with_client(fn: Callable[[PeerClient], object], node_id: str, key: str = TEST_KEY) -> object:
    async with aiohttp.ClientSession() as session:
        return await fn(PeerClient(PeerCipher.from_cluster_key(node_id, key), session))


def _raw_post(host: str, port: int, head: bytes, body: bytes) -> tuple[int, bytes]:
    """Send one captured request as it was; (status, reply body)."""

    async def go() -> tuple[bytes, bytes] | None:
        r, w = await asyncio.open_connection(host, port)
        w.write(head + body)
        try:
            return await _read_message(r)
        finally:
            w.close()

    reply = asyncio.run(go())
    assert reply is not None
    return int(reply[0].split(b" ", 2)[1]), reply[1]


# -- what travels --------------------------------------------------------------------------------
def test_wire_holds_no_plaintext(launcher: NodeLauncher) -> None:
    """A hello whose record carries a marker, a gossip and pings through a recording proxy: the
    marker travels both ways (the node puts our record in its table and sends it back), yet neither
    direction holds it, nor any JSON, on the wire."""
    a = launcher.start("a")
    me = NodeIdentity.from_seed(os.urandom(32))

    async def go(client: PeerClient) -> None:
        async with Proxy(a) as proxy:
            hello = Hello(sender=me.node_id, members=[_record(me, name=MARKER)])
            reply, replier = await client.call("127.0.0.1", proxy.port, "/peer/hello", hello, HelloReply,
                                               node_id=a.node_id)
            assert replier == a.node_id and MARKER in {r.name for r in reply.members}
            gossip = Gossip(sender=me.node_id, members=[_record(me, name=MARKER, heartbeat=2)])
            reply, _ = await client.call("127.0.0.1", proxy.port, "/peer/gossip", gossip, Gossip, node_id=a.node_id)
            assert MARKER in {r.name for r in reply.members}
            for seq in range(3):
                pong, _ = await client.call("127.0.0.1", proxy.port, "/peer/ping", Ping(seq=seq), Pong,
                                            node_id=a.node_id)
                assert pong.seq == seq
            assert len(proxy.requests) == len(proxy.replies) == 5
            wire = proxy.wire()
            assert MARKER.encode() not in wire and b"4921" not in wire
            for key in JSON_KEYS:
                assert key not in wire, key
            for head, body in [*proxy.requests, *proxy.replies]:
                assert b"application/octet-stream" in head.lower()
                with pytest.raises(ValueError):
                    json.loads(body)

    asyncio.run(_with_client(go, me.node_id))


def test_altered_swapped_wrong_key_and_replayed_are_refused(launcher: NodeLauncher) -> None:
    """An on-path attacker flips a body byte, swaps a header or the path, alters a reply or its
    status, or replays a request; a keyless one guesses. Each is refused, and the node serves on."""
    a = launcher.start("a")
    me = NodeIdentity.from_seed(os.urandom(32))
    refusals: dict[str, str] = {}
    captured: list[bytes] = []  # (head, body) of the first request

    async def go(client: PeerClient) -> None:
        async def ping() -> Pong:
            return (await client.call("127.0.0.1", proxy.port, "/peer/ping", Ping(seq=7), Pong, node_id=a.node_id))[0]

        async with Proxy(a) as proxy:
            assert (await ping()).seq == 7
            captured.extend(proxy.requests[-1])
            request_edits: dict[str, Edit] = {
                "body byte": _flip_last,
                "recipient": lambda h, b: (_set_header(h, H_TO, "0" * 32), b),
                "timestamp": lambda h, b: (_set_header(h, H_TIME, f"{float(_header(h, H_TIME)) + 0.001:.3f}"), b),
                "path": lambda h, b: (h.replace(b"POST /peer/ping ", b"POST /peer/leave ", 1), b),
                "nonce": lambda h, b: (_set_header(h, H_NONCE, "ab" * 16), b),
            }
            for name, edit in request_edits.items():
                proxy.edit_request = edit
                with pytest.raises(PeerError) as e:
                    await ping()
                refusals[name] = str(e.value)
            reply_edits: dict[str, Edit] = {
                "reply byte": _flip_last,
                "reply status": lambda h, b: (h.replace(b"HTTP/1.1 200 OK", b"HTTP/1.1 201 Created", 1), b),
            }
            for name, edit in reply_edits.items():
                proxy.edit_reply = edit
                with pytest.raises(PeerError) as e:
                    await ping()
                refusals[name] = str(e.value)
            assert (await ping()).seq == 7

    asyncio.run(_with_client(go, me.node_id))
    # the request captured first, sent again as it was
    status, body = _raw_post(a.host, a.port, *captured)
    refusals["replay"] = f"{status} {body.decode()}"


    async def wrong_key(client: PeerClient) -> None:
        with pytest.raises(PeerError) as e:
            await client.call(a.host, a.port, "/peer/ping", Ping(), Pong, node_id=a.node_id)
        refusals["wrong key"] = str(e.value)

    asyncio.run(_with_client(wrong_key, me.node_id, key="a-guessed-key-0123456789"))
    print(json.dumps(refusals, indent=1))
    for name in ("body byte", "recipient", "timestamp", "path", "nonce", "wrong key"):
        assert "HTTP 401 (unauthenticated): bad tag" in refusals[name], name
    for name in ("reply byte", "reply status"):
        assert "bad reply tag" in refusals[name], name
    assert refusals["replay"].startswith("401") and "replayed nonce" in refusals["replay"]
    assert a.proc is not None and a.proc.poll() is None
    assert [n["id"] for n in a.cluster()["nodes"]] == [a.node_id]
    assert "bad tag" in a.log() and "replayed nonce" in a.log()


# -- membership ----------------------------------------------------------------------------------
def test_forged_member_records_are_refused(launcher: NodeLauncher) -> None:
    """A peer with the key (a compromised node) tries to move node b to its own address, to take b's
    id with its own key, to make b leave, and to outbid a's own incarnation: a refuses all of it,
    logs why, keeps b where b says it is, and serves on. The peer's own record is taken."""
    a = launcher.start("a")
    b = launcher.start("b", peers=[a])
    wait_for(lambda: {n["id"] for n in a.cluster()["nodes"]} == {a.node_id, b.node_id}, 10, what="a sees b")
    evil = NodeIdentity.from_seed(os.urandom(32))
    evil_addr = ("127.0.0.1", free_port())

    async def go(client: PeerClient) -> None:
        async def gossip(*records: MemberRecord) -> Gossip:
            msg = Gossip(sender=evil.node_id, members=[_record(evil, "evil", *evil_addr), *records])
            return (await client.call(a.host, a.port, "/peer/gossip", msg, Gossip, node_id=a.node_id))[0]

        table = {r.node_id: r for r in (await gossip()).members}
        real_b, real_a = table[b.node_id], table[a.node_id]
        bump = {"heartbeat": real_b.heartbeat + 10_000}  # newer than anything a holds, so it is looked at
        moved = real_b.model_copy(update={**bump, "host": evil_addr[0], "port": evil_addr[1]})
        stolen = _record(evil, "b", *evil_addr, incarnation=real_b.incarnation,
                         heartbeat=real_b.heartbeat + 10_000).model_copy(update={"node_id": b.node_id})
        scribbled = real_b.model_copy(update={**bump, "signature": os.urandom(64).hex()})
        new_a = _record(evil, "a", *evil_addr, incarnation=real_a.incarnation + 1).model_copy(
            update={"node_id": a.node_id})
        await gossip(moved, stolen, scribbled, new_a)
        incarnation.append(real_b.incarnation)

    async def leave_as_b(client: PeerClient) -> None:
        # The cluster key lets the peer speak in b's name on the channel; b's signature it cannot make.
        msg = Leave(sender=b.node_id, incarnation=incarnation[0],
                    signature=evil.sign(leave_bytes(b.node_id, incarnation[0])))
        with pytest.raises(PeerError, match="400"):
            await client.call(a.host, a.port, "/peer/leave", msg, Ack, node_id=a.node_id)

    incarnation: list[int] = []
    asyncio.run(_with_client(go, evil.node_id))
    asyncio.run(_with_client(leave_as_b, b.node_id))
    time.sleep(1.0)  # a few gossip rounds, so a forged record taken anywhere would have spread
    for n in (a, b):
        view = {x["id"]: x for x in n.cluster()["nodes"]}
        assert view[b.node_id]["address"] == b.address and view[b.node_id]["status"] == "up", view
        assert view[a.node_id]["address"] == a.address, view
    me_a = {x["id"]: x for x in a.cluster()["nodes"]}
    assert me_a[evil.node_id]["address"] == f"{evil_addr[0]}:{evil_addr[1]}"  # its own record: taken
    log = a.log()
    assert f"refused member record of {b.node_id[:8]}" in log
    assert "bad record signature" in log and "node id does not match the record's key" in log
    assert "leave not signed by the leaving node" in log
    assert "newer incarnation of this node" not in log
    assert a.proc is not None and a.proc.poll() is None


def test_hello_replayed_to_another_node_is_refused(launcher: NodeLauncher) -> None:
    """A hello captured on its way to a, sent to b (same key, another node): b refuses it as not
    addressed to it, whether it named a by id or by address; a still takes the one it was sent."""
    a = launcher.start("a")
    b = launcher.start("b")
    me = NodeIdentity.from_seed(os.urandom(32))
    hello = Hello(sender=me.node_id, members=[_record(me)]).model_dump_json().encode()
    cipher = PeerCipher.from_cluster_key(me.node_id, TEST_KEY)
    for recipient in (a.node_id, a.address):
        headers, body = cipher.seal_request("POST", "/peer/hello", recipient, hello)
        head = "POST /peer/hello HTTP/1.1\r\nHost: x\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        head += f"Content-Length: {len(body)}\r\n\r\n"
        status, reply = _raw_post(b.host, b.port, head.encode(), body)
        assert status == 401 and b"not addressed to this node" in reply, (status, reply)
        status, _ = _raw_post(a.host, a.port, head.encode(), body)
        assert status == 200
    assert "refused POST /peer/hello from 127.0.0.1: not addressed to this node" in b.log()
    assert [n["id"] for n in b.cluster()["nodes"]] == [b.node_id]
    assert me.node_id in {n["id"] for n in a.cluster()["nodes"]}


class FakeSeed:
    """A listener without the key at a seed address: records each request and answers 401, as
    anything that is not a node of the cluster would."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.times: list[float] = []  # monotonic time of each request
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data and (chunk := conn.recv(65536)):
                    data += chunk
                head, _, body = data.partition(b"\r\n\r\n")
                lines = head.decode().split("\r\n")[1:]
                headers = {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in lines)}
                while len(body) < int(headers.get("Content-Length", 0)) and (chunk := conn.recv(65536)):
                    body += chunk
                self.requests.append((headers, body))
                self.times.append(time.monotonic())
                conn.sendall(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")

    def close(self) -> None:
        self.sock.close()


def test_no_member_table_to_an_unproven_address(launcher: NodeLauncher) -> None:
    """c knows a, and keeps greeting a seed address whose listener never proves the key: every hello
    it sends there is sealed, addressed to that address, and holds c's own record only."""
    seed = FakeSeed()
    try:
        a = launcher.start("a")
        c = launcher.start("c", peers=[a, f"127.0.0.1:{seed.port}"])
        wait_for(lambda: {n["id"] for n in c.cluster()["nodes"]} == {a.node_id, c.node_id}, 10, what="c sees a")
        knows_a = time.monotonic()
        wait_for(lambda: seed.times and seed.times[-1] > knows_a, 20, what="c greets the seed after it knows a")
    finally:
        seed.close()
    opener = PeerCipher.from_cluster_key("0" * 32, TEST_KEY, is_recipient=lambda to: True)
    for headers, body in seed.requests:
        assert headers[H_TO] == f"127.0.0.1:{seed.port}"
        sender, plain = opener.open_request("POST", "/peer/hello", headers, body)
        hello = Hello.model_validate_json(plain)
        assert sender == c.node_id and [r.node_id for r in hello.members] == [c.node_id] and not hello.links
    assert "hello to 127.0.0.1" in c.log() and "HTTP 401 (unauthenticated)" in c.log()


# -- identity ------------------------------------------------------------------------------------
def test_node_identity_in_home(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "fresh"
    home.mkdir()
    nid = load_or_create_node_id(home)
    key = home / "node.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    identity, note = load_or_create_identity(home)
    assert identity.node_id == nid == (home / "node_id").read_text().strip() and note is None
    assert load_or_create_node_id(home) == nid  # stable across starts
    assert capsys.readouterr().err == ""
    # a home from before node keys: a random id, no key; it gets one, and says so once
    old_home = tmp_path / "old"
    old_home.mkdir()
    (old_home / "node_id").write_text("0123456789abcdef" * 2 + "\n")
    new = load_or_create_node_id(old_home)
    err = capsys.readouterr().err
    assert new != "0123456789abcdef" * 2 and f"this node's id is now {new}" in err and "0123456789abcdef" in err
    assert load_or_create_node_id(old_home) == new and capsys.readouterr().err == ""
    (old_home / "node.key").write_text("not a key\n")
    with pytest.raises(ValueError, match="not a node key"):
        load_or_create_node_id(old_home)


def test_short_cluster_key_is_refused(tmp_path: Path) -> None:
    for key, ok in (("k" * 15, False), ("k" * 16, True)):
        args = argparse.Namespace(home=str(tmp_path / "h"), cluster_key=key)
        if ok:
            assert NodeConfig.from_args(args, environ={}).cluster_key == key
        else:
            with pytest.raises(ValueError, match="too short"):
                NodeConfig.from_args(args, environ={})


def test_recipient_is_this_node() -> None:
    own = OwnAddresses("a" * 32, 7000, ("10.9.8.7", None))
    for yes in ("a" * 32, "127.0.0.1:7000", "localhost:7000", "LOCALHOST.:7000", f"{socket.gethostname()}:7000",
                "10.9.8.7:7000"):
        assert own(yes), yes
    for no in ("b" * 32, "127.0.0.1:7001", "192.0.2.1:7000", "example.com:7000", "7000", ""):
        assert not own(no), no
    if "::1" in own.addresses():
        assert own("[::1]:7000") and own("[0:0::1]:7000")


# -- discovery -----------------------------------------------------------------------------------
def test_mdns_fingerprint_is_salted(tmp_path: Path) -> None:
    """Two nodes of one cluster publish different (salt, tag) pairs that each recognises; a node of
    another cluster, or a tag moved to another salt, is not recognised."""

    def discovery(name: str, key: str) -> Discovery:
        me = NodeIdentity.from_seed(os.urandom(32))
        cfg = NodeConfig(home=tmp_path, node_id=me.node_id, name=name, cluster_key=key)
        return Discovery(cfg, lambda h, p: None, lambda h, p: None)

    d1, d2 = discovery("one", TEST_KEY), discovery("two", TEST_KEY)
    other = discovery("other", "another-cluster-key-0123")
    assert d1.salt != d2.salt and d1.fingerprint != d2.fingerprint
    t = time.perf_counter()
    assert cluster_fingerprint(TEST_KEY, d2.salt) == d2.fingerprint
    print(f"one fingerprint check: {(time.perf_counter() - t) * 1000:.1f} ms")

    async def check() -> None:
        assert await d1._same_cluster(d2.salt, d2.fingerprint)
        assert await d2._same_cluster(d1.salt, d1.fingerprint)
        assert await d1._same_cluster(d2.salt, d2.fingerprint)  # cached: the same answer
        assert not await d1._same_cluster(other.salt, other.fingerprint)
        assert not await other._same_cluster(d1.salt, d1.fingerprint)
        assert not await d1._same_cluster(new_fingerprint_salt(), d2.fingerprint)
        assert not await d1._same_cluster("", d2.fingerprint)

    asyncio.run(check())
