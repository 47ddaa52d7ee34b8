"""ASGI middleware in front of every route: one error envelope, header limits, bearer-token auth and upload size
limits."""

from __future__ import annotations

import json
import re

from python_multipart.multipart import MultipartParser, parse_options_header

from .auth import bearer_ok


async def _send_json(send, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
    payload = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})


async def _send_replaced(send, start: dict, body: bytes, *, content_type: bytes | None = None) -> None:
    """Send a buffered response with a new body: the original start (status, other headers) with its length, and
    its type when given, set for the new body."""
    drop = (b"content-length", b"content-type") if content_type else (b"content-length",)
    headers = [(k, v) for k, v in start.get("headers", []) if k.lower() not in drop]
    headers.append((b"content-length", str(len(body)).encode()))
    if content_type:
        headers.append((b"content-type", content_type))
    await send({**start, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _header(scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", []):
        if k.lower() == name:
            return v.decode("latin-1")
    return None


# The kind an error answer carries when the code that refused it gave none (BentoML's own refusals).
ERROR_KINDS = {400: "invalid_input", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 408: "timeout", 409: "conflict", 413: "too_large",
               415: "unsupported_media_type", 422: "invalid_input", 429: "too_many_requests", 431: "headers_too_large",
               500: "internal", 502: "bad_gateway", 503: "unavailable", 504: "timeout"}


def _plain_message(body: bytes) -> str:
    """A readable sentence from another framework's error body: FastAPI's ``{"detail": [...]}``, a pydantic
    validation dump, or text."""
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("detail"), list):
        def where(loc) -> str:
            parts = [str(x) for x in (loc or []) if str(x) not in ("body", "query", "path", "header", "form")]
            return ".".join(parts) or "request"

        return "; ".join(f"{where(d.get('loc'))}: {d.get('msg', '')}"
                         for d in doc["detail"] if isinstance(d, dict)) or "the request is not valid"
    if isinstance(doc, dict):
        for key in ("message", "detail", "error"):
            if isinstance(doc.get(key), str):
                return doc[key]
    text = body.decode("utf-8", "replace")
    # pydantic: "1 validation error for Input\nimage\n  Field required [type=missing, ...]\n    For further ..."
    fields = re.findall(r"^(\w[\w.]*)\n\s+(.+?)(?: \[type=.*)?$", text, flags=re.M)
    if "validation error" in text and fields:
        return "; ".join(f"{name}: {msg}" for name, msg in fields)
    return " ".join(text.split())[:500] or "no details"


class ErrorEnvelopeMiddleware:
    """Every 4xx and 5xx answer, on every route, is ``{"error": kind, "message": text}``: BentoML's and FastAPI's own
    refusals (a missing form field, an unknown route, a wrong method) are rewritten into it, and no message names a
    folder of the server's (``hide``: its data folder), whoever wrote it. Successful answers, streams included,
    pass through untouched."""

    def __init__(self, app, hide: tuple[str, ...] = ()) -> None:
        self.app = app
        # Longest first, so a folder inside another is hidden whole; "." or "/" would hide every dot or slash.
        self.hide = tuple(sorted((h for h in hide if len(h.strip("./")) >= 3), key=len, reverse=True))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start: dict = {}
        chunks: list[bytes] = []
        passing = False

        async def capture(message):
            nonlocal passing
            if message["type"] == "http.response.start":
                if message["status"] < 400:
                    passing = True
                    await send(message)
                else:
                    start.update(message)
            elif passing:
                await send(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if not message.get("more_body"):
                    await self._send_envelope(send, start, b"".join(chunks))

        await self.app(scope, receive, capture)

    def _public(self, text: str) -> str:
        for path in self.hide:
            text = text.replace(path, "<server data>")
        return text

    async def _send_envelope(self, send, start: dict, body: bytes) -> None:
        status = start["status"]
        try:
            doc = json.loads(body)
        except ValueError:
            doc = None
        if isinstance(doc, dict) and isinstance(doc.get("error"), str) and isinstance(doc.get("message"), str):
            doc["message"] = self._public(doc["message"])
        else:
            doc = {"error": ERROR_KINDS.get(status, "error" if status < 500 else "internal"),
                   "message": self._public(_plain_message(body))}
        await _send_replaced(send, start, json.dumps(doc).encode(), content_type=b"application/json")


class HeaderLimitMiddleware:
    """Refuse a request whose headers are too many or too large with 431, before anything reads them. uvicorn's
    HTTP/1.1 parser (h11) already refuses a request head over 16 KiB with a 400; this holds the same line for
    many small headers and for servers run with another parser."""

    def __init__(self, app, max_bytes: int = 16 * 2**10, max_count: int = 100) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_count = max_count

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = scope.get("headers", [])
            size = sum(len(k) + len(v) + 4 for k, v in headers)
            if len(headers) > self.max_count or size > self.max_bytes:
                return await _send_json(send, 431, {
                    "error": "headers_too_large",
                    "message": f"the request has {len(headers)} headers of {size:,} bytes; the limits are "
                               f"{self.max_count} headers and {self.max_bytes:,} bytes"})
        return await self.app(scope, receive, send)


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

        def count(chunk: bytes) -> None:
            nonlocal seen
            seen += len(chunk)
            if seen > limit:
                raise _Refused("too large")

        if await _run_checking_body(self.app, scope, receive, send, count):
            await _send_json(send, 413, too_large)


class _Refused(Exception):
    """Raised by a body check: the request is refused, for the reason given."""


async def _run_checking_body(app, scope, receive, send, check) -> str | None:
    """Run ``app`` with each chunk of the request body passed to ``check`` before the app sees it. When ``check``
    raises :class:`_Refused`, the app gets no more of the body and whatever it answers to a body cut short (often
    a 500) is dropped; the reason is returned, for the caller to answer with. None: the body passed (or the app had
    already started its answer, which then stands)."""
    refused: list[str] = []
    started = False

    async def checked_receive():
        message = await receive()
        if message["type"] == "http.request" and not refused:
            try:
                check(message.get("body", b""))
            except _Refused as e:
                refused.append(str(e))
                raise
        return message

    async def guarded_send(message):
        nonlocal started
        if refused:
            return
        if message["type"] == "http.response.start":
            started = True
        await send(message)

    try:
        await app(scope, checked_receive, guarded_send)
    except Exception:
        if not refused:
            raise
    return refused[0] if refused and not started else None


class OpenAPIVersionMiddleware:
    """BentoML labels ``/docs.json`` OpenAPI 3.0.2 but fills it with pydantic v2's JSON Schema, which is the OpenAPI
    3.1 dialect (``exclusiveMinimum`` as a number, ``type: null`` for optional fields). Read as 3.0, those schemas
    are invalid, so code generators and validators misread them; this corrects the label to 3.1.0, and puts this
    project's ``info`` (title, version, description) in place of BentoML's boilerplate."""

    def __init__(self, app, path: str = "/docs.json", version: str = "3.1.0", info: dict | None = None) -> None:
        self.app = app
        self.path = path
        self.version = version
        self.info = info or {}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") != self.path or scope.get("method") != "GET":
            return await self.app(scope, receive, send)
        start: dict = {}
        chunks: list[bytes] = []

        async def capture(message):
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if not message.get("more_body"):
                    await self._send_fixed(send, start, b"".join(chunks))

        await self.app(scope, receive, capture)

    async def _send_fixed(self, send, start: dict, body: bytes) -> None:
        if start.get("status") == 200:
            try:
                doc = json.loads(body)
                if isinstance(doc, dict) and str(doc.get("openapi", "")).startswith("3.0"):
                    doc["openapi"] = self.version
                if isinstance(doc, dict) and self.info:  # this project's title and version, not BentoML's
                    doc["info"] = {**(doc.get("info") or {}), **self.info}
                body = json.dumps(doc).encode()
            except ValueError:
                pass
        await _send_replaced(send, start, body)


class MultipartGuardMiddleware:
    """Answer 400, with the reason, to a malformed multipart body sent to a BentoML API route.

    BentoML parses the form of ``POST /v1/predict`` with Starlette before the service's code runs, and turns the
    400 that Starlette raises for a malformed body (a bad part header, no boundary, a part without a name, too many
    parts) into a 500. A good body is parsed once, by BentoML: this keeps a reference to each chunk as it streams
    by, and only when the answer is a 500 parses them (python-multipart, with Starlette's limits) to tell a
    malformed body, answered 400, from a failure of the server, passed on."""

    def __init__(self, app, paths: tuple[str, ...] = ("/v1/predict",), max_parts: int = 1000,
                 max_field_bytes: int = 1024 * 1024) -> None:
        self.app = app
        self.paths = paths
        self.max_parts = max_parts
        self.max_field_bytes = max_field_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path", "").rstrip("/") \
                not in self.paths:
            return await self.app(scope, receive, send)
        content_type = _header(scope, b"content-type") or ""
        if not content_type.lower().startswith("multipart/form-data"):
            return await self.app(scope, receive, send)
        _, params = parse_options_header(content_type)
        if not params.get(b"boundary"):
            return await self._refuse(send, "the multipart Content-Type has no boundary")
        body: list[bytes] = []
        failed: list[dict] = []  # the 500's messages, held until the body is judged

        async def keep():
            message = await receive()
            if message["type"] == "http.request":
                body.append(message.get("body", b""))
            return message

        async def judge(message):
            if message["type"] == "http.response.start" and message["status"] >= 500:
                failed.append(message)
                return
            if not failed:
                return await send(message)
            failed.append(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                reason = self._malformed(params[b"boundary"], b"".join(body))
                if reason:
                    return await self._refuse(send, reason)
                for held in failed:
                    await send(held)

        await self.app(scope, keep, judge)

    def _malformed(self, boundary: bytes, data: bytes) -> str | None:
        """Why ``data`` is not a readable multipart body, or None."""
        try:
            parser = self._parser(boundary)
            parser.write(data)
            parser.finalize()
        except Exception as e:  # python-multipart's parse errors and the limits of _parser alike
            return str(e) or type(e).__name__
        return None

    @staticmethod
    async def _refuse(send, reason: str) -> None:
        await _send_json(send, 400, {"error": "invalid_input", "message": f"the multipart body cannot be read: "
                                     f"{reason}; send multipart/form-data with an 'image' file and a 'question' field"})

    def _parser(self, boundary: bytes):
        state = {"parts": 0, "field": b"", "value": b"", "disposition": b"", "is_file": False, "size": 0}

        def on_part_begin():
            state.update(parts=state["parts"] + 1, disposition=b"", size=0)
            if state["parts"] > self.max_parts:
                raise _Refused(f"more than {self.max_parts} parts")

        def on_header_field(data, start, end):
            state["field"] += data[start:end]

        def on_header_value(data, start, end):
            state["value"] += data[start:end]

        def on_header_end():
            if state["field"].lower() == b"content-disposition":
                state["disposition"] = state["value"]
            state.update(field=b"", value=b"")

        def on_headers_finished():
            _, options = parse_options_header(state["disposition"])
            if not options.get(b"name"):
                raise _Refused("a part has no Content-Disposition name")
            state["is_file"] = b"filename" in options

        def on_part_data(data, start, end):
            state["size"] += end - start
            if not state["is_file"] and state["size"] > self.max_field_bytes:
                raise _Refused(f"a form field is over {self.max_field_bytes:,} bytes")

        callbacks = {"on_part_begin": on_part_begin, "on_header_field": on_header_field,
                     "on_header_value": on_header_value, "on_header_end": on_header_end,
                     "on_headers_finished": on_headers_finished, "on_part_data": on_part_data}
        return MultipartParser(boundary, callbacks)
