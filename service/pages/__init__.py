"""The service's own landing page at ``/``: the API reference drawn by the Swagger UI files BentoML ships, from
this server alone. BentoML's page at ``/`` loads Google Tag Manager, a third-party tracker that a service on a
hospital network must not call, and that breaks the page offline."""

from __future__ import annotations

from pathlib import Path

INDEX = Path(__file__).with_name("index.html")


class LandingPageMiddleware:
    """Answers ``GET /`` (and ``HEAD /``) with this project's page; every other request passes through."""

    def __init__(self, app) -> None:
        self.app = app
        self.body = INDEX.read_bytes()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") != "/" or scope.get("method") not in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/html; charset=utf-8"),
                                (b"content-length", str(len(self.body)).encode()),
                                (b"cache-control", b"no-cache")]})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else self.body})
