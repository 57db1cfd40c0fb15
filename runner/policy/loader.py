"""Loading policies from YAML: `extends:` chains, and errors as `file:line: message`.

YAML is composed into nodes (not loaded straight to dicts) so that every key keeps the
file and line it came from through the merge of an `extends:` chain; a validation error
then points at the line that caused it, in whichever file of the chain that was.
"""

from __future__ import annotations

import datetime
import difflib
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from runner.errors import PolicyError
from runner.policy.floor import Widening, widenings_over
from runner.policy.models import Policy

Origin = tuple[str, int]  # (file, line)
PathKey = tuple[str, ...]


def presets_dir() -> Path:
    env = os.environ.get("AIRLOCK_PRESETS")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent
    for candidate in (here.parent.parent / "policies", here.parent / "data" / "policies"):
        if candidate.is_dir():
            return candidate
    return here.parent.parent / "policies"


def preset_names() -> list[str]:
    return sorted(p.stem for p in presets_dir().glob("*.yaml"))


@dataclass
class LoadedPolicy:
    policy: Policy
    files: list[str]
    origins: dict[PathKey, Origin] = field(default_factory=dict)
    # The preset this policy is measured against: itself when a preset is loaded by
    # name, else the nearest preset its `extends:` chain reaches (None: no preset).
    preset: str | None = None

    @property
    def digest(self) -> str:
        return policy_digest(self.policy)

    def origin(self, key: str) -> Origin:
        """Where a dotted key (`resources.memory`, `filesystem.tmpfs./tmp`) was written."""
        parts = key.split(".")
        if parts[:2] == ["filesystem", "tmpfs"] and len(parts) > 2:
            parts = [*parts[:2], ".".join(parts[2:])]
        return _origin_for(tuple(parts), self.origins, self.files[0])


def is_preset_ref(ref: str) -> bool:
    return "/" not in ref and not ref.endswith((".yaml", ".yml"))


def over_preset(preset: str | None, policy: Policy) -> list[Widening]:
    """What `policy` raises above the preset it builds on (see runner/policy/floor.py)."""
    if preset is None:
        return []
    try:
        base = load_policy(preset).policy
    except PolicyError:
        return []
    return widenings_over(base, policy)


def policy_digest(policy: Policy) -> str:
    canonical = json.dumps(policy.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


class _Problems:
    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, origin: Origin, message: str) -> None:
        self.items.append(f"{origin[0]}:{origin[1]}: {message}")


# Bounds on what a policy (or config) file may make the loader do, checked before any
# model validation: a policy is a few hundred bytes, so these are generous, and each
# keeps a hostile file from spending the host's memory or stack ("billion laughs" alias
# bombs expand exponentially; deep nesting overflows the recursive composer).
MAX_POLICY_BYTES = 256 << 10
MAX_DEPTH = 32
MAX_ALIASES = 100
MAX_NODES = 20_000  # after expanding aliases
MAX_EXTENDS = 8


def decode_policy_bytes(data: bytes, name: str, problems: _Problems) -> str | None:
    """UTF-8 text without NUL bytes, or a problem naming the line of the first bad byte."""
    if len(data) > MAX_POLICY_BYTES:
        problems.add((name, 1), f"the file is larger than {MAX_POLICY_BYTES >> 10} KiB; "
                     "a policy is a short text file")
        return None
    nul = data.find(b"\0")
    if nul >= 0:
        problems.add((name, data.count(b"\n", 0, nul) + 1),
                     "a NUL byte: a policy is a UTF-8 text file, not binary data")
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        problems.add((name, data.count(b"\n", 0, exc.start) + 1),
                     f"byte 0x{data[exc.start]:02x} is not UTF-8: a policy is a UTF-8 text file")
        return None


def _last_line(text: str) -> int:
    return max(1, text.count("\n") + (0 if text.endswith("\n") else 1))


def _line_of(mark: Any) -> int:
    return mark.line + 1 if mark is not None else 1


