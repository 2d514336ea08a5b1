"""A lost machine is invisible to the client, for real: `shoal node` processes on loopback, the
bundled model placed as a pipeline over three (or four) of them, a ~200-token streaming chat
through the official clients, and a node killed (daemon and runners together, as when a machine
dies) or stopped while it streams. The stream goes on: its text equals the uninterrupted run's,
`usage` counts each token once, no chunk carries an error. When what is left cannot hold the
model, the client gets one clear in-stream error and later requests a 503 with Retry-After.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import psutil
import pytest
from conftest import NodeLauncher, NodeProc, wait_for

from shoal.catalog import CATALOG, DEFAULT_MODEL, bundled_path

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.skipif(bundled_path(CATALOG[DEFAULT_MODEL]) is None, reason="the bundled model is not installed")

CONTEXT = 512
TOKENS = 200
KILL_AFTER = 30
MESSAGES = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper and a storm."}]


# -- helpers ---------------------------------------------------------------------------------------
def call(node: NodeProc, method: str, path: str, body: Any = None, timeout_s: float = 120.0) -> tuple[int, Any, dict]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(node.url + path, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}"), dict(e.headers)


def find(node: NodeProc, iid: str) -> dict[str, Any] | None:
    listing = call(node, "GET", "/v1/instances")[1]
    return next((i for i in listing["instances"] + listing["ended"] if i["id"] == iid), None)


def place(node: NodeProc, names: list[str]) -> dict[str, Any]:
    status, out, _ = call(node, "POST", "/v1/instances", {"model": DEFAULT_MODEL, "strategy": "pipeline", "nodes": names,
                                                           "context": CONTEXT})
    assert status == 202, out
    iid = out["instance"]["id"]
    wait_for(lambda: (find(node, iid) or {}).get("status") == "ready", 240, interval_s=0.3, what="instance ready")
    inst = find(node, iid)
    assert inst is not None and [s["node_name"] for s in inst["shards"]] == names
    return inst


def machine_dies(node: NodeProc) -> None:
    """SIGKILL the node's daemon and its runners at once."""
    assert node.proc is not None
    procs = [psutil.Process(node.proc.pid), *psutil.Process(node.proc.pid).children(recursive=True)]
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    node.proc.wait(10)


def cluster(launcher: NodeLauncher, names: list[str], extra: list[str] | None = None) -> list[NodeProc]:
    first = launcher.start(names[0], extra=extra or [])
    others = [launcher.start(n, peers=[first], extra=extra or []) for n in names[1:]]
    nodes = [first, *others]
    wait_for(lambda: all(sum(x["status"] == "up" for x in n.cluster()["nodes"]) == len(nodes) for n in nodes), 30,
             what="nodes see each other")
    return nodes


class Stream:
    """A streaming chat through the official client, with an action taken after `after` tokens."""

    def __init__(self, node: NodeProc, action, after: int = KILL_AFTER, **params: Any):
        self.node, self.action, self.after, self.params = node, action, after, {"temperature": 0, **params}
        self.text, self.chunks, self.usage, self.finish, self.error = "", 0, None, None, None
        self.acted_at: float | None = None
        self.stall = 0.0  # the longest wait between two chunks after the action: the kill-to-resume time

    def run(self) -> Stream:
        client = openai.OpenAI(base_url=self.node.url + "/v1", api_key="none", timeout=300, max_retries=0)
        last = time.monotonic()
        try:
            for chunk in client.chat.completions.create(
                    model=DEFAULT_MODEL, messages=MESSAGES, max_tokens=TOKENS, stream=True,
                    stream_options={"include_usage": True}, extra_body={"ignore_eos": True}, **self.params):
                if chunk.usage is not None:
                    self.usage = chunk.usage
                if not chunk.choices:
                    continue
                c = chunk.choices[0]
                if c.delta.content:
                    now = time.monotonic()
                    if self.acted_at is not None:
                        self.stall = max(self.stall, now - last)
                    last = now
                    self.text += c.delta.content
                    self.chunks += 1
                    if self.chunks == self.after and self.action is not None:
                        self.acted_at = time.monotonic()
                        threading.Thread(target=self.action).start()
                if c.finish_reason:
                    self.finish = c.finish_reason
        except openai.APIError as e:
            self.error = e
        return self


