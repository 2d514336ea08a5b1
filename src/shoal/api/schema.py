"""The OpenAPI 3.1 document of the API, served at /openapi.json and built from the request models
the handlers validate with, so the two cannot drift apart. Response models here exist only to
document (and let a fuzzer check) the JSON shapes the handlers write; they allow extra fields."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict
from pydantic.json_schema import models_json_schema

from shoal import __version__
from shoal.api import ollama, openai


class _Out(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorDetail(_Out):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(_Out):
    error: ErrorDetail


class OllamaError(_Out):
    error: str


class PromptTokensDetails(_Out):
    cached_tokens: int


class Usage(_Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class ChatMessageOut(_Out):
    role: str
    content: str | None


class ChatChoice(_Out):
    index: int
    message: ChatMessageOut
    finish_reason: str | None
    logprobs: dict[str, Any] | None = None


class ChatCompletion(_Out):
    id: str
    object: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(_Out):
    index: int
    text: str
    finish_reason: str | None
    logprobs: dict[str, Any] | None = None


class Completion(_Out):
    id: str
    object: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelObject(_Out):
    id: str
    object: str
    created: int
    owned_by: str


class ModelList(_Out):
    object: str
    data: list[ModelObject]


class OllamaChatResponse(_Out):
    model: str
    created_at: str
    done: bool


class OllamaModelList(_Out):
    models: list[dict[str, Any]]


class OllamaVersion(_Out):
    version: str


_STREAM = {"text/event-stream": {"schema": {"type": "string"}}}
_NDJSON = {"application/x-ndjson": {"schema": {"type": "string"}}}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(name: str) -> dict[str, Any]:
    return {"application/json": {"schema": _ref(name)}}


def _errors(codes: tuple[int, ...], ollama_shape: bool = False) -> dict[str, Any]:
    shape = "OllamaError" if ollama_shape else "ErrorResponse"
    return {str(c): {"description": "error", "content": _json(shape)} for c in codes}


# 403, 415 and 421 are the front door's (api/guard.py): a foreign Origin, a body that is not JSON, a Host not ours.
_GEN_ERRORS = (400, 401, 403, 404, 413, 415, 421, 429, 500, 503)


def _post(summary: str, body: str, ok: dict[str, Any], ollama_shape: bool = False) -> dict[str, Any]:
    return {"post": {
        "summary": summary,
        "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(body)}}},
        "responses": {"200": {"description": "the result (streamed when `stream` is true)", "content": ok},
                      **_errors(_GEN_ERRORS, ollama_shape)},
    }}


def _get(summary: str, ok: dict[str, Any], ollama_shape: bool = False) -> dict[str, Any]:
    return {"get": {"summary": summary, "responses": {"200": {"description": "ok", "content": ok}, **_errors((401, 421), ollama_shape)}}}


def build_openapi() -> dict[str, Any]:
    models: list[type[BaseModel]] = [
        openai.ChatCompletionRequest, openai.CompletionRequest, ollama.ChatRequest, ollama.GenerateRequest, ollama.ShowRequest,
        ErrorResponse, OllamaError, ChatCompletion, Completion, ModelList, OllamaChatResponse, OllamaModelList, OllamaVersion,
    ]
    _, defs = models_json_schema([(m, "validation") for m in models], ref_template="#/components/schemas/{model}")
    paths = {
        "/v1/chat/completions": _post("Chat completion (OpenAI)", "ChatCompletionRequest", {**_json("ChatCompletion"), **_STREAM}),
        "/v1/completions": _post("Text completion (OpenAI, legacy)", "CompletionRequest", {**_json("Completion"), **_STREAM}),
        "/v1/models": _get("Models this node can serve (OpenAI)", _json("ModelList")),
        "/api/chat": _post("Chat (Ollama)", "ChatRequest", {**_json("OllamaChatResponse"), **_NDJSON}, True),
        "/api/generate": _post("Generate (Ollama)", "GenerateRequest", {**_json("OllamaChatResponse"), **_NDJSON}, True),
        "/api/show": _post("Model details (Ollama)", "ShowRequest", {"application/json": {"schema": {"type": "object"}}}, True),
        "/api/tags": _get("Models this node can serve (Ollama)", _json("OllamaModelList"), True),
        "/api/ps": _get("Loaded models (Ollama)", _json("OllamaModelList"), True),
        "/api/version": _get("Ollama API version", _json("OllamaVersion"), True),
        "/metrics": _get("Prometheus metrics", {"text/plain": {"schema": {"type": "string"}}}),
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "shoal API", "version": __version__,
                 "description": "OpenAI- and Ollama-compatible endpoints of a shoal node."},
        "paths": paths,
        "components": {
            "schemas": defs["$defs"],
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer",
                           "description": "the node's API key; clients on its loopback may omit it unless the node says otherwise"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key", "description": "the same key, as Anthropic clients send it"},
            },
        },
    }
