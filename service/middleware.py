"""ASGI middleware in front of every route: bearer-token auth and upload size limits."""

from __future__ import annotations

import json

from .auth import bearer_ok

OPEN_PREFIXES = ("/readyz", "/livez", "/healthz", "/metrics", "/docs.json", "/docs", "/schema.json")


async def _send_json(send, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
    payload = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})


def _header(scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", []):
        if k.lower() == name:
            return v.decode("latin-1")
    return None


class AuthMiddleware:
    """Every ``/v1`` route needs ``Authorization: Bearer <token>`` when a token is configured; health, metrics and
    API docs stay open, and ``public_predict`` opens ``POST /v1/predict`` too. ``/ui`` is guarded by the demo's own
    login (a browser cannot send the header), which checks the same token."""

    def __init__(self, app, token: str | None = None, public_predict: bool = False) -> None:
        self.app = app
        self.token = token
        self.public_predict = public_predict

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.token is None:
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        protected = path.startswith("/v1")
        if self.public_predict and path.rstrip("/") == "/v1/predict":
            protected = False
        if protected and not bearer_ok(_header(scope, b"authorization"), self.token):
            return await _send_json(
                send, 401, {"error": "unauthorized", "message": "missing or wrong bearer token: send the header "
                            "'Authorization: Bearer <token>' with the server's PRSMED_API_TOKEN"},
                {"WWW-Authenticate": "Bearer"},
            )
        return await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Refuse request bodies over a per-route limit with 413: from Content-Length before reading anything, and by
    counting when the client streams without one."""

    def __init__(self, app, limits: dict[str, int] | None = None, default: int = 16 * 2**20) -> None:
        self.app = app
        self.limits = sorted((limits or {}).items(), key=lambda kv: -len(kv[0]))
        self.default = default

    def limit_for(self, path: str) -> int:
        for prefix, limit in self.limits:
            if path.startswith(prefix):
                return limit
        return self.default

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        limit = self.limit_for(scope.get("path", ""))
        declared = _header(scope, b"content-length")
        too_large = {"error": "too_large", "message": f"the request body is over this route's limit of {limit:,} bytes"}
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await _send_json(send, 413, too_large)
        seen = 0
        forwarded = False  # a response start has reached the client
        exceeded = False

        async def counting_receive():
            nonlocal seen, exceeded
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    exceeded = True
                    raise _TooLarge()
            return message

        async def guarded_send(message):
            nonlocal forwarded
            if exceeded:  # whatever the app answers to a body cut short (often a 500) is replaced by the 413
                return
            if message["type"] == "http.response.start":
                forwarded = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not exceeded:
                raise
        if exceeded and not forwarded:
            await _send_json(send, 413, too_large)


class _TooLarge(Exception):
    pass
