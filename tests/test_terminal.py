"""The operator's terminal shows only what Airlock wrote: what a sandbox chose (model names
in refusal lines, the agent's messages and steps, its logs) reaches it escaped, never as
control sequences; a command's own output passes through byte for byte."""

from __future__ import annotations

import sys
from types import SimpleNamespace
from typing import Any

import pytest

from runner.events.console import Console, visible
from runner.events.log import Event

# What an agent would like the operator's terminal to do.
OSC52 = "\x1b]52;c;b3duZWQ=\x07"  # write "owned" to the clipboard
ERASE = "\r\x1b[2K\x1b[1A"  # back to column 0, erase the line, cursor up
FAKE = "airlock: run 1 succeeded (exit 0)"
C1 = "\x9b31m"  # CSI as a single C1 character
BIDI = "\u202egnp.exe"  # right-to-left override
ATTACK = f"m{OSC52}{ERASE}{FAKE}\x07{C1}{BIDI}\x00\x7f\u2028\ud800"
FORBIDDEN = ["\x1b", "\x07", "\r", "\x9b", "\u202e", "\x00", "\x7f", "\u2028", "\n"]


def event(type_: str, source: str = "gateway", **data: Any) -> Event:
    return Event(1, 0.0, "run", type_, source, "0" * 64, data)


def test_visible_escapes_every_control_and_format_character():
    shown = visible(ATTACK)
    for c in FORBIDDEN:
        assert c not in shown, repr(c)
    assert "\\x1b]52;c;b3duZWQ=\\x07" in shown and "\\u202e" in shown and "\\ud800" in shown
    assert visible("plain text, ünïcödé and 漢字") == "plain text, ünïcödé and 漢字"


@pytest.mark.parametrize("ev", [
    event("provider.refused", model=ATTACK, reason="model"),
    event("mcp.refused", "mcp", tool=ATTACK, reason=ATTACK),
    event("agent.message", "agent", text=ATTACK),
    event("agent.tool_call", "agent", name=ATTACK, arguments={"x": ATTACK}),
    event("proxy.refused", "proxy", target=ATTACK, reason="x"),
], ids=["provider", "mcp", "message", "step", "proxy"])
def test_event_lines_carry_no_control_sequence(capfd, ev):
    Console(live=False).on_event(ev)
    out, err = capfd.readouterr()
    assert out == "" and err.startswith("airlock: ") and err.endswith("\n")
    line = err[:-1]
    for c in FORBIDDEN:
        assert c not in line, repr(c)
    assert "\\x1b" in line


RAW = f"{OSC52}{ERASE}{FAKE}\ttab\n".encode() + b"\xff\n"


def test_an_agents_logs_are_escaped(capfdbinary):
    Console(live=False, hide_stdout=True).on_output("stderr", RAW)  # builtin, codex, claude
    err = capfdbinary.readouterr().err
    assert b"\x1b" not in err and b"\r" not in err and b"\\x1b]52" in err
    assert b"\ttab\n" in err and b"\\xff" in err


def test_a_commands_output_is_byte_exact(capfdbinary):
    Console(live=False, hide_stdout=False).on_output("stdout", RAW)  # --agent command
    Console(live=False, hide_stdout=False).on_output("stderr", RAW)
    out, err = capfdbinary.readouterr()
    assert out == RAW and err == RAW


def test_a_multibyte_character_split_across_chunks_stays_whole(capfd):
    console = Console(live=False, hide_stdout=True)
    data = "é漢".encode()
    for i in range(len(data)):
        console.on_output("stderr", data[i:i + 1])
    assert capfd.readouterr().err == "é漢"


def test_the_final_line_escapes_the_error(capfd):
    result = SimpleNamespace(run_id="r", status="failed", exit_code=1, duration_s=1.0,
                             run_dir="/x", error=f"boom {OSC52}")
    Console(live=False).finish(result)
    err = capfd.readouterr().err
    assert err.count("\n") == 2 and "\x1b" not in err and "\x07" not in err
    assert sys.stderr is not None


# -- end to end: a sandbox picks the model name of a refused request ----------------------


@pytest.mark.usefixtures("engine")
def test_a_refusal_line_from_a_real_run_is_escaped_and_the_log_verifies(airlock, tmp_path):
    import json

    from runner.events.verify import verify_log
    from runner.testing import ScriptedProvider
    from tests.conftest import write_policy

    key = "sk-terminal-" + "k" * 24
    names = [f"m{OSC52}{ERASE}{FAKE}", f"gpt{chr(0xD800)}x"]  # a clipboard write; a lone surrogate
    send = ("import json, sys, urllib.request, urllib.error\n"
            "for name in json.loads(sys.argv[1]):\n"
            "    body = json.dumps({'model': name, 'max_tokens': 5, 'messages': []}).encode()\n"
            "    req = urllib.request.Request('http://127.0.0.1:41001/v1/messages', body,\n"
            "        {'content-type': 'application/json', 'x-api-key': 'x',\n"
            "         'anthropic-version': '2023-06-01'})\n"
            "    try:\n"
            "        urllib.request.urlopen(req, timeout=20)\n"
            "    except urllib.error.HTTPError:\n"
            "        pass\n")
    with ScriptedProvider([], api_key=key) as up:
        policy = write_policy(tmp_path, f"""\
extends: default
provider:
  backend: anthropic
  base_url: {up.url}
  api_key_env: AIRLOCK_TEST_TERMINAL_KEY
  models: {{default: claude-sonnet-4-5}}
""")
        r = airlock("run", "--policy", policy, "--", "python3", "-c", send, json.dumps(names),
                    env={"AIRLOCK_TEST_TERMINAL_KEY": key})
    assert r.code == 0, r.stderr
    refusals = [line for line in r.stderr.splitlines() if line.startswith("airlock: refused")]
    assert len(refusals) == 2, r.stderr
    for c in FORBIDDEN:
        assert c not in r.stderr.replace("\n", ""), repr(c)
    assert "\\x1b]52;c;b3duZWQ=\\x07" in refusals[0] and "\\ud800" in refusals[1]
    # Both refusals are on the record, the surrogate read back as sent, and it verifies.
    refused = [e["data"]["model"] for e in r.events() if e["type"] == "provider.refused"]
    assert refused == names
    assert verify_log(r.run_dir / "events.jsonl", run_id=r.run_dir.name, report=r.report) == []


def test_json_output_never_fails_and_is_ascii(capfd):
    loop: dict[str, Any] = {}
    loop["self"] = loop
    console = Console(json_out=True)
    console.on_event(event("agent.message", "agent", text=ATTACK, nan=float("nan"), cyc=loop))
    out = capfd.readouterr().out
    assert out.endswith("\n") and out.count("\n") == 1 and out.isascii()
    assert "NaN" not in out and "\x1b" not in out
    import json

    assert json.loads(out)["data"]["text"] == ATTACK
