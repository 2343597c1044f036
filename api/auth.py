"""API keys: with ``FLOW_COMPRESS_API_KEYS`` set, every /v1 route needs one.

A key is sent as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>`` (both at once only
if they are the same key). Each key is its own
owner: jobs are stored under a digest of the key (never the key itself), and a key sees only
its own jobs. Without configured keys every caller is the one ``public`` owner.
"""

from __future__ import annotations

import hashlib
import hmac

from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from api.errors import ApiError

PUBLIC_OWNER = "public"

bearer_scheme = HTTPBearer(auto_error=False, description="API key as a bearer token.")
header_scheme = APIKeyHeader(name="X-API-Key", auto_error=False, description="API key header.")


def owner_for_key(key: str) -> str:
    """A stable, non-reversible owner id for a key (what the job store records)."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:24]


def authenticate(
    keys: list[str],
    bearer: HTTPAuthorizationCredentials | None,
    header_key: str | None,
    authorization: str | None,
) -> str:
    """The caller's owner id, or 401 ``unauthorized`` when ``keys`` are configured and the
    credentials presented (the bearer token, the X-API-Key header and the raw Authorization
    header) do not name exactly one of them."""
    if not keys:
        return PUBLIC_OWNER
    presented = {k for k in (header_key, bearer.credentials if bearer else None) if k}
    # An Authorization header that is not a bearer token (HTTPBearer then reports nothing) is
    # a credential too, and an invalid one.
    if authorization is not None and bearer is None:
        presented.add(f"\0invalid:{authorization}")
    # Two different credentials are ambiguous: refuse rather than pick the valid one, so a
    # bad key is never masked by a good one sent alongside it.
    if len(presented) == 1:
        key = presented.pop()
        # Compare against every key in constant time so timing does not reveal a prefix.
        matches = [hmac.compare_digest(key.encode(), k.encode()) for k in keys]
        if any(matches):
            return owner_for_key(key)
    raise ApiError(
        "unauthorized",
        "a valid API key is required (Authorization: Bearer <key> or X-API-Key: <key>)",
        headers={"WWW-Authenticate": "Bearer"},
    )
