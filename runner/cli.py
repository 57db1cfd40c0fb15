"""The `airlock` command line. Exit codes follow DESIGN.md's contract.

Imports of heavy modules happen inside the commands: `airlock run` is on the critical
path of every sandbox start, and the CLI must not add much to it. Even typer is
imported only when a command needs it (`runner._lazy_typer`): with `airlock serve`
running, `airlock run` is a standard-library client (`runner.server.client`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from runner.errors import AirlockError, BadInput, ExitCode

if TYPE_CHECKING:
    import typer
else:
    from runner._lazy_typer import LAZY as typer

app = typer.Typer(
    name="airlock",
    help="Run LLM agents in throwaway containers that reach nothing but their model provider.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
policy_app = typer.Typer(help="Check, show and compile policies.", no_args_is_help=True)
images_app = typer.Typer(help="Build and list sandbox images.", no_args_is_help=True)
runs_app = typer.Typer(help="Past runs.", no_args_is_help=True)
remote_app = typer.Typer(help="Runs on an Airlock service (airlock serve --config).",
                         no_args_is_help=True)
keys_app = typer.Typer(help="Keys for `airlock serve --config` (the multi-tenant service).",
                       no_args_is_help=True)
app.add_typer(policy_app, name="policy")
app.add_typer(keys_app, name="keys")
app.add_typer(images_app, name="images")
app.add_typer(runs_app, name="runs")
app.add_typer(remote_app, name="remote")


def _fail(exc: AirlockError, *, json_out: bool = False) -> None:
    """One line on stderr saying why (and the fix); with --json also a last JSON line."""
    line = exc.one_line()
    typer.echo(f"airlock: {line}", err=True)
    if json_out:
        typer.echo(json.dumps({"type": "airlock.error", "error": line,
                               "exit_code": int(exc.exit_code)}))
    raise typer.Exit(int(exc.exit_code))


def _progress(msg: str) -> None:
    typer.echo(msg, err=True)


# -- run ---------------------------------------------------------------------------------



@app.command(context_settings={"allow_interspersed_args": False})
def run(
    task: Annotated[list[str], typer.Argument(help="The prompt, or the command (after --).", metavar="TASK")],
    policy: Annotated[str, typer.Option("--policy", "-p", help="Preset name or file.")] = "default",
    agent: Annotated[str, typer.Option("--agent", "-a", help="command|builtin|codex|claude-code")] = "command",
    provider: Annotated[str | None, typer.Option(help="Provider backend (overrides the policy's).")] = None,
    model: Annotated[str | None, typer.Option(help="Model, role or alias the policy allows.")] = None,
    workspace: Annotated[Path | None, typer.Option("--workspace", "-w", help="Directory mounted at /workspace.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON event per line on stdout.", metavar="")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only the agent's own output (and, on a refusal, the one line that says why).", metavar="")] = False,
    record: Annotated[Path | None, typer.Option(help="Record provider exchanges to this file.")] = None,
    runtime: Annotated[str | None, typer.Option(help="runc, runsc, or runsc-ptrace (gVisor on its ptrace platform); overrides the policy's.")] = None,
    image: Annotated[str | None, typer.Option(help="Image: an Airlock image (base, dev, codex, ...), a local image, a Dockerfile or a devcontainer.json; the agent is layered on top.")] = None,
    mcp_tool: Annotated[list[str] | None, typer.Option("--mcp-tool", help="module:function exposed as an MCP tool; repeat for more.", metavar="MODULE:FUNC")] = None,
    mcp_server: Annotated[list[str] | None, typer.Option("--mcp-server", help="'CMD ARGS' of an MCP server the host starts; repeat for more.", metavar="'CMD ARGS'")] = None,
    enable_tool: Annotated[list[str] | None, typer.Option("--enable-tool", help="A tool of --mcp-server to expose; repeat for more.", metavar="TOOL")] = None,
    server: Annotated[str | None, typer.Option("--server", help="Run on this Airlock service (URL, host:port or unix:/path), as `airlock remote run`.")] = None,
    key: Annotated[str | None, typer.Option("--key", help="The tenant key for --server (default: $AIRLOCK_KEY).")] = None,
) -> None:
    """Run an agent (or a command) inside a sandbox under a policy."""
    if server is not None:
        if workspace is not None and not str(workspace).startswith("/"):
            workspace = workspace.resolve()
        _remote(lambda c: _rc().remote_run(
            c, task, agent=agent, policy=None if policy == "default" else policy, model=model,
            workspace=str(workspace) if workspace else None, json_out=json_out, quiet=quiet),
            server, key)
    from runner.run.launch import launch
    from runner.server.paths import default_socket

    try:
        code = launch(
            task=task, policy_ref=policy, agent_name=agent, provider=provider, model=model,
            workspace=workspace, json_out=json_out, quiet=quiet, record=record,
            runtime=runtime, image=image, mcp_tools=mcp_tool or [], mcp_servers=mcp_server or [],
            enable_tools=enable_tool or [], protected_sockets=[default_socket()],
        )
    except AirlockError as exc:
        _fail(exc, json_out=json_out)
    raise typer.Exit(code)



# -- remote (a service) ------------------------------------------------------------------

def _rc() -> Any:
    from runner.client import cli as remote_cli

    return remote_cli


def _remote(call: Any, server: str | None, key: str | None) -> None:
    from runner.client import Client

    try:
        with Client(server, key) as client:
            code = call(client)
    except AirlockError as exc:
        _fail(exc)
    raise typer.Exit(code)


@remote_app.command("run", context_settings={"allow_interspersed_args": False})
def remote_run(
    task: Annotated[list[str], typer.Argument(help="The prompt, or the command (after --).")],
    server: Annotated[str | None, typer.Option("--server", envvar="AIRLOCK_SERVER", help="The service: URL, host:port or unix:/path ($AIRLOCK_SERVER).")] = None,
    key: Annotated[str | None, typer.Option("--key", help="The tenant key (default: $AIRLOCK_KEY).")] = None,
    policy: Annotated[str | None, typer.Option("--policy", "-p", help="Preset name or file, applied on top of the tenant's floor.")] = None,
    agent: Annotated[str, typer.Option("--agent", "-a", help="command|builtin|codex|claude-code")] = "command",
    model: Annotated[str | None, typer.Option(help="Model, role or alias the policy allows.")] = None,
    workspace: Annotated[str | None, typer.Option("--workspace", "-w", help="A directory under the tenant's workspaces root, on the service's host.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON event per line on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only the agent's own output.")] = False,
    detach: Annotated[bool, typer.Option("--detach", "-d", help="Print the run's id and return.")] = False,
) -> None:
    """Submit a run to the service, stream its output, exit with its exit code."""
    _remote(lambda c: _rc().remote_run(c, task, agent=agent, policy=policy, model=model,
                                       workspace=workspace, json_out=json_out, detach=detach,
                                       quiet=quiet), server, key)


@remote_app.command("status")
def remote_status(run_id: str, server: Annotated[str | None, typer.Option("--server", envvar="AIRLOCK_SERVER", help="The service: URL, host:port or unix:/path ($AIRLOCK_SERVER).")] = None, key: Annotated[str | None, typer.Option("--key", help="The tenant key (default: $AIRLOCK_KEY).")] = None) -> None:
    """A run's status, exit code and usage."""
    _remote(lambda c: _rc().remote_status(c, run_id), server, key)


