"""Link measurement, mDNS discovery and a model split over nodes, across network namespaces this test
builds itself.

Topology, all inside namespaces (the host's own namespace is never touched):

    shsw<tag>: bridge br0 ── p0 ═ eth0 in shn<tag>0 (10.213.0.1)
                        ├── p1 ═ eth0 in shn<tag>1 (10.213.0.2)
                        └── p2 ═ eth0 in shn<tag>2 (10.213.0.3)

One link (node 0 ↔ node 1) is shaped with tc on both ends' egress — an htb class (rate, or a netem
leaf for delay) that a u32 filter on the other end's address feeds — so the other two links stay
as fast as the bridge.
Needs root, iproute2 (`ip`, `tc`); skipped with the reason when the machine forbids any of it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import TEST_API_KEY, NodeLauncher, NodeProc, wait_for

from shoal.catalog import CATALOG, DEFAULT_MODEL, bundled_path

pytestmark = pytest.mark.netns

SUBNET = "10.213.0"
PORT = 7400  # namespaces are isolated: every node can use the same port


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {out.stderr.strip() or out.returncode}")
    return out


class Net:
    """Three node namespaces on one bridge that lives in a fourth namespace."""

    def __init__(self, n: int = 3) -> None:
        tag = uuid.uuid4().hex[:6]
        self.switch = f"shsw{tag}"
        self.names = [f"shn{tag}{i}" for i in range(n)]
        self.created: list[str] = []

    def ip(self, i: int) -> str:
        return f"{SUBNET}.{i + 1}"

    def up(self) -> None:
        sw = self.switch
        _run("ip", "netns", "add", sw)
        self.created.append(sw)
        _run("ip", "-n", sw, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", sw, "link", "set", "br0", "up")
        for i, ns in enumerate(self.names):
            _run("ip", "netns", "add", ns)
            self.created.append(ns)
            # Made straight between the two namespaces: no interface ever appears in the host's.
            _run("ip", "-n", sw, "link", "add", f"p{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            _run("ip", "-n", sw, "link", "set", f"p{i}", "master", "br0", "up")
            _run("ip", "-n", ns, "addr", "add", f"{self.ip(i)}/24", "dev", "eth0")
            _run("ip", "-n", ns, "link", "set", "eth0", "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            # mDNS needs a route for multicast; only inside this namespace.
            _run("ip", "-n", ns, "route", "add", "224.0.0.0/4", "dev", "eth0")

    def down(self) -> None:
        for ns in reversed(self.created):  # deleting a namespace deletes its veth ends
            _run("ip", "netns", "del", ns, check=False)
        self.created.clear()

    def shape(self, i: int, j: int, klass: list[str], leaf: list[str] | None = None) -> None:
        """Shape traffic between nodes i and j only, both directions: an htb class (e.g. rate
        100mbit) with an optional leaf qdisc (e.g. netem delay 5ms); other traffic matches no
        filter and leaves through htb's unshaped direct queue."""
        for src, dst in ((i, j), (j, i)):
            tc = ["ip", "netns", "exec", self.names[src], "tc"]
            _run(*tc, "qdisc", "add", "dev", "eth0", "root", "handle", "1:", "htb")
            _run(*tc, "class", "add", "dev", "eth0", "parent", "1:", "classid", "1:2", "htb", *klass)
            if leaf:
                _run(*tc, "qdisc", "add", "dev", "eth0", "parent", "1:2", "handle", "20:", *leaf)
            _run(
                *tc,
                "filter",
                "add",
                "dev",
                "eth0",
                "parent",
                "1:",
                "protocol",
                "ip",
                "prio",
                "1",
                "u32",
                "match",
                "ip",
                "dst",
                f"{self.ip(dst)}/32",
                "flowid",
                "1:2",
            )

    def qdisc_supported(self, leaf: list[str]) -> str | None:
        """None if this kernel accepts the qdisc, else the reason it does not."""
        ns = self.names[0]
        out = _run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "lo", "root", *leaf, check=False)
        if out.returncode != 0:
            return out.stderr.strip() or f"tc exit {out.returncode}"
        _run("ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", "lo", "root", check=False)
        return None


@pytest.fixture
def net() -> Iterator[Net]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            pytest.skip(f"`{tool}` not found: install iproute2")
    n = Net()
    try:
        n.up()
    except RuntimeError as e:
        n.down()
        pytest.skip(f"cannot build network namespaces here: {e}")
    try:
        yield n
    finally:
        n.down()


