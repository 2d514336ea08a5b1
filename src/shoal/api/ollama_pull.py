"""Ollama's model management for catalog models: /api/pull, /api/delete and /api/copy.

A pull streams what Ollama's does, one NDJSON object a line:

    {"status": "pulling manifest"}
    {"status": "pulling <12 hex>", "digest": "sha256:<hex>", "total": N, "completed": n}   # per file, repeated
    {"status": "verifying sha256 digest"}
    {"status": "writing manifest"}
    {"status": "success"}

(`stream: false`: only the last). A file is named by the hash the hub lists for it: the sha256 of a
large file, the git blob id (sha1) of a small one. The download runs in a thread of its own and
reports through the event loop, so the node keeps answering meanwhile; a client that goes away
stops it, leaving a `.partial` file the next pull resumes. Every file is checked against the hub's
hash before it is kept (weights/download.py), which is what "verifying" reports.

Copy is refused: a catalog id is both the name and where the weights come from, so a second name
for the same files would have nowhere to live.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from shoal.api.errors import ApiError, invalid, parse, read_json
from shoal.api.generation import Reply
from shoal.api.service import ModelService
from shoal.catalog import CATALOG, CatalogEntry, bundled_path
from shoal.weights import download as dl

PROGRESS_EVERY_S = 0.1  # at most this often per file (plus its first and last record)


class _Stopped(Exception):
    """The client went away: the download thread leaves at its next chunk."""


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)  # as api/ollama.py's bodies


class PullRequest(_Body):
    model: str | None = Field(None, min_length=1, max_length=512)
    name: str | None = Field(None, min_length=1, max_length=512, description="older clients' spelling of model")
    stream: bool | None = True
    insecure: bool | None = Field(None, description="ignored: the hub is reached over its own URL")


class DeleteRequest(_Body):
    model: str | None = Field(None, min_length=1, max_length=512)
    name: str | None = Field(None, min_length=1, max_length=512, description="older clients' spelling of model")


def _digest(f: dl.HubFile) -> str:
    return f"sha256:{f.sha256}" if f.sha256 else f"sha1:{f.git_blob}"


def _not_in_catalog(name: str) -> ApiError:
    return ApiError(404, f"pull model manifest: model '{name}' is not in shoal's catalog (see `shoal download --list`)",
                    param="model", code="model_not_found")


class OllamaModelFiles:
    def __init__(self, service: ModelService):
        self.service = service
        self._locks: dict[str, asyncio.Lock] = {}  # one download of a model at a time: they would share files

    def routes(self) -> list[tuple[str, str, Any]]:
        return [
            ("POST", "/api/pull", self.pull),
            ("DELETE", "/api/delete", self.delete),
            ("POST", "/api/copy", self.copy),
        ]

    def _entry(self, name: str | None) -> tuple[str, CatalogEntry | None]:
        if not name:
            raise invalid("missing required parameter: 'model'", "model")
        name = self.service.canonical(name)
        return name, CATALOG.get(name)

    async def pull(self, request: web.Request) -> web.StreamResponse:
        body = parse(PullRequest, await read_json(request))
        name, entry = self._entry(body.model or body.name)
        if entry is None:
            raise _not_in_catalog(name)
        stream = body.stream is not False
        reply = Reply(request, "ndjson" if stream else "json", ollama=True)
        lock = self._locks.setdefault(entry.id, asyncio.Lock())
        async with lock:
            return await self._pull(entry, reply, stream)

    async def _pull(self, entry: CatalogEntry, reply: Reply, stream: bool) -> web.StreamResponse:
        async def say(record: dict[str, Any]) -> None:
            if stream:
                await reply.send(record)

        await say({"status": "pulling manifest"})
        if bundled_path(entry) is not None:  # shipped with shoal: nothing to fetch
            return await self._done(reply, stream)
        loop = asyncio.get_running_loop()
        records: asyncio.Queue[dict[str, Any] | BaseException | None] = asyncio.Queue()
        stop = threading.Event()

        def put(item: dict[str, Any] | BaseException | None) -> None:
            loop.call_soon_threadsafe(records.put_nowait, item)

        def fetch() -> None:
            try:
                files = dl.needed_files(entry)
                by_name = {f.name: f for f in files}
                last: dict[str, float] = {}

                def record(f: dl.HubFile, done: int, total: int | None) -> dict[str, Any]:
                    digest = _digest(f)
                    hexpart = digest.split(":", 1)[1]
                    return {"status": f"pulling {hexpart[:12]}", "digest": digest,
                            "total": total if total is not None else f.size, "completed": done}

                for f in files:  # what is already here counts as pulled, as Ollama reports a layer it has
                    dest = dl.model_dir(entry) / f.name
                    if dest.exists():
                        size = dest.stat().st_size
                        put(record(f, size, size))

                def progress(filename: str, done: int, total: int | None) -> None:
                    if stop.is_set():
                        raise _Stopped()
                    now = time.monotonic()
                    first, finished = filename not in last, total is not None and done >= total
                    if first or finished or now - last[filename] >= PROGRESS_EVERY_S:
                        last[filename] = now
                        put(record(by_name[filename], done, total))

                dl.download(entry, progress=progress, files=files)
                put(None)
            except BaseException as e:  # noqa: BLE001 - handed to the loop, which answers it
                put(e)

        thread = threading.Thread(target=fetch, name=f"shoal-pull-{entry.id}", daemon=True)
        thread.start()
        try:
            while True:
                try:
                    item = await asyncio.wait_for(records.get(), reply.keepalive_interval)
                except TimeoutError:
                    await reply.keepalive()  # a non-streamed pull of gigabytes: keep the connection open
                    continue
                if item is None:
                    break
                if isinstance(item, _Stopped):
                    return reply.response or web.Response(status=499)
                if isinstance(item, dl.DownloadError):
                    return await reply.fail(ApiError(502, f"pulling {entry.id}: {item}", "server_error"))
                if isinstance(item, BaseException):
                    raise item
                await say(item)
            await say({"status": "verifying sha256 digest"})  # each file was checked before it was kept
            await say({"status": "writing manifest"})
            return await self._done(reply, stream)
        finally:
            stop.set()  # the client left (or we answered): the thread stops at its next chunk

    @staticmethod
    async def _done(reply: Reply, stream: bool) -> web.StreamResponse:
        if stream:
            await reply.send({"status": "success"})
            return await reply.end()
        return await reply.complete({"status": "success"})

    async def delete(self, request: web.Request) -> web.Response:
        body = parse(DeleteRequest, await read_json(request))
        name, entry = self._entry(body.model or body.name)
        if entry is None:
            raise ApiError(404, f"model '{name}' not found", param="model", code="model_not_found")
        if entry.bundled_package and bundled_path(entry) is not None:
            raise invalid(f"model '{name}' ships with shoal (the {entry.bundled_package} package) and cannot be "
                          f"deleted", "model", "model_bundled")
        if self.service.is_loaded(name):
            raise ApiError(409, f"model '{name}' is running: stop it first (`shoal stop {name}`, or /api/generate "
                                f"with keep_alive 0)", param="model", code="model_in_use")
        if not await asyncio.to_thread(dl.remove, entry):
            raise ApiError(404, f"model '{name}' not found", param="model", code="model_not_found")
        return web.Response(status=200)

    async def copy(self, request: web.Request) -> web.Response:
        raise invalid("shoal's model names are its catalog's ids (see `shoal download --list`) and cannot be copied "
                      "or renamed", "destination", "copy_not_supported")
