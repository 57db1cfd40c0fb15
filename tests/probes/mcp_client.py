"""An MCP client that runs INSIDE the sandbox with only the standard library: speaks
Streamable HTTP (JSON-RPC over POST, JSON or SSE answers) to $AIRLOCK_MCP_URL with the
run's bearer token, and prints one JSON object with what it saw.

    python3 mcp_client.py list
    python3 mcp_client.py call TOOL JSON_ARGS [TOOL JSON_ARGS ...]
    python3 mcp_client.py notoken
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request

URL = os.environ.get("AIRLOCK_MCP_URL", "")
TOKEN = os.environ.get("AIRLOCK_MCP_TOKEN", "")


class Client:
    def __init__(self, token: str | None) -> None:
        self.token = token
        self.session: str | None = None
        self.ids = 0

    def post(self, method: str, params: dict | None = None, *, notify: bool = False):
        msg: dict = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            msg["params"] = params
        if not notify:
            self.ids += 1
            msg["id"] = self.ids
        headers = {"Content-Type": "application/json",
                   "Accept": "application/json, text/event-stream",
                   "MCP-Protocol-Version": "2025-06-18"}
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        if self.session:
            headers["Mcp-Session-Id"] = self.session
        req = urllib.request.Request(URL, json.dumps(msg).encode(), headers, method="POST")
        with urllib.request.urlopen(req, timeout=30) as resp:
            self.session = resp.headers.get("Mcp-Session-Id") or self.session
            body = resp.read().decode()
            ctype = resp.headers.get("Content-Type", "")
        if notify or not body.strip():
            return None
        if "text/event-stream" in ctype:
            for line in body.splitlines():
                if line.startswith("data:"):
                    data = json.loads(line[5:])
                    if data.get("id") == msg["id"]:
                        return data
            return None
        return json.loads(body)

    def initialize(self) -> None:
        self.post("initialize", {"protocolVersion": "2025-06-18", "capabilities": {},
                                 "clientInfo": {"name": "probe", "version": "1"}})
        self.post("notifications/initialized", notify=True)


def main() -> None:
    what = sys.argv[1]
    out: dict = {"url": URL}
    if what == "notoken":
        for label, token in (("none", None), ("wrong", "not-the-token")):
            try:
                Client(token).initialize()
                out[label] = "accepted"
            except urllib.error.HTTPError as exc:
                out[label] = exc.code
        print(json.dumps(out))
        return
    c = Client(TOKEN)
    c.initialize()
    if what == "list":
        res = c.post("tools/list", {})
        out["tools"] = sorted(t["name"] for t in res["result"]["tools"])
    elif what == "call":
        calls = []
        args = sys.argv[2:]
        for tool, raw in zip(args[::2], args[1::2], strict=True):
            res = c.post("tools/call", {"name": tool, "arguments": json.loads(raw)})
            if "error" in res:
                calls.append({"tool": tool, "rpc_error": res["error"].get("message")})
            else:
                r = res["result"]
                text = "".join(x.get("text", "") for x in r.get("content", []))
                calls.append({"tool": tool, "is_error": bool(r.get("isError")), "text": text})
        out["calls"] = calls
    print(json.dumps(out))


if __name__ == "__main__":
    main()
