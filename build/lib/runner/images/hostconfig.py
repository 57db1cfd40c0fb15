"""What the host's own package tools are configured with: the apt mirror and a custom CA.

Airlock never names a registry or mirror itself: the base image is bootstrapped from
the mirror the host's apt configuration names, and builds trust the CA bundle the
host's package tools were told to trust (corporate TLS-intercepting proxies need it).
"""

from __future__ import annotations

import configparser
import os
import re
from pathlib import Path

APT_DIR = Path("/etc/apt")
SYSTEM_BUNDLES = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt")


def _deb822_entries(text: str) -> list[dict[str, str]]:
    entries: list[dict[str, str]] = []
    current: dict[str, str] = {}
    key: str | None = None
    for raw in text.splitlines():
        if raw.startswith("#"):
            continue
        if not raw.strip():
            if current:
                entries.append(current)
            current, key = {}, None
            continue
        if raw[0] in " \t" and key:
            current[key] += " " + raw.strip()
            continue
        if ":" in raw:
            key, value = raw.split(":", 1)
            key = key.strip().lower()
            current[key] = value.strip()
    if current:
        entries.append(current)
    return entries


def apt_sources(apt_dir: Path = APT_DIR) -> list[tuple[str, list[str], list[str]]]:
    """(uri, suites, components) for every enabled `deb` source of the host."""
    out: list[tuple[str, list[str], list[str]]] = []
    legacy = [apt_dir / "sources.list", *sorted((apt_dir / "sources.list.d").glob("*.list"))]
    for path in legacy:
        if not path.is_file():
            continue
        for line in path.read_text(errors="replace").splitlines():
            line = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()  # type: ignore[assignment]
            if len(line) >= 3 and line[0] == "deb":
                out.append((line[1], [line[2]], list(line[3:])))
    for path in sorted((apt_dir / "sources.list.d").glob("*.sources")):
        for e in _deb822_entries(path.read_text(errors="replace")):
            if "deb" not in e.get("types", "").split() or e.get("enabled", "yes") == "no":
                continue
            for uri in e.get("uris", "").split():
                out.append((uri, e.get("suites", "").split(), e.get("components", "").split()))
    return out


def debian_mirror(suite: str = "bookworm") -> str | None:
    """The host's mirror for the main Debian archive of `suite` (not security/updates)."""
    for uri, suites, components in apt_sources():
        if suite in suites and "main" in components and "security" not in uri:
            return uri.rstrip("/")
    return None


def _pip_cert() -> str | None:
    if os.environ.get("PIP_CERT"):
        return os.environ["PIP_CERT"]
    files = [Path("/etc/pip.conf"), Path("/etc/xdg/pip/pip.conf"),
             Path.home() / ".config/pip/pip.conf", Path.home() / ".pip/pip.conf"]
    if os.environ.get("PIP_CONFIG_FILE"):
        files.append(Path(os.environ["PIP_CONFIG_FILE"]))
    cert = None
    for f in files:
        if f.is_file():
            cp = configparser.ConfigParser()
            try:
                cp.read(f)
            except configparser.Error:
                continue
            cert = cp.get("global", "cert", fallback=cert)
    return cert


def _apt_cainfo(apt_dir: Path = APT_DIR) -> str | None:
    pattern = re.compile(r'Acquire::https(?:::[^:]+)?::CaInfo\s+"([^"]+)"', re.IGNORECASE)
    for path in sorted((apt_dir / "apt.conf.d").glob("*")):
        try:
            m = pattern.search(path.read_text(errors="replace"))
        except OSError:
            continue
        if m:
            return m.group(1)
    return None


def custom_ca_bundle() -> Path | None:
    """The CA bundle the host's package tools were configured with, if any.

    pip's `cert`, apt's CaInfo, npm's cafile and the usual TLS variables name it. The
    first that names an existing file wins: on a host behind an intercepting proxy this
    bundle holds the proxy's CA, and a build container needs it to verify anything.
    """
    candidates = [
        os.environ.get("AIRLOCK_CA_BUNDLE"),
        _pip_cert(),
        _apt_cainfo(),
        os.environ.get("NODE_EXTRA_CA_CERTS"),
        os.environ.get("npm_config_cafile"),  # noqa: SIM112 - npm reads the lower-case name
        os.environ.get("REQUESTS_CA_BUNDLE"),
        os.environ.get("SSL_CERT_FILE"),
    ]
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c)
    return None
