"""``/metrics``: request counts and durations labelled by route template, in Prometheus' text format.

BentoML's own traffic metrics label each request with its raw path, so every job id and every hashed demo asset
becomes a new series, and a server that runs for weeks grows its metrics without bound. The service turns those
off (``metrics={"enabled": False}``) and counts here instead, with a label set that is fixed by the routes:
``/v1/jobs/{job_id}``, ``/ui/{path}``, and ``unmatched`` for any path no route serves.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

METRICS_PATH = "/metrics"
# Paths served as they are: BentoML's system routes, the BentoML API and the landing page.
FIXED_ROUTES = ("/", "/livez", "/readyz", "/healthz", METRICS_PATH, "/docs.json", "/schema.json", "/v1/predict")
# Folders whose files are one route each: the demo (Gradio's pages, assets and uploads) and the API reference's
# static files.
PREFIX_ROUTES = {"/ui": "/ui/{path}", "/static_content": "/static_content/{file}"}
UNMATCHED = "unmatched"


def route_templates(mounts: dict[str, Iterable]) -> Callable[[str], str]:
    """A function from a request path to its route template. ``mounts`` maps a mount prefix ("/v1") to the routes
    of the app mounted there (Starlette routes with ``path`` and ``path_regex``), tried in order."""
    compiled = [(prefix, [(route.path_regex, prefix + route.path) for route in routes if hasattr(route, "path_regex")])
                for prefix, routes in mounts.items()]

    def template(path: str) -> str:
        if path in FIXED_ROUTES:
            return path
        for prefix, name in PREFIX_ROUTES.items():
            if path == prefix or path.startswith(prefix + "/"):
                return name
        for prefix, routes in compiled:
            if path.startswith(prefix + "/"):
                rest = path[len(prefix):]
                for regex, name in routes:
                    if regex.match(rest):
                        return name
        return UNMATCHED

    return template


def _method(method: str) -> str:
    # Any string is a valid HTTP method token; only the usual ones become label values.
    return method if re.fullmatch(r"GET|HEAD|POST|PUT|PATCH|DELETE|OPTIONS", method) else "other"


class MetricsMiddleware:
    """Counts every HTTP request by method, route template and status, times it, and answers ``GET /metrics``."""

    def __init__(self, app, route_of: Callable[[str], str], namespace: str = "prsmed") -> None:
        self.app = app
        self.route_of = route_of
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("http_requests", "HTTP requests answered", ["method", "route", "status"],
                                namespace=namespace, registry=self.registry)
        self.duration = Histogram("http_request_duration_seconds", "Time from request to the end of the answer",
                                  ["method", "route"], namespace=namespace, registry=self.registry,
                                  buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if path == METRICS_PATH and scope.get("method") in ("GET", "HEAD"):
            return await self._expose(send)
        route, method = self.route_of(path), _method(scope.get("method", ""))
        started = time.perf_counter()
        status = 500  # what a client sees when the app fails before it answers

        async def counted(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counted)
        finally:
            self.requests.labels(method, route, str(status)).inc()
            self.duration.labels(method, route).observe(time.perf_counter() - started)

    async def _expose(self, send) -> None:
        body = generate_latest(self.registry)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", CONTENT_TYPE_LATEST.encode()),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
