"""`airlock serve --config FILE`: the service in the foreground, on uvicorn.

SIGTERM (or Ctrl-C) drains: the host takes no new runs (POST answers 503), runs going
on get `shutdown_grace` to end, then are cancelled; each one's end is recorded before
the process exits. A second signal cuts the grace short (the runs are still cancelled
and recorded, never abandoned). The warm pool, if the config has one, is closed as the
drain begins: its unclaimed sandboxes are removed (claimed ones end with their runs).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from types import FrameType
from typing import Any

from runner.errors import AirlockError, ExitCode, NotReady

log = logging.getLogger("airlock.service")


def _listen_args(listen: str) -> dict[str, Any]:
    if listen.startswith("unix:"):
        return {"uds": listen[5:]}
    host, _, port = listen.rpartition(":")
    return {"host": host.strip("[]"), "port": int(port)}


def advertised(listen: str) -> str:
    """How other hosts reach this one (for a run's events and patch, which stay here)."""
    if listen.startswith("unix:"):
        return listen
    host, _, port = listen.rpartition(":")
    if host.strip("[]") in ("0.0.0.0", "::", ""):
        import socket

        host = socket.getfqdn()
    return f"{host}:{port}"


def _uvicorn_server(app: Any, listen: str, on_signal: Any) -> Any:
    import uvicorn

    from runner.service.http_limits import HEAD_BYTES, protocol_class

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            # Not uvicorn's: its first signal stops serving at once. Ours drains first,
            # and the signal is not raised again once the server has stopped.
            on_signal(sig)

    config = uvicorn.Config(app, **_listen_args(listen), log_level="warning", lifespan="off",
                            access_log=False, timeout_graceful_shutdown=10,
                            server_header=False, proxy_headers=False,
                            http=protocol_class(), h11_max_incomplete_event_size=HEAD_BYTES)
    return Server(config)


def serve(config_path: str) -> int:
    from runner.service.config import load_config

    logging.basicConfig(level=logging.INFO, format="airlock serve: %(message)s")
    config = load_config(config_path)  # PolicyError: file:line problems, exit 2

    from runner.engines.docker_engine import connect
    from runner.run.hostaddrs import host_addresses
    from runner.service.app import ServiceState, create_app
    from runner.service.dispatch import Dispatcher, default_host_id
    from runner.service.store import StoreError, open_store
    from runner.service.store.reconcile import reconcile

    for tenant in config.tenants.values():
        if tenant.workspaces is not None and not tenant.workspaces.is_dir():
            log.warning("tenant %s: %s does not exist; its runs can name no workspace yet",
                        tenant.name, tenant.workspaces)
        for run_var, service_var in tenant.provider_keys.items():
            if not os.environ.get(service_var):
                log.warning("tenant %s: %s is not set, so its runs have no %s",
                            tenant.name, service_var, run_var)
    config.runs_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(config.runs_dir, 0o700)
    try:
        store = open_store(config.database)
    except StoreError as exc:
        raise AirlockError(str(exc)) from None
    engine = connect()  # NotReady (exit 3) when no engine answers
    import docker.errors

    from runner.service.preflight import check_runtimes

    try:
        warnings = check_runtimes(config, engine.info().runtimes, engine.gvisor_problem)
    except (docker.errors.DockerException, OSError) as exc:
        # the engine went away between connect and these reads (requests' errors are
        # OSErrors)
        raise NotReady(f"the engine stopped answering: {exc}",
                       hint="start the engine again (in a checkout: `make engine`)") from None
    for warning in warnings:
        log.warning("%s", warning)
    host_id = os.environ.get("AIRLOCK_HOST_ID") or default_host_id(config)
    settled = reconcile(store, host_id, engine, config.runs_dir)
    if settled.ended or settled.lost or settled.removed:
        log.warning("settled what this host's last process left: %d ended, %d lost, "
                    "%d sandbox object(s) removed, %d log(s) closed",
                    len(settled.ended), len(settled.lost), len(settled.removed),
                    len(settled.logs_closed))
    pool = None
    from runner.service.pools import settle_previous, start_pool

    left = settle_previous(config.runs_dir, engine)
    if left:
        log.warning("removed %d warm sandbox(es) this host's last process left", len(left))
    if config.pools is not None:
        pool = start_pool(config.pools, engine)
    dispatcher = Dispatcher(config, store, engine, host_id, host_addresses=host_addresses(),
                            address=advertised(config.listen), pool=pool)
    state = ServiceState(config=config, store=store, dispatcher=dispatcher, host_id=host_id)
    app = create_app(state)

    signals = {"count": 0}
    server: Any = None
    hurry = threading.Event()

    def close_pool() -> None:
        if pool is not None:
            pool.close()  # no new runs will claim: no warm sandbox is left behind

    def drain() -> None:
        grace = config.shutdown_grace
        log.info("draining: no new runs; %d running, %g s to end", dispatcher.running, grace)
        closing = threading.Thread(target=close_pool, name="airlock-pool-close", daemon=True)
        closing.start()
        dispatcher.drain(grace, hurry=hurry)
        closing.join()
        log.info("drained")
        server.should_exit = True

    def on_signal(sig: int) -> None:
        signals["count"] += 1
        if signals["count"] == 1:
            threading.Thread(target=drain, name="airlock-drain", daemon=True).start()
        else:
            hurry.set()

    server = _uvicorn_server(app, config.listen, on_signal)
    dispatcher.start()
    log.info("host %s listening on %s with %d tenant(s), capacity %d", host_id, config.listen,
             len(config.tenants), config.capacity)
    try:
        server.run()
    finally:
        if not dispatcher.drained:
            hurry.set()
            dispatcher.drain(0)
        close_pool()
        store.close()
    return 0 if signals["count"] or dispatcher.drained else int(ExitCode.AGENT_FAILED)


def main(argv: list[str] | None = None) -> int:
    """For `python -m runner.service.serve CONFIG` (tests start the service this way too)."""
    from runner.errors import PolicyError

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m runner.service.serve CONFIG", file=sys.stderr)
        return 2
    try:
        return serve(args[0])
    except PolicyError as exc:
        for p in exc.problems:
            print(p, file=sys.stderr)
        return int(ExitCode.BAD_INPUT)
    except AirlockError as exc:
        print(f"airlock: {exc}", file=sys.stderr)
        return int(exc.exit_code)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main())