def uninterrupted(node: NodeProc, **params: Any) -> Stream:
    s = Stream(node, None, **params).run()
    assert s.error is None and s.finish == "length" and s.usage.completion_tokens == TOKENS, (s.error, s.finish)
    return s


def assert_same(got: Stream, want: Stream) -> None:
    assert got.error is None, got.error
    assert got.text == want.text
    assert got.finish == want.finish == "length"
    assert got.usage.completion_tokens == TOKENS and got.usage.prompt_tokens == want.usage.prompt_tokens
    if got.acted_at is not None:
        print(f"longest stall after the loss (detection + re-placing + prefill): {got.stall:.2f} s")


def recovered(node: NodeProc, iid: str, lost: str) -> dict[str, Any]:
    inst = find(node, iid)
    assert inst is not None and inst["status"] == "ready" and inst["epoch"] >= 1, inst
    assert lost not in [s["node_name"] for s in inst["shards"]]
    assert any("re-placed on" in e["text"] for e in inst["events"]), inst["events"]
    return inst


# -- tests -------------------------------------------------------------------------------------------
def test_killing_a_non_entry_node_mid_stream_loses_nothing(launcher: NodeLauncher) -> None:
    a, b, c = cluster(launcher, ["a", "b", "c"])
    inst = place(a, ["a", "b", "c"])
    want = uninterrupted(a)
    got = Stream(a, lambda: machine_dies(c)).run()
    assert_same(got, want)
    # Heard three times (both other ranks' links break, then c's heartbeats stop), re-placed once.
    assert recovered(a, inst["id"], "c")["epoch"] == 1
    metrics = urllib.request.urlopen(a.url + "/metrics", timeout=10).read().decode()
    assert 'shoal_requests_resumed_total{model="smollm2-135m"} 1' in metrics
    assert 'shoal_instance_recoveries_total{model="smollm2-135m"} 1' in metrics


def test_killing_the_entry_and_coordinator_mid_stream_loses_nothing(launcher: NodeLauncher) -> None:
    a, b, c = cluster(launcher, ["a", "b", "c"])
    inst = place(a, ["a", "b", "c"])  # a coordinates it and runs its entry
    want = uninterrupted(b)
    got = Stream(b, lambda: machine_dies(a)).run()
    assert_same(got, want)
    now = recovered(b, inst["id"], "a")
    assert now["coordinator"] != a.node_id
    assert any("took over" in e["text"] for e in now["events"])


def test_a_silent_node_is_detected_and_the_stream_goes_on(launcher: NodeLauncher) -> None:
    a, b, c = cluster(launcher, ["a", "b", "c"])
    inst = place(a, ["a", "b", "c"])
    want = uninterrupted(a)
    stopped = [p for p in [psutil.Process(b.proc.pid), *psutil.Process(b.proc.pid).children(recursive=True)]]
    try:
        got = Stream(a, lambda: [p.send_signal(signal.SIGSTOP) for p in stopped]).run()
        assert_same(got, want)
        recovered(a, inst["id"], "b")
    finally:
        for p in stopped:
            try:
                p.send_signal(signal.SIGKILL)
                p.send_signal(signal.SIGCONT)
            except psutil.NoSuchProcess:
                pass


def test_a_seeded_sampled_stream_gives_the_text_it_would_have(launcher: NodeLauncher) -> None:
    a, b, c = cluster(launcher, ["a", "b", "c"])
    place(a, ["a", "b", "c"])
    want = uninterrupted(a, temperature=0.8, seed=1234)
    got = Stream(a, lambda: machine_dies(b), temperature=0.8, seed=1234).run()
    assert_same(got, want)


def test_two_nodes_lost_one_after_the_other(launcher: NodeLauncher) -> None:
    # 500 MB a node: the model needs two of them, so each loss hits whichever two hold it.
    a, b, c, d = cluster(launcher, ["a", "b", "c", "d"], extra=["--memory-limit", "500MB"])
    inst = place(a, ["a", "b", "c", "d"])
    want = uninterrupted(a)
    by_name = {n.name: n for n in (b, c, d)}
    lost: list[str] = []

    def twice() -> None:
        lost.append("c")
        machine_dies(c)
        wait_for(lambda: (find(a, inst["id"]) or {}).get("epoch", 0) >= 1 and find(a, inst["id"])["status"] == "ready",
                 60, interval_s=0.2, what="the first recovery")
        victim = next(s["node_name"] for s in find(a, inst["id"])["shards"] if s["node_name"] != "a")
        lost.append(victim)
        machine_dies(by_name[victim])

    got = Stream(a, twice, after=KILL_AFTER).run()
    assert_same(got, want)
    now = recovered(a, inst["id"], lost[1])
    assert not set(lost) & {s["node_name"] for s in now["shards"]} and now["epoch"] >= 2