@pytest.fixture
def nslauncher(tmp_path: Path, cached_profile: Path) -> Iterator[NodeLauncher]:
    nl = NodeLauncher(tmp_path, cached_profile)
    try:
        yield nl
    finally:
        nl.close()


def _start_three(nl: NodeLauncher, net: Net, discovery: bool = False) -> list[NodeProc]:
    nodes: list[NodeProc] = []
    for i, ns in enumerate(net.names):
        peers = [] if discovery or i == 0 else [nodes[0]]
        nodes.append(
            nl.start(f"n{i}", peers=peers, host=net.ip(i), port=PORT, netns=ns, discovery=discovery, wait=False)
        )
    for n in nodes:
        n.wait_ready(timeout_s=60)
    return nodes


def _links(node: NodeProc, ids: list[str]) -> dict[tuple[int, int], dict[str, Any]]:
    """(i, j) with i < j -> the link record between nodes i and j, as `node` sees them."""
    out = {}
    for lk in node.cluster(timeout_s=5)["links"]:
        i, j = sorted((ids.index(lk["a"]), ids.index(lk["b"])))
        out[(i, j)] = lk
    return out


def _all_links(node: NodeProc, ids: list[str]) -> dict[tuple[int, int], dict[str, Any]]:
    found: dict[tuple[int, int], dict[str, Any]] = {}

    def ready() -> bool:
        found.clear()
        found.update(_links(node, ids))
        return len(found) == 3 and all(lk["bandwidth_mbps"] for lk in found.values())

    wait_for(ready, timeout_s=40, interval_s=0.3, what="all 3 links measured")
    return found


def test_netem_delay_shows_in_rtt(net: Net, nslauncher: NodeLauncher) -> None:
    leaf = ["netem", "delay", "5ms"]
    if why := net.qdisc_supported(leaf):
        pytest.skip(f"tc netem unavailable in this kernel (sch_netem missing?): {why}")
    net.shape(0, 1, ["rate", "10gbit"], leaf)
    nodes = _start_three(nslauncher, net)
    ids = [n.node_id for n in nodes]
    links = _all_links(nodes[2], ids)
    print({k: (v["rtt_ms"], v["bandwidth_mbps"]) for k, v in links.items()})
    assert 8.0 <= links[(0, 1)]["rtt_ms"] <= 12.0, links[(0, 1)]  # 2 x 5 ms, ±20%
    assert links[(0, 2)]["rtt_ms"] < 3.0 and links[(1, 2)]["rtt_ms"] < 3.0, links


def test_rate_limit_shows_in_bandwidth(net: Net, nslauncher: NodeLauncher) -> None:
    if why := net.qdisc_supported(["htb"]):
        pytest.skip(f"tc htb unavailable: {why}")
    net.shape(0, 1, ["rate", "100mbit", "ceil", "100mbit"])
    nodes = _start_three(nslauncher, net)
    ids = [n.node_id for n in nodes]
    links = _all_links(nodes[2], ids)
    print("htb 100mbit", {k: (v["rtt_ms"], v["bandwidth_mbps"]) for k, v in links.items()})
    assert 75.0 <= links[(0, 1)]["bandwidth_mbps"] <= 125.0, links[(0, 1)]  # 100 Mbit/s ±25%
    for k in ((0, 2), (1, 2)):
        assert links[k]["bandwidth_mbps"] > 200.0, links[k]  # the unshaped links stay fast


def _multicast_passes(net: Net) -> bool:
    """Does a multicast datagram from node 0's namespace reach node 1's across the bridge?"""
    group, port = "239.255.213.13", 45213
    recv = (
        "import socket,struct;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);"
        f"s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);s.bind(('',{port}));"
        "s.setsockopt(socket.IPPROTO_IP,socket.IP_ADD_MEMBERSHIP,"
        f"struct.pack('4s4s',socket.inet_aton('{group}'),socket.inet_aton('{net.ip(1)}')));"
        "s.settimeout(3);print(s.recv(100).decode())"
    )
    send = (
        "import socket,time;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);"
        f"s.setsockopt(socket.IPPROTO_IP,socket.IP_MULTICAST_IF,socket.inet_aton('{net.ip(0)}'));"
        f"[(s.sendto(b'hello',('{group}',{port})),time.sleep(0.2)) for _ in range(10)]"
    )
    r = subprocess.Popen(
        ["ip", "netns", "exec", net.names[1], sys.executable, "-c", recv], stdout=subprocess.PIPE, text=True
    )
    time.sleep(0.3)
    subprocess.run(["ip", "netns", "exec", net.names[0], sys.executable, "-c", send], timeout=10, check=False)
    try:
        out, _ = r.communicate(timeout=5)
    except subprocess.TimeoutExpired:
        r.kill()
        r.wait()
        return False
    return "hello" in out


