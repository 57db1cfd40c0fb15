"""The policy's egress allowlist (`network.allow`) and the targets checked against it.

Entries are `host:port` or `*.domain:port`; a missing port means 443. A wildcard matches
one or more labels below the domain, never the domain itself (list the apex separately
if it is wanted). Matching is on the normalised name only: lower case, no trailing dot.
IP literals are separate rules that match only their canonical dotted form, so an
encoding trick (2130706433, 0x7f.1) never matches a listed address.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from runner.gateway.egress_addr import IPAddress, looks_numeric, parse_ip_literal

DEFAULT_PORT = 443
_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")


class TargetError(ValueError):
    """A target that is not a well-formed host:port; `reason` is the event's reason code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Target:
    host: str  # normalised name, or the literal as written (without brackets)
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class AllowRule:
    text: str  # the policy entry, for events
    host: str  # the name (the domain for a wildcard), or the literal's canonical form
    port: int
    wildcard: bool
    literal: IPAddress | None

    def matches_host(self, host: str) -> bool:
        if self.literal is not None:
            return host == self.host
        if self.wildcard:
            return host.endswith("." + self.host)
        return host == self.host


def normalise_name(host: str) -> str:
    """Lower case and without the root's trailing dot; raises TargetError if not a name."""
    name = host.lower()
    if name.endswith("."):
        name = name[:-1]
    if not name or len(name) > 253:
        raise TargetError("bad-host", "host name is empty or too long")
    if not all(_LABEL.match(label) for label in name.split(".")):
        raise TargetError("bad-host", "host is not a valid DNS name")
    return name


def parse_port(text: str) -> int:
    if not text.isdigit() or len(text) > 5 or not 0 < int(text) < 65536:
        raise TargetError("bad-target", "port must be 1-65535")
    return int(text)


def parse_authority(text: str, default_port: int) -> tuple[str, int]:
    """Split host[:port] or [v6][:port] without judging the host yet."""
    if not text or len(text) > 300 or any(c in text for c in " \t\r\n/@?#\\%"):
        raise TargetError("bad-target", "target is not host:port")
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise TargetError("bad-target", "unclosed [ in target")
        host, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise TargetError("bad-target", "junk after ] in target")
        return host, parse_port(rest[1:]) if rest else default_port
    if text.count(":") > 1:
        return text, default_port  # a bare IPv6 literal: refused as a literal later
    host, sep, port = text.partition(":")
    if not host:
        raise TargetError("bad-target", "target has no host")
    return host, parse_port(port) if sep else default_port


def parse_rule(entry: str) -> AllowRule:
    """One `network.allow` entry; raises ValueError for anything ambiguous."""
    text = entry.strip()
    wildcard = text.startswith("*.")
    try:
        host, port = parse_authority(text[2:] if wildcard else text, DEFAULT_PORT)
    except TargetError as exc:
        raise ValueError(f"network.allow: {entry!r}: {exc.detail}") from exc
    if looks_numeric(host):
        literal = parse_ip_literal(host)
        if wildcard or literal is None or str(literal) != host:
            raise ValueError(
                f"network.allow: {entry!r}: an address must be written in canonical form"
            )
        return AllowRule(text, host, port, False, literal)
    try:
        name = normalise_name(host)
    except TargetError as exc:
        raise ValueError(f"network.allow: {entry!r}: {exc.detail}") from exc
    return AllowRule(text, name, port, wildcard, None)


def parse_rules(entries: list[str]) -> list[AllowRule]:
    return [parse_rule(e) for e in entries]


def match_rule(rules: list[AllowRule], host: str, port: int) -> tuple[AllowRule | None, str]:
    """The rule that allows host:port, or None with the reason code for the refusal."""
    host_matched = False
    for rule in rules:
        if rule.matches_host(host):
            if rule.port == port:
                return rule, "allowed"
            host_matched = True
    return None, "port-not-allowed" if host_matched else "host-not-allowed"
