"""The policy: what a sandbox may do, as validated models.

Every default here is the secure one. A preset may only tighten them; anything that
widens the boundary (a writable workspace, an extra egress host, a capability) has to be
written in the policy and is reported by `widenings()` so the run log records it.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from runner.policy.syscalls import check_allowable_syscall, check_group_name, check_syscall_name
from runner.policy.units import Duration, Size

SANDBOX_UID = 1000
MAX_WALL_TIME = 30 * 24 * 3600  # every run has a bound the host's timers can hold
SANDBOX_HOME = "/home/airlock"
WORKSPACE_PATH = "/workspace"

# Variables that would route an agent around the gateway or hand it a credential.
# They are never copied from the host and cannot be set by a policy: the adapter sets
# the gateway's own values itself.
PROVIDER_ROUTING_VARS = re.compile(
    r"^(ANTHROPIC_.*|OPENAI_.*|AZURE_OPENAI_.*|CLAUDE_.*|CODEX_.*|GOOGLE_.*|GEMINI_.*|"
    r"VERTEX_.*|CLOUDSDK_.*|AWS_.*|MISTRAL_.*|GROQ_.*|TOGETHER_.*|DEEPSEEK_.*|OLLAMA_.*|"
    r"LITELLM_.*|OPENROUTER_.*|HF_TOKEN|HUGGING_FACE_.*|.*_API_KEY|.*_API_BASE|.*_BASE_URL|"
    r"(HTTPS?|ALL|NO|FTP)_PROXY|(https?|all|no|ftp)_proxy|AIRLOCK_.*|DOCKER_.*|"
    r"SSH_AUTH_SOCK|KUBECONFIG|GITHUB_TOKEN|GH_TOKEN)$"
)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_HOST_PORT = re.compile(r"^(\*\.)?[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?(:\d{1,5})?$")

SocketFamily = Literal["unix", "inet", "inet6"]
DEFAULT_SOCKET_FAMILIES: tuple[SocketFamily, ...] = ("unix", "inet", "inet6")
DEFAULT_SYSCALL_GROUPS = [
    "file-io",
    "memory",
    "process",
    "signals",
    "time",
    "polling",
    "threads",
    "net-unix",
    "net-inet",
    # Without capabilities and with no-new-privileges these only shuffle the process's own
    # ids; glibc's posix_spawn with POSIX_SPAWN_RESETIDS calls setresuid/setresgid, and
    # GNU make spawns every recipe that way (EPERM without them: `make: sh: Operation
    # not permitted`). Docker's own default profile allows them too.
    "identity",
]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, frozen=False)


class FilesystemPolicy(Strict):
    read_only_root: bool = Field(True, description="Mount the image's root filesystem read-only.")
    tmpfs: dict[str, Size] = Field(
        default_factory=lambda: {"/tmp": 64 << 20, SANDBOX_HOME: 64 << 20},
        description="Size-capped tmpfs mounts for the paths the agent must write.",
    )
    exec_tmpfs: list[str] = Field(
        default_factory=list,
        description="tmpfs paths mounted without noexec (an agent that runs what it writes).",
    )
    workspace: Literal["ro", "copy", "rw"] = Field(
        "ro",
        description="ro: read-only bind; copy: a private writable copy returned as a patch; "
        "rw: the host directory itself, writable (widens the boundary).",
    )
    copy_size: Size = Field(
        1 << 30,
        description="copy mode: size of the tmpfs that holds the workspace copy (the host's "
        "memory; the agent's own writes also count against resources.memory). A workspace "
        "larger than this is refused; the agent gets ENOSPC past it and the run ends "
        "(reason disk).",
    )
    copy_files: int = Field(
        100_000, ge=16, le=10_000_000,
        description="copy mode: files, directories and links the copy may hold (its tmpfs "
        "inodes, which cost kernel memory beyond copy_size).",
    )
    patch_size: Size = Field(
        32 << 20,
        description="copy mode: cap on changes.patch. Changes that do not fit are listed "
        "(report.json, a workspace.left_out event), not diffed; the run ends with reason disk.",
    )
    patch_file_size: Size = Field(
        8 << 20,
        description="copy mode: a changed file larger than this (its apparent size: sparse "
        "files count in full) is listed as left out instead of diffed.",
    )
    allow_sensitive_workspace: bool = Field(
        False, description="Allow a workspace that exposes the host (/, /proc, /etc, /run, "
        "the engine's socket or a directory holding it, the runs directory); refused "
        "otherwise. A widening, recorded in the run's log.",
    )

    @field_validator("tmpfs")
    @classmethod
    def _absolute(cls, v: dict[str, int]) -> dict[str, int]:
        for path, size in v.items():
            if not path.startswith("/") or ".." in path.split("/"):
                raise ValueError(f"tmpfs path {path!r} must be absolute and without '..'")
            if path in ("/", "/proc", "/sys", "/dev", "/run/airlock"):
                raise ValueError(f"tmpfs cannot be mounted over {path}")
            if size <= 0:
                raise ValueError(f"tmpfs {path} needs a size above 0")
        return v

    @field_validator("copy_size", "patch_size", "patch_file_size")
    @classmethod
    def _disk_caps(cls, v: int) -> int:
        if v < 1 << 20:
            raise ValueError("a workspace copy or patch cap below 1m is too small to be useful")
        return v

    @model_validator(mode="after")
    def _exec_paths_are_tmpfs(self) -> FilesystemPolicy:
        for path in self.exec_tmpfs:
            if path not in self.tmpfs:
                raise ValueError(f"exec_tmpfs names {path}, which is not a tmpfs path")
        return self


class ServiceLimits(Strict):
    """What one run may make the host-side gateway and proxy spend. The defaults are
    measured (docs/security.md, "Gateway and proxy limits"); each is per run."""

    memory: Size = Field(
        128 << 20, description="Request bytes the run's gateway holds at once, counted "
        "across all its connections: bodies as they arrive plus the estimated cost of "
        "parsing and re-sending them. A request that does not fit is refused (503).")
    request_body: Size = Field(
        32 << 20, description="Largest request body the gateway reads (Anthropic's own "
        "request limit); larger ones are refused (413) before they are read.")
    json_nodes: int = Field(
        500_000, ge=1000, description="Most JSON values (objects, arrays and items) a "
        "request body may hold; bounds the host's parsing memory and CPU (413).")
    connections: int = Field(
        64, ge=4, le=4096, description="Concurrent connections to each service (gateway, "
        "proxy); more are closed as they arrive.")
    head_timeout: Duration = Field(
        30.0, description="Time for a request's line and headers to arrive once begun (408).")
    body_timeout: Duration = Field(
        60.0, description="Time for a request's whole body to arrive after its headers: a "
        "stalled, incomplete request is dropped (408) and its memory freed.")
    refusal_events: int = Field(
        100, ge=1, description="Refusals logged in full per service; past it they are "
        "counted, and one summary event gives the counts at the end.")
    refusals: int = Field(
        2000, ge=10, description="Refused requests and connections per run before the run "
        "is ended as abusive (event limits.exceeded, exit 4, reason host_limit).")

    @field_validator("head_timeout", "body_timeout")
    @classmethod
    def _positive(cls, v: float) -> float:
        if v <= 0:
            raise ValueError("a timeout must be above 0")
        return v

    @model_validator(mode="after")
    def _body_fits(self) -> ServiceLimits:
        if self.request_body > self.memory:
            raise ValueError("limits.request_body cannot exceed limits.memory")
        return self


class NetworkPolicy(Strict):
    mode: Literal["none", "gateway", "proxy"] = Field(
        "gateway",
        description="none: no way out at all; gateway: only the provider gateway; "
        "proxy: the gateway plus a CONNECT proxy for the hosts in `allow`.",
    )
    allow: list[str] = Field(
        default_factory=list,
        description="host:port or *.domain:port entries the proxy may reach (proxy mode only).",
    )
    allow_private: list[str] = Field(
        default_factory=list,
        description="CIDRs the proxy may reach although they are private, loopback or "
        "link-local (explicit widening; never needed for public hosts).",
    )
    limits: ServiceLimits = Field(default_factory=ServiceLimits)

    @field_validator("allow")
    @classmethod
    def _host_ports(cls, v: list[str]) -> list[str]:
        for entry in v:
            if not _HOST_PORT.match(entry):
                raise ValueError(f"{entry!r} is not host:port or *.domain:port")
        return v

    @model_validator(mode="after")
    def _allow_needs_proxy(self) -> NetworkPolicy:
        if (self.allow or self.allow_private) and self.mode != "proxy":
            raise ValueError("network.allow and allow_private take effect only with mode: proxy")
        return self


# Per item, so a policy error points at the line of the misspelled name.
SyscallGroup = Annotated[str, AfterValidator(check_group_name)]
SyscallName = Annotated[str, AfterValidator(check_syscall_name)]
AllowableSyscall = Annotated[str, AfterValidator(check_allowable_syscall)]


class SeccompPolicy(Strict):
    groups: list[SyscallGroup] = Field(
        default_factory=lambda: list(DEFAULT_SYSCALL_GROUPS),
        description="Named syscall groups that make up the allowlist.",
    )
    allow: list[AllowableSyscall] = Field(
        default_factory=list, description="Extra syscalls to allow (never the 'never' group)."
    )
    deny: list[SyscallName] = Field(
        default_factory=list, description="Syscalls denied whatever the groups allow."
    )
    socket_families: list[Literal["unix", "inet", "inet6"]] = Field(
        default_factory=lambda: list(DEFAULT_SOCKET_FAMILIES),
        description="Address families socket() may create.",
    )
    default_action: Literal["errno", "kill"] = Field(
        "errno", description="What a syscall outside the allowlist gets: EPERM, or the process killed."
    )


class ProcessPolicy(Strict):
    user: str = Field(f"{SANDBOX_UID}:{SANDBOX_UID}", description="uid:gid; never 0.")
    capabilities: list[str] = Field(
        default_factory=list, description="Capabilities to keep; all others are dropped."
    )
    seccomp: SeccompPolicy = Field(default_factory=SeccompPolicy)
    runtime: Literal["runc", "runsc"] = Field("runc", description="runc, or runsc (gVisor).")
    gvisor_platform: Literal["systrap", "ptrace"] = Field(
        "systrap", description="Under runsc, how gVisor's kernel takes the sandbox's system "
        "calls: systrap (gVisor's default: the faster calls, but an idle sandbox keeps ~2.5 % "
        "of a core busy) or ptrace (slower calls, no idle cost: for hosts that keep hundreds "
        "of mostly idle runs). The same Sentry either way. The engine must register a runtime "
        "runsc-ptrace (`make engine` does). Ignored under runc."
    )
    no_new_privileges: bool = True
    init: bool = Field(
        True, description="PID 1 reaps orphans and forwards signals (the shim does it; "
        "false is accepted for compatibility and changes nothing)."
    )

    @field_validator("user")
    @classmethod
    def _non_root(cls, v: str) -> str:
        m = re.fullmatch(r"(\d+)(?::(\d+))?", v)
        if not m:
            raise ValueError("user must be numeric uid[:gid], such as 1000:1000")
        if int(m.group(1)) == 0 or (m.group(2) is not None and int(m.group(2)) == 0):
            raise ValueError("the sandbox never runs as uid or gid 0")
        return v

    @field_validator("capabilities")
    @classmethod
    def _cap_names(cls, v: list[str]) -> list[str]:
        out = []
        for cap in v:
            name = cap.upper().removeprefix("CAP_")
            if not re.fullmatch(r"[A-Z_]+", name):
                raise ValueError(f"{cap!r} is not a capability name")
            if name in {"SYS_ADMIN", "SYS_PTRACE", "SYS_MODULE", "SYS_RAWIO", "BPF",
                        "PERFMON", "NET_ADMIN", "SYS_BOOT", "MAC_ADMIN", "DAC_READ_SEARCH"}:
                raise ValueError(f"CAP_{name} would break the sandbox boundary and is refused")
            out.append(name)
        return out


class ResourcesPolicy(Strict):
    memory: Size = Field(1 << 30, description="Memory limit; swap is disabled.")
    cpus: float = Field(1.0, gt=0, le=256)
    pids: int = Field(256, ge=16, le=65536)
    wall_time: Duration = Field(600.0, description="Wall-clock limit of the whole run.")
    output_bytes: Size = Field(16 << 20, description="Cap on the agent's stdout+stderr.")
    log_bytes: Size = Field(
        64 << 20, description="Cap on the run's events.jsonl: past it events are counted, not "
        "written, and the run ends (exit 4, exit_reason log_cap, event log.cap).")
    nofile: int = Field(1024, ge=64, le=1 << 20, description="Open-file limit per process.")

    @field_validator("memory")
    @classmethod
    def _min_memory(cls, v: int) -> int:
        if v < 16 << 20:
            raise ValueError("memory below 16m cannot start a sandbox")
        return v

    @field_validator("log_bytes")
    @classmethod
    def _min_log(cls, v: int) -> int:
        if v < 1 << 20:
            raise ValueError("log_bytes below 1m cannot hold a run's own events")
        return v

    @field_validator("wall_time")
    @classmethod
    def _positive_wall(cls, v: float) -> float:
        if v <= 0:
            raise ValueError("wall_time must be above 0")
        if v > MAX_WALL_TIME:
            raise ValueError(f"wall_time is at most {MAX_WALL_TIME // 3600}h (30 days)")
        return v


class EnvPolicy(Strict):
    allow: list[str] = Field(
        default_factory=list,
        description="Host variables passed through by name (nothing passes by default).",
    )
    set: dict[str, str] = Field(default_factory=dict, description="Fixed variables to set.")

    @field_validator("allow")
    @classmethod
    def _allow_names(cls, v: list[str]) -> list[str]:
        for name in v:
            _check_env_name(name)
        return v

    @field_validator("set")
    @classmethod
    def _set_names(cls, v: dict[str, str]) -> dict[str, str]:
        for name in v:
            _check_env_name(name)
        return v


def _check_env_name(name: str) -> None:
    if not _ENV_NAME.match(name):
        raise ValueError(f"{name!r} is not an environment variable name")
    if PROVIDER_ROUTING_VARS.match(name):
        raise ValueError(
            f"{name} routes to a provider or carries a credential; it is never passed into "
            "the sandbox (the gateway holds the key)"
        )


Backend = Literal[
    "anthropic", "vertex", "gateway", "openai", "openai-compatible", "ollama", "replay"
]


MAX_PRICES = 256


class ModelPrice(Strict):
    input_per_mtok: float = Field(..., ge=0, le=1e6, description="USD per million input "
                                  "tokens (cache writes included).")
    output_per_mtok: float = Field(..., ge=0, le=1e6, description="USD per million output "
                                   "tokens.")
    cached_input_per_mtok: float | None = Field(
        None, ge=0, le=1e6, description="USD per million input tokens read from the "
        "provider's cache; unset: the input price.")


class ProviderPolicy(Strict):
    backend: Backend
    base_url: str | None = Field(None, description="Upstream URL; each backend has a default.")
    api_key_env: str | None = Field(None, description="Host variable that holds the key.")
    api_key_file: str | None = Field(None, description="Host file that holds the key.")
    models: dict[str, str] = Field(
        default_factory=dict,
        description="Roles to model ids (default, triage, ...); the allowlist of models.",
    )
    aliases: dict[str, str] = Field(
        default_factory=dict, description="Short names to full model ids (sonnet -> id)."
    )
    allow_models: list[str] = Field(
        default_factory=list, description="More model ids allowed beyond `models`."
    )
    hosted_tools: list[str] = Field(
        default_factory=list,
        description="Provider-side tools the policy permits (web_search, code_execution, ...).",
    )
    tools: list[str] | None = Field(
        None, description="If set, the only tool names a request may offer the model."
    )
    url_sources: bool = Field(
        False, description="Let requests carry content the provider fetches from a URL "
        "itself (image/document URL sources, image_url and file_url parts): the provider's "
        "network, not the sandbox's, would reach that URL (widens the boundary).")
    stored_prompts: bool = Field(
        False, description="Let Responses requests name a stored `prompt`, configured on "
        "the provider's side where the gateway cannot check its tools or files (widens).")
    background: bool = Field(
        False, description="Let Responses requests run in the `background`: the answer is "
        "fetched later, without usage the token budget could see (widens).")
    project: str | None = Field(None, description="Vertex AI project.")
    region: str | None = Field(None, description="Vertex AI region.")
    replay_file: str | None = Field(None, description="Recorded exchanges (backend replay).")
    ca_file: str | None = Field(
        None, description="PEM file of extra certificate authorities to trust for the "
        "provider (a corporate TLS proxy's); the default trust store still applies.")
    prices: dict[str, ModelPrice] = Field(
        default_factory=dict, description="Model id (or `*` for any other) to its price, "
        f"for the cost in events, reports and usage (at most {MAX_PRICES}); a model "
        "without a price has no cost (unknown, not 0).")

    @field_validator("prices")
    @classmethod
    def _prices(cls, v: dict[str, ModelPrice]) -> dict[str, ModelPrice]:
        if len(v) > MAX_PRICES:
            raise ValueError(f"at most {MAX_PRICES} prices")
        return v

    def cost_usd(self, model: str | None, input_tokens: int | None,
                 output_tokens: int | None, cache_read_tokens: int | None) -> float | None:
        """The request's cost from `prices`, or None when the model or the usage is unknown."""
        price = self.prices.get(model or "") or self.prices.get("*")
        if price is None or (input_tokens is None and output_tokens is None):
            return None
        cached = min(cache_read_tokens or 0, input_tokens or 0)
        rate = price.input_per_mtok if price.cached_input_per_mtok is None \
            else price.cached_input_per_mtok
        usd = ((input_tokens or 0) - cached) * price.input_per_mtok + cached * rate \
            + (output_tokens or 0) * price.output_per_mtok
        return round(usd / 1e6, 9)

    @field_validator("api_key_env")
    @classmethod
    def _key_env(cls, v: str | None) -> str | None:
        if v is not None and not _ENV_NAME.match(v):
            raise ValueError(f"{v!r} is not an environment variable name")
        return v

    @model_validator(mode="after")
    def _backend_needs(self) -> ProviderPolicy:
        if self.backend == "openai-compatible" and not self.base_url:
            raise ValueError("backend openai-compatible needs base_url")
        if self.backend == "replay" and not self.replay_file:
            raise ValueError("backend replay needs replay_file")
        if self.api_key_env and self.api_key_file:
            raise ValueError("give api_key_env or api_key_file, not both")
        return self

    def allowed_models(self) -> set[str]:
        return set(self.models.values()) | set(self.allow_models) | set(self.aliases.values())

    def resolve_model(self, name: str) -> str | None:
        """A role, alias or full id to the full id, or None when the policy does not allow it."""
        resolved = self.models.get(name) or self.aliases.get(name) or name
        return resolved if resolved in self.allowed_models() else None


