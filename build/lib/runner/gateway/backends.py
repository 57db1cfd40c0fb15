"""What each provider backend lets through, and how a request maps onto the upstream.

A backend is a table of routes (method + path pattern + allowed query keys): anything
else is refused. Each route names its API family, which decides the error shape the
agent gets back, how the tool list is read and how usage is parsed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode

Family = Literal["anthropic", "openai", "ollama"]
Auth = Literal["x-api-key", "bearer", "google", "none"]
ModelAt = Literal["body", "path", "none"]

PLACEHOLDER_KEY = "airlock-placeholder-key"  # what the sandbox holds instead of a key


@dataclass(frozen=True)
class Route:
    method: str
    path: re.Pattern[str]
    family: Family
    kind: str  # messages, count_tokens, models, model, responses, chat, generate, ...
    model_at: ModelAt
    query: frozenset[str] = frozenset()

    @property
    def lists_models(self) -> bool:
        return self.kind in ("models", "tags")


def _r(method: str, path: str, family: Family, kind: str, model_at: ModelAt,
       query: tuple[str, ...] = ()) -> Route:
    return Route(method, re.compile(path), family, kind, model_at, frozenset(query))


_MESSAGES = (
    # Claude Code posts to /v1/messages?beta=true
    _r("POST", r"/v1/messages", "anthropic", "messages", "body", ("beta",)),
    _r("POST", r"/v1/messages/count_tokens", "anthropic", "count_tokens", "body", ("beta",)),
)
_ANTHROPIC_MODELS = (
    _r("GET", r"/v1/models", "anthropic", "models", "none",
       ("beta", "limit", "after_id", "before_id")),
    _r("GET", r"/v1/models/(?P<model>[^/]+)", "anthropic", "model", "path", ("beta",)),
)
_OPENAI = (
    _r("POST", r"/v1/responses", "openai", "responses", "body"),
    _r("POST", r"/v1/chat/completions", "openai", "chat", "body"),
    _r("GET", r"/v1/models", "openai", "models", "none"),
    _r("GET", r"/v1/models/(?P<model>[^/]+)", "openai", "model", "path"),
)
_OLLAMA_NATIVE = (
    _r("POST", r"/api/generate", "ollama", "generate", "body"),
    _r("POST", r"/api/chat", "ollama", "ollama_chat", "body"),
    _r("GET", r"/api/tags", "ollama", "tags", "none"),
    _r("POST", r"/api/show", "ollama", "show", "body"),
    _r("GET", r"/api/version", "ollama", "version", "none"),
)


@dataclass(frozen=True)
class BackendSpec:
    name: str
    routes: tuple[Route, ...]
    family: Family  # for answers to requests that match no route
    auth: Auth
    default_base_url: str | None
    default_key_env: str | None  # used when the policy names no key source
    key_required: bool

    def match(self, method: str, path: str) -> tuple[Route | None, bool]:
        """(route, path_known): the route for method+path, and whether the path exists."""
        known = False
        for route in self.routes:
            if route.path.fullmatch(path):
                known = True
                if route.method == method:
                    return route, True
        return None, known

    def family_for(self, path: str) -> Family:
        if self.name in ("ollama", "replay") and path.startswith("/api/"):
            return "ollama"
        return self.family


BACKENDS: dict[str, BackendSpec] = {
    "anthropic": BackendSpec("anthropic", _MESSAGES + _ANTHROPIC_MODELS, "anthropic",
                             "x-api-key", "https://api.anthropic.com", "ANTHROPIC_API_KEY", True),
    # An AI gateway that speaks the Messages API with Anthropic model ids and takes a
    # bearer token, as Claude Code's ANTHROPIC_AUTH_TOKEN does.
    "gateway": BackendSpec("gateway", _MESSAGES + _ANTHROPIC_MODELS, "anthropic", "bearer",
                           None, "ANTHROPIC_AUTH_TOKEN", True),
    "vertex": BackendSpec("vertex", _MESSAGES, "anthropic", "google", None, None, True),
    "openai": BackendSpec("openai", _OPENAI, "openai", "bearer", "https://api.openai.com/v1",
                          "OPENAI_API_KEY", True),
    "openai-compatible": BackendSpec("openai-compatible", _OPENAI, "openai", "bearer", None,
                                     None, False),
    "ollama": BackendSpec("ollama", _OLLAMA_NATIVE + _OPENAI, "openai", "bearer",
                          "http://127.0.0.1:11434", None, False),
}


def replay_spec(recorded_backend: str) -> BackendSpec:
    """Replay serves the routes of the backend the recording was made with."""
    base = BACKENDS[recorded_backend]
    return BackendSpec("replay", base.routes, base.family, "none", None, None, False)


def filter_query(route: Route, query: str) -> tuple[str, list[str]]:
    """(query to forward, names of parameters the route does not allow)."""
    pairs = parse_qsl(query, keep_blank_values=True)
    bad = sorted({k for k, _ in pairs if k not in route.query})
    return urlencode(pairs), bad


def upstream_url(backend: str, base_url: str, route: Route, path: str, query: str) -> str:
    """Where an agent-side path goes: the agent always speaks the `/v1/...` form."""
    base = base_url.rstrip("/")
    if backend == "ollama":
        pass  # Ollama's base is its host: both /api and /v1 hang off the root
    elif route.family == "openai":
        # OpenAI-style base URLs carry their own version root (…/v1, …/openai/v1).
        path = path[len("/v1"):]
    elif route.family == "anthropic" and base.endswith("/v1"):
        base = base[: -len("/v1")]
    return base + path + (f"?{query}" if query else "")


VERTEX_ANTHROPIC_VERSION = "vertex-2023-10-16"


def vertex_request(base_url: str | None, project: str, region: str, route: Route,
                   body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Anthropic Messages on Vertex AI: the model moves from the body into the path."""
    host = ("https://aiplatform.googleapis.com" if region == "global"
            else f"https://{region}-aiplatform.googleapis.com")
    root = (base_url or host).rstrip("/")
    prefix = f"{root}/v1/projects/{project}/locations/{region}/publishers/anthropic/models"
    body = dict(body)
    body.setdefault("anthropic_version", VERTEX_ANTHROPIC_VERSION)
    if route.kind == "count_tokens":
        return f"{prefix}/count-tokens:rawPredict", body
    model = body.pop("model")
    verb = "streamRawPredict" if body.get("stream") else "rawPredict"
    return f"{prefix}/{model}:{verb}", body


_ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 409: "invalid_request_error", 413: "request_too_large",
    429: "rate_limit_error", 502: "api_error", 503: "overloaded_error",
}
_OPENAI_ERROR_TYPES = {
    400: "invalid_request_error", 401: "invalid_request_error", 403: "permission_denied",
    404: "not_found", 409: "invalid_request_error", 413: "invalid_request_error",
    429: "insufficient_quota", 502: "server_error", 503: "server_error",
}


def error_body(family: Family, status: int, message: str, code: str) -> bytes:
    """An error in the provider's own JSON shape, so SDKs raise their usual exception."""
    obj: dict[str, Any]
    if family == "anthropic":
        obj = {"type": "error", "error": {
            "type": _ANTHROPIC_ERROR_TYPES.get(status, "api_error"), "message": message}}
    elif family == "openai":
        obj = {"error": {"message": message,
                         "type": _OPENAI_ERROR_TYPES.get(status, "server_error"),
                         "param": None, "code": code}}
    else:
        obj = {"error": message}
    return json.dumps(obj).encode()


def agent_env(backend: str, base_url: str) -> dict[str, str]:
    """Variables an agent inside the sandbox needs to reach the gateway at `base_url`."""
    base = base_url.rstrip("/")
    anthropic = {"ANTHROPIC_BASE_URL": base, "ANTHROPIC_API_KEY": PLACEHOLDER_KEY}
    openai = {"OPENAI_BASE_URL": f"{base}/v1", "OPENAI_API_KEY": PLACEHOLDER_KEY}
    if backend in ("anthropic", "vertex", "gateway"):
        return anthropic
    if backend in ("openai", "openai-compatible"):
        return openai
    if backend == "ollama":
        return {"OLLAMA_HOST": base, **openai}
    raise ValueError(f"unknown backend {backend!r}")
