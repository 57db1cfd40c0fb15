"""The suite's report as a table (rich when available, plain text otherwise) or JSON."""

from __future__ import annotations

import json
import shutil
import textwrap
from typing import TextIO

from runner.conformance.runner import SuiteReport

_MARK = {"blocked": "blocked", "escaped": "ESCAPED", "error": "ERROR"}
_STYLE = {"blocked": "green", "escaped": "bold red", "error": "yellow"}


def summary_line(report: SuiteReport) -> str:
    n = len(report.results)
    blocked = n - len(report.escaped) - len(report.errors)
    where = f"policy {report.policy}, runtime {report.runtime}"
    if report.weakening:
        where += f", WEAKENED: {report.weakening}"
    return (f"{n} attacks: {blocked} blocked, {len(report.escaped)} escaped, "
            f"{len(report.errors)} errors ({where}; {report.duration_s:.1f} s)")


def as_json(report: SuiteReport) -> str:
    return json.dumps(report.to_dict(), indent=2)


def plain(report: SuiteReport, width: int | None = None) -> str:
    width = width or max(shutil.get_terminal_size((140, 24)).columns, 100)
    w_id, w_exp, w_ver = 24, 30, 8
    w_obs = max(width - w_id - w_exp - w_ver - 6, 30)
    lines = [f"{'attack':<{w_id}}  {'expected':<{w_exp}}  {'observed':<{w_obs}}  verdict",
             "-" * (w_id + w_exp + w_obs + w_ver + 6)]
    for r in report.results:
        exp = textwrap.wrap(r.expected, w_exp) or [""]
        obs = textwrap.wrap(r.observed, w_obs) or [""]
        for i in range(max(len(exp), len(obs))):
            lines.append(f"{(r.id if i == 0 else ''):<{w_id}}  "
                         f"{(exp[i] if i < len(exp) else ''):<{w_exp}}  "
                         f"{(obs[i] if i < len(obs) else ''):<{w_obs}}  "
                         f"{_MARK[r.verdict] if i == 0 else ''}")
    lines.append("")
    lines.append(summary_line(report))
    return "\n".join(lines)


def print_report(report: SuiteReport, *, json_out: bool = False,
                 out: TextIO | None = None) -> None:
    import sys

    stream = out or sys.stdout
    if json_out:
        stream.write(as_json(report) + "\n")
        return
    if stream.isatty():
        try:
            from rich.console import Console
            from rich.table import Table
            from rich.text import Text
        except ImportError:
            pass
        else:
            table = Table(title=f"airlock conformance ({report.policy} on {report.runtime})",
                          show_lines=False)
            table.add_column("attack", no_wrap=True)
            table.add_column("expected", ratio=2)
            table.add_column("observed", ratio=4)
            table.add_column("verdict", no_wrap=True)
            for r in report.results:
                # Text, not markup: observations are full of brackets.
                table.add_row(Text(r.id), Text(r.expected), Text(r.observed),
                              Text(_MARK[r.verdict], style=_STYLE[r.verdict]))
            console = Console(file=stream)
            console.print(table)
            style = "green" if report.exit_code == 0 else "bold red"
            console.print(Text(summary_line(report), style=style))
            return
    stream.write(plain(report) + "\n")
