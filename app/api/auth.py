"""API keys and their scopes, all sent as ``X-API-Key``.

- ``admin`` (``SKQK_API_KEY``, always set): retrain, activate, sample admin, and every other
  scope too;
- ``ingest`` (``SKQK_INGEST_API_KEY``, or read from ``SKQK_INGEST_API_KEY_FILE``):
  ``POST /ingest``; unset, ``/ingest`` is open;
- ``predict`` (``SKQK_PREDICT_API_KEY``, or read from ``SKQK_PREDICT_API_KEY_FILE``):
  ``POST /predict`` and v2 infer; unset, they are open (and the fast path checks nothing).

401 when the header is missing or matches no key, 403 when the key is known but lacks the
scope. A key is compared with every configured key in constant time
(``secrets.compare_digest``, no early exit), so timing tells nothing about which matched.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Literal

from app.api.errors import ApiError
from app.settings import Settings

Scope = Literal["admin", "ingest", "predict"]
SCOPES: tuple[Scope, ...] = ("admin", "ingest", "predict")
HEADER = "X-API-Key"
_CHALLENGE = {"WWW-Authenticate": "ApiKey"}


@dataclass(frozen=True)
class ApiKeys:
    """The configured keys as bytes (``None``: that scope is open)."""

    admin: bytes
    ingest: bytes | None = None
    predict: bytes | None = None

    def enforced(self, scope: Scope) -> bool:
        return getattr(self, scope) is not None

    def granted(self, provided: bytes) -> set[Scope]:
        """The scopes ``provided`` grants (admin: all of them)."""
        matched: set[Scope] = set()
        for scope in SCOPES:  # every key is compared: no early exit
            key = getattr(self, scope)
            if key is not None and secrets.compare_digest(provided, key):
                matched.add(scope)
        return set(SCOPES) if "admin" in matched else matched

    def check(self, scope: Scope, provided: bytes | None) -> None:
        """ApiError 401/403 unless ``provided`` (the raw header value) grants ``scope``."""
        if not self.enforced(scope):
            return
        if provided is None:
            raise ApiError(401, f"missing {HEADER} header ({scope} endpoint: {_who(scope)})", _CHALLENGE)
        granted = self.granted(provided)
        if not granted:
            raise ApiError(401, f"invalid {HEADER}", _CHALLENGE)
        if scope not in granted:
            have = ", ".join(sorted(granted))
            raise ApiError(403, f"this {HEADER} grants {have}, not {scope} ({scope} endpoint: {_who(scope)})")


def _who(scope: Scope) -> str:
    return "the admin key" if scope == "admin" else f"the {scope} key or the admin key"


def resolve_keys(settings: Settings, admin_key: str) -> ApiKeys:
    """The keys of a serving process (``*_FILE`` settings are read into the keys by Settings)."""
    return ApiKeys(admin=admin_key.encode(),
                   ingest=settings.ingest_api_key.encode() if settings.ingest_api_key else None,
                   predict=settings.predict_api_key.encode() if settings.predict_api_key else None)
