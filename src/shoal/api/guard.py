"""The front door: one middleware before every route that is not a peer's, so a route added anywhere
is guarded without asking. The checks, in order; the first that fails answers, in the error shape
of the path (Ollama's on /api/, OpenAI's elsewhere, a login page for the dashboard's page):

    0. a skipped prefix (/peer/ on a node) passes untouched: the peer middleware signs and checks it
    1. Host names this node, else 421: a DNS-rebinding page reaches us under the attacker's name
    2. /healthz is open
    3. a state-changing request (POST, PUT, PATCH, DELETE) that carries an Origin comes from this
       Host, else 403: a browser says where a request comes from, and a page elsewhere is not us
    4. a credential, else 401: the API key (`Authorization: Bearer KEY` from OpenAI and Ollama
       clients, `x-api-key: KEY` from Anthropic ones) or the dashboard's cookie. Loopback clients
       need none unless the exemption is off, or the route is an admin view
    5. a state-changing request with a body says it is JSON, else 415: forms and text/plain are
       what a page may send cross-site without the browser asking first

The dashboard logs in through `/login?key=KEY` (a link the node prints, like a notebook server's
token URL): it sets an HttpOnly, SameSite=Strict cookie holding an HMAC of the key, never the key,
so the page's scripts cannot read it and other sites' pages do not send it. No route answers CORS:
another origin's page can send what a form can, and can read nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from urllib.parse import urlsplit

import psutil
from aiohttp import web

from shoal.api.errors import ApiError, error_response_for
from shoal.config import split_hostport

log = logging.getLogger("shoal.guard")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
OPEN_PATHS = frozenset({"/healthz"})
LOGIN_PATH = "/login"  # also in cluster/cli.py, which prints the link
PAGE_PATHS = frozenset({"/", "/index.html"})  # answered with the login page when refused
COOKIE_MAX_AGE_S = 30 * 24 * 3600
MAX_LOGIN_BODY = 4096
_WILDCARDS = frozenset({"", "0.0.0.0", "::", "*"})
_INTERFACES_REFRESH_S = 1.0  # a Host naming an address we do not know rereads the interfaces, this often at most
_COOKIE_CONTEXT = b"shoal dashboard cookie v1"


class HostRule:
    """Which Host headers name this node: localhost (and *.localhost), the hostname (and
    hostname.local), loopback and this machine's interface addresses, and the names it was given.
    "*" among them allows any. A wildcard bind address is never a name."""

    def __init__(self, names: Iterable[str | None]):
        given = {_normal_name(n) for n in names if n}
        self.any = "*" in given
        hostname = socket.gethostname().lower()
        self.names = {"localhost", hostname, f"{hostname}.local"} | (given - _WILDCARDS)
        self._addresses: frozenset[str] = frozenset()
        self._read_at = float("-inf")

    def allows(self, header: str | None) -> bool:
        if self.any or header is None:  # no Host at all: not a browser, so no rebinding
            return True
        name = split_host(header)[0]
        if name in self.names or name.endswith(".localhost"):
            return True
        try:
            ip = ipaddress.ip_address(name.split("%")[0])
        except ValueError:
            return False
        if is_loopback(ip):
            return True
        if ip.is_unspecified:  # 0.0.0.0 reaches the node from a browser, but names no machine
            return False
        return self._is_interface(str(ip))

    def _is_interface(self, address: str) -> bool:
        if address in self._addresses:
            return True
        now = time.monotonic()
        if now - self._read_at < _INTERFACES_REFRESH_S:
            return False
        self._read_at = now
        self._addresses = frozenset(filter(None, (
            _canonical_ip(a.address)
            for addrs in psutil.net_if_addrs().values()
            for a in addrs
            if a.family in (socket.AF_INET, socket.AF_INET6)
        )))
        return address in self._addresses


class FrontDoor:
    """The middleware and the login routes of one app; on a node also a component, whose start
    (once the port is bound) prints `banner`: a key made on this start, and its login link.

    api_key None asks no credential at all (only `python -m shoal.api.serve` without --api-key);
    an empty key matches nothing, so only exempt loopback clients get in.
    """

    name = "front door"

    def __init__(
        self,
        api_key: str | None,
        *,
        port: int,
        hosts: Iterable[str | None] = (),
        loopback_exempt: bool = True,
        admin_routes: Iterable[str] = (),
        skip_prefixes: tuple[str, ...] = (),
        banner: str | None = None,
    ) -> None:
        self.banner = banner
        self.open = api_key is None
        self._key_digest = hashlib.sha256(api_key.encode()).digest() if api_key else None
        self._cookie = hmac.new(api_key.encode(), _COOKIE_CONTEXT, hashlib.sha256).hexdigest() if api_key else None
        # Cookies are per host, not per port: two nodes on one machine must not overwrite each other's.
        self.cookie_name = f"shoal_{port}"
        self.hosts = HostRule(hosts)
        self.loopback_exempt = loopback_exempt
        self.admin_routes = frozenset(admin_routes)  # canonical paths, as the routes were declared
        self.skip_prefixes = skip_prefixes

    def routes(self) -> list[web.RouteDef]:
        return [web.get(LOGIN_PATH, self._login_link), web.post(LOGIN_PATH, self._login_json)]

    async def start(self) -> None:
        if self.banner:
            # Printed, not logged: the owner copies it to the other machines' clients.
            print(self.banner, flush=True)

    async def stop(self) -> None:
        return None

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        if path.startswith(self.skip_prefixes):
            return await handler(request)
        host = request.headers.get("Host")
        if not self.hosts.allows(host):
            name = split_host(host or "")[0]
            return refusal(request, 421, f"this node does not answer to the name {name!r} (a guard against DNS "
                           f"rebinding): use its address or hostname, or start it with --allowed-host {name}",
                           "unknown_host")
        if path in OPEN_PATHS:
            return await handler(request)
        changes = request.method in STATE_CHANGING
        origin = request.headers.get("Origin")
        if changes and origin is not None and not same_origin(origin, host):
            return refusal(request, 403, f"cross-origin request refused: the page at {origin} is not this node",
                           "cross_origin")
        if path != LOGIN_PATH and not self._admitted(request):
            return self._unauthorized(request)
        if changes and request.body_exists and request.content_type != "application/json":
            return refusal(request, 415, "send the body as JSON, with 'Content-Type: application/json' "
                           f"(this one says {request.headers.get('Content-Type') or 'nothing'})", "unsupported_media_type")
        return await handler(request)

    # -- credentials --------------------------------------------------------------------------------
    def _admitted(self, request: web.Request) -> bool:
        if self.open:
            return True
        if self.loopback_exempt and from_loopback(request) and not self._is_admin(request):
            return True
        return self.has_credential(request)

    def has_credential(self, request: web.Request) -> bool:
        """The key in a header, or the dashboard's cookie; either one is enough."""
        scheme, _, token = request.headers.get("Authorization", "").strip().partition(" ")
        if scheme.lower() == "bearer" and self._is_key(token.strip()):
            return True
        if self._is_key(request.headers.get("x-api-key", "").strip()):
            return True
        cookie = request.cookies.get(self.cookie_name)
        return bool(cookie and self._cookie and hmac.compare_digest(cookie.encode(), self._cookie.encode()))

    def _is_key(self, token: str) -> bool:
        # Digests of equal length, so the comparison's time says nothing about the key's length either.
        return bool(token and self._key_digest
                    and hmac.compare_digest(hashlib.sha256(token.encode()).digest(), self._key_digest))

    def _is_admin(self, request: web.Request) -> bool:
        resource = request.match_info.route.resource
        return resource is not None and resource.canonical in self.admin_routes

    def _unauthorized(self, request: web.Request) -> web.Response:
        if request.method in ("GET", "HEAD") and request.path in PAGE_PATHS:
            return _page(401, LOGIN_FORM.format(message=""))
        if self._is_admin(request):
            message = "this is an admin view: it needs the API key, from this machine too"
        else:
            message = ("this node needs its API key: send 'Authorization: Bearer KEY' or 'x-api-key: KEY' "
                       "(`shoal key` on the node's machine prints it; shoal's own commands send $SHOAL_API_KEY)")
        resp = refusal(request, 401, message, "invalid_api_key")
        resp.headers["WWW-Authenticate"] = 'Bearer realm="shoal"'
        return resp

    # -- login --------------------------------------------------------------------------------------
    async def _login_link(self, request: web.Request) -> web.Response:
        """GET /login?key=KEY: the cookie, then the dashboard. A page that refreshes to it rather
        than a redirect: a strict cookie set during a navigation another site started is not sent
        on that navigation's redirect, but it is on a navigation our own page starts."""
        if self.open:
            raise web.HTTPSeeOther("/")
        if not self._is_key(request.query.get("key", "").strip()):
            given = "key" in request.query
            return _page(401, LOGIN_FORM.format(message="<p role=alert>That is not this node's key.</p>" if given else ""))
        resp = _page(200, SIGNED_IN)
        self._set_cookie(request, resp)
        return resp

    async def _login_json(self, request: web.Request) -> web.Response:
        """POST /login {"key": KEY}: the cookie, for the dashboard's own key dialog (204)."""
        if (request.content_length or 0) > MAX_LOGIN_BODY:
            return refusal(request, 413, f"a login body is {MAX_LOGIN_BODY} bytes at most", "request_too_large")
        try:
            key = json.loads(await request.read())["key"]
        except (ValueError, KeyError, TypeError):
            key = None
        if not self.open and not (isinstance(key, str) and self._is_key(key.strip())):
            return refusal(request, 401, "that is not this node's API key", "invalid_api_key")
        resp = web.Response(status=204, headers={"Cache-Control": "no-store"})
        if not self.open:
            self._set_cookie(request, resp)
        return resp

    def _set_cookie(self, request: web.Request, resp: web.Response) -> None:
        assert self._cookie is not None
        resp.set_cookie(self.cookie_name, self._cookie, max_age=COOKIE_MAX_AGE_S, path="/", httponly=True,
                        samesite="Strict", secure=request.secure)


