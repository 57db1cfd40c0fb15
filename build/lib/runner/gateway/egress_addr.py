"""Which addresses the egress proxy may connect to, and how IP literals are recognised.

The proxy resolves names itself and judges every resolved address here before it opens
a connection, so a name that points at the host's loopback, a private network or a cloud
metadata service (DNS rebinding, a hostile resolver) never gets through. Only a CIDR the
policy lists in `allow_private` opens such a range, and a metadata endpoint only when it
is listed exactly: a broad `169.254.0.0/16` must not hand out cloud credentials by accident.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Instance-metadata and host-platform endpoints: they hand out credentials or control
# the VM. 168.63.129.16 (Azure WireServer) is a *public* address, so the generic
# "non-global" test alone would let it through.
METADATA_ADDRESSES: frozenset[IPAddress] = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure IMDS, OpenStack, DigitalOcean, Oracle
        "169.254.170.2",  # AWS ECS task credentials
        "169.254.169.123",  # AWS time sync
        "169.254.0.23",  # Tencent Cloud
        "100.100.100.200",  # Alibaba Cloud
        "168.63.129.16",  # Azure WireServer
        "192.0.0.192",  # Oracle Cloud (legacy)
        "fd00:ec2::254",  # AWS IMDS over IPv6
        "fd00:ec2::23",  # AWS time sync over IPv6
    )
)

_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_BROADCAST = ipaddress.ip_address("255.255.255.255")

# One inet_aton(3) component: decimal, octal (leading 0) or hex (0x). getaddrinfo and
# most URL parsers accept these, so "2130706433" or "0x7f.1" mean 127.0.0.1.
_ATON_PART = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$")


def parse_cidrs(entries: Iterable[str]) -> list[IPNetwork]:
    """The policy's allow_private list; a typo fails loudly instead of opening nothing."""
    out: list[IPNetwork] = []
    for entry in entries:
        try:
            out.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError as exc:
            raise ValueError(f"network.allow_private: {entry!r} is not a CIDR") from exc
    return out


def _aton_part(text: str) -> int | None:
    if not _ATON_PART.match(text):
        return None
    if text.startswith("0x"):
        return int(text[2:] or "0", 16)
    if len(text) > 1 and text.startswith("0"):
        return int(text, 8) if re.fullmatch(r"[0-7]+", text) else None
    return int(text)


def _parse_inet_aton(host: str) -> ipaddress.IPv4Address | None:
    """IPv4 in any form inet_aton accepts: a, a.b, a.b.c, a.b.c.d; each part any base."""
    parts = host.split(".")
    if not 1 <= len(parts) <= 4:
        return None
    values = [_aton_part(p) for p in parts]
    if any(v is None for v in values):
        return None
    nums = [v for v in values if v is not None]
    # The last part fills all remaining bytes; the others are one byte each.
    head, last = nums[:-1], nums[-1]
    if any(v > 255 for v in head) or last >= 1 << (8 * (4 - len(head))):
        return None
    value = 0
    for v in head:
        value = value << 8 | v
    value = value << (8 * (4 - len(head))) | last
    return ipaddress.IPv4Address(value)


def parse_ip_literal(host: str) -> IPAddress | None:
    """The address a host string denotes by itself (without DNS), or None for a name.

    Covers dotted IPv4, inet_aton forms, IPv6 with or without brackets (mapped and
    compatible forms included) and a trailing dot.
    """
    text = host.strip().lower().removesuffix(".")
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if ":" in text:
        try:
            return ipaddress.IPv6Address(text)
        except ValueError:
            return None
    return _parse_inet_aton(text)


def looks_numeric(host: str) -> bool:
    """True for a host whose last label is a number: an IP literal in some encoding.

    No top-level domain is numeric (RFC 3696 section 2), so such a string is either an
    address or an attempt to smuggle one past a parser; refuse it even when it is too
    odd to decode (e.g. 1.2.3.4.5 or 0x1ffffffff).
    """
    text = host.strip().lower().removesuffix(".")
    if ":" in text or text.startswith("["):
        return True
    last = text.rsplit(".", 1)[-1]
    return bool(_ATON_PART.match(last))


def unwrap(address: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address (::ffff:a.b.c.d) is the IPv4 address it carries."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _non_public_v4(address: ipaddress.IPv4Address) -> str | None:
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local"
    if address in _CGNAT:
        return "cgnat"
    if address.is_private:
        return "private"
    if address.is_reserved:
        return "reserved"
    if not address.is_global:
        return "non-global"
    return None


def _non_public_v6(address: ipaddress.IPv6Address) -> str | None:
    # Prefixes that embed an IPv4 address are judged by the address they lead to.
    if address in _NAT64:
        embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        inner = _non_public_v4(embedded)
        return f"nat64-{inner}" if inner else None
    if address.sixtofour is not None and _non_public_v4(address.sixtofour):
        return f"6to4-{_non_public_v4(address.sixtofour)}"
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local"
    if address.is_site_local:
        return "site-local"
    if address.is_private:
        return "private"
    if address.is_reserved:
        return "reserved"
    if not address.is_global:
        return "non-global"
    return None


def non_public_reason(address: IPAddress) -> str | None:
    """Why an address is not a public unicast one, or None when it is."""
    address = unwrap(address)
    if address.is_unspecified:
        return "unspecified"
    if address.is_multicast:
        return "multicast"
    if address == _BROADCAST:
        return "broadcast"
    if address in METADATA_ADDRESSES:
        return "metadata"
    if isinstance(address, ipaddress.IPv4Address):
        return _non_public_v4(address)
    return _non_public_v6(address)


def _covered(address: IPAddress, nets: Sequence[IPNetwork]) -> bool:
    return any(address.version == n.version and address in n for n in nets)


def _listed_exactly(address: IPAddress, nets: Sequence[IPNetwork]) -> bool:
    return any(
        address.version == n.version and n.prefixlen == n.max_prefixlen and address in n
        for n in nets
    )


def refusal_reason(
    address: IPAddress, allow_private: Sequence[IPNetwork], *, explicit_only: bool = False
) -> str | None:
    """Why the proxy must not connect to `address`, or None when it may.

    explicit_only: the address came from an IP literal, which passes only when the
    policy's allow_private covers it (public or not).
    """
    address = unwrap(address)
    reason = non_public_reason(address)
    # Never a TCP destination: no CIDR can make these meaningful.
    if reason in ("unspecified", "multicast", "broadcast"):
        return reason
    if reason == "metadata":
        return None if _listed_exactly(address, allow_private) else reason
    if _covered(address, allow_private):
        return None
    if explicit_only:
        return reason or "not-in-allow-private"
    return reason
