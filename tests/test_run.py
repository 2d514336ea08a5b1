"""`shoal run` driven in a real terminal (tmux send-keys / capture-pane): a two-turn greedy
conversation equals the same conversation generated in this process (so the first turn is kept),
through a node equals the node's OpenAI route, and Ctrl-C stops a reply, not the session."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TEST_API_KEY, wait_for

from shoal.catalog import CATALOG, DEFAULT_MODEL, bundled_path

pytestmark = [
    pytest.mark.skipif(bundled_path(CATALOG[DEFAULT_MODEL]) is None, reason="bundled model not installed"),
    pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed"),
]

PROMPT = ">>> "
TURNS = ["My name is Ada and I like sailing. Say hello to me.", "What is my name, and what do I like?"]
SHORT = ["--temperature", "0", "--max-tokens", "24"]
START_TIMEOUT_S = 180  # imports and model load (or placement on a node) on a busy machine


# Runs the command in the pane and writes its exit status to a file (tmux's own #{pane_dead_status}
# is sometimes left empty when the pty closes before the exit is reaped). The recorder ignores the
# Ctrl-C the test types; the command gets it, with the default handling restored.
_RECORD_EXIT = """
import signal, subprocess, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
code = subprocess.call(sys.argv[2:], preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
open(sys.argv[1], "w").write(str(code))
"""


class Terminal:
    """`shoal run ...` in a tmux session of its own (its own server socket), wide enough that no
    reply wraps. The pane stays when the command ends, so its exit status can be read: a shell
    around the command would itself be killed by the Ctrl-C the test types."""

    def __init__(self, tmp_path: Path, args: list[str], env: dict[str, str]):
        self.socket = tmp_path / "tmux.sock"
        self.status = tmp_path / "exit-status"
        run = ["env", *(f"{k}={v}" for k, v in env.items()), sys.executable, "-m", "shoal.cli", "run", *args]
        cmd = [sys.executable, "-c", _RECORD_EXIT, str(self.status), *run]
        self.tmux("-f", "/dev/null", "start-server", ";", "set-option", "-g", "remain-on-exit", "on", ";",
                  "new-session", "-d", "-x", "400", "-y", "100", shlex.join(cmd))

    def tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-S", str(self.socket), *args], check=True, capture_output=True, text=True).stdout

    def screen(self) -> list[str]:
        return self.tmux("capture-pane", "-p", "-J", "-S", "-").rstrip("\n").splitlines()

    def at_prompt(self) -> bool:
        lines = self.screen()
        return bool(lines) and lines[-1].rstrip() == PROMPT.rstrip()

    def say(self, text: str, timeout_s: float = 120) -> str:
        """Type a line; wait for the next prompt; the reply between them."""
        before = len([ln for ln in self.screen() if ln.startswith(PROMPT)])
        self.tmux("send-keys", "-l", text)
        self.tmux("send-keys", "Enter")
        wait_for(lambda: len([ln for ln in self.screen() if ln.startswith(PROMPT.rstrip())]) > before and self.at_prompt(),
                 timeout_s, 0.1, f"the reply to {text!r}")
        lines = self.screen()
        start = max(i for i, ln in enumerate(lines) if ln == PROMPT + text)
        return "\n".join(lines[start + 1: -1])

    def exit_status(self) -> int:
        try:
            wait_for(self.status.exists, 60, 0.1, "shoal run to exit")
        except AssertionError as e:
            raise AssertionError(f"{e}; the screen:\n" + "\n".join(self.screen()[-30:])) from None
        return int(self.status.read_text())

    def close(self) -> None:
        subprocess.run(["tmux", "-S", str(self.socket), "kill-server"], check=False, capture_output=True)


def _words(text: str) -> str:
    return " ".join(text.split())


def _reference(turns: list[str], max_tokens: int) -> list[str]:
    """The same greedy conversation generated in this process."""
    from shoal.engine.generate import stream_generate
    from shoal.engine.loader import load_model
    from shoal.engine.sampler import SamplingParams

    lm = load_model(DEFAULT_MODEL)
    messages, replies = [], []
    for t in turns:
        messages.append({"role": "user", "content": t})
        ids = lm.tokenizer.encode_chat(messages)
        text = "".join(ev.text for ev, _ in stream_generate(lm.model, lm.tokenizer, ids, SamplingParams(max_tokens=max_tokens),
                                                            lm.args.max_context))
        replies.append(text)
        messages.append({"role": "assistant", "content": text})
    return replies


@pytest.fixture
def terminal(tmp_path):
    opened: list[Terminal] = []

    def open_(args: list[str], env: dict[str, str] | None = None) -> Terminal:
        t = Terminal(tmp_path / str(len(opened)), args, env or {})
        opened.append(t)
        wait_for(t.at_prompt, START_TIMEOUT_S, 0.2, "the first prompt")
        return t

    for i in range(4):
        (tmp_path / str(i)).mkdir()
    yield open_
    for t in opened:
        t.close()


def _ctrl_c_mid_reply(term: Terminal) -> None:
    question = "Count from 1 to 1000, one number per line."
    term.tmux("send-keys", "-l", question)
    term.tmux("send-keys", "Enter")
    # Some of the reply on screen, then Ctrl-C: the reply stops and the prompt comes back.
    wait_for(lambda: len(term.screen()) >= term.screen().index(PROMPT + question) + 4, 120, 0.05, "the reply to start")
    term.tmux("send-keys", "C-c")
    wait_for(term.at_prompt, 60, 0.1, "the prompt after Ctrl-C")
    lines = term.screen()
    assert "(stopped)" in lines[-2], lines[-6:]
    term.tmux("send-keys", "-l", "/bye")
    term.tmux("send-keys", "Enter")
    assert term.exit_status() == 0


def test_in_process_chat_keeps_the_conversation(terminal):
    term = terminal(["--local", *SHORT], {"SHOAL_CLUSTER": "http://127.0.0.1:9"})
    assert "in this process (--local)" in term.screen()[0]
    replies = [term.say(t) for t in TURNS]
    want = _reference(TURNS, 24)
    assert [_words(r) for r in replies] == [_words(w) for w in want]
    assert _words(want[1]) != _words(_reference(TURNS[1:], 24)[0])  # the answer depends on the first turn
    term.tmux("send-keys", "-l", "/bye")
    term.tmux("send-keys", "Enter")
    assert term.exit_status() == 0


def test_in_process_ctrl_c_stops_the_reply_not_the_session(terminal):
    _ctrl_c_mid_reply(terminal(["--local", "--temperature", "0", "--max-tokens", "1500"]))


def test_through_the_node_on_this_machine(launcher, terminal):
    openai = pytest.importorskip("openai")
    node = launcher.start("chat")
    env = {"SHOAL_CLUSTER": node.url}
    term = terminal(SHORT, env)
    assert f"on the node at {node.url}" in term.screen()[0]
    replies = [term.say(t) for t in TURNS]
    client = openai.OpenAI(base_url=node.url + "/v1", api_key=TEST_API_KEY)
    messages: list[dict[str, str]] = []
    for turn, got in zip(TURNS, replies):
        messages.append({"role": "user", "content": turn})
        out = client.chat.completions.create(model=DEFAULT_MODEL, messages=messages, temperature=0, max_tokens=24)
        want = out.choices[0].message.content or ""
        assert _words(got) == _words(want)
        messages.append({"role": "assistant", "content": want})
    term.tmux("send-keys", "-l", "/bye")
    term.tmux("send-keys", "Enter")
    assert term.exit_status() == 0

    _ctrl_c_mid_reply(terminal(["--temperature", "0", "--max-tokens", "1500"], env))
