"""Run INSIDE the sandbox: attack the host's provider gateway the way a hostile agent
would, and report what came back. Standard library only.

    python3 -I hostile_gateway.py stall CONNS BYTES HOLD_S   bodies one byte short, held
    python3 -I hostile_gateway.py json MIB                   a body of MIB of `{}` objects
    python3 -I hostile_gateway.py paths CONNS SECONDS PATH_BYTES   pipelined refused paths
    python3 -I hostile_gateway.py conns N HOLD_S             N idle connections at once
    python3 -I hostile_gateway.py tokens N MAX_TOKENS        N concurrent generations
    python3 -I hostile_gateway.py hangup API                 read a stream's start, hang up
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from urllib.parse import urlsplit

BASE = os.environ.get("ANTHROPIC_BASE_URL") or os.environ["OPENAI_BASE_URL"]
_u = urlsplit(BASE)
HOST, PORT = _u.hostname or "127.0.0.1", _u.port or 80
PREFIX = _u.path.rstrip("/")  # /v1 for OpenAI-style base URLs


def connect(timeout: float = 30.0) -> socket.socket:
    s = socket.create_connection((HOST, PORT), timeout=timeout)
    return s


def head(path: str, length: int, extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"x-api-key: placeholder\r\nContent-Length: {length}\r\n{extra}\r\n").encode()


def status_of(s: socket.socket, timeout: float) -> str:
    """The status line the gateway answered with, 'closed', or 'none' (no answer yet)."""
    s.settimeout(timeout)
    try:
        data = s.recv(4096)
    except TimeoutError:
        return "none"
    except OSError as exc:
        return f"error:{type(exc).__name__}"
    if not data:
        return "closed"
    return data.split(b"\r\n", 1)[0].decode("latin-1")


def stall(conns: int, size: int, hold: float) -> dict:
    """Each connection sends a body one byte short of its Content-Length, then waits."""
    chunk = b" " * (1 << 20)
    socks, sent = [], []
    t0 = time.monotonic()
    for _ in range(conns):
        s = connect()
        s.sendall(head("/v1/messages", size))
        left, n = size - 1, 0
        try:
            while left > 0:
                part = chunk[:min(left, len(chunk))]
                s.sendall(part)
                left -= len(part)
                n += len(part)
        except OSError:
            pass  # the gateway closed it (a cap)
        socks.append(s)
        sent.append(n)
    # Held: the gateway must drop each by its deadline, whatever it answered before.
    answers = [status_of(s, 0.2) for s in socks]
    time.sleep(max(0.0, hold - (time.monotonic() - t0)))
    # Each one still unanswered gets up to `hold` more seconds: its deadline runs from
    # when its own head arrived, and sending the others took a while.
    later = [a if a != "none" else status_of(s, hold) for a, s in zip(answers, socks, strict=True)]
    for s in socks:
        s.close()
    return {"sent": sent, "first": answers, "answers": later}


def json_bomb(mib: int) -> dict:
    n = (mib << 20) // 3
    body = b'{"model":"default","max_tokens":5,"messages":[{"role":"user","content":"x"}],' \
           b'"metadata":{"user_id":"a"},"x":[' + b",".join([b"{}"] * n) + b"]}"
    s = connect(60)
    s.sendall(head("/v1/messages", len(body)) + body)
    return {"bytes": len(body), "answer": status_of(s, 60)}


def paths(conns: int, seconds: float, path_bytes: int) -> dict:
    path = "/" + "a" * path_bytes
    req = f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    sent = [0] * conns
    stop = time.monotonic() + seconds

    def flood(i: int) -> None:
        try:
            s = connect()
            s.setblocking(True)
            reader = threading.Thread(target=_drain, args=(s,), daemon=True)
            reader.start()
            while time.monotonic() < stop:
                s.sendall(req * 8)
                sent[i] += 8
        except OSError:
            pass

    threads = [threading.Thread(target=flood, args=(i,)) for i in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"sent": sum(sent)}


def _drain(s: socket.socket) -> None:
    try:
        while s.recv(1 << 16):
            pass
    except OSError:
        pass


def conns(n: int, hold: float) -> dict:
    socks, refused = [], 0
    for _ in range(n):
        try:
            socks.append(connect(5))
        except OSError:
            refused += 1
    time.sleep(0.5)
    closed = 0
    for s in socks:
        s.settimeout(0.05)
        try:
            if s.recv(1) == b"":
                closed += 1
        except (TimeoutError, BlockingIOError):
            pass
        except OSError:
            closed += 1
    time.sleep(hold)
    for s in socks:
        s.close()
    return {"opened": len(socks), "refused": refused, "closed_by_host": closed}


def tokens(n: int, max_tokens: int) -> dict:
    body = json.dumps({"model": "default", "max_tokens": max_tokens,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    out: list[str] = [""] * n
    barrier = threading.Barrier(n)

    def one(i: int) -> None:
        s = connect(60)
        barrier.wait()
        s.sendall(head("/v1/messages", len(body)) + body)
        out[i] = status_of(s, 60)
        s.close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"statuses": [o.split(" ")[1] if " " in o else o for o in out]}


def hangup(api: str) -> dict:
    """Start a streamed generation, read its first bytes, and hang up before the end."""
    if api == "anthropic":
        path, body = "/v1/messages", {"model": "default", "max_tokens": 2000, "stream": True,
                                      "messages": [{"role": "user", "content": "hi"}]}
    elif api == "chat":
        path, body = f"{PREFIX}/chat/completions", {
            "model": "default", "stream": True, "max_tokens": 2000,
            "messages": [{"role": "user", "content": "hi"}]}
    else:
        path, body = f"{PREFIX}/responses", {"model": "default", "stream": True,
                                             "max_output_tokens": 2000, "input": "hi"}
    raw = json.dumps(body).encode()
    s = connect(60)
    s.sendall(head(path, len(raw)) + raw)
    got = b""
    while len(got) < 2048:
        data = s.recv(4096)
        if not data:
            break
        got += data
    s.close()
    return {"status": got.split(b"\r\n", 1)[0].decode("latin-1"), "read": len(got)}


def main() -> None:
    what, args = sys.argv[1], sys.argv[2:]
    if what == "stall":
        out = stall(int(args[0]), int(args[1]), float(args[2]))
    elif what == "json":
        out = json_bomb(int(args[0]))
    elif what == "paths":
        out = paths(int(args[0]), float(args[1]), int(args[2]))
    elif what == "conns":
        out = conns(int(args[0]), float(args[1]))
    elif what == "tokens":
        out = tokens(int(args[0]), int(args[1]))
    elif what == "hangup":
        out = hangup(args[0])
    else:
        raise SystemExit(f"unknown attack {what}")
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
