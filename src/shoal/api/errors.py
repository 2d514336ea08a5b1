"""Errors as the OpenAI API shapes them, and the request-body reading that produces most of them.

Every failure a client can cause is an `ApiError` with an HTTP status and OpenAI's four fields
{"error": {"message", "type", "param", "code"}}. Ollama clients read `{"error": "<message>"}` and
Anthropic clients `{"type": "error", "error": {"type", "message"}}` instead, so the same error
renders three ways (`to_openai`, `to_ollama`, `to_anthropic`); `error_response_for` picks the one
of the API a path belongs to. Unexpected exceptions become a 500 whose message carries no
traceback (it goes to the log).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ValidationError

from shoal.engine.scheduler import RequestRefused

# Bodies larger than this are refused before parsing (413); prompts are text, not uploads.
MAX_BODY_BYTES = 16 << 20
# json.loads recurses per nesting level; refuse absurd nesting before it can blow the stack.
MAX_JSON_DEPTH = 64

Shape = Literal["openai", "ollama", "anthropic"]
ANTHROPIC_PATH = "/v1/messages"

# Anthropic names an error by its status; its clients pick the exception class by status alone.
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.retry_after = retry_after

    def to_openai(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def to_ollama(self) -> dict[str, Any]:
        return {"error": self.message}

    def to_anthropic(self) -> dict[str, Any]:
        kind = _ANTHROPIC_TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "api_error")
        return {"type": "error", "error": {"type": kind, "message": self.message}}

    def body(self, shape: Shape) -> dict[str, Any]:
        return {"openai": self.to_openai, "ollama": self.to_ollama, "anthropic": self.to_anthropic}[shape]()

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))}


def invalid(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", param, code)


def not_found(message: str, code: str = "model_not_found", param: str | None = "model") -> ApiError:
    return ApiError(404, message, "invalid_request_error", param, code)


def overloaded(message: str, retry_after: float, status: int = 429) -> ApiError:
    if status == 429:
        return ApiError(429, message, "rate_limit_error", None, "rate_limit_exceeded", retry_after)
    return ApiError(503, message, "server_error", None, "service_unavailable", retry_after)


def internal(message: str = "the server had an error while processing the request") -> ApiError:
    return ApiError(500, message, "server_error", None, "internal_error")


def from_http_exception(e: web.HTTPException) -> ApiError:
    """aiohttp's own refusals (no route, wrong method, body too large) in the API's shape."""
    if e.status == 413:
        return ApiError(413, f"request body too large (limit {MAX_BODY_BYTES} bytes)", code="request_too_large")
    if e.status == 404:
        return ApiError(404, "no such endpoint", code="unknown_url")
    if e.status == 405:
        return ApiError(405, "method not allowed for this endpoint", code="method_not_allowed")
    return ApiError(e.status, e.reason or "request refused", "invalid_request_error" if e.status < 500 else "server_error")


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode(),
        status=status,
        headers=headers,
        content_type="application/json",
    )


def error_response(err: ApiError, ollama: bool = False) -> web.Response:
    return json_response(err.to_ollama() if ollama else err.to_openai(), err.status, err.headers())


def shape_for(path: str) -> Shape:
    """The error shape of the API a path belongs to: Ollama's under /api/, Anthropic's at
    /v1/messages and under it, OpenAI's elsewhere."""
    if path.startswith("/api/"):
        return "ollama"
    if path == ANTHROPIC_PATH or path.startswith(ANTHROPIC_PATH + "/"):
        return "anthropic"
    return "openai"


def error_response_for(path: str, err: ApiError) -> web.Response:
    """`err` answered in the shape the client of `path` reads (see `shape_for`)."""
    return json_response(err.body(shape_for(path)), err.status, err.headers())


# -- request bodies ------------------------------------------------------------------------------


async def read_json(request: web.Request, limit: int = MAX_BODY_BYTES) -> Any:
    """The request body as parsed JSON, or an ApiError: 413 too large, 400 not UTF-8 / not JSON."""
    if request.content_length is not None and request.content_length > limit:
        raise from_http_exception(web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length))
    chunks, size = [], 0
    while True:
        chunk = await request.content.read(1 << 16)
        if not chunk:
            break
        size += len(chunk)
        if size > limit:
            raise from_http_exception(web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=size))
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body.strip():
        raise invalid("the request body is empty; expected a JSON object")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise invalid(f"the request body is not valid UTF-8 (byte {e.start})", code="invalid_encoding") from None
    if _nesting(text) > MAX_JSON_DEPTH:
        raise invalid(f"JSON nested deeper than {MAX_JSON_DEPTH} levels", code="invalid_json")
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        raise invalid(f"the request body is not valid JSON ({e})", code="invalid_json") from None


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _nesting(text: str) -> int:
    # Upper bound of nesting depth, counting brackets even inside strings: cheap and conservative.
    depth = worst = 0
    for ch in text:
        if ch in "[{":
            depth += 1
            worst = max(worst, depth)
        elif ch in "]}":
            depth -= 1
    return worst


def parse(model: type[BaseModel], data: Any) -> Any:
    """Validate a parsed body against a request model; the first problem becomes a 400 naming its param."""
    if not isinstance(data, dict):
        raise invalid(f"the request body must be a JSON object, not {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        param = _param_path(err.get("loc", ()))
        msg = err.get("msg", "invalid value")
        if err.get("type") == "missing":
            raise invalid(f"missing required parameter: {param!r}", param, "missing_required_parameter") from None
        raise invalid(f"invalid value for {param!r}: {msg}" if param else msg, param or None, "invalid_value") from None


# Parts of a pydantic error location that name a union member or validator, not a parameter.
_TYPE_TAG = re.compile(r"^(str|int|float|bool|none|[a-z-]+\[.*\]|constrained-\w+|[A-Z]\w*)$")


def _param_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _TYPE_TAG.match(str(part)):
            out += ("." if out else "") + str(part)
    return out


def from_refusal(e: RequestRefused) -> ApiError:
    """A scheduler's refusal (or a request's failure) in the API's error shape."""
    kind = "invalid_request_error" if e.status < 429 else "rate_limit_error" if e.status == 429 else "server_error"
    return ApiError(e.status, e.message, kind, e.param, e.code, e.retry_after)
