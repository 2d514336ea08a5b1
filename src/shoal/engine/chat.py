"""`shoal run [MODEL]`: a chat in the terminal, and how `shoal run` and `shoal generate` find the
node running on this machine.

A node is used when one answers (`$SHOAL_CLUSTER`, else this machine's default port) and the model
is a catalog id, which is what a node serves by name: the chat goes through its OpenAI route,
streamed, so the cluster's instances serve it (placed on first use). Otherwise the model runs in
this process, as `shoal generate --local` does. The first line says which.

The conversation is kept until /clear. Ctrl-C while a reply streams stops that reply (the turn is
dropped, so the model never sees half an answer); at the prompt, a second Ctrl-C in a row leaves,
as do /bye and Ctrl-D.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any, Protocol

from shoal.config import DEFAULT_PORT, client_headers, refusal_message

PROMPT = ">>> "
HELP = """commands:
  /clear   forget the conversation and start over
  /bye     leave (or Ctrl-D, or Ctrl-C twice at the prompt)
  /help    this list
Ctrl-C while a reply streams stops it."""
HEALTH_TIMEOUT_S = 1.0


class ChatError(Exception):
    """A turn that failed; the session goes on."""


def local_node(environ: dict[str, str] | None = None) -> str | None:
    """The URL of the node on this machine ($SHOAL_CLUSTER, else the default port) if it answers
    /healthz as a shoal node does; else None."""
    env = os.environ if environ is None else environ
    url = (env.get("SHOAL_CLUSTER") or f"http://127.0.0.1:{DEFAULT_PORT}").rstrip("/")
    if not url.startswith(("http://", "https://")):
        url = "http://" + url
    try:
        with urllib.request.urlopen(url + "/healthz", timeout=HEALTH_TIMEOUT_S) as r:
            return url if json.loads(r.read()).get("status") == "ok" else None
    except (OSError, ValueError, AttributeError):  # nothing there, or something that is not a node
        return None


def node_for(model: str | None, local: bool) -> str | None:
    """The node to use for `model`, or None to run it in this process."""
    from shoal.catalog import CATALOG, DEFAULT_MODEL

    if local or (model or DEFAULT_MODEL) not in CATALOG:
        return None
    return local_node()


class Backend(Protocol):
    def reply(self, messages: list[dict[str, str]]) -> Iterator[str]:
        """The reply's text, piece by piece; closing the iterator stops the generation."""
        ...


class NodeBackend:
    """Through the node's OpenAI chat route, streamed (server-sent events)."""

    def __init__(self, base: str, model: str, sampling: dict[str, Any]):
        self.base, self.model, self.sampling = base, model, sampling

    def reply(self, messages: list[dict[str, str]]) -> Iterator[str]:
        body = {"model": self.model, "messages": messages, "stream": True, **self.sampling}
        req = urllib.request.Request(self.base + "/v1/chat/completions", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", **client_headers()})
        try:
            resp = urllib.request.urlopen(req, timeout=600)
        except urllib.error.HTTPError as e:
            raise ChatError(refusal_message(e)) from None
        except (urllib.error.URLError, OSError) as e:
            raise ChatError(f"cannot reach {self.base}: {getattr(e, 'reason', e)}") from None
        with resp:  # leaving early closes the connection, and the node cancels the request
            for raw in resp:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data: "):
                    continue  # a keep-alive comment while the model is placed, or a blank separator
                data = line[len("data: "):]
                if data == "[DONE]":
                    return
                event = json.loads(data)
                if "error" in event:
                    raise ChatError(event["error"].get("message", str(event["error"])))
                for choice in event.get("choices", []):
                    if text := (choice.get("delta") or {}).get("content"):
                        yield text


class LocalBackend:
    """The model loaded in this process, as `shoal generate` runs it."""

    def __init__(self, lm: Any, params: Any):
        self.lm, self.params = lm, params

    def reply(self, messages: list[dict[str, str]]) -> Iterator[str]:
        from shoal.engine.generate import ContextOverflowError, stream_generate

        ids = self.lm.tokenizer.encode_chat(messages)
        try:
            for ev, _ in stream_generate(self.lm.model, self.lm.tokenizer, ids, self.params, self.lm.args.max_context):
                if ev.text:
                    yield ev.text
        except ContextOverflowError as e:
            raise ChatError(f"{e}: /clear starts over") from None


def chat(backend: Backend, system: str | None = None) -> int:
    """The read-reply loop; the exit status."""
    try:
        import readline  # noqa: F401 - line editing and history for input()
    except ImportError:
        pass
    history: list[dict[str, str]] = []
    head = [{"role": "system", "content": system}] if system else []
    interrupted = False  # the last thing at the prompt was a Ctrl-C
    while True:
        try:
            line = input(PROMPT)
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            if interrupted:
                print()
                return 0
            interrupted = True
            print("\n(Ctrl-C again, /bye or Ctrl-D to leave)")
            continue
        interrupted = False
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command = text.split()[0]
            if command in ("/bye", "/exit", "/quit"):
                return 0
            if command == "/clear":
                history.clear()
                print("(conversation cleared)")
            elif command in ("/help", "/?"):
                print(HELP)
            else:
                print(f"unknown command {command}: /help lists them")
            continue
        turn = [*history, {"role": "user", "content": text}]
        pieces: list[str] = []
        stream = backend.reply(head + turn)
        try:
            for piece in stream:
                pieces.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            print("\n(stopped)")
            continue
        except ChatError as e:
            print(f"\nshoal: {e}", file=sys.stderr)
            continue
        finally:
            stream.close()  # type: ignore[attr-defined]
        print()
        history = [*turn, {"role": "assistant", "content": "".join(pieces)}]


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help="catalog id, GGUF file or model directory (default: smollm2-135m)")
    p.add_argument("--local", action="store_true", help="run the model in this process even if a node runs on this machine")
    p.add_argument("--system", default=None, metavar="TEXT", help="system message for the whole conversation")
    p.add_argument("--temperature", type=float, default=0.8, metavar="T", help="sampling temperature; 0 is greedy (default 0.8)")
    p.add_argument("--top-p", type=float, default=0.9, metavar="P", help="nucleus sampling (default 0.9)")
    p.add_argument("--seed", type=int, default=None, metavar="N", help="random seed, for replies that can be repeated")
    p.add_argument("--max-tokens", type=int, default=1024, metavar="N", help="most tokens in one reply (default 1024)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads when the model runs in this process (default: all cores)")


def run_run(args: argparse.Namespace) -> int:
    from shoal.catalog import DEFAULT_MODEL

    model = args.model or DEFAULT_MODEL
    node = node_for(model, args.local)
    if node is not None:
        print(f"shoal run: {model} on the node at {node} (the cluster's instances serve it); /help for commands",
              file=sys.stderr)
        sampling = {"temperature": args.temperature, "top_p": args.top_p, "max_tokens": args.max_tokens}
        if args.seed is not None:
            sampling["seed"] = args.seed
        return chat(NodeBackend(node, model, sampling), args.system)

    from shoal.catalog import CATALOG
    from shoal.engine.cli import _fail, _load, set_threads
    from shoal.engine.sampler import SamplingParams

    why = ("--local" if args.local else "a node serves catalog models by name" if model not in CATALOG
           else "no node is running on this machine")
    print(f"shoal run: {model} in this process ({why}); /help for commands", file=sys.stderr)
    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    except ValueError as e:
        return _fail(str(e), 2)
    set_threads(args.threads)
    args.model = model
    return chat(LocalBackend(_load(args), params), args.system)