# -- the rules, each a plain function ---------------------------------------------------------------


def is_loopback(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def from_loopback(request: web.Request) -> bool:
    """Did the connection come from this machine's loopback? (The socket's peer: no header can say so.)"""
    try:
        return is_loopback(ipaddress.ip_address((request.remote or "").split("%")[0]))
    except ValueError:
        return False


def _canonical_ip(text: str) -> str | None:
    try:
        return str(ipaddress.ip_address(text.split("%")[0]))
    except ValueError:
        return None


def split_host(header: str) -> tuple[str, int | None]:
    """'Name:8080', '[::1]:80', 'name.' -> ('name', 8080), ('::1', 80), ('name', None)."""
    name, port = split_hostport(header)
    return _normal_name(name), int(port) if port.isdigit() else None


def _normal_name(name: str) -> str:
    return name.strip().strip("[]").rstrip(".").lower()


def same_origin(origin: str, host: str | None) -> bool:
    """Does an Origin header name the Host the request was sent to? ('null' never does.)"""
    if host is None:
        return False
    o = urlsplit(origin.strip())
    if o.scheme not in ("http", "https") or not o.hostname:
        return False
    default = 443 if o.scheme == "https" else 80
    try:
        o_port = o.port or default
    except ValueError:
        return False
    name, port = split_host(host)
    return _normal_name(o.hostname) == name and o_port == (port or default)


def refusal(request: web.Request, status: int, message: str, code: str) -> web.Response:
    log.debug("refused %s %s from %s: %d %s", request.method, request.path, request.remote, status, code)
    return error_response_for(request.path, ApiError(status, message, "invalid_request_error", None, code))


# -- the two pages: no script, no style, nothing loaded ---------------------------------------------

_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

LOGIN_FORM = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>shoal: sign in</title></head>
<body>
<h1>shoal</h1>
<p>This node needs its API key. Open the login link that <code>shoal key</code> prints on the node's machine,
or enter the key here.</p>
{message}
<form method="get" action="/login">
<label for="key">API key</label>
<input id="key" name="key" type="password" autocomplete="current-password" required>
<button type="submit">Open the dashboard</button>
</form>
</body></html>
"""

SIGNED_IN = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="0; url=/">
<title>shoal</title></head>
<body><p>Signed in. <a href="/">Open the dashboard</a>.</p></body></html>
"""


def _page(status: int, body: str) -> web.Response:
    return web.Response(status=status, text=body, content_type="text/html", charset="utf-8", headers=_PAGE_HEADERS)