class BudgetsPolicy(Strict):
    steps: int | None = Field(None, ge=1, description="Completed agent actions.")
    requests: int | None = Field(None, ge=1, description="Provider requests.")
    tokens: int | None = Field(
        None, ge=1, description="Input plus output tokens. Each request reserves its "
        "output cap plus an estimate of its input before it is forwarded; one that does "
        "not fit what is left is refused and ends the run.")
    reserve_output_tokens: int = Field(
        32_000, ge=256, description="Output tokens reserved for a request that sets no "
        "output cap (max_tokens, max_output_tokens, ...); with a token budget the gateway "
        "sets that cap on the request, so the reservation holds.")
    mcp_calls: int | None = Field(None, ge=1, description="MCP tool calls.")


class McpServerPolicy(Strict):
    command: str | None = Field(None, description="A stdio MCP server the host starts.")
    url: str | None = Field(None, description="An MCP server the host reaches.")
    enabled_tools: list[str] = Field(
        default_factory=list, description="The only tools of this server the run exposes."
    )

    @model_validator(mode="after")
    def _one_source(self) -> McpServerPolicy:
        if bool(self.command) == bool(self.url):
            raise ValueError("an MCP server needs exactly one of command or url")
        return self


class McpPolicy(Strict):
    tools: list[str] = Field(
        default_factory=list, description="Python callables exposed as tools (module:function)."
    )
    servers: list[McpServerPolicy] = Field(default_factory=list)
    builtin: list[Literal["submit_result"]] = Field(default_factory=list)
    per_tool_calls: dict[str, Annotated[int, Field(ge=1)]] = Field(default_factory=dict)


