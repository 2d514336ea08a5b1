"""The entry host role: the node whose runner is rank 0 of an instance takes its requests.

It hands each request to the entry runner (whose scheduler accepts or refuses it at once) and keeps,
per request, the prompt as the entry tokenized it and every token streamed so far: what a client on
any node polls, and what a replay on a new placement would resend.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from shoal.daemon.messages import PollReply
from shoal.daemon.records import Hosted, InstanceError, RequestLog
from shoal.runner.contract import (
    Accepted,
    Cancel,
    Failed,
    Failure,
    Refused,
    Submit,
    Tokens,
)

log = logging.getLogger("shoal.instances")

ACCEPT_TIMEOUT_S = 30.0  # the entry answers between two steps; a longer silence means it is stuck
KEEP_FINISHED_REQUESTS = 256


class EntryHost:
    def __init__(self, hosted: dict[tuple[str, int], Hosted]):
        self.hosted = hosted  # the host's table of running shards (shared, read only here)
        self.requests: dict[str, dict[str, RequestLog]] = {}  # instance id -> request id -> log
        self.last_done: dict[str, float] = {}  # instance id -> monotonic time its last request ended
        # A request that finished with its stats (the node's decode feedback reads them).
        self.on_finished: Callable[[Hosted, RequestLog], None] = lambda h, req: None

    def _entry(self, iid: str) -> Hosted:
        h = self.hosted.get((iid, 0))
        if h is None:
            raise InstanceError(404, f"the entry of instance {iid} does not run on this node")
        if h.status != "ready":
            raise InstanceError(409, f"instance {iid} is {h.status}")
        return h

    async def submit(self, iid: str, request: Submit) -> RequestLog:
        """Hand a request to the entry runner and wait for its scheduler's answer. A refusal is
        returned as the log's `error` (the request is then forgotten)."""
        h = self._entry(iid)
        logs = self.requests.setdefault(iid, {})
        if request.rid in logs:
            raise InstanceError(409, f"request {request.rid} exists")
        running = [r for r in logs.values() if not r.done]
        req = logs[request.rid] = RequestLog(request.rid, iid, request)
        if running:  # they share the cores: none of them times the node's own decode speed
            for r in (req, *running):
                r.alone = False
        if not h.runner.send(request):
            req.fail(Failure(status=503, message="the entry runner is gone", code="model_unavailable", retry_after=1.0))
        try:
            refusal = await asyncio.wait_for(asyncio.shield(req.answered), ACCEPT_TIMEOUT_S)
        except asyncio.CancelledError:  # whoever submitted it is gone: nobody would read it
            self.cancel(iid, request.rid)
            raise
        except TimeoutError:
            h.runner.send(Cancel(rid=request.rid))
            refusal = Failure(status=503, message=f"the entry of instance {iid} did not answer in {ACCEPT_TIMEOUT_S:.0f} s",
                              code="model_unavailable", retry_after=5.0)
            req.fail(refusal)
        if refusal is not None:
            logs.pop(request.rid, None)
        return req

    def cancel(self, iid: str, rid: str) -> None:
        req = self.requests.get(iid, {}).get(rid)
        if req is None or req.done:
            return
        h = self.hosted.get((iid, 0))
        if h is not None:
            h.runner.send(Cancel(rid=rid))
        req.fail(Failure(status=499, message="cancelled by the client"))

    async def poll(self, iid: str, rid: str, after: int, wait_s: float) -> PollReply:
        req = self.requests.get(iid, {}).get(rid)
        if req is None:
            raise InstanceError(404, f"no request {rid} at the entry of {iid}")
        await req.wait_after(after, wait_s)
        return PollReply(tokens=req.tokens[after:], done=req.done, error=req.error, stats=req.stats)

    def list(self, iid: str) -> list[RequestLog]:
        return list(self.requests.get(iid, {}).values())

    def activity(self, iid: str) -> tuple[int, float]:
        """(requests running now, seconds since the last one ended) at this instance's entry."""
        active = sum(not r.done for r in self.requests.get(iid, {}).values())
        since = time.monotonic() - self.last_done.get(iid, 0.0) if iid in self.last_done else float(1 << 30)
        return active, 0.0 if active else since

    # -- from the host
    def on_event(self, h: Hosted, ev: Accepted | Refused | Tokens | Failed) -> None:
        req = self.requests.get(h.instance_id, {}).get(ev.rid)
        if req is None:
            return
        if isinstance(ev, Accepted):
            req.accepted(ev.prompt_ids)
        elif isinstance(ev, Tokens):
            req.add(ev.tokens, ev.stats)
        else:
            req.fail(ev.error)
        if req.done:
            self.last_done[h.instance_id] = time.monotonic()
            self._trim(h.instance_id)
            if req.stats is not None and req.error is None:
                self.on_finished(h, req)

    def on_runner_gone(self, h: Hosted) -> None:
        if h.rank != 0:
            return
        why = "stopped" if h.stopping else "failed"
        for req in self.requests.get(h.instance_id, {}).values():
            req.fail(Failure(status=503, message=f"the entry runner of instance {h.instance_id} {why}",
                             code="model_unavailable", retry_after=1.0))

    def forget(self, iid: str) -> None:
        """The instance stopped here: drop what was kept of its requests (a client still polling
        one gets 404, and resumes elsewhere)."""
        for req in self.requests.pop(iid, {}).values():
            req.fail(Failure(status=503, message=f"the entry of instance {iid} stopped", code="model_unavailable",
                             retry_after=1.0))
        self.last_done.pop(iid, None)

    def _trim(self, iid: str) -> None:
        logs = self.requests.get(iid, {})
        done = [r for r in logs.values() if r.done]
        for r in sorted(done, key=lambda r: r.created_at)[:-KEEP_FINISHED_REQUESTS]:
            del logs[r.rid]
