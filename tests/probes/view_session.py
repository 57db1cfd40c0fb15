"""Run INSIDE the sandbox: a small session for the viewer's tests, driven by one JSON
argument. Standard library only, so it runs in the base image as well.

    {"ok": 2,                      provider requests for the policy's default model
     "refuse": ["gpt-x"],          requests for models the policy does not allow
     "print": ["line", ...],       lines on stdout
     "write": {"f.txt": "text"},   files written to /workspace (copy mode: a patch)
     "ticks": 0, "tick_s": 0.3}    then print `tick N` every tick_s seconds
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request


def ask(model: str) -> int:
    body = json.dumps({"model": model, "max_tokens": 16,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    req = urllib.request.Request(
        os.environ["ANTHROPIC_BASE_URL"].rstrip("/") + "/v1/messages", body,
        {"content-type": "application/json", "anthropic-version": "2023-06-01",
         "x-api-key": os.environ.get("ANTHROPIC_API_KEY", "placeholder")})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            resp.read()
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def main() -> None:
    cfg = json.loads(sys.argv[1])
    statuses = [ask("default") for _ in range(cfg.get("ok", 0))]
    statuses += [ask(m) for m in cfg.get("refuse", [])]
    for line in cfg.get("print", []):
        print(line, flush=True)
    for name, text in cfg.get("write", {}).items():
        with open(os.path.join("/workspace", name), "w") as fh:
            fh.write(text)
    for n in range(cfg.get("ticks", 0)):
        print(f"tick {n + 1}", flush=True)
        time.sleep(cfg.get("tick_s", 0.3))
    print(json.dumps({"statuses": statuses}), flush=True)


if __name__ == "__main__":
    main()
