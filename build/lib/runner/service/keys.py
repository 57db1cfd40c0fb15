"""Tenant and operator keys: made here, stored nowhere, checked in constant time.

The config holds only each key's SHA-256. A presented key is hashed and compared with
every configured digest by `hmac.compare_digest`, all of them each time, so neither the
answer's timing nor its content tells a caller how close a guess came, or whose it was.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping

KEY_PREFIX = "alk_"


def new_key() -> str:
    """A fresh random key: 32 random bytes, hex, with a prefix that secret scanners can match."""
    return KEY_PREFIX + secrets.token_hex(32)


def key_sha256(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", errors="surrogateescape")).hexdigest()


def match_key(presented: str | None, digests: Mapping[str, str]) -> str | None:
    """The name whose digest the presented key hashes to, or None."""
    if not presented:
        return None
    digest = key_sha256(presented).encode()
    found = None
    for name, expected in digests.items():
        if hmac.compare_digest(digest, expected.encode()) and found is None:
            found = name
    return found


def bearer(header: str | None) -> str | None:
    """The key of an `Authorization: Bearer <key>` header, or None."""
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    value = value.strip()
    return value or None
