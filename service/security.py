"""Optional API keys with two scopes: `read` (classify, list) and `admin` (change caches).

Keys come from KVCLIP_API_KEYS ("KEY:SCOPE[+SCOPE],KEY2:SCOPE") and/or a file with one
"KEY SCOPE[,SCOPE]" per line (# comments allowed). `admin` implies `read`. With no keys
configured the server is open, which `kvclip serve` says loudly at start.
Clients send `Authorization: Bearer KEY` or `X-API-Key: KEY`.
"""
from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path

from kvclip.errors import KvclipError

SCOPES = ("read", "admin")
ENV_VAR = "KVCLIP_API_KEYS"


class AuthError(Exception):
    """A request the API keys refuse."""


class Unauthorized(AuthError):
    """No key, or an unknown one (401)."""


class Forbidden(AuthError):
    """A valid key without the scope (403)."""


@dataclass(frozen=True)
class ApiKeys:
    # sha256(key) -> scopes; only digests are kept, compared in constant time.
    digests: dict[bytes, frozenset[str]]

    @property
    def enabled(self) -> bool:
        return bool(self.digests)

    @classmethod
    def load(cls, env_value: str | None = None, path: Path | None = None) -> ApiKeys:
        pairs: list[tuple[str, str]] = []
        for entry in (env_value or "").split(","):
            if entry.strip():
                key, _, scopes = entry.strip().partition(":")
                pairs.append((key, scopes.replace("+", ",")))
        if path is not None:
            try:
                lines = Path(path).read_text().splitlines()
            except OSError as exc:
                raise KvclipError(f"cannot read API keys file {path}: {exc.strerror or exc}") from exc
            for line in lines:
                line = line.split("#", 1)[0].strip()
                if line:
                    key, *scopes = line.split(None, 1)  # spaces or tabs
                    pairs.append((key, scopes[0] if scopes else ""))
        digests: dict[bytes, frozenset[str]] = {}
        for key, scopes in pairs:
            names = frozenset(s.strip() for s in scopes.split(",") if s.strip()) or frozenset({"read"})
            unknown = names - set(SCOPES)
            if not key or unknown:
                raise KvclipError(
                    f"bad API key entry (scopes {sorted(names)}): expected KEY:read or KEY:admin"
                )
            if "admin" in names:
                names = names | {"read"}
            digests[_digest(key)] = digests.get(_digest(key), frozenset()) | names
        return cls(digests)

    def check(self, authorization: str | None, x_api_key: str | None, scope: str) -> None:
        """Raise Unauthorized without a valid key, Forbidden without the scope."""
        if scope not in self.scopes(authorization, x_api_key):
            raise Forbidden(f"the API key lacks the '{scope}' scope")

    def scopes(self, authorization: str | None, x_api_key: str | None) -> frozenset[str]:
        """The scopes of the request's key (every scope when no keys are configured);
        Unauthorized without a valid key."""
        if not self.enabled:
            return frozenset(SCOPES)
        key = x_api_key
        if authorization:
            kind, _, value = authorization.partition(" ")
            if kind.lower() == "bearer" and value.strip():
                key = value.strip()
        if not key:
            raise Unauthorized("an API key is required: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'")
        scopes = self._scopes(key)
        if scopes is None:
            raise Unauthorized("the API key is not valid")
        return scopes

    def _scopes(self, key: str) -> frozenset[str] | None:
        digest = _digest(key)
        found = None
        for known, scopes in self.digests.items():
            if hmac.compare_digest(known, digest):
                found = scopes
        return found


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()
