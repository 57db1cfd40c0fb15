"""The engine the suite's runs use: Docker, recording what it creates, with optional hooks.

The normal suite installs no hook: its sandboxes are exactly what `airlock run` creates.
Hooks exist for the weakened counterparts (see `weakened.py`): where the boundary has no
policy knob (network mode none, the seccomp `never` set, masked paths, ...), a hook edits
the engine's create call so the test can show that the attack notices the difference.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterable
from typing import Any

from runner.engines.base import ContainerSpec, Engine, EngineInfo, ManagedObject, Sandbox
from runner.engines.docker_engine import DockerEngine

CreateHook = Callable[[dict[str, Any]], None]  # edits docker's containers.create kwargs
# A hook may put raw HostConfig fields under this key (docker-py has no keyword for some).
HOST_CONFIG_EXTRA = "_airlock_host_config_extra"


class _Containers:
    def __init__(self, real: Any, hooks: list[CreateHook]) -> None:
        self._real = real
        self._hooks = hooks

    def create(self, *args: Any, **kwargs: Any) -> Any:
        for hook in self._hooks:
            hook(kwargs)
        extra = kwargs.pop(HOST_CONFIG_EXTRA, None)
        if not extra:
            return self._real.create(*args, **kwargs)
        # HostConfig fields docker-py has no keyword for (MaskedPaths, ReadonlyPaths):
        # build the request as containers.create does, then add them.
        from docker.models.containers import _create_container_args

        if args:
            kwargs["image"] = args[0]
        if len(args) > 1:
            kwargs["command"] = args[1]
        kwargs["version"] = self._real.client.api._version
        create_kwargs = _create_container_args(kwargs)
        create_kwargs["host_config"].update(extra)
        resp = self._real.client.api.create_container(**create_kwargs)
        return self._real.get(resp["Id"])

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


class _Api:
    """The low-level API, keeping every output stream it opens so the suite can close
    them (see RecordingEngine.close_output)."""

    def __init__(self, real: Any, streams: list[Any]) -> None:
        self._real = real
        self._streams = streams

    def attach(self, *args: Any, **kwargs: Any) -> Any:
        # docker-py's own attach, run with this object as `self` so that the socket it
        # reads from passes through _read_from_socket below and is kept.
        try:
            return type(self._real).attach(self, *args, **kwargs)
        except AttributeError:
            return self._real.attach(*args, **kwargs)

    def _read_from_socket(self, response: Any, *args: Any, **kwargs: Any) -> Any:
        with contextlib.suppress(Exception):
            self._streams.append(self._real._get_raw_response_socket(response))
        return self._real._read_from_socket(response, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


class _Client:
    def __init__(self, real: Any, hooks: list[CreateHook], streams: list[Any]) -> None:
        self._real = real
        self.containers = _Containers(real.containers, hooks)
        self.api = _Api(real.api, streams)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


class RecordingEngine(Engine):
    name = "docker"

    def __init__(self, client: Any, hooks: Iterable[CreateHook] = ()) -> None:
        self.hooks = list(hooks)
        self.streams: list[Any] = []
        self._inner = DockerEngine(client=_Client(client, self.hooks, self.streams))
        self.specs: list[ContainerSpec] = []
        self.sandboxes: list[Sandbox] = []

    def info(self) -> EngineInfo:
        return self._inner.info()

    def image_present(self, tag: str) -> bool:
        return self._inner.image_present(tag)

    def create(self, spec: ContainerSpec) -> Sandbox:
        self.specs.append(spec)
        sandbox = self._inner.create(spec)
        self.sandboxes.append(sandbox)
        return sandbox

    def adopt(self, sandbox_id: str) -> Sandbox:
        return self._inner.adopt(sandbox_id)

    def managed(self) -> list[ManagedObject]:
        return self._inner.managed()

    def remove_object(self, obj: ManagedObject) -> None:
        self._inner.remove_object(obj)

    def mount_source(self, target: str) -> str | None:
        """Where the first sandbox's mount at `target` comes from on the host."""
        for spec in self.specs:
            for m in spec.mounts:
                if m.target == target:
                    return m.source
        return None

    def close_output(self) -> int:
        """Close the output streams the run opened. A container blocked on a stdout
        nobody reads may not die of SIGKILL (seen with runsc); once its reader is gone,
        the engine can end it."""
        closed = 0
        for stream in self.streams:
            sock = _stream_socket(stream)
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                    closed += 1
        return closed


def _stream_socket(raw: Any) -> socket.socket | None:
    """The socket object under what docker-py reads an attach stream from."""
    if isinstance(raw, socket.socket):
        return raw
    sock = getattr(raw, "_sock", None) or getattr(raw, "sock", None)
    return sock if isinstance(sock, socket.socket) else None
