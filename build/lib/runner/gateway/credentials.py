"""The real credential, read on the host at gateway start and injected on the way out.

A missing credential is an error at start, never a request that goes out without one.
The key never leaves this object except as the header of an upstream request; its
current value(s) are offered to the scrubbers that keep it out of events, recordings
and responses.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

from runner.errors import NotReady
from runner.gateway.backends import BackendSpec
from runner.policy.models import ProviderPolicy

GOOGLE_SCOPE = "https://www.googleapis.com/auth/cloud-platform"


class CredentialError(NotReady):
    """The gateway cannot start: the policy's credential is not there."""


class Credential:
    """No credential (a local Ollama, a self-hosted vLLM, replay)."""

    async def headers(self) -> dict[str, str]:
        return {}

    def secrets(self) -> list[str]:
        return []

    async def aclose(self) -> None:
        return None


class StaticKey(Credential):
    def __init__(self, key: str, style: str) -> None:
        self._key = key
        self._style = style

    async def headers(self) -> dict[str, str]:
        if self._style == "x-api-key":
            return {"x-api-key": self._key}
        return {"authorization": f"Bearer {self._key}"}

    def secrets(self) -> list[str]:
        return [self._key]

    def __repr__(self) -> str:  # never print the key, even in a traceback
        return f"StaticKey(style={self._style!r})"


class GoogleToken(Credential):
    """An OAuth access token for Vertex AI, refreshed before it expires.

    Sources, in order: a service-account key file (via google-auth when installed,
    else the JWT-bearer grant signed with PyJWT), application default credentials
    (google-auth only), or a ready access token (from `gcloud auth print-access-token`).
    """

    def __init__(self, *, token: str | None = None, service_account: dict[str, Any] | None = None,
                 google_creds: Any = None) -> None:
        self._token = token
        self._expiry = float("inf") if token else 0.0
        self._sa = service_account
        self._google = google_creds
        self._lock = asyncio.Lock()
        self._old: list[str] = []

    async def headers(self) -> dict[str, str]:
        async with self._lock:
            if self._token is None or time.time() > self._expiry - 120:
                await self._refresh()
        assert self._token is not None
        return {"authorization": f"Bearer {self._token}"}

    def secrets(self) -> list[str]:
        return [t for t in [self._token, *self._old] if t]

    async def _refresh(self) -> None:
        if self._token:
            self._old = [self._token, *self._old][:3]
        if self._google is not None:
            import google.auth.transport.requests

            await asyncio.to_thread(self._google.refresh, google.auth.transport.requests.Request())
            self._token = self._google.token
            expiry = getattr(self._google, "expiry", None)
            self._expiry = expiry.timestamp() if expiry else time.time() + 1800
        elif self._sa is not None:
            self._token, self._expiry = await _jwt_bearer_grant(self._sa)
        else:
            raise CredentialError("the Vertex AI access token has expired and cannot be refreshed")

    def __repr__(self) -> str:
        return "GoogleToken()"


async def _jwt_bearer_grant(sa: dict[str, Any]) -> tuple[str, float]:
    """OAuth 2.0 JWT-bearer grant for a service account (RFC 7523), as google-auth does."""
    import jwt  # PyJWT, with cryptography for RS256

    now = int(time.time())
    token_uri = sa.get("token_uri", "https://oauth2.googleapis.com/token")
    assertion = jwt.encode(
        {"iss": sa["client_email"], "scope": GOOGLE_SCOPE, "aud": token_uri,
         "iat": now, "exp": now + 3600},
        sa["private_key"], algorithm="RS256",
        headers={"kid": sa.get("private_key_id", "")},
    )
    async with httpx.AsyncClient(timeout=30, trust_env=False) as client:
        resp = await client.post(token_uri, data={
            "grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer", "assertion": assertion})
    if resp.status_code != 200:
        raise CredentialError(f"Google token exchange failed: HTTP {resp.status_code}")
    data = resp.json()
    return str(data["access_token"]), time.time() + float(data.get("expires_in", 3600))


def _read_key_source(provider: ProviderPolicy, spec: BackendSpec,
                     environ: Mapping[str, str]) -> tuple[str | None, str]:
    """(secret text or None, a description of where it was looked for)."""
    if provider.api_key_file:
        path = Path(provider.api_key_file).expanduser()
        try:
            return path.read_text().strip() or None, f"file {path}"
        except OSError as exc:
            raise CredentialError(
                f"provider key file {path} cannot be read: {exc.strerror}",
                hint="fix provider.api_key_file in the policy") from None
    env = provider.api_key_env or spec.default_key_env
    if env:
        return (environ.get(env) or "").strip() or None, f"environment variable {env}"
    return None, "nowhere (the policy names no key)"


async def load_credential(provider: ProviderPolicy, spec: BackendSpec,
                          environ: Mapping[str, str]) -> Credential:
    if spec.auth == "none":
        return Credential()
    if spec.auth == "google":
        return await _load_google(provider, environ)
    secret, where = _read_key_source(provider, spec, environ)
    if secret is None:
        if spec.key_required or provider.api_key_env or provider.api_key_file:
            raise CredentialError(
                f"the {spec.name} provider key is missing: looked in {where}",
                hint="set the variable on the host, or name api_key_env/api_key_file "
                     "in the policy's provider section")
        return Credential()
    return StaticKey(secret, spec.auth)


async def _load_google(provider: ProviderPolicy, environ: Mapping[str, str]) -> Credential:
    if not provider.project or not provider.region:
        raise CredentialError("backend vertex needs provider.project and provider.region")
    if provider.api_key_env:
        token = (environ.get(provider.api_key_env) or "").strip()
        if not token:
            raise CredentialError(
                f"the Vertex AI access token is missing: {provider.api_key_env} is not set",
                hint="export it from `gcloud auth print-access-token`, or name a "
                     "service-account key file in provider.api_key_file")
        return GoogleToken(token=token)
    if provider.api_key_file:
        path = Path(provider.api_key_file).expanduser()
        try:
            text = path.read_text()
        except OSError as exc:
            raise CredentialError(f"Vertex AI key file {path} cannot be read: {exc.strerror}") \
                from None
        try:
            info = json.loads(text)
        except ValueError:
            info = None
        if not isinstance(info, dict):  # a file holding a ready access token
            return GoogleToken(token=text.strip())
        if info.get("type") != "service_account":
            raise CredentialError(f"{path} is not a service-account key file")
        try:
            from google.oauth2 import service_account
        except ImportError:
            cred = GoogleToken(service_account=info)
        else:
            cred = GoogleToken(google_creds=service_account.Credentials.from_service_account_info(
                info, scopes=[GOOGLE_SCOPE]))
        await cred.headers()  # fail at start, not on the agent's first request
        return cred
    try:
        import google.auth
    except ImportError:
        raise CredentialError(
            "backend vertex has no credential: name api_key_file (a service-account key) "
            "or api_key_env (an access token) in the policy, or install google-auth "
            "for application default credentials") from None
    creds, _ = google.auth.default(scopes=[GOOGLE_SCOPE])
    cred = GoogleToken(google_creds=creds)
    await cred.headers()
    return cred