def test_mdns_discovery_across_namespaces(net: Net, nslauncher: NodeLauncher) -> None:
    if not _multicast_passes(net):
        pytest.skip("multicast does not pass the bridge between the namespaces here")
    nodes = _start_three(nslauncher, net, discovery=True)
    ids = {n.node_id for n in nodes}
    last_up = max(n.ready_at for n in nodes)
    for n in nodes:
        wait_for(
            lambda n=n: {x["id"] for x in n.cluster()["nodes"] if x["status"] == "up"} == ids,
            timeout_s=15,
            interval_s=0.1,
            what=f"{n.name} discovers the others",
        )
    took = time.monotonic() - last_up
    print(f"mDNS: all three joined {took:.1f} s after the last was up")
    assert took <= 3.0, f"discovered nodes joined only after {took:.1f} s"
    assert "mDNS: announcing" in nodes[0].log()


def _ns_request(netns: str, method: str, url: str, body: Any = None, timeout_s: float = 240.0) -> list[Any]:
    """An HTTP request made from inside `netns`; the JSON lines (or the one JSON body) it answered."""
    code = (
        "import json, sys, urllib.request\n"
        "body = None if sys.argv[3] == 'null' else sys.argv[3].encode()\n"
        "req = urllib.request.Request(sys.argv[2], data=body, method=sys.argv[1], headers={'Content-Type': 'application/json',\n"
        f"                             'Authorization': 'Bearer {TEST_API_KEY}'}})\n"
        "with urllib.request.urlopen(req, timeout=float(sys.argv[4])) as r:\n"
        "    for line in r:\n"
        "        sys.stdout.write(line.decode().rstrip() + '\\n')\n"
    )
    out = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", code, method, url, json.dumps(body),
                          str(timeout_s)], capture_output=True, text=True, timeout=timeout_s + 10, check=False)
    if out.returncode != 0:
        raise OSError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "request failed")
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


@pytest.mark.skipif(bundled_path(CATALOG[DEFAULT_MODEL]) is None, reason="the bundled model is not installed")
def test_pipeline_across_namespaces_equals_one_process(net: Net, nslauncher: NodeLauncher) -> None:
    """The bundled model split over three nodes with addresses of their own (the data plane binds
    and dials the nodes' own addresses, not loopback): its greedy tokens equal one process's."""
    from shoal.engine.generate import stream_generate
    from shoal.engine.loader import load_model
    from shoal.engine.sampler import SamplingParams

    nodes = _start_three(nslauncher, net)
    ids = [n.node_id for n in nodes]
    wait_for(lambda: sum(x["status"] == "up" for x in nodes[0].cluster()["nodes"]) == 3, timeout_s=30, interval_s=0.2,
             what="three nodes up")
    ns0 = net.names[0]
    (placed,) = _ns_request(ns0, "POST", nodes[0].url + "/v1/instances",
                            {"model": DEFAULT_MODEL, "strategy": "pipeline", "nodes": 3, "context": 256})
    iid = placed["instance"]["id"]

    def ready() -> bool:
        (listing,) = _ns_request(ns0, "GET", nodes[0].url + "/v1/instances", timeout_s=10)
        assert iid not in [i["id"] for i in listing["ended"]], listing["ended"]
        inst = next(i for i in listing["instances"] if i["id"] == iid)
        return inst["status"] == "ready"

    wait_for(ready, timeout_s=240, interval_s=0.5, what="the pipeline instance ready")
    prompt = [1, 504, 3439, 282, 253, 1789, 28, 2, 198, 42, 7, 900]
    events = _ns_request(ns0, "POST", nodes[0].url + f"/v1/instances/{iid}/generate",
                         {"prompt_ids": prompt, "params": {"max_tokens": 24, "ignore_eos": True}})
    assert not [e for e in events if "error" in e], events
    got = [e["token"] for e in events if e.get("token") is not None]
    (listing,) = _ns_request(ns0, "GET", nodes[0].url + "/v1/instances", timeout_s=10)
    shards = next(i for i in listing["instances"] if i["id"] == iid)["shards"]
    assert sorted(s["node_id"] for s in shards) == sorted(ids)  # one stage on each namespace's node

    lm = load_model(DEFAULT_MODEL)
    want = [ev.token for ev, _ in stream_generate(lm.model, lm.tokenizer, prompt, SamplingParams(max_tokens=24, ignore_eos=True), 256)
            if ev.token is not None]
    assert len(got) == 24 and got == want


