"""A scripted model provider that speaks the real wire protocols, for tests and demos.

It runs on the host (127.0.0.1, a free port) and answers, from a script of turns:
- Anthropic Messages: `POST /v1/messages` (SSE or JSON), `/v1/messages/count_tokens`;
- OpenAI Responses: `POST /v1/responses` (SSE as the Codex CLI reads it, or JSON);
- Chat Completions: `POST /v1/chat/completions` (SSE with `[DONE]`, or JSON);
- Ollama: `POST /api/chat`, `/api/generate` (NDJSON or JSON), `GET /api/tags`,
  `POST /api/show`, `GET /api/version`, and its OpenAI paths;
- `GET /v1/models` (a listing both SDKs accept).

Streams are written with chunked transfer encoding, one event per chunk, flushed at
once, with an optional delay between events ("slow upstream"). Every request is
recorded (method, path, headers, parsed body) for assertions. It uses the standard
library's threaded HTTP server on purpose: an implementation independent of the
gateway it is used to test.

    with ScriptedProvider([{"tool": "exec_command", "arguments": {"cmd": "ls"}},
                           {"text": "done"}], api_key="sk-test") as up:
        ... point a client or the gateway at up.url ...
        assert up.requests[0].body["model"] == "claude-sonnet-4-6"

    python -m runner.testing.scripted_provider --script turns.json [--chunk-delay 0.05]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import signal
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

from runner.testing import wire
from runner.testing.wire import Turn, parse_turn

# Anthropic on Vertex AI: the model is in the path, the verb says whether to stream.
VERTEX_PATH = re.compile(r"/v1/projects/[^/]+/locations/[^/]+/publishers/anthropic/models/"
                         r"(?P<model>[^/:]+):(?P<verb>streamRawPredict|rawPredict)")

GENERATION_PATHS = {
    "/v1/messages": "anthropic",
    "/v1/responses": "responses",
    "/v1/chat/completions": "chat",
    "/api/chat": "ollama_chat",
    "/api/generate": "ollama_generate",
}


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: str
    headers: dict[str, str]  # lower-cased names
    raw: bytes
    body: Any  # parsed JSON, or None
    at: float = field(default_factory=time.time)

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    @property
    def is_generation(self) -> bool:
        return self.path in GENERATION_PATHS or bool(VERTEX_PATH.fullmatch(self.path))

    @property
    def tool_names(self) -> list[str]:
        """Names of the tools the request offered (any protocol)."""
        out = []
        for t in (self.body or {}).get("tools") or []:
            if isinstance(t, dict):
                name = t.get("name") or (t.get("function") or {}).get("name") or t.get("type")
                out.append(str(name))
        return out


Responder = Callable[[RecordedRequest], Any]


class ScriptedProvider:
    def __init__(
        self,
        script: Iterable[Any] | Responder = (),
        *,
        api_key: str | None = None,
        chunk_delay: float = 0.0,
        chunk_chars: int | None = None,
        loop: bool = False,
        models: list[str] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        log_path: Path | None = None,
        strict_models: bool = False,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        """`script`: turns served in order to generation requests, or a callable that
        returns a turn for each request. `api_key`: when set, requests without it get
        401. `loop`: start the script over when it runs out (else: a 400 error)."""
        self._responder: Responder | None = script if callable(script) else None
        self._turns: list[Turn] = [] if callable(script) else [parse_turn(t) for t in script]
        self.api_key = api_key
        self.chunk_delay = chunk_delay
        self.chunk_chars = chunk_chars
        self.loop = loop
        self.models = models or ["claude-sonnet-4-6", "claude-haiku-4-5", "gpt-5", "gpt-5-mini",
                                 "llama3"]
        # With strict_models, generation for a model outside `models` is a 404, as a
        # provider answers for a model the account cannot use.
        self.strict_models = strict_models
        self.requests: list[RecordedRequest] = []
        self.served = 0
        self._lock = threading.Lock()
        self._log_path = log_path
        self._server = _Server((host, port), _Handler)
        # With `tls`, the provider answers HTTPS as https://localhost:PORT (the name a
        # test certificate carries); the handshake happens as each client is accepted.
        self.tls = tls is not None
        if tls is not None:
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
        self._server.provider = self
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        if self.tls:
            return f"https://localhost:{self.port}"
        host = self._server.server_address[0]
        return f"http://{host!s}:{self.port}"

    def start(self) -> ScriptedProvider:
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05},
                                        name=f"scripted-provider:{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> ScriptedProvider:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- script ---------------------------------------------------------------------

    def add(self, *turns: Any) -> None:
        with self._lock:
            self._turns.extend(parse_turn(t) for t in turns)

    def generation_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.is_generation]

    def _record(self, req: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(req)
        if self._log_path is not None:
            with self._lock, self._log_path.open("a") as fh:
                fh.write(json.dumps({"method": req.method, "path": req.path, "query": req.query,
                                     "headers": req.headers, "body": req.body}) + "\n")

    def _next_turn(self, req: RecordedRequest) -> Turn | None:
        if self._responder is not None:
            return parse_turn(self._responder(req))
        with self._lock:
            if not self._turns:
                return None
            if self.served >= len(self._turns):
                if not self.loop:
                    return None
                self.served = 0
            turn = self._turns[self.served]
            self.served += 1
            return turn


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    provider: ScriptedProvider

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up mid-stream is a case under test, not an error.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive and chunked responses
    # Headers and body go out in separate writes: without TCP_NODELAY, Nagle plus the
    # client's delayed ACK would add ~40 ms to every response.
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        return

    # -- plumbing -------------------------------------------------------------------

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("transfer-encoding") or "").lower():
            data = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(data)
                data += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("content-length") or 0)
        return self.rfile.read(length) if length else b""

    def _json(self, status: int, obj: Any) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.send_header("request-id", wire._id("req_"))
        self.end_headers()
        self.wfile.write(body)

    def _stream(self, content_type: str, events: list[bytes], delay: float) -> None:
        self.send_response(200)
        self.send_header("content-type", content_type)
        self.send_header("cache-control", "no-cache")
        self.send_header("transfer-encoding", "chunked")
        self.send_header("request-id", wire._id("req_"))
        self.end_headers()
        self.wfile.flush()
        for i, event in enumerate(events):
            if delay and i:
                time.sleep(delay)
            # one write per event: frame and payload together, sent at once
            self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    # -- dispatch -------------------------------------------------------------------

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        provider = self.server.provider
        parts = urlsplit(self.path)
        raw = self._read_body()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        req = RecordedRequest(self.command, parts.path, parts.query,
                              {k.lower(): v for k, v in self.headers.items()}, raw, body)
        provider._record(req)
        path = parts.path
        style = _style(path)
        if provider.api_key is not None and not _authorised(req, provider.api_key):
            self._error(style, 401, "scripted provider: invalid API key")
            return
        model = (body or {}).get("model") or "scripted"
        if self.command == "GET":
            if path == "/v1/models":
                self._json(200, wire.models_list(provider.models))
            elif path.startswith("/v1/models/"):
                self._json(200, wire.models_list([path.rsplit("/", 1)[1]])["data"][0])
            elif path == "/api/tags":
                self._json(200, wire.ollama_tags(provider.models))
            elif path == "/api/version":
                self._json(200, {"version": "0.12.0"})
            else:
                self._error(style, 404, f"scripted provider: no route GET {path}")
            return
        if path == "/v1/messages/count_tokens":
            self._json(200, {"input_tokens": max(1, len(raw) // 4)})
            return
        if path == "/api/show":
            self._json(200, {"modelfile": "", "parameters": "", "template": "{{ .Prompt }}",
                             "details": {"format": "gguf", "family": "scripted"},
                             "model_info": {}, "capabilities": ["completion", "tools"]})
            return
        kind = GENERATION_PATHS.get(path)
        vertex = VERTEX_PATH.fullmatch(path)
        if vertex and isinstance(body, dict):
            if vertex["model"] == "count-tokens":
                self._json(200, {"input_tokens": max(1, len(raw) // 4)})
                return
            kind, model = "anthropic", vertex["model"]
            body = {**body, "stream": vertex["verb"] == "streamRawPredict"}
            style = "anthropic"
        if kind is None or not isinstance(body, dict):
            self._error(style, 404 if kind is None else 400,
                        f"scripted provider: no route POST {path}" if kind is None
                        else "scripted provider: the body is not a JSON object")
            return
        if provider.strict_models and model not in provider.models:
            self._error(style, 404, f"model: {model} not found")
            return
        turn = provider._next_turn(req)
        if turn is None:
            self._error(style, 400, "scripted provider: the script is exhausted")
            return
        if turn.error is not None:
            self._error(style, int(turn.error.get("status", 500)),
                        str(turn.error.get("message", "scripted error")))
            return
        self._generate(kind, turn, model, body, len(raw))

    def _generate(self, kind: str, turn: Turn, model: str, body: dict[str, Any],
                  nbytes: int) -> None:
        provider = self.server.provider
        usage = wire.estimate_usage(turn, nbytes)
        cc = provider.chunk_chars
        delay = provider.chunk_delay if turn.delay is None else turn.delay
        sse = "text/event-stream"
        stream = bool(body.get("stream", kind.startswith("ollama")))
        if kind == "anthropic":
            if stream:
                self._stream(sse, wire.anthropic_stream(turn, model, usage, cc), delay)
            else:
                self._json(200, wire.anthropic_message(turn, model, usage))
        elif kind == "responses":
            if stream:
                self._stream(sse, wire.responses_stream(turn, model, usage, cc), delay)
            else:
                self._json(200, wire.responses_body(turn, model, usage))
        elif kind == "chat":
            include = bool((body.get("stream_options") or {}).get("include_usage"))
            if stream:
                self._stream(sse, wire.chat_stream(turn, model, usage, cc, include), delay)
            else:
                self._json(200, wire.chat_body(turn, model, usage))
        else:
            render = wire.ollama_chat if kind == "ollama_chat" else wire.ollama_generate
            out = render(turn, model, usage, stream, cc)
            if isinstance(out, list):
                self._stream("application/x-ndjson", out, delay)
            else:
                self._json(200, out)

    def _error(self, style: str, status: int, message: str) -> None:
        if style == "anthropic":
            self._json(status, wire.anthropic_error(status, message))
        elif style == "ollama":
            self._json(status, {"error": message})
        else:
            self._json(status, wire.openai_error(status, message))


def _style(path: str) -> str:
    if path.startswith("/api/"):
        return "ollama"
    if path.startswith(("/v1/messages", "/v1/projects/")):
        return "anthropic"
    return "openai"


def _authorised(req: RecordedRequest, key: str) -> bool:
    return key in (req.header("x-api-key"), req.header("x-goog-api-key")) or \
        req.header("authorization") == f"Bearer {key}"


def load_script(path: Path) -> list[Any]:
    """A JSON list of turns, or JSONL with one turn per line."""
    text = path.read_text()
    try:
        data = json.loads(text)
    except ValueError:
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return data if isinstance(data, list) else [data]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m runner.testing.scripted_provider",
                                 description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--script", type=Path, help="JSON list (or JSONL) of turns")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--api-key", help="require this key (x-api-key or Bearer)")
    ap.add_argument("--chunk-delay", type=float, default=0.0, help="seconds between events")
    ap.add_argument("--chunk-chars", type=int, help="split text into slices of N chars")
    ap.add_argument("--loop", action="store_true", help="start the script over at its end")
    ap.add_argument("--log", type=Path, help="append every request to this JSONL file")
    args = ap.parse_args(argv)
    script = load_script(args.script) if args.script else [{"text": "Hello from the scripted "
                                                                    "provider."}]
    provider = ScriptedProvider(script, api_key=args.api_key, chunk_delay=args.chunk_delay,
                                chunk_chars=args.chunk_chars, loop=args.loop or not args.script,
                                host=args.host, port=args.port, log_path=args.log)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with provider:
        print(json.dumps({"url": provider.url, "port": provider.port}), flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
