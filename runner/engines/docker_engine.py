"""The Docker Engine provider (docker SDK).

Talks to whatever engine DOCKER_HOST or the default socket reaches and changes nothing
on it: every object it creates carries Airlock's labels, and is removed by the run or
by `airlock gc`.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any, Literal

from runner.engines.base import (
    LABEL_MANAGED,
    LABEL_OWNER,
    LABEL_RUN,
    LABEL_SCRATCH,
    ContainerSpec,
    Engine,
    EngineInfo,
    Exit,
    ManagedObject,
    ResourceSample,
    Sandbox,
)
from runner.errors import NotReady

# What selects the engine; a client made for one set of these serves only that set.
_ENGINE_ENV = ("DOCKER_HOST", "DOCKER_CONTEXT", "DOCKER_TLS_VERIFY", "DOCKER_CERT_PATH",
               "DOCKER_CONFIG")
_shared: dict[tuple[Any, ...], Any] = {}
_shared_lock = threading.Lock()
POOL_SIZE = 64  # concurrent runs each hold two streaming calls (attach, wait)
# An OOM event up to this long before the exit's time still counts (the engine's clock
# on both; one the engine handled before the exit already shows in the inspect).
OOM_LOOKBACK = 1.0


def _negotiate(client: Any) -> None:
    """Ping the engine and adopt the API version its answer names.

    One round trip instead of the SDK's ping plus `GET /version`: `/_ping` carries
    the server's API version in a header. The client speaks the lower of that and
    the newest version the SDK knows.
    """
    import docker.constants
    import docker.utils

    api = client.api
    resp = api._get(api._url("/_ping", versioned_api=False))
    api._raise_for_status(resp)
    server = resp.headers.get("Api-Version")
    if not server:
        api._version = api._retrieve_server_version()
        return
    newest = docker.constants.DEFAULT_DOCKER_API_VERSION
    api._version = server if docker.utils.version_lt(server, newest) else newest


def _client(timeout: int = 60, *, shared: bool = False) -> Any:
    """A docker SDK client that has just answered a ping.

    With `shared`, one client per process and engine address is kept and reused (a
    process running many sandboxes pays for the connection and the version once);
    it is pinged again on every call, so an engine that went away is noticed here.
    """
    import docker

    key = (os.getpid(), timeout, *(os.environ.get(k) for k in _ENGINE_ENV))
    try:
        with _shared_lock:
            client = _shared.get(key) if shared else None
            if client is None:
                client = docker.from_env(timeout=timeout, max_pool_size=POOL_SIZE,
                                         version=docker.constants.MINIMUM_DOCKER_API_VERSION)
                _negotiate(client)
                if shared:
                    _shared.clear()  # another process's or address's client is of no use
                    _shared[key] = client
                return client
        client.ping()
    except Exception as exc:  # the SDK's errors, and requests' when nothing answers
        where = os.environ.get("DOCKER_HOST") or "the default socket"
        raise NotReady(
            f"no Docker Engine answers at {where} ({_short(exc)})",
            hint="run `make engine`, or start Docker and check DOCKER_HOST",
        ) from None
    return client


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]


def _unix_time(stamp: str) -> float | None:
    """The engine's RFC 3339 UTC time (`2026-12-06T21:37:41.769073492Z`, nanoseconds
    that `datetime` does not parse) as seconds since the epoch; None for the zero time
    of a container that never ended, or anything else."""
    import datetime as dt

    if not stamp.endswith("Z"):
        return None
    head, _, frac = stamp[:-1].partition(".")
    try:
        t = dt.datetime.fromisoformat(head).replace(tzinfo=dt.UTC).timestamp()
    except ValueError:
        return None
    if t <= 0 or (frac and not frac.isdigit()):
        return None
    return t + (int(frac) / 10 ** len(frac) if frac else 0.0)


def _is_oom_of(event: Any, container_id: str) -> bool:
    """An OOM event of this container: the engine's filter is not taken on trust (an
    engine or a proxy in front of it that drops it would pass other containers' events)."""
    if not isinstance(event, dict):
        return False
    actor = event.get("Actor")
    if not isinstance(actor, dict):
        actor = {}
    return (event.get("Action", event.get("status")) == "oom"
            and actor.get("ID", event.get("id")) == container_id)