def test_when_the_model_no_longer_fits_the_client_is_told(launcher: NodeLauncher) -> None:
    # ~520 MB for the whole model against 500 MB a node: it needs both.
    a, b = cluster(launcher, ["a", "b"], extra=["--memory-limit", "500MB"])
    inst = place(a, ["a", "b"])
    got = Stream(a, lambda: machine_dies(b)).run()
    assert got.error is not None and "no longer fits" in str(got.error) and "missing" in str(got.error), got.error
    assert 0 < got.chunks < TOKENS
    ended = find(a, inst["id"])
    assert ended["status"] == "failed" and "no longer fits" in ended["error"]
    status, out, headers = call(a, "POST", "/v1/chat/completions", {"model": DEFAULT_MODEL, "messages": MESSAGES, "max_tokens": 4})
    assert status == 503 and int(headers["Retry-After"]) >= 1, (status, out)
    assert "missing" in out["error"]["message"] or "fit" in out["error"]["message"], out


def test_an_ollama_stream_goes_on_through_the_loss(launcher: NodeLauncher) -> None:
    ollama = pytest.importorskip("ollama")
    a, b, c = cluster(launcher, ["a", "b", "c"])
    place(a, ["a", "b", "c"])
    client = ollama.Client(host=a.url, timeout=300)
    opts = {"temperature": 0, "num_predict": TOKENS}

    def chat(action) -> tuple[str, int, int]:
        text, n, count = "", 0, 0
        for part in client.chat(model=DEFAULT_MODEL, messages=MESSAGES, stream=True, options=opts):
            text += part.message.content or ""
            n += bool(part.message.content)
            if n == KILL_AFTER and action is not None:
                threading.Thread(target=action).start()
                action = None
            if part.done:
                count = part.eval_count
        return text, n, count

    want, n, want_count = chat(None)
    assert n > KILL_AFTER
    got, _, got_count = chat(lambda: machine_dies(c))
    assert got == want and got_count == want_count


def test_a_node_that_leaves_moves_its_shards_first(launcher: NodeLauncher) -> None:
    a, b, c = cluster(launcher, ["a", "b", "c"])
    inst = place(a, ["a", "b", "c"])
    want = uninterrupted(a)
    got = Stream(a, lambda: os.kill(c.proc.pid, signal.SIGTERM)).run()
    assert_same(got, want)
    assert c.proc.wait(90) == 0
    now = recovered(a, inst["id"], "c")
    assert any("c (" in e["text"] and "is leaving" in e["text"] for e in now["events"]), now["events"]
    assert "moving 1 shard(s) elsewhere first" in c.log() and "every shard moved" in c.log()


def test_a_coordinator_that_leaves_hands_its_instance_over_as_it_runs(launcher: NodeLauncher) -> None:
    """c coordinates an instance it holds no shard of: on SIGTERM it hands the instance to the node
    that would have taken it over, which keeps it as it runs — nothing is re-placed, the stream
    through a does not notice."""
    a, b, c = cluster(launcher, ["a", "b", "c"])
    inst = place(c, ["a", "b"])
    want = uninterrupted(a)
    got = Stream(a, lambda: os.kill(c.proc.pid, signal.SIGTERM)).run()
    assert_same(got, want)
    assert c.proc.wait(90) == 0
    wait_for(lambda: all(x["status"] != "up" for x in a.cluster()["nodes"] if x["name"] == "c"), 30, what="c gone")
    now = find(a, inst["id"])
    assert now is not None and now["status"] == "ready" and now["epoch"] == inst["epoch"], now
    assert now["coordinator"] != inst["coordinator"] and [s["node_name"] for s in now["shards"]] == ["a", "b"]
    assert any("c (" in e["text"] and "coordinates it now" in e["text"] for e in now["events"]), now["events"]
    assert not any("re-placed" in e["text"] for e in now["events"]), now["events"]
    assert "handed instance" in c.log()
    assert uninterrupted(b).text == want.text


