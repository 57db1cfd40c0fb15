"""Reading a request's tool list: provider-side tools and the run's tool allowlist.

Hosted tools run on the provider's side (search, code execution, remote MCP, ...), so
the sandbox boundary cannot contain them: the gateway refuses any the policy does not
name in `hosted_tools`. It fails closed: every tool type that is not a plain function
(or custom/freeform) tool is treated as provider-defined and must be named, even if it
is one the client executes itself (Anthropic `bash_*`, OpenAI `local_shell`).

A `hosted_tools` entry matches a tool by its family (`web_search`), its type without
the date (`web_search_preview`) or its exact type (`web_search_20250305`).
When the policy gives `tools`, every function tool name must match one of its entries
(shell-style patterns allowed, e.g. `mcp__run__*`); a tool inside a Responses
`namespace` tool is named `<namespace>__<name>`.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Any

# Type stems (date suffix removed) to a family name a policy can use.
_FAMILIES = {
    "web_search": "web_search", "web_search_preview": "web_search",
    "web_fetch": "web_fetch",
    "code_execution": "code_execution", "code_interpreter": "code_interpreter",
    "computer": "computer_use", "computer_use": "computer_use",
    "computer_use_preview": "computer_use",
    "mcp": "mcp", "mcp_toolset": "mcp", "mcp_servers": "mcp",
    "file_search": "file_search", "image_generation": "image_generation",
    "bash": "bash", "text_editor": "text_editor", "memory": "memory",
    "local_shell": "local_shell", "shell": "shell", "apply_patch": "apply_patch",
    "tool_search": "tool_search", "tool_search_tool_regex": "tool_search",
    "tool_search_tool_bm25": "tool_search",
}
_DATE = re.compile(r"(_\d{8}|_\d{4}_\d{2}_\d{2})$")
_FUNCTION_TYPES = {None, "function", "custom"}


@dataclass(frozen=True)
class ToolRefusal:
    reason: str  # "hosted_tool" | "tool_not_allowed"
    tool: str
    detail: str


def hosted_names(tool_type: str) -> tuple[str, str, str]:
    """(family, stem, exact) for a provider-defined tool type."""
    stem = _DATE.sub("", tool_type)
    return _FAMILIES.get(stem, stem), stem, tool_type


def _tool_list(kind: str, tools: Any, namespace: str | None = None
               ) -> list[tuple[str | None, str | None]]:
    out: list[tuple[str | None, str | None]] = []
    if not isinstance(tools, list):
        return out
    for tool in tools:
        if not isinstance(tool, dict):
            out.append(("<malformed>", None))
            continue
        ttype = tool.get("type")
        name = tool.get("name")
        if ttype == "namespace" and namespace is None:
            # Responses groups client-side function tools under a namespace; the
            # model calls them as namespace + name.
            out.extend(_tool_list(kind, tool.get("tools"), namespace=str(name)))
            continue
        if kind in ("chat", "ollama_chat") and isinstance(tool.get(ttype or "function"), dict):
            name = tool[ttype or "function"].get("name")  # {"type":"function","function":{..}}
        if ttype == "function" and name is None and isinstance(tool.get("function"), dict):
            name = tool["function"].get("name")
        if namespace is not None and isinstance(name, str):
            name = f"{namespace}__{name}"
        out.append((ttype if isinstance(ttype, str) else None, name))
    return out


def _tool_entries(kind: str, body: dict[str, Any]) -> list[tuple[str | None, str | None]]:
    """(type, function name) for every tool the request offers the model."""
    out = _tool_list(kind, body.get("tools"))
    functions = body.get("functions")  # legacy Chat Completions
    if isinstance(functions, list):
        out.extend(("function", f.get("name") if isinstance(f, dict) else None)
                   for f in functions)
    # Request parameters that switch on provider-side tools without a tools[] entry.
    if body.get("mcp_servers"):
        out.append(("mcp_servers", None))
    if kind == "chat" and body.get("web_search_options") is not None:
        out.append(("web_search", None))
    if kind == "messages" and isinstance(body.get("container"), dict | str):
        out.append(("code_execution", None))  # a container runs code on Anthropic's side
    return out


def check_tools(kind: str, body: dict[str, Any], hosted_allowed: list[str],
                allowed_tools: list[str] | None) -> ToolRefusal | None:
    allowed_hosted = set(hosted_allowed)
    for ttype, name in _tool_entries(kind, body):
        if ttype not in _FUNCTION_TYPES:
            family, stem, exact = hosted_names(str(ttype))
            if not allowed_hosted & {family, stem, exact}:
                return ToolRefusal(
                    "hosted_tool", exact,
                    f"provider-side tool {exact!r} ({family}) is not in the policy's "
                    "provider.hosted_tools")
            continue
        if allowed_tools is not None:
            if not isinstance(name, str) or not name:
                return ToolRefusal("tool_not_allowed", "<unnamed>",
                                   "a tool without a name cannot be checked against the "
                                   "policy's provider.tools")
            if not any(fnmatch.fnmatchcase(name, pat) for pat in allowed_tools):
                return ToolRefusal("tool_not_allowed", name,
                                   f"tool {name!r} is not in the policy's provider.tools")
    return None
