"""The host's own addresses (not loopback): what a sandbox must never reach."""

from __future__ import annotations

import ipaddress
import itertools
from pathlib import Path


def host_addresses() -> list[str]:
    out: set[str] = set()
    try:
        lines = Path("/proc/net/fib_trie").read_text().splitlines()
        for prev, line in itertools.pairwise(lines):
            if "/32 host LOCAL" in line:
                addr = prev.strip().split()[-1]
                if not ipaddress.ip_address(addr).is_loopback:
                    out.add(addr)
    except (OSError, ValueError):
        pass
    try:
        for line in Path("/proc/net/if_inet6").read_text().splitlines():
            raw, *_rest, dev = line.split()
            ip6 = ipaddress.ip_address(":".join(raw[i:i + 4] for i in range(0, 32, 4)))
            if not ip6.is_loopback and not ip6.is_link_local and dev != "lo":
                out.add(str(ip6))
    except (OSError, ValueError):
        pass
    return sorted(out)