def _scan_bounds(text: str, name: str, problems: _Problems) -> bool:
    """Nesting and alias counts from the event stream (no tree built yet)."""
    depth = aliases = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                problems.add((name, _line_of(event.start_mark)),
                             f"nested deeper than {MAX_DEPTH} levels")
                return False
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
        elif isinstance(event, yaml.AliasEvent):
            aliases += 1
            if aliases > MAX_ALIASES:
                problems.add((name, _line_of(event.start_mark)),
                             f"more than {MAX_ALIASES} YAML aliases (*name)")
                return False
    return True


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """Nodes the tree has once aliases are expanded (shared nodes counted each time)."""
    key = id(node)
    if key in memo:
        return memo[key]
    memo[key] = MAX_NODES + 1  # a node that contains itself expands without end
    size = 1
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            size += _expanded_size(k, memo) + _expanded_size(v, memo)
            if size > MAX_NODES:
                break
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            size += _expanded_size(item, memo)
            if size > MAX_NODES:
                break
    memo[key] = min(size, MAX_NODES + 1)
    return memo[key]


def compose_bounded(text: str, name: str, problems: _Problems) -> yaml.Node | None:
    """YAML text composed into nodes within the bounds above; None after a problem."""
    try:
        if not _scan_bounds(text, name, problems):
            return None
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = min(mark.line + 1, _last_line(text)) if mark else 1
        problems.add((name, line), f"YAML: {exc.problem or exc.context}")
        return None
    except yaml.YAMLError as exc:
        problems.add((name, 1), f"YAML: {exc}")
        return None
    except RecursionError:  # not reached within MAX_DEPTH; kept as a last guard
        problems.add((name, 1), "nested too deeply")
        return None
    if node is not None and _expanded_size(node, {}) > MAX_NODES:
        problems.add((name, node.start_mark.line + 1),
                     f"more than {MAX_NODES} values once YAML aliases are expanded "
                     "(an alias bomb?)")
        return None
    return node


def _to_python(
    node: yaml.Node, name: str, path: PathKey, origins: dict[PathKey, Origin], problems: _Problems
) -> Any:
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                problems.add((name, line), "keys must be plain scalars")
                continue
            key = str(key_node.value)
            if key in out:
                problems.add((name, line), f"{'.'.join((*path, key))}: duplicate key")
                continue
            origins[(*path, key)] = (name, line)
            out[key] = _to_python(value_node, name, (*path, key), origins, problems)
        return out
    if isinstance(node, yaml.SequenceNode):
        items = []
        for i, item in enumerate(node.value):
            origins[(*path, str(i))] = (name, item.start_mark.line + 1)
            items.append(_to_python(item, name, (*path, str(i)), origins, problems))
        return items
    constructor = yaml.SafeLoader("")
    try:
        value = constructor.construct_object(node, deep=True)
    except yaml.YAMLError as exc:
        problems.add((name, node.start_mark.line + 1), f"YAML: {exc}")
        return None
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, datetime.date):  # an unquoted 2026-12-05: the text as written
        return str(node.value)
    # !!binary and the like: not JSON, and everything after parsing is JSON (before,
    # the service answered a policy with `!!binary` 500 and `policy check` a traceback)
    problems.add((name, node.start_mark.line + 1),
                 f"{'.'.join(path) or 'the document'}: a {type(value).__name__} value "
                 "is not a policy value (quote it)")
    return None