def _ns_stream(netns: str, url: str, body: dict[str, Any]) -> subprocess.Popen[str]:
    """A streaming chat made from inside `netns`: its stdout gives one JSON line per SSE event as
    it arrives (the client's view, unbuffered)."""
    code = (
        "import json, sys, urllib.request\n"
        "req = urllib.request.Request(sys.argv[1], data=sys.argv[2].encode(), headers={'Content-Type': 'application/json',\n"
        f"                             'Authorization': 'Bearer {TEST_API_KEY}'}})\n"
        "with urllib.request.urlopen(req, timeout=300) as r:\n"
        "    for line in r:\n"
        "        if line.startswith(b'data: {'):\n"
        "            sys.stdout.write(line[6:].decode().strip() + '\\n'); sys.stdout.flush()\n"
    )
    return subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-u", "-c", code, url, json.dumps(body)],
                            stdout=subprocess.PIPE, text=True)


@pytest.mark.skipif(bundled_path(CATALOG[DEFAULT_MODEL]) is None, reason="the bundled model is not installed")
def test_a_machine_lost_across_namespaces_loses_no_token(net: Net, nslauncher: NodeLauncher) -> None:
    """Three nodes with addresses of their own, the bundled model as a pipeline over them, and the
    last one killed (daemon and runners) 30 tokens into a greedy stream: the stream, read from the
    first node's namespace, goes on and equals the uninterrupted one."""
    import psutil

    nodes = _start_three(nslauncher, net)
    wait_for(lambda: sum(x["status"] == "up" for x in nodes[0].cluster()["nodes"]) == 3, timeout_s=30, interval_s=0.2,
             what="three nodes up")
    ns0 = net.names[0]
    (placed,) = _ns_request(ns0, "POST", nodes[0].url + "/v1/instances",
                            {"model": DEFAULT_MODEL, "strategy": "pipeline", "nodes": ["n0", "n1", "n2"], "context": 256})
    iid = placed["instance"]["id"]
    wait_for(lambda: next(i for i in _ns_request(ns0, "GET", nodes[0].url + "/v1/instances", timeout_s=10)[0]["instances"]
                          if i["id"] == iid)["status"] == "ready", timeout_s=240, interval_s=0.5, what="instance ready")
    body = {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "Tell me a long story about a lighthouse."}],
            "max_tokens": 120, "temperature": 0, "stream": True, "ignore_eos": True}

    def run(kill_after: int | None) -> str:
        proc = _ns_stream(ns0, nodes[0].url + "/v1/chat/completions", body)
        assert proc.stdout is not None
        text, pieces = "", 0
        for line in proc.stdout:
            chunk = json.loads(line)
            assert "error" not in chunk, chunk
            content = chunk["choices"][0]["delta"].get("content") if chunk["choices"] else None
            if content:
                text += content
                pieces += 1
                if pieces == kill_after:
                    victim = psutil.Process(nodes[2].proc.pid)
                    for p in [victim, *victim.children(recursive=True)]:
                        p.kill()
        assert proc.wait(60) == 0
        return text

    want = run(None)
    got = run(30)
    assert got == want
    (listing,) = _ns_request(ns0, "GET", nodes[0].url + "/v1/instances", timeout_s=10)
    inst = next(i for i in listing["instances"] if i["id"] == iid)
    assert inst["epoch"] >= 1 and nodes[2].node_id not in [s["node_id"] for s in inst["shards"]]


_PROBE = """
import json, sys, urllib.error, urllib.request
out = []
for method, url, headers, body in json.loads(sys.argv[1]):
    data = None if body is None else body.encode()
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            out.append(r.status)
    except urllib.error.HTTPError as e:
        out.append(e.code)
print(json.dumps(out))
"""

_CLIENTS = """
import json, sys, ollama, openai
url, key = sys.argv[1], sys.argv[2]
out = {}
try:
    openai.OpenAI(base_url=url + "/v1", api_key="not-the-key", max_retries=0).models.list()
except openai.AuthenticationError:
    out["openai_without"] = 401
out["openai_with"] = [m.id for m in openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0).models.list().data]
try:
    ollama.Client(host=url).list()
except ollama.ResponseError as e:
    out["ollama_without"] = e.status_code
out["ollama_with"] = [m.model for m in ollama.Client(host=url, headers={"Authorization": "Bearer " + key}).list().models]
print(json.dumps(out))
"""


