"""A real `airlock serve --config` in a child process, for tests and benchmarks.

    with ServiceProcess(tmp_path, tenants={"acme": {"floor": "default"}}) as svc:
        client = svc.client("acme")            # httpx.Client with acme's key
        run = client.post("/v1/runs", json={"command": ["echo", "hi"]}).json()
        svc.wait(client, run["id"])

Keys are made fresh per service (`svc.keys[name]`); the config holds only their SHA-256.
The service listens on a free loopback port, with its own runs directory and SQLite
database under `root` unless `database` names another (PostgreSQL).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import yaml

from runner.service.keys import key_sha256, new_key

ENDED = {"succeeded", "failed", "budget", "timeout", "cancelled", "lost"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServiceProcess:
    def __init__(self, root: Path, *, tenants: dict[str, dict[str, Any]], capacity: int = 4,
                 database: str | None = None, env: dict[str, str] | None = None,
                 extra: dict[str, Any] | None = None, runs_dir: Path | None = None,
                 port: int | None = None, host_id: str | None = None,
                 keys: dict[str, str] | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.keys = {name: (keys or {}).get(name) or new_key() for name in tenants}
        self.operator_key = new_key()
        self.runs_dir = runs_dir or self.root / "runs"
        self.database = database or f"sqlite:///{self.root / 'airlock.db'}"
        config: dict[str, Any] = {
            "listen": f"127.0.0.1:{self.port}",
            "database": self.database,
            "runs_dir": str(self.runs_dir),
            "capacity": {"runs": capacity},
            "operator_key_sha256": key_sha256(self.operator_key),
            "shutdown_grace": "20s",
            "tenants": {name: {"api_key_sha256": key_sha256(self.keys[name]), **t}
                        for name, t in tenants.items()},
            **(extra or {}),
        }
        self.config_path = self.root / f"service-{self.port}.yaml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.env = {**os.environ, **(env or {})}
        if host_id:
            self.env["AIRLOCK_HOST_ID"] = host_id
        self.log_path = self.root / f"service-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    # -- lifecycle ------------------------------------------------------------------

    def start(self, timeout: float = 60) -> ServiceProcess:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "runner.cli", "serve", "--config", str(self.config_path)],
            stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.root)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the service exited ({self.proc.returncode}): {self.log()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"the service did not answer in {timeout} s: {self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 90) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)

    def log(self) -> str:
        try:
            return self.log_path.read_text()[-4000:]
        except OSError:
            return ""

    def __enter__(self) -> ServiceProcess:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- clients --------------------------------------------------------------------

    def client(self, tenant: str | None = None, *, key: str | None = None,
               timeout: float = 30) -> httpx.Client:
        headers = {}
        key = key or (self.keys[tenant] if tenant else None)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    @staticmethod
    def wait(client: httpx.Client, run_id: str, *, timeout: float = 120,
             until: frozenset[str] | set[str] = frozenset(ENDED)) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            info = client.get(f"/v1/runs/{run_id}").json()
            if info.get("status") in until:
                return dict(info)
            if time.monotonic() > deadline:
                raise TimeoutError(f"run {run_id} is still {info.get('status')}")
            time.sleep(0.1)
