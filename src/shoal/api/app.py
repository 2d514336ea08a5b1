"""Mounting the API on an aiohttp application: routes, error shapes, metrics, life.

    setup_api(app, service)      # routes + error middleware + service start/stop hooks

`ApiComponent` is the same thing in the node's Component shape (routes, start, stop) for a node
that manages component lifetimes itself; its `middleware` must be appended to the app as well.
Every handler is wrapped once (`_endpoint`): ApiError -> JSON error, anything unexpected -> logged
and answered 500 without a traceback, one request counted per answer. Who may call at all is the
front door's business (api/guard.py), one middleware for the whole app.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from shoal.api.anthropic import AnthropicHandlers
from shoal.api.errors import ApiError, error_response_for, from_http_exception, internal
from shoal.api.ollama import OllamaHandlers
from shoal.api.openai import OpenAIHandlers
from shoal.api.schema import build_openapi
from shoal.api.service import ModelService

log = logging.getLogger("shoal.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_API_PREFIXES = ("/v1/", "/api/")


class ApiComponent:
    """The API as a node component: its routes, and the service's start and stop."""

    name = "api"

    def __init__(self, service: ModelService):
        self.service = service
        self._openai, self._ollama = OpenAIHandlers(service), OllamaHandlers(service)
        self._anthropic = AnthropicHandlers(service)
        self._openapi = json.dumps(build_openapi()).encode()

    def routes(self) -> list[web.RouteDef]:
        out = []
        for method, path, handler in [*self._openai.routes(), *self._ollama.routes(), *self._anthropic.routes()]:
            out.append(web.route(method, path, self._endpoint(handler, path)))
        out.append(web.get("/metrics", self._endpoint(self._metrics, "/metrics")))
        out.append(web.get("/openapi.json", self._endpoint(self._schema, "/openapi.json")))
        out.append(web.get("/healthz", self._endpoint(self._health, "/healthz")))
        return out

    async def start(self) -> None:
        await self.service.start()

    async def stop(self) -> None:
        await self.service.close()

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """aiohttp's own 404/405 on API paths, answered in the API's error shape."""
        if not request.path.startswith(_API_PREFIXES):
            return await handler(request)
        try:
            return await handler(request)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            err = from_http_exception(e)
            self.service.metrics.requests.inc(endpoint="unknown", status=str(err.status))
            return error_response_for(request.path, err)

    def _endpoint(self, handler: Handler, name: str) -> Handler:
        metrics = self.service.metrics

        async def wrapped(request: web.Request) -> web.StreamResponse:
            status = 500
            try:
                resp = await handler(request)
                status = resp.status
                return resp
            except ApiError as e:
                status = e.status
                return error_response_for(name, e)
            except web.HTTPException as e:
                err = from_http_exception(e)
                status = err.status
                return error_response_for(name, err)
            except (asyncio.CancelledError, ConnectionError):
                status = 499  # the client went away (nginx's code for it)
                raise
            except Exception:
                log.exception("%s %s failed", request.method, request.path)
                return error_response_for(name, internal())
            finally:
                metrics.requests.inc(endpoint=name, status=str(status))

        return wrapped

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.service.metrics.render().encode(),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def _schema(self, request: web.Request) -> web.Response:
        return web.Response(body=self._openapi, content_type="application/json")

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "models": sorted(self.service.instances)})


def setup_api(app: web.Application, service: ModelService) -> ApiComponent:
    """Mount the OpenAI, Ollama and Anthropic APIs on `app` and tie the service's life to the app's."""
    api = ApiComponent(service)
    app.add_routes(api.routes())
    app.middlewares.append(api.middleware)

    async def on_startup(_: web.Application) -> None:
        await api.start()

    async def on_cleanup(_: web.Application) -> None:
        await api.stop()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return api