@remote_app.command("events")
def remote_events(
    run_id: str,
    server: Annotated[str | None, typer.Option("--server", envvar="AIRLOCK_SERVER", help="The service: URL, host:port or unix:/path ($AIRLOCK_SERVER).")] = None,
    key: Annotated[str | None, typer.Option("--key", help="The tenant key (default: $AIRLOCK_KEY).")] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep streaming until the run ends.")] = False,
    fmt: Annotated[str, typer.Option("--format", help="sse or jsonl (the stream the service sends).")] = "sse",
    json_out: Annotated[bool, typer.Option("--json", help="Events as JSON lines.")] = False,
) -> None:
    """A run's events (hash-chained, as logged on the service)."""
    _remote(lambda c: _rc().remote_events(c, run_id, follow=follow, fmt=fmt, json_out=json_out),
            server, key)


@remote_app.command("cancel")
def remote_cancel(run_id: str, server: Annotated[str | None, typer.Option("--server", envvar="AIRLOCK_SERVER", help="The service: URL, host:port or unix:/path ($AIRLOCK_SERVER).")] = None, key: Annotated[str | None, typer.Option("--key", help="The tenant key (default: $AIRLOCK_KEY).")] = None) -> None:
    """Cancel a queued or running run."""
    _remote(lambda c: _rc().remote_cancel(c, run_id), server, key)


