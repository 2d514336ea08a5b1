"""The dashboard: one page at `/`, with its ES modules (entry `main.js`) and style under `/static/`,
shipped inside the package (`shoal/api/static/`, one flat folder). No build step and no CDN: the
files are served as they are, and the browser resolves the modules' imports against `/static/`.

The page itself only reads the node's JSON endpoints (same origin) — /v1/cluster, the instance and
placement endpoints, and the OpenAI API for chat — so this component has no state and no background
task; it is a component only so that the node mounts and orders it like the others. The page and
its files are behind the front door like every route (api/guard.py): a browser on another machine
gets in through the login link, whose cookie then rides along with each of the page's requests.
The page never reads the request logs, nor any prompt but its own chat's.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from importlib.resources.abc import Traversable

from aiohttp import web

# What each served suffix is; ES modules must come with a JavaScript type or the browser refuses
# them. Files with other suffixes are never served.
CONTENT_TYPES = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
}

# The page loads nothing from anywhere else and runs no inline script; say so, so a stray
# injection in a model's reply rendered by mistake could not load or run anything either.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Revalidate every time (ETag makes that a 304): a node upgraded in place serves the new page.
    "Cache-Control": "no-cache",
}


def static_dir() -> Traversable:
    return resources.files("shoal.api").joinpath("static")


class Dashboard:
    """Node component serving the dashboard files."""

    name = "dashboard"

    def __init__(self, root: Traversable | None = None) -> None:
        self.root = root or static_dir()

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/", self._index),
            web.get("/index.html", self._index),
            web.get("/static/{name}", self._static),
        ]

    async def start(self) -> None:
        if not self.root.joinpath("index.html").is_file():
            raise FileNotFoundError(f"dashboard files missing from {self.root} (a broken install?)")

    async def stop(self) -> None:
        return None

    async def _index(self, request: web.Request) -> web.Response:
        return self._serve(request, "index.html")

    async def _static(self, request: web.Request) -> web.Response:
        return self._serve(request, request.match_info["name"])

    def _serve(self, request: web.Request, name: str) -> web.Response:
        # One flat folder: a name with a separator or a leading dot is never a file of ours.
        suffix = "." + name.rsplit(".", 1)[-1] if "." in name else ""
        if "/" in name or "\\" in name or name.startswith(".") or suffix not in CONTENT_TYPES:
            raise web.HTTPNotFound(text="not found")
        f = self.root.joinpath(name)
        if not f.is_file():
            raise web.HTTPNotFound(text="not found")
        body = f.read_bytes()  # a few tens of KiB, read per request so edits show on reload
        etag = '"' + hashlib.blake2b(body, digest_size=12).hexdigest() + '"'
        headers = {**SECURITY_HEADERS, "ETag": etag}
        if request.headers.get("If-None-Match") == etag:
            return web.Response(status=304, headers=headers)
        return web.Response(body=body, headers=headers, content_type=CONTENT_TYPES[suffix], charset="utf-8")
