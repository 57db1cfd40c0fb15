"""The one small interface every container engine implements.

The orchestrator speaks only this; `docker` is the first provider, and a Kubernetes
provider (Job + NetworkPolicy + RuntimeClass) fits behind the same calls.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

LABEL_MANAGED = "airlock.managed"
LABEL_RUN = "airlock.run"
LABEL_OWNER = "airlock.owner"  # "<hostname>:<pid>:<process start time>"
# A pooled sandbox's scratch directory: once a run claims it, the owner file there (not
# the label, fixed at creation by the pool's process) says whose it is.
LABEL_SCRATCH = "airlock.scratch"


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    read_only: bool = True


@dataclass
class ContainerSpec:
    """Everything the boundary says about one sandbox container, engine-neutral."""

    image: str
    command: list[str]
    user: str
    env: dict[str, str]
    labels: dict[str, str]
    mounts: list[Mount] = field(default_factory=list)
    tmpfs: dict[str, str] = field(default_factory=dict)  # path -> mount options
    read_only_root: bool = True
    cap_add: list[str] = field(default_factory=list)
    no_new_privileges: bool = True
    seccomp_profile: str | None = None  # JSON text
    runtime: str = "runc"
    memory: int = 1 << 30
    cpus: float = 1.0
    pids: int = 256
    nofile: int = 1024
    init: bool = True
    network: Literal["none"] = "none"
    hostname: str = "airlock"
    working_dir: str = "/"
    log_max_bytes: int = 16 << 20


@dataclass(frozen=True)
class Exit:
    code: int
    oom_killed: bool


@dataclass(frozen=True)
class ResourceSample:
    """What the engine's own accounting says a running container has used so far."""

    cpu_seconds: float
    memory_bytes: int  # in use now, page cache that can be reclaimed left out
    memory_peak: int | None  # the engine's high-water mark, where it keeps one (cgroup v1)


@dataclass(frozen=True)
class EngineInfo:
    name: str
    version: str
    runtimes: tuple[str, ...]
    endpoint: str


class Sandbox(ABC):
    """A created container."""

    id: str
    image_id: str | None = None  # the content digest of the image it runs

    @abstractmethod
    def start(self, *, attach: bool = True) -> None:
        """Start the container; with `attach`, collect its output from the first byte."""

    @abstractmethod
    def attach(self) -> None:
        """Start collecting output of a sandbox that is already running (a pooled one):
        what it writes from now on is in `output()`."""

    @abstractmethod
    def output(self) -> Iterator[tuple[Literal["stdout", "stderr"], bytes]]:
        """The container's output from its first byte, as it comes, until it ends."""

    @abstractmethod
    def wait(self) -> Exit: ...

    def late_oom(self, wait: float) -> bool:
        """Whether the engine reports an OOM kill of this ended sandbox after all: asked
        when `wait()` said it was not OOM-killed, it waits until the engine has said
        nothing more for `wait` seconds. (Under gVisor the engine can hear of the exit
        before the OOM kill that caused it.)
        """
        return False

    @abstractmethod
    def kill(self) -> None:
        """Kill the sandbox. One already stopped or gone is no error; raises when the
        engine did not take the kill (it may answer so under load)."""

    @abstractmethod
    def remove(self) -> None: ...


@dataclass(frozen=True)
class ManagedObject:
    kind: str
    id: str
    run_id: str
    owner: str
    running: bool
    scratch: str = ""  # a pooled sandbox's scratch directory (see LABEL_SCRATCH)


class Engine(ABC):
    name: str

    @abstractmethod
    def info(self) -> EngineInfo: ...

    @abstractmethod
    def image_present(self, tag: str) -> bool: ...

    @abstractmethod
    def create(self, spec: ContainerSpec) -> Sandbox: ...

    @abstractmethod
    def adopt(self, sandbox_id: str) -> Sandbox:
        """A sandbox created earlier (by a pool, maybe in another process)."""

    @abstractmethod
    def managed(self) -> list[ManagedObject]:
        """Every object this engine holds that carries Airlock's labels."""

    @abstractmethod
    def remove_object(self, obj: ManagedObject) -> None: ...

    def stats(self, container_id: str) -> ResourceSample | None:
        """A running container's CPU and memory use, or None when the engine cannot say."""
        return None