@remote_app.command("usage")
def remote_usage(server: Annotated[str | None, typer.Option("--server", envvar="AIRLOCK_SERVER", help="The service: URL, host:port or unix:/path ($AIRLOCK_SERVER).")] = None, key: Annotated[str | None, typer.Option("--key", help="The tenant key (default: $AIRLOCK_KEY).")] = None) -> None:
    """This tenant's usage."""
    _remote(lambda c: _rc().remote_usage(c), server, key)


@remote_app.command("list")
def remote_list(server: Annotated[str | None, typer.Option("--server", envvar="AIRLOCK_SERVER", help="The service: URL, host:port or unix:/path ($AIRLOCK_SERVER).")] = None, key: Annotated[str | None, typer.Option("--key", help="The tenant key (default: $AIRLOCK_KEY).")] = None) -> None:
    """This tenant's runs, newest first."""
    _remote(lambda c: _rc().remote_list(c), server, key)


# -- policy ------------------------------------------------------------------------------


@policy_app.command("check")
def policy_check(files: Annotated[list[str], typer.Argument(help="Policy files (or preset names).")]) -> None:
    """Validate policy files; print `file:line: message` for every problem (exit 2).

    Also prints each value a file raises above the preset it extends (not an error:
    a run records each one as a `policy.widened` event).
    """
    from runner.policy.loader import check_files

    notes: list[str] = []
    problems = check_files(files, notes)
    for p in [*problems, *notes]:
        typer.echo(p)
    if problems:
        raise typer.Exit(ExitCode.BAD_INPUT)
    typer.echo(f"ok: {len(files)} file(s)", err=True)


def _load(ref: str) -> Any:
    from runner.policy.loader import load_policy

    try:
        return load_policy(ref)
    except AirlockError as exc:
        _fail(exc)


@policy_app.command("show")
def policy_show(ref: Annotated[str, typer.Argument(help="Preset name or file.")] = "default") -> None:
    """The resolved policy (after extends), as YAML."""
    import yaml

    loaded = _load(ref)
    typer.echo(f"# digest: {loaded.digest}")
    typer.echo(yaml.safe_dump(loaded.policy.model_dump(mode="json", exclude={"extends"}),
                              sort_keys=False).rstrip())


@policy_app.command("schema")
def policy_schema() -> None:
    """The policy's JSON Schema."""
    from runner.policy.models import Policy

    typer.echo(json.dumps(Policy.model_json_schema(), indent=2))


@policy_app.command("reference")
def policy_reference() -> None:
    """The policy reference in Markdown, generated from the JSON Schema."""
    from runner.policy.reference import reference_markdown

    typer.echo(reference_markdown(), nl=False)


