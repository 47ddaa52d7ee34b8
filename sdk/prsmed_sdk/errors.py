"""Typed errors carrying the server's message. Every one is a :class:`PrsMedError`."""

from __future__ import annotations


class PrsMedError(Exception):
    """Something the server refused or could not do. ``status`` is the HTTP status (``None`` when no answer came),
    ``kind`` the server's short error kind (``invalid_input``, ``not_found``, ...), ``message`` its explanation."""

    def __init__(self, message: str, *, status: int | None = None, kind: str = "", body: dict | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.kind = kind
        self.body = body or {}

    def __str__(self) -> str:
        prefix = f"HTTP {self.status}" if self.status is not None else "no answer"
        return f"{prefix} ({self.kind}): {self.message}" if self.kind else f"{prefix}: {self.message}"


class InvalidInput(PrsMedError):
    """The request is wrong: a corrupt image, an empty question, a bad dataset, an adapter for another model."""


class TooLarge(InvalidInput):
    """The upload is over the server's size limit (HTTP 413)."""


class Unauthorized(PrsMedError):
    """No token, or the wrong one (HTTP 401/403)."""


class NotFound(PrsMedError):
    """No such adapter, job, dataset or route (HTTP 404)."""


class Conflict(PrsMedError):
    """The request does not fit the resource's state, e.g. resuming a job that is running (HTTP 409)."""


class Busy(PrsMedError):
    """The server is full (HTTP 429) or not ready (503) and stayed so through every retry. ``retry_after_s`` is
    what it asked to wait, ``queue_position`` where a job would stand."""

    @property
    def retry_after_s(self) -> float | None:
        return self.body.get("retry_after_s")

    @property
    def queue_position(self) -> int | None:
        return self.body.get("queue_position")


class ServerError(PrsMedError):
    """The server failed (HTTP 5xx), or could not be reached at all after every retry (``status`` is None)."""


class JobFailed(PrsMedError):
    """A job ended without an adapter: ``state`` is ``failed``, ``canceled`` or ``preempted`` (resumable with
    ``job.resume()``); ``job`` is its last JobInfo."""

    def __init__(self, message: str, *, job) -> None:
        super().__init__(message, kind=job.state)
        self.job = job
        self.state = job.state


_BY_STATUS = {400: InvalidInput, 401: Unauthorized, 403: Unauthorized, 404: NotFound, 409: Conflict, 413: TooLarge,
              422: InvalidInput, 429: Busy, 503: Busy}


def error_for(status: int, body: dict | None, text: str = "") -> PrsMedError:
    """The typed error for an HTTP answer. ``body`` is the server's JSON ``{"error", "message"}`` when it sent one."""
    body = body if isinstance(body, dict) else {}
    kind = str(body.get("error") or "")
    message = body.get("message") or body.get("detail") or text.strip()[:500] or f"HTTP {status}"
    if not isinstance(message, str):  # FastAPI's validation errors carry a list of problems
        message = "; ".join(f"{'.'.join(str(x) for x in d.get('loc', []))}: {d.get('msg')}" for d in message
                            if isinstance(d, dict)) or str(message)
    cls = _BY_STATUS.get(status) or (ServerError if status >= 500 else PrsMedError)
    return cls(message, status=status, kind=kind, body=body)
