"""The public instance routes (no cluster key needed, like /v1/cluster): list, place, stop, preview a
placement, generate (an NDJSON stream of events) and the requests an entry keeps. They work on any
node; the component (supervisor.py) forwards to the coordinator or the entry as needed."""

from __future__ import annotations

import json
import secrets
from typing import TYPE_CHECKING, Any

from aiohttp import web
from pydantic import ValidationError

from shoal.cluster.messages import Ack
from shoal.cluster.peer import PeerError
from shoal.placement.planner import PlacementError, PlacementRequest, plan, plan_each_strategy
from shoal.runner.messages import CreateInstance, InstanceRef, Submit
from shoal.runner.records import InstanceError, public_instance

if TYPE_CHECKING:
    from shoal.runner.supervisor import InstancesComponent


class PublicRoutes:
    def __init__(self, component: InstancesComponent):
        self.c = component

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/v1/instances", self._get_instances),
            web.post("/v1/instances", self._post_instance),
            web.delete("/v1/instances/{id}", self._delete_instance),
            web.post("/v1/instances/{id}/generate", self._generate),
            web.get("/v1/instances/{id}/requests", self._get_requests),
            web.get("/v1/placement", self._get_placement),
        ]

    async def _get_instances(self, request: web.Request) -> web.Response:
        return _json({"instances": await self.c.instances()})

    async def _post_instance(self, request: web.Request) -> web.Response:
        try:
            body = CreateInstance.model_validate_json(await request.read())
        except ValidationError as e:
            return _error(400, f"invalid body: {e.errors()[0]['msg']} at {'.'.join(map(str, e.errors()[0]['loc']))}")
        try:
            inst = await self.c.create(body)
        except PlacementError as e:
            return _error(507 if e.missing_bytes else 409, str(e), missing_bytes=e.missing_bytes)
        except InstanceError as e:
            return _error(e.status, str(e), **e.extra)
        return _json({"instance": public_instance(inst.record(self.c.config.node_id))}, status=202)

    async def _delete_instance(self, request: web.Request) -> web.Response:
        iid = request.match_info["id"]
        try:
            if iid in self.c.coordinated:
                inst = await self.c.delete(iid)
                return _json({"id": iid, "status": inst.status})
            rec = await self.c.find(iid)
            await self.c.call(rec.coordinator, "/peer/instances/delete", InstanceRef(instance_id=iid), Ack, 20.0)
        except InstanceError as e:
            return _error(e.status, str(e))
        except PeerError as e:
            return _error(502, f"the instance's coordinator did not answer: {e}")
        return _json({"id": iid, "status": "stopped"})

    async def _get_requests(self, request: web.Request) -> web.Response:
        """The requests this entry keeps (prompt and tokens so far): what a replay would resend."""
        iid = request.match_info["id"]
        h = self.c.hosted.get((iid, 0))
        if h is None:
            return _error(404, f"the entry of instance {iid} does not run on this node")
        return _json({"requests": [
            {"id": r.rid, "prompt_ids": r.prompt_ids, "output_ids": r.output_ids, "params": r.params, "done": r.done,
             "created_at": r.created_at} for r in h.requests.values()]})

    async def _get_placement(self, request: web.Request) -> web.Response:
        q = request.query
        model = q.get("model")
        if not model:
            return _error(400, "give ?model=")
        try:
            nodes = q.get("nodes")
            names = [x for x in nodes.split(",") if x] if nodes and not nodes.isdigit() else None
            req = PlacementRequest(strategy=q.get("strategy", "auto"), nodes=names,
                                   node_count=int(nodes) if nodes and nodes.isdigit() else None,
                                   context=int(q["context"]) if "context" in q else None,
                                   tp_size=int(q["tp_size"]) if "tp_size" in q else None)
            spec = await self.c.spec_of(model)
        except (ValidationError, ValueError) as e:
            return _error(400, f"bad query: {e}")
        except InstanceError as e:
            return _error(e.status, str(e))
        lists = await self.c.gather_lists()
        view, reserved = self.c.node.cluster_view(), self.c.reserved_by_node(lists)
        if req.strategy == "auto":
            plans = plan_each_strategy(spec, view, req, reserved)
        else:
            try:
                plans = {req.strategy: plan(spec, view, req, reserved)}
            except PlacementError as e:
                plans = {req.strategy: e}
        out = {}
        for k, p in plans.items():
            if isinstance(p, PlacementError):
                out[k] = {"error": str(p), "missing_bytes": p.missing_bytes}
            else:
                out[k] = p.model_dump(mode="json")
        return _json({"model": model, "spec": spec.model_dump(), "plans": out})

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        iid = request.match_info["id"]
        try:
            body = json.loads(await request.read() or b"{}")
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
            rid = f"g{secrets.token_hex(8)}"
            msg = Submit(instance_id=iid, rid=rid, prompt_ids=body.get("prompt_ids"), text=body.get("prompt"),
                         messages=body.get("messages"), params=body.get("params") or {})
            rec = await self.c.find(iid)
            if rec.status != "ready":
                raise InstanceError(409, f"instance {iid} is {rec.status}")
        except (ValueError, ValidationError) as e:
            return _error(400, f"invalid body: {e}")
        except InstanceError as e:
            return _error(e.status, str(e))
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        try:
            async for batch in self.c.stream_events(rec, msg):
                await resp.write("".join(json.dumps(ev) + "\n" for ev in batch).encode())
        except (InstanceError, PeerError) as e:
            await resp.write((json.dumps({"error": str(e)}) + "\n").encode())
        await resp.write_eof()
        return resp


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, text=json.dumps(obj), content_type="application/json")


def _error(status: int, message: str, **extra: Any) -> web.Response:
    return _json({"error": {"message": message, **extra}}, status=status)
