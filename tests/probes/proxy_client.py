"""Run INSIDE the sandbox: send raw CONNECT requests to the proxy the environment names
and report each answer's status line (the proxy, not the sandbox, reaches the target)."""

from __future__ import annotations

import json
import os
import socket
import sys
from urllib.parse import urlsplit


def connect(target: str) -> str:
    proxy = urlsplit(os.environ["HTTPS_PROXY"])
    with socket.create_connection((proxy.hostname, proxy.port), timeout=10) as s:
        s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        head = s.recv(4096).split(b"\r\n", 1)[0].decode("latin-1")
        if " 200 " in head + " ":
            s.sendall(b"ping\n")
            return head + " | " + s.recv(100).decode("latin-1").strip()
        return head


print(json.dumps({t: connect(t) for t in sys.argv[1:]}))
