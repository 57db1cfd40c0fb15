"""The policy reference, generated from the JSON Schema so it cannot drift from the code.

    airlock policy reference > docs/policy-reference.md
"""

from __future__ import annotations

import json
from typing import Any

from runner.policy.models import Policy


def _type(prop: dict[str, Any], defs: dict[str, Any]) -> str:
    if "$ref" in prop:
        return f"[{prop['$ref'].rsplit('/', 1)[1]}](#{prop['$ref'].rsplit('/', 1)[1].lower()})"
    if "enum" in prop:
        return " \\| ".join(f"`{v}`" for v in prop["enum"])
    if "const" in prop:
        return f"`{prop['const']}`"
    if "anyOf" in prop:
        return " or ".join(_type(p, defs) for p in prop["anyOf"])
    t = prop.get("type", "any")
    if t == "array":
        return f"list of {_type(prop.get('items', {}), defs)}"
    if t == "object":
        extra = prop.get("additionalProperties")
        return f"map of {_type(extra, defs)}" if isinstance(extra, dict) else "map"
    return str(t)


def _default(prop: dict[str, Any]) -> str:
    if "default" not in prop:
        return ""
    return f"`{json.dumps(prop['default'])}`"


def _table(name: str, schema: dict[str, Any], defs: dict[str, Any]) -> list[str]:
    lines = [f"### {name}", ""]
    if schema.get("description"):
        lines += [schema["description"].strip(), ""]
    lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, prop in schema.get("properties", {}).items():
        desc = (prop.get("description") or "").replace("\n", " ").replace("|", "\\|")
        lines.append(f"| `{key}` | {_type(prop, defs)} | {_default(prop)} | {desc} |")
    return [*lines, ""]


def reference_markdown() -> str:
    schema = Policy.model_json_schema()
    defs = schema.get("$defs", {})
    out = ["# Policy reference", "",
           "Generated from the policy's JSON Schema (`airlock policy reference`); "
           "`airlock policy schema` prints the schema itself. Unknown keys are errors.", "",
           "Sizes are bytes or a number with k, m, g (`256m`); durations are seconds or a "
           "number with ms, s, m, h (`600s`).", ""]
    out += _table("Policy (top level)", schema, defs)
    for name in sorted(defs):
        out += _table(name, defs[name], defs)
    return "\n".join(out).rstrip() + "\n"
