"""The one configuration the Codex CLI gets inside the sandbox, generated per run.

Codex reads configuration from many places (user and system `config.toml`, managed
config, project `.codex/`, profiles, rules, skills, hooks, plugins, AGENTS.md). In the
sandbox none of those exist: `CODEX_HOME` and `HOME` are fresh tmpfs mounts, the image
ships no `/etc/codex`, and the only file Codex finds is the one generated here. Every key
that turns on something the run did not ask for is set off explicitly, and Codex runs
with `--strict-config`, so a key this version does not know fails the run loudly rather
than being ignored.

The keys were checked against `codex features list` and `--strict-config` of the pinned
version (see runner/images/catalog.py, CODEX_VERSION).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

PROVIDER_ID = "airlock"
MCP_SERVER = "airlock"
MCP_TOKEN_ENV = "AIRLOCK_MCP_TOKEN"
API_KEY_ENV = "OPENAI_API_KEY"
MODEL_CATALOG = "/opt/codex/models.json"

# Features of Codex 0.163 that reach beyond the run (apps, plugins, browsers, other
# agents, hooks, memories, update prompts) or that need what a hardened container does
# not give: all off. Command execution stays on; the container confines it.
FEATURES_OFF = (
    "apps", "plugins", "remote_plugin", "plugin_sharing", "multi_agent",
    "image_generation", "browser_use", "browser_use_external", "computer_use",
    "in_app_browser", "hooks", "memories", "tool_suggest", "skill_mcp_dependency_install",
    "skill_search", "goals", "guardian_approval", "realtime_conversation",
    "workspace_dependencies", "worktrees", "daemon_auto_start", "in_app_updates",
    "api_key_model_discovery", "enable_request_compression", "shell_snapshot",
    "code_mode_host", "system_proxy_fallback", "view_image", "browser_use_full_cdp_access",
    "browser_annotation_api", "in_app_chat", "in_app_dictation", "in_app_local_automation",
    "in_app_voice", "api_key_cyber_access_programs",
    # A provider that cannot be reached fails the run instead of being retried forever.
    "unbounded_connection_retries",
    # Commands run on pipes, not a pseudo-terminal (TERM is dumb anyway). Under Debian
    # 12's gVisor (runsc 2022-12) Codex never learned that a PTY-backed command ended
    # (the shell stayed a zombie) and the turn hung until the wall-time limit, on every
    # run measured; on pipes only now and then (about one run in four with 25
    # commands). Under the runsc `make engine` registers (2024-07) 8 runs of 25 piped
    # commands all ended. Off on every runtime, so a run behaves the same on both.
    "unified_exec_tty",
)
FEATURES_ON = ("shell_tool", "unified_exec")


def generate(*, model: str | None, base_url: str | None, mcp_url: str | None,
             mcp_tools: list[str] | None, workspace: str | None) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "approval_policy": "never",
        # Codex's own bubblewrap sandbox cannot start in a hardened container (it needs
        # user namespaces, which seccomp and no-new-privileges refuse); the container is
        # the sandbox. The command line says the same with
        # --dangerously-bypass-approvals-and-sandbox.
        "sandbox_mode": "danger-full-access",
        "web_search": "disabled",
        "check_for_update_on_startup": False,
        # The image's copy of the bundled catalog, with client-side tool search off
        # (see images/codex/Dockerfile): MCP tools are offered directly, by name.
        "model_catalog_json": MODEL_CATALOG,
        "project_doc_max_bytes": 0,
        "allow_login_shell": False,
        "cli_auth_credentials_store": "ephemeral",  # no auth.json: the key is a placeholder
        "history": {"persistence": "none"},
        "analytics": {"enabled": False},
        "feedback": {"enabled": False},
        "otel": {"exporter": "none", "trace_exporter": "none", "metrics_exporter": "none",
                 "log_user_prompt": False},
        "skills": {"bundled": {"enabled": False}, "include_instructions": False},
        "apps": {"_default": {"enabled": False}},
        # Commands get the core variables only, and never one named *KEY*, *SECRET* or
        # *TOKEN* (the placeholder key, the MCP token).
        "shell_environment_policy": {"inherit": "core", "ignore_default_excludes": False},
        # update_plan only reports progress (todo_list events); request_user_input
        # could only ever be refused by `codex exec`, so it is not offered at all.
        "tools": {"update_plan": {"enabled": True},
                  "experimental_request_user_input": {"enabled": False}},
        "features": {**{k: False for k in FEATURES_OFF}, **{k: True for k in FEATURES_ON}},
        "mcp_servers": {},
    }
    if model:
        cfg["model"] = model
    if base_url:
        cfg["model_provider"] = PROVIDER_ID
        cfg["model_providers"] = {PROVIDER_ID: {
            "name": "Airlock gateway",
            "base_url": base_url,
            "wire_api": "responses",
            "env_key": API_KEY_ENV,
            "requires_openai_auth": False,
            "supports_websockets": False,
            "request_max_retries": 2,
            "stream_max_retries": 2,
            "stream_idle_timeout_ms": 300_000,
        }}
    if mcp_url:
        server: dict[str, Any] = {
            "url": mcp_url,
            "bearer_token_env_var": MCP_TOKEN_ENV,
            "required": True,
            "startup_timeout_sec": 30,
            "tool_timeout_sec": 600,
            "default_tools_approval_mode": "approve",
        }
        if mcp_tools is not None:
            server["enabled_tools"] = list(mcp_tools)  # the allowlist, applied by Codex too
        cfg["mcp_servers"][MCP_SERVER] = server
    if workspace:
        cfg["projects"] = {workspace: {"trust_level": "untrusted"}}
    return cfg


# -- a small TOML writer (the standard library only reads TOML) ----------------------

_BARE = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(k: str) -> str:
    return k if _BARE.match(k) else json.dumps(k)


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # a JSON string is a TOML basic string
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def to_toml(cfg: Mapping[str, Any]) -> str:
    lines: list[str] = []

    def table(prefix: list[str], data: Mapping[str, Any]) -> None:
        scalars = {k: v for k, v in data.items() if not isinstance(v, Mapping)}
        tables = {k: v for k, v in data.items() if isinstance(v, Mapping)}
        if prefix and (scalars or not tables):
            lines.append("")
            lines.append("[" + ".".join(_key(p) for p in prefix) + "]")
        for k, v in scalars.items():
            lines.append(f"{_key(k)} = {_value(v)}")
        for k, v in tables.items():
            table([*prefix, k], v)

    table([], cfg)
    return "\n".join(lines).lstrip("\n") + "\n"