def _in_ns(netns: str, code: str, *args: str) -> Any:
    out = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", code, *args], capture_output=True, text=True,
                         timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def test_front_door_from_a_namespace_of_its_own(net: Net, nslauncher: NodeLauncher, tmp_path: Path) -> None:
    """A node in one namespace and its client in another, with an address of its own: without the
    key every route of the app but /healthz is refused (401), with it none is, and the official
    openai and ollama clients work; a foreign Host and a text/plain body are refused even with it."""
    from test_front_door import REFUSALS, app_routes, concrete

    node = nslauncher.start("n0", host=net.ip(0), port=PORT, netns=net.names[0])
    routes = app_routes(tmp_path / "routes")
    auth = {"Authorization": f"Bearer {TEST_API_KEY}"}
    probes = []
    for method, pattern in routes:
        body = "{}" if method in ("POST", "DELETE") else None
        json_type = {"Content-Type": "application/json"} if body else {}
        probes += [[method, node.url + concrete(pattern), json_type, body],
                   [method, node.url + concrete(pattern), {**json_type, **auth}, body]]
    probes += [["GET", node.url + "/v1/models", {**auth, "Host": "evil.example"}, None],
               ["POST", node.url + "/v1/chat/completions", {**auth, "Content-Type": "text/plain"}, "{}"]]
    statuses = _in_ns(net.names[1], _PROBE, json.dumps(probes))
    for i, (method, pattern) in enumerate(routes):
        without, with_key = statuses[2 * i], statuses[2 * i + 1]
        if pattern == "/healthz":
            assert without == with_key == 200
        elif pattern.startswith("/peer/"):
            assert without in (401, 403) and with_key in (401, 403), (method, pattern)  # peers sign, keys do not help
        else:
            assert without == 401, (method, pattern, without)
            assert pattern == "/login" or with_key not in REFUSALS, (method, pattern, with_key)
    assert statuses[-2:] == [421, 415]

    clients = _in_ns(net.names[1], _CLIENTS, node.url, TEST_API_KEY)
    assert clients["openai_without"] == 401 and clients["ollama_without"] == 401
    assert DEFAULT_MODEL in clients["openai_with"] and f"{DEFAULT_MODEL}:latest" in clients["ollama_with"]


# -- what crosses the link between two nodes ---------------------------------------------------------
_CAPTURE = """
import os, socket, struct, sys
# Every TCP payload between two addresses, as eth0 of this namespace carries it, until `stop` exists.
a, b, out_path, stop = socket.inet_aton(sys.argv[1]), socket.inet_aton(sys.argv[2]), sys.argv[3], sys.argv[4]
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
s.bind(("eth0", 0))
s.settimeout(0.2)
open(out_path + ".ready", "w").close()
with open(out_path, "wb") as out:
    while not os.path.exists(stop):
        try:
            frame = s.recv(65535)
        except socket.timeout:
            continue
        if frame[12:14] != b"\\x08\\x00" or frame[23] != 6:  # IPv4, TCP
            continue
        ip = frame[14:]
        if {ip[12:16], ip[16:20]} != {a, b}:
            continue
        payload = ip[(ip[0] & 15) * 4:]
        out.write(payload[(payload[12] >> 4) * 4:])
"""

_CHAT = """
import json, sys, openai
client = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key=sys.argv[2], max_retries=0, timeout=300)
text = ""
for chunk in client.chat.completions.create(model=sys.argv[3], messages=[{"role": "user", "content": sys.argv[4]}],
                                            max_tokens=48, temperature=0, stream=True):
    if chunk.choices:
        text += chunk.choices[0].delta.content or ""
print(json.dumps(text))
"""


