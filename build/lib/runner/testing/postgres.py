"""A private PostgreSQL server for tests and benchmarks: Debian's binaries, a fresh
cluster in a temporary directory, reachable only on a unix socket there.

PostgreSQL refuses to run as root, so as root the cluster belongs to the `postgres`
system user (`runuser`); as anyone else it runs as that user. Nothing listens on TCP.
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

PORT = 5432  # only names the socket file: nothing listens on TCP


def find_bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"),
                   key=lambda p: int(Path(p).parent.parent.name) if
                   Path(p).parent.parent.name.isdigit() else 0)
    return Path(found[-1]).parent if found else None


class PostgresServer:
    def __init__(self, bindir: Path | None = None) -> None:
        bindir = bindir or find_bindir()
        if bindir is None:
            raise RuntimeError("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/"
                               "postgres): run scripts/ensure-test-tools.sh as root")
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="airlock-pg-"))
        self.data = self.root / "data"
        self.socket_dir = self.root / "sock"
        self._proc: subprocess.Popen[bytes] | None = None
        self._as: list[str] = []
        if os.geteuid() == 0:
            self._as = ["runuser", "-u", "postgres", "--"]
            import pwd

            pw = pwd.getpwnam("postgres")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        os.chmod(self.root, 0o700)

    def start(self, timeout: float = 60) -> PostgresServer:
        log = self.root / "initdb.log"
        with log.open("wb") as fh:
            rc = subprocess.run([*self._as, str(self.bindir / "initdb"), "-D", str(self.data),
                                 "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"],
                                stdout=fh, stderr=subprocess.STDOUT).returncode
        if rc != 0:
            raise RuntimeError(f"initdb failed: {log.read_text(errors='replace')[-2000:]}")
        subprocess.run([*self._as, "mkdir", "-m", "0700", str(self.socket_dir)], check=True)
        # A test cluster: no fsync (its data dies with the test), sized for many
        # connections from the services and store processes the tests start.
        with (self.root / "postgres.log").open("wb") as errlog:
            self._proc = subprocess.Popen(
                [*self._as, str(self.bindir / "postgres"), "-D", str(self.data),
                 "-k", str(self.socket_dir), "-p", str(PORT), "-c", "listen_addresses=",
                 "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
                 "-c", "max_connections=200", "-c", "shared_buffers=32MB"],
                stdout=subprocess.DEVNULL, stderr=errlog,
                start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError("postgres exited: "
                                   + (self.root / "postgres.log").read_text(errors="replace")[-2000:])
            if subprocess.run([str(self.bindir / "pg_isready"), "-q", "-h", str(self.socket_dir),
                               "-p", str(PORT)]).returncode == 0:
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("postgres did not become ready")
            time.sleep(0.1)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@/{database}?host={self.socket_dir}&port={PORT}"

    def create_database(self, name: str | None = None) -> str:
        """A new empty database; its URL."""
        import psycopg

        name = name or "t_" + secrets.token_hex(6)
        with psycopg.connect(host=str(self.socket_dir), port=PORT, user="postgres",
                             dbname="postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            # SIGINT to the postmaster ("fast" shutdown); under runuser, Popen's pid is
            # runuser's, so the postmaster's own pid comes from its pid file.
            pid = self._proc.pid
            with contextlib.suppress(OSError, ValueError, IndexError):
                pid = int((self.data / "postmaster.pid").read_text().split()[0])
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGINT)
            try:
                self._proc.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._proc.wait(10)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
