"""What a person (or CI) sees while a run goes.

- On a terminal: the agent's output as it comes, each agent step and each refused
  attempt as a line, and a live status line (elapsed time, steps, tokens, requests, MCP
  calls, and what is left of each budget) kept at the bottom.
- Not on a terminal: the same lines, no status line.
- `--json`: every event as one JSON line on stdout, nothing else on stdout.
- `--quiet`: only the agent's own output.

Every line Airlock prints is made of text the sandbox chose (model names, paths, tool
arguments, the agent's messages): control characters and anything else that is not
printable are shown escaped (`\x1b`, `\u202e`), never sent to the terminal, so no agent
can write to the clipboard (OSC 52), move the cursor, erase a line or fake an `airlock:`
line. The output of `--agent command` is the command's own and passes through byte for
byte, as `docker run` does; other agents' raw output (their stderr) is escaped too.
"""

from __future__ import annotations

import codecs
import json
import sys
import threading
import time
from typing import Any

from runner.events.log import Event

REFUSALS = ("provider.refused", "proxy.refused", "mcp.refused", "control.refused",
            "provider.replay_mismatch")
SHOWN = ("budget.exceeded", "policy.widened", "workspace.patch", "workspace.writable",
         "selftest", "agent.step", "agent.tool_call", "agent.command", "agent.mcp_call",
         "agent.file_change", "agent.message", "agent.error", "mcp.call", "proxy.allowed",
         "provider.request", "service.started", "disk.exceeded", "workspace.left_out")
STATUS_COUNTERS = (("steps", "steps"), ("tokens", "tokens"), ("requests", "requests"),
                   ("mcp_calls", "mcp"))


