"""What the sync and async clients share: request payloads, the retry rule, answers to errors, SSE parsing."""

from __future__ import annotations

import email.utils
import io
import json
import os
import random
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import httpx

from . import _png
from .errors import PrsMedError, ServerError, error_for
from .models import MASK_FORMATS, JobEvent

DEFAULT_URL = "http://127.0.0.1:3000"
TOKEN_ENV = "PRSMED_API_TOKEN"
RETRY_STATUSES = frozenset({429, 503})
MANIFEST_NAME = "manifest.jsonl"
KNOWN_EVENTS = frozenset({"state", "step", "metrics", "end"})


@dataclass(frozen=True)
class Retry:
    """How often and how long to retry. Connection failures are retried for every request (nothing reached the
    server); 429 and 503 too (the server did nothing), waiting what ``Retry-After`` asks when it is given, else
    ``backoff * 2**attempt`` with jitter, never more than ``max_wait`` seconds at once."""

    attempts: int = 4
    backoff: float = 0.5
    max_wait: float = 30.0

    def delay(self, attempt: int, retry_after: str | None = None) -> float:
        if retry_after:
            seconds = _retry_after_seconds(retry_after)
            if seconds is not None:
                return min(self.max_wait, max(0.0, seconds))
        return min(self.max_wait, self.backoff * (2 ** attempt) * (0.5 + random.random() / 2))