@policy_app.command("compile")
def policy_compile(
    ref: Annotated[str, typer.Argument(help="Preset name or file.")] = "default",
    agent: Annotated[str, typer.Option(help="The agent whose image the spec names.")] = "command",
) -> None:
    """The engine settings and the seccomp profile a run would use (nothing is run)."""
    import dataclasses

    from runner.agents import get_agent
    from runner.images.build import image_tag
    from runner.policy.compile import SandboxInputs, container_spec

    loaded = _load(ref)
    try:
        image = image_tag(get_agent(agent).image)
        spec = container_spec(loaded.policy, SandboxInputs(
            image=image, run_id="<run-id>", owner="<owner>", run_dir=Path("<run-dir>"),
            etc_dir=Path("<etc-dir>"), workspace=Path("<workspace>"),
            workspace_writable=loaded.policy.filesystem.workspace != "ro"))
    except AirlockError as exc:
        _fail(exc)
    out = dataclasses.asdict(spec)
    out["seccomp_profile"] = json.loads(spec.seccomp_profile or "null")
    out["network"] = "none (only unix sockets under /run/airlock)"
    typer.echo(json.dumps({"policy_digest": loaded.digest, "container": out}, indent=2))


# -- images ------------------------------------------------------------------------------


@images_app.command("build")
def images_build(
    names: Annotated[list[str] | None, typer.Argument(help="Images to build (default: base).")] = None,
    force: Annotated[bool, typer.Option(help="Rebuild even when up to date.", metavar="")] = False,
) -> None:
    """Build sandbox images (bootstrapping the Debian root when needed)."""
    from runner.engines.docker_engine import connect
    from runner.images.build import build, spec_for

    try:
        engine = connect()
        for name in names or ["base"]:
            spec_for(name)
            tag = build(name, engine.client, _progress, force=force)
            typer.echo(tag)
    except AirlockError as exc:
        _fail(exc)


@images_app.command("list")
def images_list() -> None:
    """The images this version of Airlock uses, and whether each is built."""
    from runner.engines.docker_engine import connect
    from runner.images.build import SPECS, image_tag
    from runner.images.catalog import load_catalog

    load_catalog()
    try:
        engine = connect()
    except AirlockError as exc:
        _fail(exc)
    for name in SPECS:
        tag = image_tag(name)
        state = "built" if engine.image_present(tag) else "missing"
        typer.echo(f"{name:12} {tag:40} {state}")
    # Images Airlock layered onto what users brought (`image:` / --image), and from what.
    client = getattr(engine, "client", None)
    for img in client.images.list(filters={"label": "airlock.source"}) if client else []:
        source = (img.labels or {}).get("airlock.source", "?")
        for tag in img.tags or [img.short_id]:
            typer.echo(f"{'(layered)':12} {tag:40} built from {source}")


# -- doctor / gc -------------------------------------------------------------------------


@app.command()
def doctor(
    probe: Annotated[bool, typer.Option(help="Also send one request to the provider.", metavar="")] = False,
    policy: Annotated[str, typer.Option("--policy", "-p", help="Preset name or file whose provider section is checked.")] = "default",
) -> None:
    """Check the engine, runtimes, images, disk and provider configuration."""
    from runner.doctor import run_doctor

    _load(policy)  # a policy that does not load is bad input (exit 2), not a sick machine
    raise typer.Exit(run_doctor(policy, probe=probe, echo=typer.echo))


@app.command()
def gc(
    all_runs: Annotated[bool, typer.Option("--all", help="Also remove live runs' objects.", metavar="")] = False,
) -> None:
    """Remove containers and files of runs whose host process is gone."""
    from runner.engines.docker_engine import connect
    from runner.run.gc import collect

    try:
        engine = connect()
    except AirlockError as exc:
        _fail(exc)
    report = collect(engine, include_live=all_runs)
    for line in report.removed:
        typer.echo(f"removed {line}")
    typer.echo(f"gc: {len(report.removed)} removed, {report.kept} live kept", err=True)


# -- runs / events -----------------------------------------------------------------------


@runs_app.command("list")
def runs_list(limit: Annotated[int, typer.Option(help="At most this many runs.")] = 20) -> None:
    """Recent runs, newest first."""
    from runner.run.history import list_runs

    runs = list_runs(limit)
    if not runs:
        from runner.run.orchestrator import runs_dir

        typer.echo(f"no runs in {runs_dir()}", err=True)
    for r in runs:
        typer.echo(f"{r['run_id']}  {r.get('status', '?'):16} exit={r.get('exit_code', '?'):<4} "
                   f"{r.get('agent', '?'):12} {r.get('duration_s', '?')}s")