def visible(text: str, keep: str = "") -> str:
    """`text` with every character that is not printable escaped (but those in `keep`).

    Not printable: C0 and C1 controls (ESC starts every escape sequence, CR rewrites the
    line, BEL rings), DEL, bidi overrides and other format characters, line separators,
    lone surrogates, unassigned code points.
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c in keep else _escape(c) for c in text)


def _escape(c: str) -> str:
    n = ord(c)
    if n <= 0xFF:
        return f"\\x{n:02x}"
    if n <= 0xFFFF:
        return f"\\u{n:04x}"
    return f"\\U{n:08x}"


def _short(n: int) -> str:
    for suffix, factor in (("M", 1_000_000), ("k", 1_000)):
        if n >= factor:
            return f"{n / factor:.1f}{suffix}".replace(".0", "")
    return str(n)


def status_text(elapsed: float, budgets: dict[str, dict[str, int | None]]) -> str:
    parts = [f"airlock {elapsed:6.1f}s"]
    for key, label in STATUS_COUNTERS:
        b = budgets.get(key) or {}
        used, limit = int(b.get("used") or 0), b.get("limit")
        if limit is None:
            parts.append(f"{label} {_short(used)}")
        else:
            parts.append(f"{label} {_short(used)}/{_short(limit)} ({_short(max(0, limit - used))} left)")
    return " | ".join(parts)


def event_line(event: Event) -> str | None:
    """One human line for an event worth showing, or None."""
    t, d = event.type, event.data
    if t == "selftest":
        if d.get("ok"):
            return None
        failed = [f"{c['name']}: {c['detail']}" for c in d.get("checks", []) if not c.get("ok")]
        return "self-test FAILED: " + "; ".join(failed)
    if t.startswith(REFUSALS):
        reason = d.get("reason") or d.get("error") or ""
        what = " ".join(str(d[k]) for k in ("target", "tool", "path", "model") if d.get(k))
        return f"refused {t.split('.')[0]}: {what} {reason}".rstrip()
    if not t.startswith(SHOWN) or t == "mcp.call_started":
        return None
    if t == "provider.request":
        return (f"model {d.get('model')} {d.get('path')} -> {d.get('status')} "
                f"({d.get('latency_ms')} ms, in {d.get('input_tokens')} out {d.get('output_tokens')})")
    if t == "agent.message" and d.get("text"):
        text = " ".join(str(d["text"]).split())
        return f"agent says: {text[:500]}{'...' if len(text) > 500 else ''}"
    if t == "workspace.left_out":
        # The paths are the agent's to choose: they stay in the record, off the console.
        why = sorted({str(f.get("reason")) for f in d.get("files", []) if isinstance(f, dict)})
        return (f"host: {d.get('count')} changed file(s) left out of the patch "
                f"({', '.join(why)}); see report.json")
    if t == "mcp.call":
        return f"mcp {d.get('tool')} {'ok' if d.get('ok') else 'error'} ({d.get('duration_ms')} ms)"
    skip = {"checks", "raw", "text"}
    detail = " ".join(f"{k}={v}" for k, v in d.items() if k not in skip and v not in (None, ""))
    prefix = "agent" if event.source == "agent" else event.source
    return f"{prefix}: {t} {detail}"[:300]


class Console:
    def __init__(self, *, json_out: bool = False, quiet: bool = False,
                 live: bool | None = None, hide_stdout: bool = False) -> None:
        self.json_out = json_out
        self.quiet = quiet
        # An agent whose stdout is its event stream is shown through its parsed events.
        self.hide_stdout = hide_stdout and not quiet
        self.structured = hide_stdout
        self._decoders: dict[str, codecs.IncrementalDecoder] = {}
        self.live = (sys.stderr.isatty() if live is None else live) and not (json_out or quiet)
        self._budgets: Any = None
        self._t0 = time.monotonic()
        self._lock = threading.Lock()
        self._rich: Any = None
        self._live: Any = None

    def attach(self, budgets: Any) -> None:
        """Follow a run's budgets for the status line; start the live display."""
        self._budgets = budgets
        self._t0 = time.monotonic()
        if self.live:
            from rich.console import Console as RichConsole
            from rich.live import Live
            from rich.text import Text

            self._rich = RichConsole(stderr=True, highlight=False)
            # One line, cropped to the terminal: a wrapped status line would leave stale
            # copies of itself behind as it redraws.
            self._live = Live(console=self._rich, refresh_per_second=4, transient=True,
                              redirect_stdout=False, redirect_stderr=False,
                              get_renderable=lambda: Text(self._status(), style="bold",
                                                          no_wrap=True, overflow="crop"))
            self._live.start()

    def _status(self) -> str:
        snapshot = self._budgets.snapshot() if self._budgets is not None else {}
        return status_text(time.monotonic() - self._t0, snapshot)

    def _line(self, text: str, *, err: bool = True) -> None:
        with self._lock:
            if self._live is not None:
                self._rich.out(text, highlight=False)
            else:
                (sys.stderr if err else sys.stdout).write(text + "\n")
                (sys.stderr if err else sys.stdout).flush()

    def on_output(self, stream: str, chunk: bytes) -> None:
        if stream == "stdout" and self.hide_stdout:
            return
        if self.structured:
            # Not a command's output meant for its user: an agent's logs, shown escaped.
            decoder = self._decoders.setdefault(stream, codecs.getincrementaldecoder("utf-8")(
                errors="backslashreplace"))
            chunk = visible(decoder.decode(chunk), keep="\n\t").encode()
        if self._live is not None:
            with self._lock:
                self._rich.out(chunk.decode("utf-8", errors="replace"), end="", highlight=False)
            return
        target = sys.stdout if stream == "stdout" else sys.stderr
        target.buffer.write(chunk)
        target.flush()

    def on_event(self, event: Event) -> None:
        if self.json_out:
            line = json.dumps(event.to_dict(), separators=(",", ":"), default=str)
            with self._lock:
                sys.stdout.write(line + "\n")
                sys.stdout.flush()
            return
        if self.quiet:
            return
        text = event_line(event)
        if text is not None:
            self._line(f"airlock: {visible(text)}")

    def finish_live(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def finish(self, result: Any) -> None:
        self.finish_live()
        if self.json_out or self.quiet:
            # A run Airlock refused says why whatever the flags: one line on stderr, and
            # with --json the same as the last line on stdout.
            if result.error:
                self._line(f"airlock: {result.error}")
            if result.error and self.json_out:
                self._line(json.dumps({"type": "airlock.error", "error": result.error,
                                       "exit_code": result.exit_code, "run_id": result.run_id},
                                      separators=(",", ":")), err=False)
            return
        line = visible(f"airlock: run {result.run_id} {result.status} (exit {result.exit_code}, "
                       f"{result.duration_s}s) -> {result.run_dir}")
        if result.error:
            line += f"\nairlock: {visible(str(result.error))}"
        self._line(line)
