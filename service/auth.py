"""Bearer-token authentication shared by the REST and gRPC fronts. The token is never logged or echoed."""

from __future__ import annotations

import hmac
import os
from pathlib import Path

TOKEN_ENV = "PRSMED_API_TOKEN"


def load_token(token_file: str | Path | None = None) -> str | None:
    """The API token from ``--token-file`` (first line) or ``$PRSMED_API_TOKEN``; None leaves the API open."""
    if token_file is not None:
        text = Path(token_file).read_text().strip().splitlines()
        token = text[0].strip() if text else ""
        if not token:
            raise ValueError(f"token file {token_file} is empty")
        return token
    token = os.environ.get(TOKEN_ENV, "").strip()
    return token or None


def bearer_ok(authorization: str | None, token: str | None) -> bool:
    """True when no token is configured, or ``authorization`` is ``Bearer <token>`` (compared in constant time)."""
    if token is None:
        return True
    if not authorization:
        return False
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.strip().encode(), token.encode())


def token_matches(candidate: str | None, token: str | None) -> bool:
    """A password typed into the demo's login against the token, in constant time."""
    if token is None:
        return True
    return bool(candidate) and hmac.compare_digest(candidate.strip().encode(), token.encode())