@runs_app.command("show")
def runs_show(run_id: str) -> None:
    """A run's report."""
    from runner.run.history import load_report

    try:
        typer.echo(json.dumps(load_report(run_id), indent=2))
    except AirlockError as exc:
        _fail(exc)


@app.command()
def events(
    run_id: Annotated[str, typer.Argument(help="Run id (or `latest`); `verify RUN` checks a run's log.", metavar="RUN|verify")],
    verify_id: Annotated[str | None, typer.Argument(help="With `verify`: the run id (or `latest`).", metavar="RUN")] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing events as they are written, until the run ends.", metavar="")] = False,
    type_: Annotated[list[str] | None, typer.Option("--type", "-t", help="Only these types (prefix match); repeat for more.", metavar="TYPE")] = None,
) -> None:
    """Print a run's events (`airlock events verify RUN` checks the hash chain)."""
    from runner.run import history

    try:
        if run_id == "verify":
            if not verify_id:
                raise BadInput("usage: airlock events verify RUN",
                               hint="name a run id from `airlock runs list`, or `latest`")
            problems = history.verify(verify_id)
            if problems:
                for p in problems:
                    typer.echo(p)
                raise typer.Exit(1)
            typer.echo("ok: the chain is intact")
            return
        for line in history.iter_events(run_id, follow=follow, types=type_ or []):
            typer.echo(line)
    except AirlockError as exc:
        _fail(exc)


@app.command()
def view(
    run_id: Annotated[str | None, typer.Argument(help="A run to open (an id, or `latest`).")] = None,
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1 (default: a free one).")] = 0,
    browser: Annotated[bool, typer.Option("--browser/--no-browser", help="Open the page in a browser (where there is a display).")] = True,
) -> None:
    """A web page over the runs: timelines, refusals, budgets, patches, the chain check.

    Serves on 127.0.0.1 with a token in the URL it prints, until Ctrl-C.
    """
    from runner.run.history import run_path
    from runner.run.orchestrator import runs_dir
    from runner.view.local import serve as serve_view

    try:
        name = run_path(run_id).name if run_id else None
    except AirlockError as exc:
        _fail(exc)
    raise typer.Exit(serve_view(runs_dir(), name, port=port, browser=browser,
                                echo=typer.echo, note=_progress))


