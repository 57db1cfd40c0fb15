"""The service's configuration file: validated like a policy, errors as `file:line: message`.

The names are DESIGN.md's contract (`listen`, `database`, `runs_dir`, `capacity`,
`operator_key_sha256`, `tenants.*`). Unknown keys are refused, and every problem in the
file is reported in one pass. Relative paths (a floor file, `runs_dir`, `workspaces`)
are relative to the config file, never to the directory the service was started in.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from runner.errors import PolicyError
from runner.policy.loader import load_policy, parse_yaml
from runner.policy.models import Policy
from runner.policy.units import Duration

MAX_CONFIG_BYTES = 1 << 20
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_TENANT = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _sha256_hex(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError("must be 64 hex digits in quotes (YAML read this one as a number)")
    v = v.strip().lower()
    if not _HEX64.match(v):
        raise ValueError("must be 64 hex digits (the SHA-256 that `airlock keys new` prints)")
    return v


class Quota(_Strict):
    concurrent: int | None = Field(None, ge=1, description="Runs of the tenant running at once.")
    queued: int | None = Field(100, ge=0, description="Runs of the tenant waiting at once.")
    runs_per_day: int | None = Field(None, ge=1, description="Runs created per UTC day.")
    tokens_per_day: int | None = Field(None, ge=1, description="Provider tokens per UTC day.")


class Tenant(_Strict):
    api_key_sha256: str
    floor: str = Field("strict", description="Preset name or policy file: the least strict a run may be.")
    weight: int = Field(1, ge=1, le=1000, description="Share of capacity when tenants compete.")
    quota: Quota = Field(default_factory=Quota)
    provider_keys: dict[str, str] = Field(
        default_factory=dict,
        description="The run's key variable -> the service's environment variable holding it.")
    workspaces: str | None = Field(None, description="The only host directory runs may name.")

    @field_validator("api_key_sha256", mode="before")
    @classmethod
    def _key(cls, v: Any) -> str:
        return _sha256_hex(v)

    @field_validator("provider_keys")
    @classmethod
    def _env_names(cls, v: dict[str, str]) -> dict[str, str]:
        for run_var, service_var in v.items():
            for name in (run_var, service_var):
                if not _ENV_NAME.match(name):
                    raise ValueError(f"{name!r} is not an environment variable name")
        return v


class Capacity(_Strict):
    runs: int = Field(8, ge=1, le=1024, description="Sandboxes this host runs at once.")


class LearnedPools(_Strict):
    per_boundary: int = Field(2, ge=1, le=64,
                              description="Most sandboxes kept warm for one boundary.")
    window: Duration = Field(60.0, description="Demand is the claims seen this long ago or less.")
    idle: Duration = Field(900.0, description="A boundary not claimed this long is emptied.")


class FixedPool(_Strict):
    policy: str = Field(description="Preset name or policy file: the boundary of runs "
                        "made at it (a tenant's floor, say), with no policy of their own.")
    agent: Literal["command", "builtin", "codex", "claude-code"] = "command"
    image: Literal["base", "builtin", "codex", "claude-code"] | None = Field(
        None, description="The image of the command agent, as a run's `image` names it.")
    workspace: Literal["none", "ro", "copy"] = Field(
        "none", description="Runs without a workspace, or with one of this mode "
        "(an rw workspace always starts cold).")
    size: int = Field(ge=1, le=1024, description="Sandboxes kept warm, from the start.")

    @model_validator(mode="after")
    def _image_for_command(self) -> FixedPool:
        if self.image is not None and self.agent != "command":
            raise ValueError("image: only the command agent takes an image")
        return self


class Pools(_Strict):
    """Warm sandboxes, shared by all tenants: one holds nothing of a tenant until claimed."""

    enabled: bool = True
    max_total: int = Field(4, ge=1, le=1024,
                           description="Sandboxes held warm at once, all boundaries together.")
    learned: LearnedPools | None = Field(
        None, description="Sizes learned from demand (the default when `fixed` is absent).")
    fixed: list[FixedPool] | None = Field(
        None, description="Boundaries kept warm at a fixed size; others start cold.")

    @model_validator(mode="after")
    def _one_sizing(self) -> Pools:
        if self.learned is not None and self.fixed is not None:
            raise ValueError("give either `learned` or `fixed` sizing, not both")
        if self.fixed is not None:
            if not self.fixed:
                raise ValueError("fixed: name at least one boundary (or use `learned`)")
            total = sum(f.size for f in self.fixed)
            if total > self.max_total:
                raise ValueError(f"fixed: the sizes add up to {total}, more than max_total "
                                 f"({self.max_total})")
        elif self.learned is None:
            self.learned = LearnedPools()
        return self


class ServiceConfig(_Strict):
    listen: str = "127.0.0.1:8470"
    database: str | None = Field(None, description="sqlite:///... (default) or postgresql://...")
    runs_dir: str = "/var/lib/airlock/runs"
    capacity: Capacity = Field(default_factory=Capacity)
    operator_key_sha256: str | None = None
    shutdown_grace: Duration = Field(60.0, description="On SIGTERM, how long running runs may go on.")
    lease_ttl: Duration = Field(30.0, description="A host that misses heartbeats this long is dead.")
    pools: Pools | None = Field(None, description="Warm pools; absent: every run starts cold.")
    tenants: dict[str, Tenant]

    @field_validator("operator_key_sha256", mode="before")
    @classmethod
    def _operator_key(cls, v: Any) -> str | None:
        return None if v is None else _sha256_hex(v)

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        if v.startswith("unix:"):
            if not v[5:].startswith("/"):
                raise ValueError("unix: needs an absolute socket path")
            return v
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("must be host:port or unix:/path")
        return v

    @field_validator("tenants")
    @classmethod
    def _names(cls, v: dict[str, Tenant]) -> dict[str, Tenant]:
        if not v:
            raise ValueError("at least one tenant is needed")
        for name in v:
            if not _TENANT.match(name):
                raise ValueError(f"tenant name {name!r}: lowercase letters, digits, - and _ "
                                 "(it names directories and metric labels)")
        return v

    @model_validator(mode="after")
    def _distinct_keys(self) -> ServiceConfig:
        seen: dict[str, str] = {}
        if self.operator_key_sha256:
            seen[self.operator_key_sha256] = "the operator"
        for name, tenant in self.tenants.items():
            if tenant.api_key_sha256 in seen:
                raise ValueError(f"tenant {name} has the same key as {seen[tenant.api_key_sha256]}")
            seen[tenant.api_key_sha256] = f"tenant {name}"
        return self


@dataclass
class TenantConfig:
    """A tenant with its floor resolved and its paths made absolute."""

    name: str
    key_sha256: str
    floor: Policy
    floor_ref: str
    weight: int
    quota: Quota
    provider_keys: dict[str, str]
    workspaces: Path | None


@dataclass
class FixedPoolConfig:
    """A fixed pool entry with its policy loaded."""

    policy: Policy
    policy_ref: str
    agent: str
    image: str | None
    workspace: str
    size: int


@dataclass
class PoolConfig:
    max_total: int
    per_boundary: int  # 0: nothing learned (fixed sizing)
    window: float
    idle: float
    fixed: list[FixedPoolConfig]


@dataclass
class Config:
    path: Path
    listen: str
    database: str
    runs_dir: Path
    capacity: int
    operator_key_sha256: str | None
    shutdown_grace: float
    lease_ttl: float
    tenants: dict[str, TenantConfig]
    pools: PoolConfig | None = None


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The model a field holds, through Optional, list[...] and dict[..., ...]."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _allowed(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    current: Any = model
    for part in loc:
        if current is None:
            return []
        if isinstance(part, int):
            continue  # a list's item: of the list's item model
        fields = getattr(current, "model_fields", {})
        if part not in fields:
            # a dict's key (a tenant's name): its values are of the dict's value model
            continue
        current = _model_in(fields[part].annotation)
    return list(getattr(current, "model_fields", {}))


def _message(err: Any) -> str:
    loc = tuple(err["loc"])
    where = ".".join(str(p) for p in loc)
    if err["type"] == "extra_forbidden":
        allowed = _allowed(ServiceConfig, loc[:-1])
        near = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        return f"{where}: unknown key{hint}; allowed: {', '.join(allowed)}"
    if err["type"] == "missing":
        return f"{where}: required key is missing"
    msg = str(err["msg"]).removeprefix("Value error, ")
    return f"{where}: {msg}" if where else msg


def _origin(loc: tuple[Any, ...], origins: dict[tuple[str, ...], tuple[str, int]],
            top: str) -> tuple[str, int]:
    key = tuple(str(p) for p in loc)
    while key:
        if key in origins:
            return origins[key]
        key = key[:-1]
    return (top, 1)


def _resolve(base: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else base / p


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate the file; raise PolicyError (exit 2) listing every problem."""
    path = Path(path)
    name = str(path)
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise PolicyError([f"{name}:1: cannot read: {exc.strerror}"]) from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise PolicyError([f"{name}:1: larger than {MAX_CONFIG_BYTES} bytes"])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyError([f"{name}:1: not UTF-8 text"]) from None
    data, origins, problems = parse_yaml(text, name)
    if problems:
        raise PolicyError(problems)
    if not isinstance(data, dict):
        raise PolicyError([f"{name}:1: the config must be a mapping of keys"])
    try:
        model = ServiceConfig.model_validate(data)
    except ValidationError as exc:
        raise PolicyError([f"{o[0]}:{o[1]}: {_message(e)}" for e in exc.errors()
                           for o in [_origin(tuple(e["loc"]), origins, name)]]) from None

    base = path.resolve().parent
    out: list[str] = []
    tenants: dict[str, TenantConfig] = {}
    for tname, t in model.tenants.items():
        floor_ref = t.floor
        if "/" in floor_ref or floor_ref.endswith((".yaml", ".yml")):
            floor_ref = str(_resolve(base, floor_ref))
        floor: Policy | None = None
        try:
            floor = load_policy(floor_ref).policy
        except PolicyError as exc:
            where = origins.get(("tenants", tname, "floor"), (name, 1))
            out.append(f"{where[0]}:{where[1]}: tenants.{tname}.floor: {t.floor!r} is not a valid "
                       "policy:")
            out.extend(f"  {p}" for p in exc.problems)
        workspaces = None
        if t.workspaces is not None:
            workspaces = _resolve(base, t.workspaces).resolve()
            # Missing is allowed (made later; until then every workspace asked for is
            # refused); something else in its place is a mistake worth stopping for.
            if workspaces.exists() and not workspaces.is_dir():
                where = origins.get(("tenants", tname, "workspaces"), (name, 1))
                out.append(f"{where[0]}:{where[1]}: tenants.{tname}.workspaces: {workspaces} "
                           "is not a directory")
        if floor is not None:
            tenants[tname] = TenantConfig(
                name=tname, key_sha256=t.api_key_sha256, floor=floor, floor_ref=t.floor,
                weight=t.weight, quota=t.quota, provider_keys=dict(t.provider_keys),
                workspaces=workspaces)
    pools = _pools(model.pools, base, origins, name, out)
    if out:
        raise PolicyError(out)
    runs_dir = _resolve(base, model.runs_dir).resolve()
    database = model.database or f"sqlite:///{runs_dir.parent / 'airlock.db'}"
    return Config(path=path.resolve(), listen=model.listen, database=database, runs_dir=runs_dir,
                  capacity=model.capacity.runs, operator_key_sha256=model.operator_key_sha256,
                  shutdown_grace=model.shutdown_grace, lease_ttl=model.lease_ttl,
                  tenants=tenants, pools=pools)


