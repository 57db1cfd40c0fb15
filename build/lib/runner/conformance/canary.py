"""Host-side listeners the attacks aim at, each recording what reached it.

- `Canary`: one TCP and one UDP port per attack, bound on every interface of this host
  (0.0.0.0 and ::), so "the host's own address", "the docker bridge", "loopback" and
  "through the proxy" all have something to hit. A hit on an attack's port is an escape
  whatever the sandbox reported.
- `EchoUpstream`: a provider stand-in on 127.0.0.1 that answers a Chat Completions request
  with the request's own headers, the credential the gateway injected included.
- `Decoy`: a unix socket on the host that no sandbox is given.

NETWORK RULE: everything here listens on this machine and never connects anywhere.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

# The shim's bridge ports inside the sandbox (runner.run.wiring.PORTS) must never double
# as a canary port, or a loopback check would meet the shim instead of the canary.
_AVOID = range(41000, 41011)


@dataclass(frozen=True)
class Hit:
    attack: str
    proto: str  # tcp | udp
    peer: str
    payload: bytes


class Canary:
    def __init__(self, attacks: list[str]) -> None:
        self.hits: list[Hit] = []
        self.ports: dict[str, int] = {}
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        try:
            for aid in attacks:
                self.ports[aid] = self._bind_all(aid)
        except BaseException:
            self.close()
            raise

    def _bind_all(self, aid: str) -> int:
        for _ in range(50):
            socks: list[socket.socket] = []
            try:
                first = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(first)
                first.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                first.bind(("0.0.0.0", 0))
                port = first.getsockname()[1]
                if port in _AVOID:
                    raise OSError("reserved port")
                udp4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                socks.append(udp4)
                udp4.bind(("0.0.0.0", port))
                if socket.has_ipv6:
                    with contextlib.suppress(OSError):  # a host without IPv6
                        for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                            s6 = socket.socket(socket.AF_INET6, kind)
                            socks.append(s6)
                            s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                            if kind == socket.SOCK_STREAM:
                                s6.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                            s6.bind(("::", port))
            except OSError:
                for s in socks:
                    s.close()
                continue
            for s in socks:
                if s.type == socket.SOCK_STREAM:
                    s.listen(16)
                    target = self._accept
                else:
                    target = self._receive
                s.settimeout(0.2)
                threading.Thread(target=target, args=(s, aid), daemon=True,
                                 name=f"canary-{aid}").start()
            self._socks.extend(socks)
            return port
        raise OSError("no free port for a canary")

    def _record(self, hit: Hit) -> None:
        with self._lock:
            self.hits.append(hit)

    def _accept(self, s: socket.socket, aid: str) -> None:
        while not self._closed.is_set():
            try:
                conn, peer = s.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._talk, args=(conn, peer, aid), daemon=True).start()

    def _talk(self, conn: socket.socket, peer: tuple[str, int], aid: str) -> None:
        payload = b""
        try:
            conn.settimeout(1.0)
            conn.sendall(f"airlock-canary {aid}\n".encode())
            payload = conn.recv(256)
        except OSError:
            pass
        finally:
            conn.close()
            self._record(Hit(aid, "tcp", str(peer[0]), payload))

    def _receive(self, s: socket.socket, aid: str) -> None:
        while not self._closed.is_set():
            try:
                data, peer = s.recvfrom(2048)
            except TimeoutError:
                continue
            except OSError:
                return
            self._record(Hit(aid, "udp", str(peer[0]), data[:256]))

    def hits_for(self, aid: str) -> list[Hit]:
        with self._lock:
            return [h for h in self.hits if h.attack == aid]

    def close(self) -> None:
        self._closed.set()
        for s in self._socks:
            s.close()
        self._socks.clear()


class EchoUpstream:
    """An OpenAI-compatible upstream that answers with the request's own headers."""

    def __init__(self) -> None:
        self.requests: list[dict[str, str]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                return

            def _answer(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                if length:
                    self.rfile.read(length)
                headers = {k.lower(): v for k, v in self.headers.items()}
                outer.requests.append(headers)
                echo = json.dumps(headers)
                body = json.dumps({
                    "id": "chatcmpl-airlock-echo", "object": "chat.completion", "created": 0,
                    "model": "conformance-model",
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant",
                                             "content": f"x-airlock-echo {echo}"}}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                }).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.send_header("x-airlock-echo", headers.get("authorization", ""))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name="conformance-echo")
        self._thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class Decoy:
    """A unix socket on the host that no sandbox is given; it counts who connects."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(mode=0o755, parents=True, exist_ok=True)
        os.chmod(directory, 0o755)
        self.path = directory / "decoy.sock"
        self.connections = 0
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(self.path))
        os.chmod(self.path, 0o666)
        self._sock.listen(8)
        self._sock.settimeout(0.2)
        self._closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True, name="conformance-decoy").start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._closed.set()
        self._sock.close()
        with contextlib.suppress(OSError):
            self.path.unlink()
