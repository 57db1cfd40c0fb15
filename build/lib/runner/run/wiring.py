"""Which host services a run gets, from its policy, and how the sandbox reaches them.

Each service listens on a unix socket in the run's directory; the shim bridges a fixed
loopback port inside the sandbox to it, and the agent finds the URL in its environment.
Nothing listens that the policy did not ask for.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from runner.errors import AirlockError, BadInput, NotReady
from runner.run.services import ServiceHost

if TYPE_CHECKING:
    from runner.run.orchestrator import Run

SANDBOX_SOCKETS = "/run/airlock"
PORTS = {"provider": 41001, "proxy": 41002, "mcp": 41003}


def _bridge(name: str) -> dict[str, Any]:
    return {"name": name, "port": PORTS[name], "socket": f"{SANDBOX_SOCKETS}/{name}.sock"}


def _url(name: str) -> str:
    return f"http://127.0.0.1:{PORTS[name]}"


def _start(host: ServiceHost, service: Any, name: str) -> None:
    try:
        host.start(service)
    except AirlockError:
        raise
    except Exception as exc:
        raise NotReady(f"the {name} service could not start: {exc}") from None


def start_services(run: Run, host: ServiceHost, run_dir: Path
                   ) -> tuple[list[dict[str, Any]], dict[str, str]]:
    policy = run.policy
    bridges: list[dict[str, Any]] = []
    env: dict[str, str] = {}

    if policy.provider is not None and policy.network.mode != "none":
        from runner.gateway import ProviderGateway

        gateway = ProviderGateway(policy.provider, run_dir / "provider.sock", run.log,
                                  run.budgets, record_path=run.o.record,
                                  environ=run.o.env_source)
        _start(host, gateway, "provider gateway")
        run.gateway = gateway
        bridges.append(_bridge("provider"))
        env.update(gateway.agent_env(_url("provider")))
        run.log.emit("service.started", "host", service="provider",
                     backend=policy.provider.backend, url=_url("provider"))

    if policy.network.mode == "proxy":
        from runner.gateway.proxy import EgressProxy, agent_env

        try:
            proxy = EgressProxy(policy.network, run_dir / "proxy.sock", run.log)
        except ValueError as exc:
            raise BadInput(f"network: {exc}") from None
        _start(host, proxy, "egress proxy")
        bridges.append(_bridge("proxy"))
        env.update(agent_env(_url("proxy")))
        run.log.emit("service.started", "host", service="proxy", allow=policy.network.allow)

    mcp = policy.mcp
    if mcp.tools or mcp.servers or mcp.builtin or run.o.python_tools:
        from runner.mcp import RunMcpServer, new_token

        token = new_token()
        server = RunMcpServer(mcp, run_dir / "mcp.sock", token, run.log, run.budgets,
                              python_tools=run.o.python_tools,
                              upstream_log=run.dir / "mcp-upstream.log",
                              on_abuse=run.end_for_abuse)
        _start(host, server, "MCP")
        run.mcp_server = server
        bridges.append(_bridge("mcp"))
        env["AIRLOCK_MCP_URL"] = f"{_url('mcp')}{server.url_path}"
        env["AIRLOCK_MCP_TOKEN"] = token
        run.log.emit("service.started", "host", service="mcp", tools=server.tool_names)
    return bridges, env