@pytest.mark.skipif(bundled_path(CATALOG[DEFAULT_MODEL]) is None, reason="the bundled model is not installed")
def test_a_capture_of_the_link_between_two_nodes_reads_nothing(net: Net, nslauncher: NodeLauncher, tmp_path: Path) -> None:
    """Two nodes in their own namespaces, the bundled model as a pipeline over both, and a chat whose
    client (in a third namespace) talks to the node that is not the entry, so the prompt and every
    token cross the link as control messages as well as on the data plane. A capture of that link,
    from before the placement to after the chat, holds neither the prompt's marker, nor the reply,
    nor a JSON key, nor the instance's id — while the request lines it does hold show it saw the
    traffic."""
    n0 = nslauncher.start("n0", host=net.ip(0), port=PORT, netns=net.names[0])
    n1 = nslauncher.start("n1", peers=[n0], host=net.ip(1), port=PORT, netns=net.names[1])
    wait_for(lambda: sum(x["status"] == "up" for x in n0.cluster()["nodes"]) == 2, 30, what="two nodes up")
    capture, stop = tmp_path / "link.bin", tmp_path / "stop"
    sniffer = subprocess.Popen(["ip", "netns", "exec", net.names[0], sys.executable, "-c", _CAPTURE,
                                net.ip(0), net.ip(1), str(capture), str(stop)])
    try:
        wait_for(lambda: Path(str(capture) + ".ready").exists(), 30, what="the capture running")
        (placed,) = _ns_request(net.names[0], "POST", n0.url + "/v1/instances",
                                {"model": DEFAULT_MODEL, "strategy": "pipeline", "nodes": ["n0", "n1"], "context": 256})
        iid = placed["instance"]["id"]

        def ready() -> bool:
            (listing,) = _ns_request(net.names[0], "GET", n0.url + "/v1/instances", timeout_s=10)
            return next(i for i in listing["instances"] if i["id"] == iid)["status"] == "ready"

        wait_for(ready, 240, interval_s=0.5, what="the instance ready")
        marker = "Zq7-MARKER-4921"
        reply = _in_ns(net.names[2], _CHAT, n1.url, TEST_API_KEY, DEFAULT_MODEL,
                       f"My bank PIN is {marker}. Tell me a short story about a lighthouse keeper.")
        (listing,) = _ns_request(net.names[0], "GET", n0.url + "/v1/instances", timeout_s=10)
        inst = next(i for i in listing["instances"] if i["id"] == iid)
        assert [s["node_name"] for s in inst["shards"]] == ["n0", "n1"] and inst["entry"] != n1.node_id
    finally:
        stop.touch()
        sniffer.wait(30)
    seen = capture.read_bytes()
    assert len(reply) > 40, reply
    assert b"POST /peer/instances/submit" in seen and b"POST /peer/instances/start" in seen  # it saw the traffic
    assert len(seen) > 100_000  # and the data plane's frames
    for secret in (marker, reply.strip(), reply.strip()[:24], iid):
        assert secret.encode() not in seen, secret
    for key in (b'"messages"', b'"prompt_ids"', b'"content"', b'"text"', b'"instance_id"', b'"tokens"'):
        assert key not in seen, key


def test_a_node_joins_across_namespaces_with_the_invite_alone(net: Net, nslauncher: NodeLauncher) -> None:
    """The second machine joins with `--join TOKEN` only (the token from `shoal invite` on the
    first); a third, given the first as a peer but another cluster's key, says so and stays out."""
    from shoal.cluster.invite import Invite

    n0 = nslauncher.start("n0", key=None, host=net.ip(0), port=PORT, netns=net.names[0], wait=False).wait_ready(60)
    env = {k: v for k, v in os.environ.items() if k not in ("SHOAL_CLUSTER_KEY", "SHOAL_JOIN")}
    made = subprocess.run(["ip", "netns", "exec", net.names[0], sys.executable, "-m", "shoal.cli", "invite",
                           "--home", str(n0.home)], capture_output=True, text=True, timeout=60, env=env, check=True)
    token = made.stdout.strip()
    assert Invite.parse(token).addresses == ((net.ip(0), PORT),)
    n1 = nslauncher.start("n1", key=None, extra=["--join", token], host=net.ip(1), port=PORT, netns=net.names[1],
                          wait=False).wait_ready(60)
    n2 = nslauncher.start("n2", peers=[n0], key="another-cluster-key-0123456789", host=net.ip(2), port=PORT,
                          netns=net.names[2], wait=False).wait_ready(60)
    ids = {n0.node_id, n1.node_id}
    wait_for(lambda: all({x["id"] for x in n.cluster()["nodes"] if x["status"] == "up"} == ids for n in (n0, n1)),
             30, what="the joined node up on both")
    wait_for(lambda: "the cluster key does not match" in n2.log(), 30, what="the wrong key said")
    assert [x["id"] for x in n2.cluster()["nodes"]] == [n2.node_id]
    assert n2.node_id not in {x["id"] for x in n0.cluster()["nodes"]}
