"""`airlock doctor`'s provider checks: is the chosen backend usable, and if not, why.

Credentials are checked the way the gateway will load them (the same code), a backend
without a default model is not ready (runs ask for `default` unless told otherwise),
and `--probe` sends one request through a real gateway instance: an authentication
failure and a model the account cannot use are told apart, each with its own fix.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from collections.abc import Callable
from pathlib import Path

from runner.errors import AirlockError
from runner.events.budgets import Budgets
from runner.events.log import EventLog
from runner.policy.loader import load_policy
from runner.policy.models import ProviderPolicy

Report = Callable[[str], None]
Problem = Callable[[str, str], None]

PROBE_REQUEST = {
    "anthropic": ("POST", "/v1/messages", lambda m: {
        "model": m, "max_tokens": 1, "messages": [{"role": "user", "content": "ping"}]}),
    "openai": ("POST", "/v1/chat/completions", lambda m: {
        "model": m, "max_tokens": 1, "messages": [{"role": "user", "content": "ping"}]}),
    "ollama": ("POST", "/api/generate", lambda m: {
        "model": m, "prompt": "ping", "stream": False, "options": {"num_predict": 1}}),
}
FAMILY = {"anthropic": "anthropic", "vertex": "anthropic", "gateway": "anthropic",
          "openai": "openai", "openai-compatible": "openai", "ollama": "ollama"}


def classify(status: int, body: str) -> tuple[str, str] | None:
    """(problem, fix) for a failed probe answer, or None when it worked."""
    if 200 <= status < 300:
        return None
    lowered = body.lower()
    if status in (401, 403) and "model" not in lowered:
        return ("the provider refused the credential (authentication failed)",
                "check the key the policy names (api_key_env / api_key_file) and that it "
                "belongs to this provider")
    if status == 404 or ("model" in lowered and any(
            w in lowered for w in ("not found", "not_found", "does not exist", "not available",
                                   "no access", "not allowed", "unknown model"))):
        return ("the model is not available to this account",
                "set provider.models.default to a model your account can use")
    if status == 429:
        return ("the provider is rate-limiting or out of quota", "check the account's quota")
    return (f"the provider answered HTTP {status}: {body[:200]}",
            "check provider.base_url and the provider's status")


async def _probe(provider: ProviderPolicy, model: str) -> tuple[int, str]:
    import httpx

    from runner.gateway import ProviderGateway

    with tempfile.TemporaryDirectory(prefix="airlock-doctor-") as tmp:
        sock = Path(tmp) / "provider.sock"
        log = EventLog(None, "doctor")
        gateway = ProviderGateway(provider, sock, log, Budgets({}))
        await gateway.start()
        try:
            family = FAMILY.get(gateway.api_backend, "anthropic")
            method, path, body = PROBE_REQUEST[family]
            headers = {"content-type": "application/json", "anthropic-version": "2023-06-01"}
            transport = httpx.AsyncHTTPTransport(uds=str(sock))
            async with httpx.AsyncClient(transport=transport, timeout=30) as client:
                resp = await client.request(method, f"http://gateway{path}", headers=headers,
                                            content=json.dumps(body(model)))
                return resp.status_code, resp.text
        finally:
            await gateway.aclose()


def check_provider(policy_ref: str, *, probe: bool, ok: Report, bad: Problem) -> int:
    """Report each check; return the number of problems found."""
    problems = 0
    report_bad = bad

    def bad(msg: str, fix: str) -> None:  # type: ignore[no-redef]
        nonlocal problems
        problems += 1
        report_bad(msg, fix)

    try:
        policy = load_policy(policy_ref).policy
    except AirlockError as exc:
        bad(f"policy {policy_ref}: {exc}", "fix the policy (see `airlock policy check`)")
        return 1
    provider = policy.provider
    if provider is None:
        ok(f"policy {policy_ref}: no provider (runs reach no model)")
        return 0
    name = provider.backend
    default = provider.models.get("default")
    if default is None and name != "replay":
        bad(f"backend {name} has no default model",
            "add provider.models.default (a model id, or a role such as `default: sonnet` "
            "with an alias)")
    else:
        ok(f"backend {name}: default model {default or '(from the recording)'}")
    try:
        asyncio.run(_check_credential(provider))
        ok(f"backend {name}: credential present")
    except AirlockError as exc:
        bad(f"backend {name}: {exc.message}", exc.hint or "set the provider key on the host")
        return problems
    if probe and default is not None:
        try:
            status, body = asyncio.run(_probe(provider, provider.resolve_model("default") or default))
        except AirlockError as exc:
            bad(f"probe: {exc.message}", exc.hint or "check provider.base_url")
        except Exception as exc:
            bad(f"probe: the provider could not be reached ({type(exc).__name__}: {exc})",
                "check provider.base_url and the host's network")
        else:
            verdict = classify(status, body)
            if verdict is None:
                ok(f"probe: {name} answered with model {default}")
            else:
                bad(f"probe: {verdict[0]}", verdict[1])
    return problems


async def _check_credential(provider: ProviderPolicy) -> None:
    import os

    from runner.gateway.backends import BACKENDS, replay_spec
    from runner.gateway.credentials import load_credential

    if provider.backend == "replay":
        from runner.gateway.record import Replayer

        Replayer(Path(provider.replay_file or "").expanduser())
        spec = replay_spec("anthropic")
    else:
        spec = BACKENDS[provider.backend]
    cred = await load_credential(provider, spec, os.environ)
    await cred.aclose()

