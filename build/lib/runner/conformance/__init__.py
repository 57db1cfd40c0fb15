"""`airlock conformance`: the shipped escape suite.

Attacks (attacks.py) run inside sandboxes under the policy being checked (probe.py is
the in-sandbox half), the host adds what only it can see (runner.py), and the result is
a table or JSON (table.py). The exit code is 0 only when every attack was blocked.
weakened.py holds, for every attack, a deliberately weakened policy or setting under
which it must report an escape; the test suite runs those to prove the suite can fail.
"""

from __future__ import annotations

from runner.conformance.attacks import ATTACKS, BY_ID, Attack, select
from runner.conformance.runner import AttackResult, Suite, SuiteReport, Weakening


def run_suite(policy_ref: str, *, runtime: str | None = None, only: list[str] | None = None,
              json_out: bool = False, pooled: bool = False) -> int:
    """Run the suite under a preset or policy file, print the report, return the exit code."""
    from runner.conformance.attacks import select
    from runner.conformance.table import print_report
    from runner.errors import BadInput
    from runner.policy.loader import load_policy

    policy = load_policy(policy_ref).policy
    if only and not select(only):
        # Before any sandbox or engine is touched.
        raise BadInput(f"--only {' '.join(only)}: no attack id starts with it",
                       hint="`airlock conformance --json` lists every attack's id")
    report = Suite(policy, runtime=runtime, pooled=pooled).run(only or None)
    print_report(report, json_out=json_out)
    return report.exit_code


__all__ = ["ATTACKS", "BY_ID", "Attack", "AttackResult", "Suite", "SuiteReport", "Weakening",
           "run_suite", "select"]
