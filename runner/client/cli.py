"""`airlock remote ...` and `airlock run --server URL`: the CLI pointed at a service.

Exit codes are those of a local run: the run's own exit code when it has one (a
command's, 4 for a budget, 124 for wall time, 137 for OOM), else by its status; 2 when
the service refuses the request (400/401/403/404/413/422), 3 when it cannot be reached
(or answers 5xx), 4 over a quota (429: a tenant's budget of runs or tokens).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from runner.client.errors import BadRequest, Unavailable
from runner.client.models import RunEvent, RunInfo
from runner.client.sync import Client

RECONNECT_S = 60.0


def _policy(ref: str | None) -> dict[str, Any] | Path | None:
    if ref is None:
        return None
    path = Path(ref)
    if path.is_file():
        return path  # sent as YAML text; the service resolves and checks it
    return {"extends": ref}


def _print_event(event: RunEvent, json_out: bool, out: TextIO, err: TextIO) -> None:
    if json_out:
        out.write(json.dumps(event.model_dump(mode="json"), separators=(",", ":")) + "\n")
        out.flush()
    elif event.type == "agent.output":
        stream = err if event.data.get("stream") == "stderr" else out
        stream.write(str(event.data.get("text", "")))
        stream.flush()
    elif event.type == "run.error" and event.trusted:
        # Why the run could not go on (a missing runtime, an unbuilt image) and its fix:
        # the end line alone says only "error", as a local run's stderr would not.
        err.write(f"airlock: {str(event.data.get('error', ''))[:2000]}\n")
        err.flush()


def _end_line(info: RunInfo) -> str:
    reason = f", {info.exit_reason}" if info.exit_reason else ""
    return f"airlock: run {info.id} {info.status} (exit {info.cli_exit_code}{reason})"


def remote_run(client: Client, task: list[str], *, agent: str = "command",
               policy: str | None = None, model: str | None = None,
               workspace: str | None = None, json_out: bool = False, detach: bool = False,
               quiet: bool = False) -> int:
    if not task:
        raise BadRequest("nothing to run: give a command or a prompt after --")
    created = client.submit(
        agent=agent, command=task if agent == "command" else None,
        task=None if agent == "command" else " ".join(task), model=model,
        policy=_policy(policy), workspace=workspace)
    if detach:
        print(created.id)
        return 0
    if not quiet and not json_out:
        print(f"airlock: run {created.id} {created.status}", file=sys.stderr)
    last = 0
    try:
        deadline = time.monotonic() + RECONNECT_S
        while True:
            try:
                for event in client.events(created.id, after=last):
                    _print_event(event, json_out, sys.stdout, sys.stderr)
                    last = event.seq
                    deadline = time.monotonic() + RECONNECT_S
                break
            except Unavailable as exc:
                # The stream broke (the service restarting, a proxy's timeout): resume
                # after the last event seen, for as long as the service may take to return.
                if time.monotonic() > deadline:
                    raise Unavailable(f"{exc.message} (for {RECONNECT_S:.0f} s)",
                                      hint=exc.hint) from None
                time.sleep(1.0)
        info = client.wait(created.id)
    except KeyboardInterrupt:
        info = client.cancel(created.id)
        print(f"airlock: run {created.id} cancelled", file=sys.stderr)
        return 130
    if not quiet:
        print(_end_line(info), file=sys.stderr)
    return info.cli_exit_code


def remote_status(client: Client, run_id: str) -> int:
    info = client.get(run_id)
    print(json.dumps(info.model_dump(mode="json"), indent=2))
    return 0


def remote_events(client: Client, run_id: str, *, follow: bool, fmt: str,
                  json_out: bool) -> int:
    # Without --follow: what the run has logged so far (the service streams until the
    # run ends, so a quiet second ends the listing of a run still going).
    for event in client.events(run_id, format=fmt, idle_timeout=None if follow else 1.0):
        if json_out:
            _print_event(event, True, sys.stdout, sys.stderr)
        else:
            data = json.dumps(event.data, separators=(",", ":"), ensure_ascii=False)
            print(f"{event.seq:>5} {event.source:<7} {event.type:<22} {data[:200]}")
    return 0


def remote_cancel(client: Client, run_id: str) -> int:
    info = client.cancel(run_id)
    print(f"airlock: run {info.id} {info.status}", file=sys.stderr)
    return 0


def remote_usage(client: Client) -> int:
    print(json.dumps(client.usage(), indent=2))
    return 0


def remote_list(client: Client) -> int:
    for info in client.list():
        print(f"{info.id}  {info.status:<9}  {'' if info.exit_code is None else info.exit_code}")
    return 0