def oom_in_events(api: Any, container_id: str, end: float, wait: float) -> bool:
    """Whether the engine reports an OOM kill of the container, from shortly before `end`
    (its exit, in the engine's clock) until it has said nothing for `wait` seconds.

    Asked once the engine has reported the exit, so the wait counts from that report,
    whenever it came; what the engine heard in between is replayed from `since`. The
    read timeout bounds each silence and the deadline a stream that never ends, so no
    engine (a wedged one, one that sends no headers, one that ignores the filter) holds
    the run longer than about twice `wait` plus the connect timeout.
    """
    from docker.utils import convert_filters

    deadline = time.monotonic() + 2 * wait
    params = {"since": f"{end - OOM_LOOKBACK:.6f}",
              "filters": convert_filters({"container": [container_id], "event": ["oom"]})}
    response = None
    try:
        response = api._get(api._url("/events"), params=params, stream=True,
                            timeout=(5.0, wait))
        api._raise_for_status(response)
        for event in api._stream_helper(response, decode=True):
            if _is_oom_of(event, container_id):
                return True
            if time.monotonic() > deadline:
                return False
    except Exception:
        return False
    finally:
        if response is not None:
            with contextlib.suppress(Exception):
                response.close()
    return False


class DockerSandbox(Sandbox):
    def __init__(self, client: Any, container: Any) -> None:
        self._client = client
        self._container = container
        self.id = container.id
        self.image_id = (container.attrs or {}).get("Image")
        self._stream: Any = None
        self._response: Any = None

    def _attach(self) -> None:
        """Attach to stdout and stderr before the start, as `docker run` does.

        Attaching after the start (with `logs`) loses what a short command writes
        between the two now and then; attached first, the stream has every byte.
        """
        api = self._client.api
        response = api._post(api._url("/containers/{0}/attach", self.id),
                             params={"stdout": 1, "stderr": 1, "stream": 1, "logs": 0},
                             headers={"Connection": "Upgrade", "Upgrade": "tcp"}, stream=True)
        try:
            api._raise_for_status(response)
            # Created with tty=False: the stream is multiplexed (no inspect needed to know).
            self._stream = api._read_from_socket(response, True, False, demux=True)
        except BaseException:
            response.close()
            raise
        self._response = response

    def attach(self) -> None:
        import docker.errors

        try:
            self._attach()
        except docker.errors.APIError as exc:
            raise NotReady(f"the engine could not attach to the sandbox: {exc.explanation}") from None

    def start(self, *, attach: bool = True) -> None:
        import docker.errors

        if attach:
            with contextlib.suppress(Exception):  # output() attaches afterwards, with logs
                self._attach()
        try:
            self._container.start()
        except docker.errors.APIError as exc:
            if self._response is not None:
                self._response.close()
            raise NotReady(f"the engine could not start the sandbox: {exc.explanation}") from None

    def output(self) -> Iterator[tuple[Literal["stdout", "stderr"], bytes]]:
        stream, self._stream = self._stream, None
        if stream is None:
            stream = self._client.api.attach(self.id, stdout=True, stderr=True, stream=True,
                                             logs=True, demux=True)
        for out, err in stream:
            if out:
                yield "stdout", out
            if err:
                yield "stderr", err

    def wait(self) -> Exit:
        import docker.errors

        result = self._client.api.wait(self.id)
        try:
            state = self._client.api.inspect_container(self.id)["State"]
        except docker.errors.NotFound:  # removed as it ended (a run that could not kill it)
            state = {}
        return Exit(code=int(result.get("StatusCode", state.get("ExitCode", 1))),
                    oom_killed=bool(state.get("OOMKilled")))

    def late_oom(self, wait: float) -> bool:
        try:
            state = self._client.api.inspect_container(self.id)["State"]
        except Exception:
            return False
        if state.get("OOMKilled"):
            return True
        end = _unix_time(str(state.get("FinishedAt") or ""))
        return end is not None and oom_in_events(self._client.api, self.id, end, wait)

    def kill(self) -> None:
        import docker.errors

        try:
            self._client.api.kill(self.id)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            if exc.status_code != 409:  # 409: not running (it ended meanwhile)
                raise

    def remove(self) -> None:
        import docker.errors

        try:
            self._client.api.remove_container(self.id, force=True, v=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            # 409: a removal already in progress (the run's killer and its teardown)
            if exc.status_code != 409 or "in progress" not in str(exc.explanation):
                raise
        if self._response is not None:
            with contextlib.suppress(Exception):
                self._response.close()
            self._response = None


# engine client -> runtime -> when its registration was last found whole
_GVISOR_CHECKED: weakref.WeakKeyDictionary[Any, dict[str, float]] = weakref.WeakKeyDictionary()
_GVISOR_RECHECK = 60.0


def _runtime_args(registered: dict[str, Any]) -> list[str]:
    return [str(a) for a in registered.get("runtimeArgs") or []]


class DockerEngine(Engine):
    name = "docker"

    def __init__(self, client: Any | None = None) -> None:
        self.client = client or _client(shared=True)

    def info(self) -> EngineInfo:
        info = self.client.info()
        version = self.client.version().get("Version", "?")
        return EngineInfo(
            name="docker",
            version=version,
            runtimes=tuple(sorted((info.get("Runtimes") or {}).keys())),
            endpoint=self.client.api.base_url,
        )

    def _registration(self, name: str) -> dict[str, Any] | None:
        """The engine's record of a registered OCI runtime; None when it has none."""
        registered = (self.client.info().get("Runtimes") or {}).get(name)
        return dict(registered) if registered is not None else None

    def runtime_path(self, name: str) -> str | None:
        """The binary the engine runs for a registered OCI runtime (as the engine sees it)."""
        path = (self._registration(name) or {}).get("path")
        return str(path) if path else None

    def runtime_args(self, name: str) -> list[str]:
        """The arguments the engine passes to a registered OCI runtime."""
        return _runtime_args(self._registration(name) or {})

    def gvisor_problem(self, name: str) -> tuple[str, str] | None:
        """What keeps a registered gVisor runtime from holding Airlock's boundary, and its
        fix; None when nothing does. Read as runsc reads its flags (gvisor_flags.py)."""
        from runner.engines.gvisor_flags import registration_problem

        return registration_problem(name, self.runtime_args(name))

    def _refuse_weak_gvisor(self, runtime: str) -> None:
        """NotReady before a sandbox is made on a gVisor runtime registered without the
        boundary's flags: whichever front end asked, and whatever runtime a policy narrowed
        to. Checked again after a minute: a registration changes only with an engine reload.
        """
        if runtime == "runc":
            return
        checked = _GVISOR_CHECKED.setdefault(self.client, {})
        now = time.monotonic()
        if now - checked.get(runtime, -_GVISOR_RECHECK) < _GVISOR_RECHECK:
            return
        registered = self._registration(runtime)
        if registered is None:
            return  # create names the missing runtime, with its fix
        from runner.engines.gvisor_flags import registration_problem

        problem = registration_problem(runtime, _runtime_args(registered))
        if problem is not None:
            raise NotReady(f"the engine's runtime {runtime}: {problem[0]}, so it would not "
                           "hold Airlock's boundary",
                           hint=f"{problem[1]} (`airlock doctor` checks it)")
        checked[runtime] = now

    def image_present(self, tag: str) -> bool:
        import docker.errors

        try:
            self.client.images.get(tag)
            return True
        except docker.errors.ImageNotFound:
            return False

    def create(self, spec: ContainerSpec) -> Sandbox:
        import docker.errors
        from docker.types import LogConfig, Mount, Ulimit

        self._refuse_weak_gvisor(spec.runtime)

        security_opt = []
        if spec.no_new_privileges:
            security_opt.append("no-new-privileges")
        if spec.seccomp_profile is not None:
            # The Engine API wants the profile's JSON text itself, not a path.
            security_opt.append(f"seccomp={spec.seccomp_profile}")
        try:
            container = self.client.containers.create(
                image=spec.image,
                command=spec.command,
                user=spec.user,
                environment=spec.env,
                labels=spec.labels,
                mounts=[Mount(target=m.target, source=m.source, type="bind",
                              read_only=m.read_only) for m in spec.mounts],
                tmpfs=spec.tmpfs,
                read_only=spec.read_only_root,
                cap_drop=["ALL"],
                cap_add=spec.cap_add or None,
                security_opt=security_opt,
                runtime=spec.runtime,
                mem_limit=spec.memory,
                memswap_limit=spec.memory,  # equal to the limit: no swap
                nano_cpus=int(spec.cpus * 1e9),
                pids_limit=spec.pids,
                ulimits=[Ulimit(name="nofile", soft=spec.nofile, hard=spec.nofile),
                         Ulimit(name="core", soft=0, hard=0)],
                init=spec.init,
                network_mode=spec.network,
                hostname=spec.hostname,
                working_dir=spec.working_dir,
                ipc_mode="private",
                log_config=LogConfig(type="json-file",
                                     config={"max-size": str(spec.log_max_bytes),
                                             "max-file": "1"}),
                stdin_open=False,
                tty=False,
                detach=True,
            )
        except docker.errors.ImageNotFound:
            name = spec.image.split("/", 1)[-1].split(":", 1)[0]
            raise NotReady(f"image {spec.image} is not built",
                           hint=f"run `airlock images build {name}`") from None
        except docker.errors.APIError as exc:
            message = exc.explanation or str(exc)
            if "runtime" in str(message).lower():
                other = ("process.gvisor_platform: systrap" if spec.runtime.endswith("-ptrace")
                         else "process.runtime: runc")
                raise NotReady(f"the engine has no runtime {spec.runtime!r}: {message}",
                               hint=f"register it with the engine (see `make engine`) or "
                               f"choose {other}") from None
            raise NotReady(f"the engine refused the sandbox: {message}") from None
        return DockerSandbox(self.client, container)

    def adopt(self, sandbox_id: str) -> Sandbox:
        import docker.errors

        try:
            return DockerSandbox(self.client, self.client.containers.get(sandbox_id))
        except docker.errors.NotFound:
            raise NotReady(f"sandbox {sandbox_id[:12]} is gone") from None

    def managed(self) -> list[ManagedObject]:
        out = []
        for c in self.client.api.containers(all=True, filters={"label": LABEL_MANAGED}):
            labels = c.get("Labels") or {}
            out.append(ManagedObject("container", c["Id"], labels.get(LABEL_RUN, ""),
                                     labels.get(LABEL_OWNER, ""), c.get("State") == "running",
                                     scratch=labels.get(LABEL_SCRATCH, "")))
        for n in self.client.api.networks(filters={"label": LABEL_MANAGED}):
            labels = n.get("Labels") or {}
            out.append(ManagedObject("network", n["Id"], labels.get(LABEL_RUN, ""),
                                     labels.get(LABEL_OWNER, ""), False))
        volumes = self.client.api.volumes(filters={"label": LABEL_MANAGED}) or {}
        for v in volumes.get("Volumes") or []:
            labels = v.get("Labels") or {}
            out.append(ManagedObject("volume", v["Name"], labels.get(LABEL_RUN, ""),
                                     labels.get(LABEL_OWNER, ""), False))
        return out

    def stats(self, container_id: str) -> ResourceSample | None:
        """From the Engine API's stats (`docker stats`), never from cgroup files.

        The API hides whether the host has cgroup v1 or v2: CPU time is in nanoseconds
        either way; the peak (`max_usage`) exists only on v1, so callers that need one
        on v2 keep the highest sample themselves.
        """
        import docker.errors

        try:
            raw = self.client.api.stats(container_id, stream=False, one_shot=True)
        except (docker.errors.APIError, docker.errors.InvalidVersion):
            return None
        return parse_stats(raw)

    def remove_object(self, obj: ManagedObject) -> None:
        import docker.errors

        with contextlib.suppress(docker.errors.NotFound):
            if obj.kind == "container":
                self.client.api.remove_container(obj.id, force=True, v=True)
            elif obj.kind == "network":
                self.client.api.remove_network(obj.id)
            elif obj.kind == "volume":
                self.client.api.remove_volume(obj.id, force=True)


def parse_stats(raw: dict[str, Any]) -> ResourceSample | None:
    cpu = ((raw.get("cpu_stats") or {}).get("cpu_usage") or {}).get("total_usage")
    mem = raw.get("memory_stats") or {}
    if not cpu and not mem.get("usage"):
        return None  # a container that is not running reports nothing (or zeros)
    detail = mem.get("stats") or {}
    # What `docker stats` shows: usage less the inactive page cache (v2, then v1 names).
    cache = detail.get("inactive_file", detail.get("total_inactive_file", 0))
    usage = max(0, int(mem.get("usage") or 0) - int(cache or 0))
    peak = mem.get("max_usage")
    return ResourceSample(cpu_seconds=int(cpu or 0) / 1e9, memory_bytes=usage,
                          memory_peak=int(peak) if peak else None)


def connect() -> DockerEngine:
    return DockerEngine()
