"""The public instance routes: list, place, stop, preview a placement, generate (an NDJSON stream of
tokens) and the requests an entry keeps. They work on any node; the component forwards to the
coordinator or the entry as needed.

The requests an entry keeps are other clients' prompts: that route is an admin view (ADMIN_ROUTES,
which the front door asks the API key for even from loopback) and shows their text only when asked."""

from __future__ import annotations

import contextlib
import json
import secrets
from collections.abc import AsyncIterator
from typing import Any, Protocol

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shoal.cluster.messages import Ack
from shoal.cluster.peer import PeerError
from shoal.daemon.coordinator import Coordinator
from shoal.daemon.entry_host import EntryHost
from shoal.daemon.host import Host
from shoal.daemon.messages import (
    CreateInstance,
    InstanceRecord,
    InstanceRef,
    PollReply,
    SubmitReply,
)
from shoal.daemon.peers import Peers
from shoal.daemon.records import InstanceError, RequestLog, public_instance
from shoal.placement.contract import PlacementError, PlacementRequest
from shoal.placement.planner import plan, plan_each_strategy, preview_json
from shoal.runner.contract import MAX_PROMPT_IDS, MAX_TEXT, ChatTurn, Sampling, Submit


class Instances(Protocol):
    """What the routes use of the instances component (daemon/instances.py)."""

    coordinator: Coordinator
    host: Host
    entries: EntryHost
    peers: Peers

    async def instances(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]: ...

    async def submit(self, rec: InstanceRecord, request: Submit) -> tuple[SubmitReply, AsyncIterator[PollReply] | None]: ...

    async def leave(self, node_id: str) -> None: ...


