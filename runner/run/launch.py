"""`airlock run`: the CLI's words turned into a Run, with the console attached."""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from pydantic import ValidationError

from runner.agents import get_agent
from runner.errors import BadInput
from runner.events.console import Console
from runner.policy.compile import GVISOR_PTRACE_RUNTIME
from runner.policy.loader import error_message, load_policy
from runner.policy.models import McpServerPolicy, Policy, ProviderPolicy
from runner.run.hostaddrs import host_addresses
from runner.run.orchestrator import Run, RunOptions
from runner.run.pool import SandboxSource


def apply_overrides(policy: Policy, *, provider: str | None, runtime: str | None,
                    mcp_tools: list[str], mcp_servers: list[str],
                    enable_tools: list[str]) -> Policy:
    """Command-line flags on top of the policy file, validated like the file itself."""
    data = policy.model_dump(mode="json")
    if runtime == GVISOR_PTRACE_RUNTIME:  # the engine's name, as doctor and `docker info` show it
        data["process"]["runtime"], data["process"]["gvisor_platform"] = "runsc", "ptrace"
    elif runtime == "runsc":  # the engine's runsc: gVisor's default platform
        data["process"]["runtime"], data["process"]["gvisor_platform"] = "runsc", "systrap"
    elif runtime:
        data["process"]["runtime"] = runtime
    if provider:
        if data.get("provider") and data["provider"]["backend"] != provider:
            data["provider"] = {"backend": provider}
        data.setdefault("provider", None)
        data["provider"] = data["provider"] or {"backend": provider}
    if mcp_tools:
        data["mcp"]["tools"] = [*data["mcp"]["tools"], *mcp_tools]
    if enable_tools and not mcp_servers:
        raise BadInput("--enable-tool needs --mcp-server")
    for cmd in mcp_servers:
        data["mcp"]["servers"].append(
            McpServerPolicy(command=cmd, url=None, enabled_tools=enable_tools).model_dump(mode="json"))
    try:
        out = Policy.model_validate(data)
        if out.provider is not None:
            ProviderPolicy.model_validate(out.provider.model_dump())
    except ValidationError as exc:
        err = exc.errors()[0]
        flag = _FLAG_OF.get(str(err["loc"][0]) if err["loc"] else "", "")
        if err["loc"][:2] == ("process", "runtime"):
            raise BadInput(f"--runtime {runtime}: not one of runc, runsc or "
                           f"{GVISOR_PTRACE_RUNTIME}") from None
        elif err["loc"][:1] == ("provider",):
            flag = f"--provider {provider}"
        raise BadInput(f"{flag}: {error_message(err)}" if flag else error_message(err)) from None
    return out


_FLAG_OF = {"mcp": "--mcp-server"}


GC_BEFORE_RUN = True  # `airlock serve` turns this off in its workers: the server collects
POOL: SandboxSource | None = None  # `airlock serve` sets its pool here in its workers


def _collect(engine: object, collect: Callable[[object], object]) -> None:
    with contextlib.suppress(Exception):  # the run itself reports an engine that is away
        collect(engine)


def launch(*, task: list[str], policy_ref: str, agent_name: str, provider: str | None,
           model: str | None, workspace: Path | None, json_out: bool, quiet: bool,
           record: Path | None, runtime: str | None, mcp_tools: list[str],
           image: str | None = None,
           mcp_servers: list[str], enable_tools: list[str],
           protected_sockets: list[str] | None = None) -> int:
    from runner.engines import get_engine
    from runner.run.gc import collect

    loaded = load_policy(policy_ref)
    policy = apply_overrides(loaded.policy, provider=provider, runtime=runtime,
                             mcp_tools=mcp_tools, mcp_servers=mcp_servers,
                             enable_tools=enable_tools)
    agent = get_agent(agent_name)
    if image is not None:
        policy = policy.model_copy(update={"image": image})
    engine = get_engine()
    # Whatever a killed run left behind goes while this one starts (in the background:
    # gc removes only what belongs to processes that are gone, never this run).
    if GC_BEFORE_RUN:
        threading.Thread(target=_collect, args=(engine, collect), name="airlock-gc",
                         daemon=True).start()
    console = Console(json_out=json_out, quiet=quiet, hide_stdout=agent.structured_stdout)
    the_run = Run(RunOptions(
        policy=policy, agent=agent, task=task, workspace=workspace, model=model,
        engine=engine, record=record, listeners=[console.on_event],
        on_output=None if json_out else console.on_output, host_addresses=host_addresses(),
        pool=POOL,
        preset=loaded.preset, protected_sockets=protected_sockets or [],
    ))
    console.attach(the_run.budgets)
    try:
        result = the_run.execute()
    finally:
        console.finish_live()
    console.finish(result)
    if json_out:
        sys.stdout.flush()
    return result.exit_code
