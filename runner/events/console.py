"""What a person (or CI) sees while a run goes: the agent's output, and the run's events.

Plain mode prints the agent's output as it comes and one line per notable event on
stderr; `--json` prints every event as one JSON line on stdout; `--quiet` prints only
the agent's output.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from runner.events.log import Event

NOTABLE_PREFIXES = ("provider.refused", "proxy.refused", "mcp.refused", "budget.", "selftest",
                    "policy.widened", "control.refused", "agent.step",
                    "mcp.call", "provider.request", "workspace.patch")


class Console:
    def __init__(self, *, json_out: bool = False, quiet: bool = False,
                 budgets_from: Any = None) -> None:
        self.json_out = json_out
        self.quiet = quiet

    def on_output(self, stream: str, chunk: bytes) -> None:
        target = sys.stdout if stream == "stdout" else sys.stderr
        target.buffer.write(chunk)
        target.flush()

    def on_event(self, event: Event) -> None:
        if self.json_out:
            sys.stdout.write(json.dumps(event.to_dict(), separators=(",", ":"), default=str) + "\n")
            sys.stdout.flush()
            return
        if self.quiet or event.type == "agent.output":
            return
        if event.type.startswith(NOTABLE_PREFIXES):
            if event.type == "selftest" and event.data.get("ok"):
                return
            detail = " ".join(f"{k}={v}" for k, v in event.data.items() if k != "checks")
            sys.stderr.write(f"airlock: {event.type} {detail}\n")
            if event.type == "selftest":
                for c in event.data.get("checks", []):
                    if not c.get("ok"):
                        sys.stderr.write(f"  FAILED {c['name']}: {c['detail']}\n")

    def finish(self, result: Any) -> None:
        if self.json_out or self.quiet:
            return
        line = (f"airlock: run {result.run_id} {result.status} (exit {result.exit_code}, "
                f"{result.duration_s}s) -> {result.run_dir}")
        if result.error:
            line += f"\nairlock: {result.error}"
        sys.stderr.write(line + "\n")