def _merge(
    base: dict[str, Any],
    base_origins: dict[PathKey, Origin],
    child: dict[str, Any],
    child_origins: dict[PathKey, Origin],
    path: PathKey = (),
) -> None:
    """Merge `child` into `base` in place: mappings merge key by key, anything else replaces."""
    for key, value in child.items():
        sub = (*path, key)
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base_origins[sub] = child_origins.get(sub, base_origins.get(sub, ("?", 1)))
            _merge(base[key], base_origins, value, child_origins, sub)
        else:
            for k in [k for k in base_origins if k[: len(sub)] == sub]:
                del base_origins[k]
            base[key] = value
            for k, v in child_origins.items():
                if k[: len(sub)] == sub:
                    base_origins[k] = v


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _resolve_source(ref: str, relative_to: Path | None) -> Path | None:
    """A preset name, or a file path (relative to the file that names it)."""
    if is_preset_ref(ref):
        candidate = presets_dir() / f"{ref}.yaml"
        return candidate if candidate.is_file() else None
    path = Path(ref).expanduser()
    if not path.is_absolute() and relative_to is not None:
        path = relative_to / path
    return path if path.is_file() else None


def _load_raw(
    path: Path, problems: _Problems, chain: list[Path], presets: list[str] | None = None
) -> tuple[dict[str, Any], dict[PathKey, Origin]] | None:
    name = _display(path)
    if len(chain) > MAX_EXTENDS:
        problems.add((name, 1), f"extends: a chain longer than {MAX_EXTENDS} files")
        return None
    try:
        with path.open("rb") as f:
            data = f.read(MAX_POLICY_BYTES + 1)
    except OSError as exc:
        problems.add((name, 1), f"cannot read: {exc.strerror}")
        return None
    text = decode_policy_bytes(data, name, problems)
    if text is None:
        return None
    node = compose_bounded(text, name, problems)
    if node is None:
        return {}, {}
    origins: dict[PathKey, Origin] = {}
    data = _to_python(node, name, (), origins, problems)
    if not isinstance(data, dict):
        problems.add((name, node.start_mark.line + 1), "a policy must be a mapping of sections")
        return None
    ref = data.get("extends")
    if ref is None:
        return data, origins
    origin = origins.get(("extends",), (name, 1))
    # A broken `extends` is reported, and the file's own keys are still checked on
    # their own, so one pass shows every problem.
    if not isinstance(ref, str) or not ref:
        problems.add(origin, "extends: must be a preset name or a relative file path")
        return data, origins
    parent_path = _resolve_source(ref, path.parent)
    if parent_path is None:
        problems.add(
            origin,
            f"extends: no preset or file named {ref!r} (presets: {', '.join(preset_names())})",
        )
        return data, origins
    if parent_path.resolve() in chain:
        problems.add(origin, f"extends: {ref!r} makes a cycle")
        return data, origins
    if presets is not None and is_preset_ref(ref):
        presets.append(ref)
    parent = _load_raw(parent_path, problems, [*chain, parent_path.resolve()], presets)
    if parent is None:
        return data, origins
    merged, merged_origins = parent
    _merge(merged, merged_origins, data, origins)
    return merged, merged_origins


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    current: Any = model
    for part in loc:
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return []
        annotation = fields[part].annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        current = next(
            (c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None
        )
        if current is None:
            return []
    return list(getattr(current, "model_fields", {}))


def error_message(err: Any) -> str:
    """One pydantic error as `key: message`, in the words of a policy file."""
    return _message(err)


def _message(err: Any) -> str:
    loc = tuple(str(p) for p in err["loc"])
    where = ".".join(loc)
    if err["type"] == "extra_forbidden":
        allowed = _allowed_keys(Policy, tuple(err["loc"][:-1]))
        near = difflib.get_close_matches(loc[-1], allowed, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        return f"{where}: unknown key{hint}; allowed: {', '.join(allowed)}"
    msg = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] in ("literal_error", "enum"):
        expected = (err.get("ctx") or {}).get("expected")
        if expected:
            msg = f"{err.get('input')!r} is not one of {expected}"
    if err["type"] == "missing":
        return f"{where}: required key is missing"
    return f"{where}: {msg}" if where else msg


def _origin_for(loc: tuple[Any, ...], origins: dict[PathKey, Origin], top: str) -> Origin:
    key = tuple(str(p) for p in loc)
    while key:
        if key in origins:
            return origins[key]
        key = key[:-1]
    return (top, 1)


def validate_data(
    data: dict[str, Any], origins: dict[PathKey, Origin], top: str, problems: _Problems
) -> Policy | None:
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors():
            problems.add(_origin_for(tuple(err["loc"]), origins, top), _message(err))
    return None


def load_policy(ref: str | os.PathLike[str] | None = None) -> LoadedPolicy:
    """Load a policy by preset name or file; raise PolicyError listing every problem."""
    ref = str(ref) if ref is not None else "default"
    path = _resolve_source(ref, Path.cwd())
    if path is None:
        raise PolicyError(
            [f"{ref}:1: no preset or file named {ref!r} (presets: {', '.join(preset_names())})"]
        )
    problems = _Problems()
    presets: list[str] = []
    raw = _load_raw(path, problems, [path.resolve()], presets)
    policy = None
    if raw is not None:
        data, origins = raw
        policy = validate_data(data, origins, _display(path), problems)
    if problems.items or policy is None:
        raise PolicyError(problems.items or [f"{_display(path)}:1: invalid policy"])
    preset = ref if is_preset_ref(ref) else (presets[0] if presets else None)
    return LoadedPolicy(policy=policy, files=[_display(path)], origins=raw[1] if raw else {},
                        preset=preset)


def widening_note(loaded: LoadedPolicy, w: Widening) -> str:
    file, line = loaded.origin(w.key)
    return f"{file}:{line}: widened above the preset {loaded.preset}: {w}"


def check_files(paths: list[str], notes: list[str] | None = None) -> list[str]:
    """Every problem in every file, for `airlock policy check`; what each file widens
    above the preset it extends goes to `notes` (recorded as `policy.widened` at run time)."""
    problems: list[str] = []
    for p in paths:
        ref = p
        if "/" not in p and not p.endswith((".yaml", ".yml")):
            # A bare name is a file in this directory if there is one, else a preset
            # (`airlock policy check strict`).
            ref = f"./{p}" if Path(p).exists() or _resolve_source(p, None) is None else p
        try:
            loaded = load_policy(ref)
        except PolicyError as exc:
            problems.extend(exc.problems)
            continue
        if notes is not None:
            notes.extend(widening_note(loaded, w) for w in over_preset(loaded.preset, loaded.policy))
    return problems


def policy_from_dict(data: dict[str, Any], *, name: str = "<python>") -> Policy:
    """Build a policy from a mapping (the Python API), with `extends:` resolved."""
    data = json.loads(json.dumps(data))
    problems = _Problems()
    origins: dict[PathKey, Origin] = {}
    ref = data.get("extends")
    if ref:
        parent_path = _resolve_source(str(ref), Path.cwd())
        if parent_path is None:
            raise PolicyError([f"{name}:1: extends: no preset or file named {ref!r}"])
        raw = _load_raw(parent_path, problems, [parent_path.resolve()])
        if raw is None:
            raise PolicyError(problems.items)
        merged, origins = raw
        _merge(merged, origins, data, {})
        data = merged
    policy = validate_data(data, origins, name, problems)
    if policy is None:
        raise PolicyError(problems.items)
    return policy


def parse_yaml(text: str, name: str) -> tuple[Any, dict[PathKey, Origin], list[str]]:
    """One YAML document as plain data, with each key's `(file, line)`, and its problems.

    The same bounded loading as policies (the service's config and the policies runs
    send as YAML text use it), so a limit added here protects all of them.
    """
    problems = _Problems()
    node = compose_bounded(text, name, problems)
    origins: dict[PathKey, Origin] = {}
    data = None if node is None else _to_python(node, name, (), origins, problems)
    return data, origins, problems.items


def merge_onto(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """`overlay` applied on top of `base` as `extends:` does: mappings key by key."""
    merged = json.loads(json.dumps(base))
    _merge(merged, {}, json.loads(json.dumps(overlay)), {})
    return merged