class ReadinessPolicy(Strict):
    selftest: bool = Field(True, description="Run the in-sandbox self-test before the agent.")
    gate: bool = Field(
        True, description="A failing self-test stops the run (exit 3); false only records it."
    )


class Policy(Strict):
    """A resolved policy (after `extends:`)."""

    name: str | None = Field(None, description="A label for reports.")
    extends: str | None = Field(
        None, description="A preset name or a path relative to this file."
    )
    image: str | None = Field(
        None, description="The sandbox's image: an Airlock image (base, dev, ...), a local image "
        "(name:tag or id; never pulled), a Dockerfile, a devcontainer.json or a directory holding "
        "either (paths relative to the current directory). Airlock layers its shim and the "
        "agent on top; the boundary is the policy's whatever the image says.")
    filesystem: FilesystemPolicy = Field(default_factory=FilesystemPolicy)
    network: NetworkPolicy = Field(default_factory=NetworkPolicy)
    process: ProcessPolicy = Field(default_factory=ProcessPolicy)
    resources: ResourcesPolicy = Field(default_factory=ResourcesPolicy)
    env: EnvPolicy = Field(default_factory=EnvPolicy)
    approval: Literal["never"] = Field(
        "never", description="Agents never ask: the boundary, not a prompt, keeps them in."
    )
    provider: ProviderPolicy | None = None
    budgets: BudgetsPolicy = Field(default_factory=BudgetsPolicy)
    mcp: McpPolicy = Field(default_factory=McpPolicy)
    readiness: ReadinessPolicy = Field(default_factory=ReadinessPolicy)