def _pools(model: Pools | None, base: Path, origins: dict[tuple[str, ...], tuple[str, int]],
           name: str, out: list[str]) -> PoolConfig | None:
    if model is None or not model.enabled:
        return None
    fixed: list[FixedPoolConfig] = []
    for i, entry in enumerate(model.fixed or []):
        where = origins.get(("pools", "fixed", str(i), "policy"), (name, 1))
        prefix = f"{where[0]}:{where[1]}: pools.fixed.{i}.policy"
        ref = entry.policy
        if "/" in ref or ref.endswith((".yaml", ".yml")):
            ref = str(_resolve(base, ref))
        try:
            policy = load_policy(ref).policy
        except PolicyError as exc:
            out.append(f"{prefix}: {entry.policy!r} is not a valid policy:")
            out.extend(f"  {p}" for p in exc.problems)
            continue
        mode = policy.filesystem.workspace
        if entry.workspace != "none" and entry.workspace != mode:
            out.append(f"{prefix}: its workspace mode is {mode}, so no run of it has a "
                       f"pooled {entry.workspace} workspace")
            continue
        fixed.append(FixedPoolConfig(policy=policy, policy_ref=entry.policy, agent=entry.agent,
                                     image=entry.image, workspace=entry.workspace,
                                     size=entry.size))
    learned = model.learned
    return PoolConfig(max_total=model.max_total,
                      per_boundary=learned.per_boundary if learned is not None else 0,
                      window=learned.window if learned is not None else 60.0,
                      idle=learned.idle if learned is not None else 900.0,
                      fixed=fixed)