def _retry_after_seconds(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return when.timestamp() - time.time()


def headers(token: str | None) -> dict[str, str]:
    token = token if token is not None else os.environ.get(TOKEN_ENV)
    return {"Authorization": f"Bearer {token}"} if token else {}


def hub_headers(hf_token: str | None) -> dict[str, str]:
    """The per-request Hugging Face token header; the server uses it for that request's download only."""
    return {"X-HF-Token": hf_token} if hf_token else {}


def check(response: httpx.Response) -> httpx.Response:
    """The response, or the typed error the server's answer means."""
    if response.is_success:
        return response
    try:
        body = response.json()
    except (ValueError, UnicodeDecodeError):
        body = None
    raise error_for(response.status_code, body, response.text if body is None else "")


def unreachable(url: str, exc: Exception) -> PrsMedError:
    return ServerError(f"cannot reach the PRS-Med server at {url} ({type(exc).__name__}: {exc}); is `prsmed serve` "
                       f"running there?")


def image_part(image) -> tuple[tuple[str, bytes, str], str | None]:
    """The multipart ``image`` field for any accepted image, and the NIfTI/DICOM slice named after a ``#``.

    Paths (str or PathLike; ``scan.nii.gz#z=42`` picks a slice), bytes, PIL images and numpy arrays (H x W or
    H x W x 3/4, uint8/uint16/bool) are accepted; PIL images and arrays are sent as lossless PNG."""
    slice_ = None
    if isinstance(image, (str, os.PathLike)):
        text = os.fspath(image)
        path = Path(text)
        if not path.is_file() and "#" in text:
            head, _, slice_ = text.rpartition("#")
            path = Path(head)
        if not path.is_file():
            raise FileNotFoundError(f"image file not found: {path}")
        return (path.name, path.read_bytes(), "application/octet-stream"), slice_ or None
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        if not data:
            raise ValueError("the image is empty (0 bytes)")
        return ("image", data, "application/octet-stream"), None
    if hasattr(image, "save") and hasattr(image, "mode"):  # a PIL image, without importing Pillow to check
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return ("image.png", buf.getvalue(), "image/png"), None
    if hasattr(image, "__array_interface__") or hasattr(image, "__array__"):
        return ("image.png", _png.encode(image), "image/png"), None
    raise TypeError(f"image must be a path, bytes, a PIL image or a numpy array; found {type(image).__name__}")


def predict_form(question: str, adapter: str | None, slice_: str | None, mask_format: str = "png") -> dict[str, str]:
    if not isinstance(question, str) or not question.strip():
        raise ValueError("the question is empty")
    if mask_format not in MASK_FORMATS:
        raise ValueError(f"mask_format must be one of {', '.join(MASK_FORMATS)}; found {mask_format!r}")
    form = {"question": question}
    if mask_format != "png":
        form["mask_format"] = mask_format
    if adapter:
        form["adapter"] = adapter
    if slice_:
        form["slice"] = slice_
    return form


def pack_dataset(source: str | os.PathLike) -> tuple[str, bytes]:
    """A local dataset as the zip the server takes: a folder (the authors' ``annotations/`` layout or one holding
    ``manifest.jsonl``) is zipped as it is; a JSONL manifest is zipped with the files it names, its paths
    rewritten relative to the archive."""
    path = Path(source)
    if path.is_dir():
        if not (path / "annotations").is_dir() and not (path / MANIFEST_NAME).is_file():
            raise ValueError(f"{path} is not a dataset folder: expected annotations/<modality>.csv (the authors' "
                             f"layout) or {MANIFEST_NAME} in it")
        files = sorted(p for p in path.rglob("*") if p.is_file() and not any(s.startswith(".") for s in
                                                                              p.relative_to(path).parts))
        return path.name, _zip((p.relative_to(path).as_posix(), p) for p in files)
    if path.is_file() and path.suffix in (".jsonl", ".json"):
        return path.stem, _zip_manifest(path)
    if path.is_file() and path.suffix == ".zip":
        return path.stem, path.read_bytes()
    raise ValueError(f"{path}: expected a dataset folder, a .jsonl manifest or a .zip; "
                     f"{'found no such file' if not path.exists() else 'found something else'}")


def _zip(entries: Iterable[tuple[str, Path | bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, content in entries:
            if isinstance(content, Path):
                zf.write(content, name)
            else:
                zf.writestr(name, content)
    return buf.getvalue()


def _zip_manifest(manifest: Path) -> bytes:
    base = manifest.parent.resolve()
    lines, files = [], {}
    for n, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{manifest}:{n}: not JSON ({e.msg})") from e
        for key in ("image", "mask"):
            value = row.get(key)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{manifest}:{n}: expected a file path in {key!r}; found {value!r}")
            src = Path(value) if Path(value).is_absolute() else base / value
            if not src.is_file():
                raise ValueError(f"{manifest}:{n}: {key} file not found: {src}")
            src = src.resolve()
            arc = src.relative_to(base).as_posix() if src.is_relative_to(base) else _outside_name(src, files)
            files[arc] = src
            row[key] = arc
        lines.append(json.dumps(row, ensure_ascii=False))
    if not lines:
        raise ValueError(f"{manifest}: the manifest has no rows")
    entries: list[tuple[str, Path | bytes]] = [(MANIFEST_NAME, ("\n".join(lines) + "\n").encode())]
    entries += sorted(files.items())
    return _zip(entries)


def _outside_name(src: Path, taken: dict[str, Path]) -> str:
    """An archive name for a file outside the manifest's folder: files/<parent>/<name>, made unique."""
    stem = f"files/{src.parent.name}/{src.name}"
    name, k = stem, 1
    while name in taken and taken[name] != src:
        name, k = f"files/{src.parent.name}-{k}/{src.name}", k + 1
    return name


class SseParser:
    """Server-sent events, fed one line at a time (``event:`` and ``data:`` lines; a blank line ends an event)."""

    def __init__(self) -> None:
        self._event: str | None = None
        self._data: list[str] = []

    def feed(self, line: str) -> JobEvent | None:
        if line == "":
            event, data = self._event, self._data
            self._event, self._data = None, []
            if event in KNOWN_EVENTS:  # a newer server's other events are skipped, not fatal
                payload: Any = json.loads("\n".join(data)) if data else {}
                return JobEvent(event=event, data=payload if isinstance(payload, dict) else {})
        elif line.startswith("event:"):
            self._event = line[6:].strip()
        elif line.startswith("data:"):
            self._data.append(line[5:].lstrip())
        return None  # comments (":...") and unknown fields are ignored, as the SSE standard says


def progress_line(info: dict) -> str:
    step, total = info.get("step") or 0, info.get("total_steps")
    width = 24
    if total:
        done = min(width, int(width * step / total))
        bar = f"[{'#' * done}{'.' * (width - done)}] {step}/{total}"
    else:
        bar = f"step {step}"
    parts = [f"{info.get('id', '')[:12]} {info.get('state', '')}", bar]
    if info.get("loss") is not None:
        parts.append(f"loss {info['loss']:.4f}")
    eta = info.get("eta_s")
    if eta is not None and info.get("state") == "running":
        parts.append(f"ETA {int(eta) // 60}m{int(eta) % 60:02d}s")
    return "  ".join(parts)


STOPPED_STATES = frozenset({"failed", "canceled", "preempted"})


class Watcher:
    """Follows a job for ``wait``: merges events into the job's last known state, draws the progress line, and says
    when the job is over. ``preempted`` counts as over: only ``resume()`` starts such a job again."""

    def __init__(self, info: dict, progress: bool, stream=None) -> None:
        import sys

        self.info = dict(info)
        self.progress = progress
        self.stream = stream or sys.stderr
        self._tty = getattr(self.stream, "isatty", lambda: False)()
        self._last = ("", -1)

    def feed(self, event: JobEvent) -> bool:
        """Take one event; True once the job is over."""
        if event.event in ("state", "end"):
            self.info.update(event.data)
        elif event.event == "step":
            self.info.update({k: v for k, v in event.data.items() if v is not None and k != "epoch"})
        self.draw()
        return event.event == "end" or self.info.get("state") == "preempted"

    def set(self, info: dict) -> bool:
        self.info = dict(info)
        self.draw()
        return self.info.get("state") in STOPPED_STATES or self.info.get("state") == "succeeded"

    def draw(self, final: bool = False) -> None:
        if not self.progress:
            return
        line = progress_line(self.info)
        state, step = self.info.get("state", ""), self.info.get("step") or 0
        total = self.info.get("total_steps") or 0
        if self._tty:
            self.stream.write("\r" + line.ljust(100)[:120] + ("\n" if final else ""))
        elif final or state != self._last[0] or (total and step * 10 // total != self._last[1] * 10 // max(total, 1)):
            self.stream.write(line + "\n")
        self._last = (state, step)
        self.stream.flush()

    def result(self, job_info_cls):
        """The final JobInfo, or JobFailed for a job that ended without an adapter."""
        from .errors import JobFailed

        self.draw(final=True)
        info = job_info_cls.model_validate(self.info)
        if self.progress and info.report is not None:
            # The verdict goes with the progress line: a run that made the answers worse must not end silently.
            self.stream.write(f"validation: {info.report.verdict}\n")
            for warning in info.report.warnings:
                self.stream.write(f"warning: {warning}\n")
            self.stream.flush()
        if info.state in STOPPED_STATES:
            reason = f": {info.error}" if info.error else ""
            raise JobFailed(f"job {info.id} ended {info.state}{reason}; job.resume() continues it from its last "
                            f"checkpoint", job=info)
        return info