@app.command()
def conformance(
    policy: Annotated[str, typer.Option("--policy", "-p", help="Preset name or file.")] = "strict",
    runtime: Annotated[str | None, typer.Option(help="runc, runsc, or runsc-ptrace (gVisor on its ptrace platform); overrides the policy's.")] = None,
    only: Annotated[list[str] | None, typer.Option("--only", help="Run only attacks whose id starts with this; repeat for more.", metavar="PREFIX")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Results as JSON.", metavar="")] = False,
    pooled: Annotated[bool, typer.Option("--pooled", help="Run the attacks in sandboxes claimed from a warm pool.", metavar="")] = False,
) -> None:
    """Run the shipped escape suite inside sandboxes under a policy; exit 1 on any escape."""
    from runner.conformance import run_suite

    try:
        code = run_suite(policy, runtime=runtime, only=only or [], json_out=json_out,
                         pooled=pooled)
    except AirlockError as exc:
        _fail(exc, json_out=json_out)
    raise typer.Exit(code)


@app.command()
def serve(
    config: Annotated[Path | None, typer.Option(
        "--config", help="Run the multi-tenant HTTP service this file configures "
        "(see README: Running Airlock for many tenants).")] = None,
    socket_path: Annotated[Path | None, typer.Option(
        "--socket", help="Socket path (default: $XDG_RUNTIME_DIR/airlock/serve.sock, "
        "else ~/.cache/airlock/serve/serve.sock; or $AIRLOCK_SERVE_SOCKET).")] = None,
    spares: Annotated[int, typer.Option(help="Idle pre-forked workers kept ready.")] = 1,
    idle_exit: Annotated[float | None, typer.Option(
        "--idle-exit", help="Exit after this many seconds without a run.")] = None,
    stop: Annotated[bool, typer.Option("--stop", help="Stop the running server.", metavar="")] = False,
    auto: Annotated[bool, typer.Option("--auto", hidden=True)] = False,
) -> None:
    """Keep a warm server for this user so that `airlock run` starts fast.

    `airlock run` hands its run to the server when one answers on the socket (only
    this user can reach it) and runs in its own process otherwise. Runs behave the
    same either way: output, exit codes, Ctrl-C, and the client's own environment.
    `airlock run` starts one by itself when none answers (set AIRLOCK_AUTO_SERVE=0 to
    stop that); such a server exits after 30 idle minutes.

    With --config FILE it is instead the service for many tenants: an HTTP API with
    per-tenant keys, policy floors, quotas and fair scheduling, in the foreground
    (SIGTERM drains it).
    """
    if config is not None:
        if socket_path is not None or stop or auto or idle_exit is not None:
            typer.echo("airlock: --config runs the multi-tenant service; --socket, --stop, "
                       "--idle-exit belong to the per-user server", err=True)
            raise typer.Exit(ExitCode.BAD_INPUT)
        _serve_config(config)
        return
    from runner.server import daemon

    if stop:
        stopped = daemon.stop(socket_path)
        typer.echo("stopped" if stopped else "no server was running", err=True)
        return
    try:
        code = daemon.serve(socket_path, spares=spares, idle_exit=idle_exit, auto=auto)
    except AirlockError as exc:
        _fail(exc)
    raise typer.Exit(code)


def _serve_config(config: Path) -> None:
    from runner.errors import PolicyError
    from runner.service.serve import serve as serve_service

    try:
        code = serve_service(str(config))
    except PolicyError as exc:
        for problem in exc.problems:
            typer.echo(problem, err=True)
        raise typer.Exit(ExitCode.BAD_INPUT) from None
    except AirlockError as exc:
        _fail(exc)
    raise typer.Exit(code)


@keys_app.command("new")
def keys_new() -> None:
    """Print a new random tenant key, then the line for the service's config.

    Give the key to the tenant and put the second line in its `tenants.NAME` section
    (or use it as `operator_key_sha256`). The key itself is stored nowhere.
    """
    from runner.service.keys import key_sha256, new_key

    key = new_key()
    typer.echo(key)
    typer.echo(f"api_key_sha256: {key_sha256(key)}")


def _terminate(signum: int, frame: object) -> None:
    # SIGTERM (a CI runner cancelling a job, `kill`) ends a run as cleanly as Ctrl-C.
    raise KeyboardInterrupt


def tidy_help() -> None:
    """Help without Python annotations: newer typer prints `<bool>` beside every flag and
    `<list[str]>` beside repeatable options and arguments; a flag takes no value, and an
    argument's name says what it is. Options keep their metavar (or their type)."""
    from typer import core

    for cls in (getattr(core, "TyperOption", None), getattr(core, "TyperArgument", None)):
        shown = getattr(cls, "display_type_rich", None)
        if cls is None or shown is None or getattr(shown, "airlock_tidy", False):
            continue

        def display(self: Any, ctx: Any, _shown: Any = shown) -> str | None:
            if isinstance(self, core.TyperArgument):
                return None
            if getattr(self, "is_flag", False):
                return self.metavar or None
            return _shown(self, ctx)

        display.airlock_tidy = True  # type: ignore[attr-defined]
        cls.display_type_rich = display


def cli_main() -> None:
    """The full CLI (typer), for every command a warm server did not take."""
    import signal

    tidy_help()
    signal.signal(signal.SIGTERM, _terminate)
    from runner.usage import invoke

    try:
        code = invoke(lambda: app(standalone_mode=False))
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


def main() -> None:
    from runner.entry import main as entry

    entry(cli_main)


if __name__ == "__main__":  # python -m runner.cli: this module is __main__, not runner.cli
    main()