class GenerateBody(BaseModel):
    """Body of POST /v1/instances/{id}/generate: exactly one of prompt_ids, prompt and messages."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt_ids: list[int] | None = Field(None, max_length=MAX_PROMPT_IDS)
    prompt: str | None = Field(None, max_length=MAX_TEXT)
    messages: list[ChatTurn] | None = Field(None, min_length=1, max_length=4096)
    params: Sampling = Sampling()


# Routes the front door (api/guard.py) asks the key for from every client, loopback included.
ADMIN_ROUTES = ("/v1/instances/{id}/requests",)


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0] if e.errors() else {}
    where = ".".join(map(str, err.get("loc", ())))
    return f"{err.get('msg', 'invalid')}" + (f" at {where}" if where else "")


class PublicRoutes:
    def __init__(self, component: Instances):
        self.c = component

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/v1/instances", self._get_instances),
            web.post("/v1/instances", self._post_instance),
            web.delete("/v1/instances/{id}", self._delete_instance),
            web.post("/v1/instances/{id}/generate", self._generate),
            web.get("/v1/instances/{id}/requests", self._get_requests),
            web.get("/v1/placement", self._get_placement),
            web.post("/v1/nodes/{node}/drain", self._drain_node),
        ]

    async def _get_instances(self, request: web.Request) -> web.Response:
        live, ended = await self.c.instances()
        return _json({"instances": live, "ended": ended})

    async def _post_instance(self, request: web.Request) -> web.Response:
        try:
            body = CreateInstance.model_validate_json(await request.read())
        except ValidationError as e:
            return _error(400, f"invalid body: {_first_error(e)}")
        try:
            rec, new = await self.c.coordinator.create(body)
        except PlacementError as e:
            return _error(507 if e.missing_bytes else 409, str(e), missing_bytes=e.missing_bytes)
        except InstanceError as e:
            return _error(e.status, str(e), **e.extra)
        # 202: placed and loading; 200: the model's instance that already runs (ask for a replica to get another)
        return _json({"instance": public_instance(rec), "created": new}, status=202 if new else 200)

    async def _delete_instance(self, request: web.Request) -> web.Response:
        iid = request.match_info["id"]
        co = self.c.coordinator
        try:
            if iid in co.coordinated or any(e.id == iid for e in co.ended):
                rec = await co.delete(iid)
                return _json({"id": iid, "status": rec.status})
            rec = await co.find(iid)
            if rec.ended_at is not None:
                return _json({"id": iid, "status": rec.status})
            await self.c.peers.call(rec.coordinator, "/peer/instances/delete", InstanceRef(instance_id=iid), Ack, 20.0)
        except InstanceError as e:
            return _error(e.status, str(e))
        except PeerError as e:
            return _error(502, f"the coordinator of instance {iid} did not answer: {e}")
        return _json({"id": iid, "status": "stopped"})

    async def _drain_node(self, request: web.Request) -> web.Response:
        """A node (by name or id) moves the shards it hosts elsewhere, then leaves the cluster."""
        want = request.match_info["node"]
        view = self.c.coordinator.view
        hits = [n for n in view.up_nodes() if n.id == want or n.name == want]
        if len(hits) != 1:
            return _error(404 if not hits else 409, f"no up node named {want!r}" if not hits else f"{want!r} names several nodes")
        try:
            await self.c.leave(hits[0].id)
        except (InstanceError, PeerError) as e:
            return _error(502, f"{hits[0].name} did not answer: {e}")
        return _json({"node": hits[0].name, "id": hits[0].id, "status": "draining"}, status=202)

    async def _get_requests(self, request: web.Request) -> web.Response:
        """The requests this entry keeps (what a replay would resend): by default their ids, sizes,
        timings and state; with ?text=1 also the prompt and output, as tokens and as text."""
        iid = request.match_info["id"]
        if (iid, 0) not in self.c.host.hosted:
            return _error(404, f"the entry of instance {iid} does not run on this node")
        text = request.query.get("text", "") in ("1", "true")
        return _json({"requests": [_request_view(r, text) for r in self.c.entries.list(iid)]})

    async def _get_placement(self, request: web.Request) -> web.Response:
        q = request.query
        model = q.get("model")
        if not model:
            return _error(400, "give ?model=")
        co = self.c.coordinator
        try:
            nodes = q.get("nodes")
            names = [x for x in nodes.split(",") if x] if nodes and not nodes.isdigit() else None
            req = PlacementRequest(strategy=q.get("strategy", "auto"), nodes=names,
                                   node_count=int(nodes) if nodes and nodes.isdigit() else None,
                                   context=int(q["context"]) if "context" in q else None,
                                   tp_size=int(q["tp_size"]) if "tp_size" in q else None,
                                   weights=q.get("weights", "stored"), collective=q.get("collective", "shoal"))
            spec = await co.spec_of(model, req.weights)
        except (ValidationError, ValueError) as e:
            return _error(400, f"bad query: {e}")
        except InstanceError as e:
            return _error(e.status, str(e))
        lists = await co.gather_lists()
        view, reserved = co.view, co.reserved_by_node(lists)
        if req.strategy == "auto":
            plans = plan_each_strategy(spec, view, req, reserved)
        else:
            try:
                plans = {req.strategy: plan(spec, view, req, reserved)}
            except PlacementError as e:
                plans = {req.strategy: e}
        return _json(preview_json(model, spec, plans))

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        """An NDJSON stream: one line per token ({"token", "text", "finish", ...}; the last one also
        carries the request's "stats"), or an {"error": {...}} line if it failed after it started."""
        iid = request.match_info["id"]
        try:
            body = GenerateBody.model_validate_json(await request.read() or b"{}")
            sub = Submit(rid=f"g{secrets.token_hex(8)}", prompt_ids=body.prompt_ids, text=body.prompt,
                         messages=body.messages, params=body.params)
        except ValidationError as e:
            return _error(400, f"invalid body: {_first_error(e)}")
        try:
            rec = await self.c.coordinator.find(iid)
            if rec.status != "ready":
                raise InstanceError(409, f"instance {iid} is {rec.status}")
            accepted, feed = await self.c.submit(rec, sub)
            if not accepted.accepted and accepted.error is not None and accepted.error.code == "model_unavailable":
                rec = await self.c.coordinator.find(iid, fresh=True)  # its entry may have moved (a recovery)
                if rec.status != "ready":
                    raise InstanceError(503, f"instance {iid} is {rec.status}")
                accepted, feed = await self.c.submit(rec, sub)
        except InstanceError as e:
            return _error(e.status, str(e))
        except PeerError as e:
            return _error(502, f"the entry of instance {iid} did not answer: {e}")
        if not accepted.accepted:
            assert accepted.error is not None
            err = accepted.error
            headers = {"Retry-After": str(max(1, round(err.retry_after)))} if err.retry_after is not None else None
            return _error(err.status, err.message, code=err.code, param=err.param, headers=headers)
        assert feed is not None  # accepted
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        try:
            async with contextlib.aclosing(feed) as replies:  # leaving early cancels the request
                async for reply in replies:
                    lines: list[dict[str, Any]] = [t.model_dump(exclude_none=True) for t in reply.tokens]
                    if reply.error is not None:
                        lines.append({"error": reply.error.model_dump(exclude_none=True)})
                    elif lines and reply.done and reply.stats is not None:
                        lines[-1]["stats"] = reply.stats.model_dump()
                    if lines:
                        await resp.write("".join(json.dumps(x) + "\n" for x in lines).encode())
        except (InstanceError, PeerError) as e:
            await resp.write((json.dumps({"error": {"status": 502, "message": str(e)}}) + "\n").encode())
        except ConnectionError:  # the client went away; aclosing cancelled its request
            return resp
        await resp.write_eof()
        return resp


def _request_view(r: RequestLog, text: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": r.rid, "state": "failed" if r.error is not None else "done" if r.done else "running", "done": r.done,
        "created_at": r.created_at, "prompt_tokens": len(r.prompt_ids or ()), "output_tokens": len(r.output_ids),
        "stats": r.stats.model_dump() if r.stats is not None else None,
        "error": {"status": r.error.status, "code": r.error.code} if r.error is not None else None,
    }
    if text:
        sub = r.request
        out.update(prompt_ids=r.prompt_ids, output_ids=r.output_ids, params=sub.params.model_dump(), prompt=sub.text,
                   messages=[m.model_dump() for m in sub.messages] if sub.messages is not None else None,
                   output="".join(t.text for t in r.tokens))
    return out


def _json(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, text=json.dumps(obj), content_type="application/json", headers=headers)


def _error(status: int, message: str, headers: dict[str, str] | None = None, **extra: Any) -> web.Response:
    return _json({"error": {"message": message, **{k: v for k, v in extra.items() if v is not None}}}, status, headers)