def widenings(policy: Policy) -> list[str]:
    """Every place where the policy opens the boundary beyond the secure default."""
    out = []
    fs, net, proc = policy.filesystem, policy.network, policy.process
    if not fs.read_only_root:
        out.append("filesystem.read_only_root: false (the root filesystem is writable)")
    if fs.workspace == "rw":
        out.append("filesystem.workspace: rw (the agent writes the host's workspace)")
    if fs.allow_sensitive_workspace:
        out.append("filesystem.allow_sensitive_workspace: true (a workspace may expose the host)")
    for path in fs.exec_tmpfs:
        out.append(f"filesystem.exec_tmpfs: {path} (files written there can be executed)")
    if net.mode == "proxy":
        out.extend(f"network.allow: {h}" for h in net.allow)
        out.extend(f"network.allow_private: {c}" for c in net.allow_private)
    out.extend(f"process.capabilities: CAP_{c}" for c in proc.capabilities)
    if not proc.no_new_privileges:
        out.append("process.no_new_privileges: false")
    if proc.seccomp.allow:
        out.append(f"process.seccomp.allow: {', '.join(proc.seccomp.allow)}")
    if not policy.readiness.selftest:
        out.append("readiness.selftest: false (the run starts without its self-test)")
    elif not policy.readiness.gate:
        out.append("readiness.gate: false (a failing self-test does not stop the run)")
    if policy.provider and policy.provider.hosted_tools:
        out.append(f"provider.hosted_tools: {', '.join(policy.provider.hosted_tools)}")
    if policy.provider and policy.provider.url_sources:
        out.append("provider.url_sources: true (the provider fetches URLs a request names)")
    if policy.provider and policy.provider.stored_prompts:
        out.append("provider.stored_prompts: true (stored prompts run unchecked tools)")
    if policy.provider and policy.provider.background:
        out.append("provider.background: true (background responses escape the token budget)")
    return out