def test_an_idle_instance_moves_back_when_a_faster_node_returns(launcher: NodeLauncher) -> None:
    """A node measured much faster holds the model; it dies and the model recovers on a slower one
    (degraded from then on, once the fast node is back); when it is back and the instance idle, the
    instance is re-placed onto it, and serves the same text.

    "Much faster": past what the slow nodes' own decode feedback can make of them (each learns a
    correction of at most CORRECTION_BOUNDS[1] from the requests it serves, placement/feedback.py),
    and the fast node comes back without the correction it learned, as a new machine would."""
    from shoal.cluster.profile import PLAUSIBLE
    from shoal.placement.cost import CORRECTION_BOUNDS

    a, b = cluster(launcher, ["a", "b"])
    fast_home = launcher.root / "f"
    fast_home.mkdir()
    profile = json.loads((a.home / "profile.json").read_text())
    x = 4 * CORRECTION_BOUNDS[1]
    # The per-layer cost no lower than a node would believe of a probe (it re-measures below that).
    overhead = max(1.5 * PLAUSIBLE["layer_overhead_us"][0], profile["layer_overhead_us"] / x)
    profile.update(q4_read_gbps=x * profile["q4_read_gbps"], layer_overhead_us=overhead,
                   memory_bandwidth_gbps=x * profile["memory_bandwidth_gbps"], gflops_fp32=x * profile["gflops_fp32"])
    (fast_home / "profile.json").write_text(json.dumps(profile))
    f = launcher.start("f", peers=[a])
    wait_for(lambda: sum(x["status"] == "up" for x in a.cluster()["nodes"]) == 3, 30, what="three up")
    status, out, _ = call(a, "POST", "/v1/instances", {"model": DEFAULT_MODEL, "context": CONTEXT})
    assert status == 202, out
    iid = out["instance"]["id"]
    wait_for(lambda: (find(a, iid) or {}).get("status") == "ready", 240, interval_s=0.3, what="instance ready")
    assert [s["node_name"] for s in find(a, iid)["shards"]] == ["f"]  # the fastest node alone
    want = uninterrupted(a)
    machine_dies(f)
    wait_for(lambda: find(a, iid)["epoch"] == 1 and find(a, iid)["status"] == "ready", 60, interval_s=0.3, what="recovered")
    assert "f" not in [s["node_name"] for s in find(a, iid)["shards"]]
    (fast_home / "decode_correction.json").unlink(missing_ok=True)
    f.start()
    f.wait_ready()
    wait_for(lambda: find(a, iid)["epoch"] == 2 and find(a, iid)["status"] == "ready", 90, interval_s=0.3,
             what="moved back to the fast node")
    now = find(a, iid)
    assert [s["node_name"] for s in now["shards"]] == ["f"] and not now["degraded"]
    texts = [e["text"] for e in now["events"]]
    assert any(t.startswith("degraded:") for t in texts) and any("rebalancing while idle" in t for t in texts), texts
    assert_same(uninterrupted(a), want)


def test_shoal_drain_moves_a_nodes_shards_then_it_leaves(launcher: NodeLauncher) -> None:
    import subprocess
    import sys

    a, b, c = cluster(launcher, ["a", "b", "c"])
    inst = place(a, ["a", "b", "c"])
    want = uninterrupted(a)
    out: list[subprocess.CompletedProcess[str]] = []

    def drain() -> None:
        out.append(subprocess.run([sys.executable, "-m", "shoal.cli", "drain", "b", "--cluster", c.url],
                                  capture_output=True, text=True, timeout=60))

    got = Stream(a, drain).run()
    assert_same(got, want)
    assert out[0].returncode == 0 and "b is moving its shards elsewhere" in out[0].stdout, out[0].stderr
    assert b.proc.wait(90) == 0
    recovered(a, inst["id"], "b")
    missing = subprocess.run([sys.executable, "-m", "shoal.cli", "drain", "nobody", "--cluster", a.url],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "no up node named 'nobody'" in missing.stderr
