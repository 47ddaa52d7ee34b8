"""A run's checkpoints mirrored to object storage (``--checkpoint-uri``), so a preempted machine that takes its disk
with it takes no progress with it.

Any fsspec URL works: ``s3://bucket/run`` (the ``prsmed[s3]`` extra; MinIO, R2 and other S3-compatible stores
through the standard ``AWS_ENDPOINT_URL``), ``gs://`` (``prsmed[gcs]``), ``az://`` (``prsmed[azure]``),
``file://`` (built in: a mounted network disk). Credentials come from each back-end's own environment (for S3
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, a profile or an instance role) and never reach a log: every
message is scrubbed of the values of secret-looking environment variables.

Layout under the URI::

    checkpoints/step-00000120/...    the local checkpoint's files (checkpoint.py), manifest.json last of them
    checkpoints/step-00000120/COMPLETE   written after every file: only then is the checkpoint on the remote
    adapter/...  adapter/COMPLETE    the final adapter bundle, the same way
    summary.json

Uploads run on a background thread, so training does not wait for the network; a newer checkpoint queued behind an
older one simply follows it. A checkpoint without ``COMPLETE`` (an upload cut off by preemption) is never used, and
one whose files do not match their manifest after download is skipped with a message: the previous one is used.
Keep-last-K and the best checkpoint apply on the remote as locally. The exit on SIGTERM waits for the queue
(:meth:`CheckpointMirror.flush`) before the process ends.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from prsmed.train.checkpoint import MANIFEST, CheckpointManager
from prsmed.weights import CheckpointError

log = logging.getLogger("prsmed.train")

MARKER = "COMPLETE"
_STEP = re.compile(r"^step-(\d{8})$")
# URL scheme -> the extra that installs its fsspec back-end (prsmed/extras.py)
BACKENDS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure", "abfss": "azure"}
UPLOAD_NICENESS = 10
_SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|CREDENTIAL|ACCESS_KEY|ACCOUNT_KEY|SAS|API_KEY", re.I)


class RemoteError(RuntimeError):
    """The checkpoint URI cannot be used (no back-end, no access); the message names what to fix."""


def scrub(text: str) -> str:
    """``text`` with every secret-looking environment value, and any password in a URL, replaced by ``***``."""
    for name, value in os.environ.items():
        if _SECRET_NAME.search(name) and len(value) >= 6:
            text = text.replace(value, "***")
    return re.sub(r"(//[^/:@\s]+):[^/@\s]+@", r"\1:***@", text)


def open_filesystem(uri: str):
    """(filesystem, root path) for ``uri``; a missing back-end names the extra that installs it."""
    import fsspec

    scheme = uri.split("://", 1)[0].lower() if "://" in uri else "file"
    if scheme in BACKENDS:
        from prsmed.extras import MissingExtra, require

        try:
            require(BACKENDS[scheme])
        except MissingExtra as e:
            raise RemoteError(f"--checkpoint-uri {scrub(uri)}: {e}") from None
    try:
        # A fresh instance: fsspec's cache would keep the credentials an earlier instance was made with.
        fs, root = fsspec.core.url_to_fs(uri, skip_instance_cache=True)
    except (ValueError, ImportError) as e:
        raise RemoteError(f"--checkpoint-uri {scrub(uri)}: {scrub(str(e))}") from None
    return fs, root.rstrip("/")


class CheckpointMirror:
    """Mirrors checkpoint directories and the adapter bundle to ``uri``; restores from it on resume."""

    def __init__(self, uri: str, *, keep_last: int) -> None:
        self.uri = uri
        self.keep_last = keep_last
        self.fs, self.root = open_filesystem(uri)
        self._queue: queue.Queue = queue.Queue()
        self.errors: list[str] = []
        self.uploaded: list[str] = []
        self._thread: threading.Thread | None = None
        self._newest: Path | None = None

    # access ---------------------------------------------------------------------------------------------------
    def check_access(self) -> None:
        """Write, read back and delete a small object, so missing or wrong credentials, a missing bucket or a
        read-only store stop the run before its first step rather than at its first checkpoint."""
        probe = f"{self.root}/.prsmed-access-check-{uuid.uuid4().hex[:8]}"
        try:
            if _is_local(self.fs):  # object stores have no folders to make; making a bucket is not ours to do
                self.fs.makedirs(self.root, exist_ok=True)
            self.fs.pipe_file(probe, b"ok")
            found = self.fs.cat_file(probe)
            self.fs.rm_file(probe)
        except Exception as e:  # each back-end raises its own types; all mean "cannot use this store"
            raise RemoteError(f"--checkpoint-uri {scrub(self.uri)}: cannot write there ({type(e).__name__}: "
                              f"{scrub(str(e))}); check the bucket's name and this machine's credentials "
                              f"(for S3: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL)") from None
        if found != b"ok":
            raise RemoteError(f"--checkpoint-uri {scrub(self.uri)}: an object written there read back differently")

    # uploading ------------------------------------------------------------------------------------------------
    def submit(self, local: Path, *, best: str | None = None) -> None:
        """Queue a committed checkpoint directory for upload (then prune the remote, keeping ``best``). One still
        waiting when a newer one is queued is skipped: the remote only ever needs the newest."""
        self._newest = Path(local)
        self._put(("checkpoint", Path(local), best))

    def submit_tree(self, local: Path, name: str) -> None:
        """Queue a whole folder (the adapter bundle) for upload as ``URI/name``, marked complete when whole."""
        self._put(("tree", Path(local), name))

    def submit_file(self, local: Path) -> None:
        self._put(("file", Path(local), None))

    def _put(self, item) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="checkpoint-upload", daemon=True)
            self._thread.start()
        self._queue.put(item)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued upload is done (or ``timeout`` seconds); True when the queue emptied."""
        if self._thread is None:
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def _work(self) -> None:
        try:
            # Linux: this thread only, at a lower priority, so on a machine short of cores the training step keeps
            # its CPU and the upload takes what is left.
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), UPLOAD_NICENESS)
        except (AttributeError, OSError):
            pass
        while True:
            kind, local, extra = self._queue.get()
            try:
                if kind == "checkpoint" and local != self._newest:
                    continue  # superseded while it waited
                if kind == "checkpoint":
                    self._upload_checkpoint(local, best=extra)
                elif kind == "tree":
                    self._upload_tree(local, f"{self.root}/{extra}")
                else:
                    self.fs.put_file(str(local), f"{self.root}/{local.name}")
            except Exception as e:  # a failed upload must not kill training: the next checkpoint tries again
                message = f"upload of {local} to {scrub(self.uri)} failed ({type(e).__name__}: {scrub(str(e))})"
                self.errors.append(message)
                log.warning("%s", message)
            finally:
                self._queue.task_done()

    def _upload_checkpoint(self, local: Path, *, best: str | None) -> None:
        if not local.is_dir():  # pruned locally before its turn came: a newer one is queued behind it
            return
        remote = f"{self.root}/checkpoints/{local.name}"
        t0 = time.monotonic()
        if not self._upload_tree(local, remote, last=MANIFEST):
            return
        self.uploaded.append(local.name)
        log.info("checkpoint %s mirrored to %s in %.1f s", local.name, scrub(self.uri), time.monotonic() - t0)
        self.prune(best=best)

    def _upload_tree(self, local: Path, remote: str, *, last: str | None = None) -> bool:
        """Upload every file of ``local`` (``last`` after the others), then the marker. False when the folder
        vanished meanwhile (left without a marker, so never used)."""
        marker = f"{remote}/{MARKER}"
        if self.fs.exists(marker):  # the same step written again: not complete until its new files are
            self.fs.rm_file(marker)
        files = sorted((p for p in local.rglob("*") if p.is_file()), key=lambda p: (p.name == last, str(p)))
        try:
            for path in files:
                target = f"{remote}/{path.relative_to(local).as_posix()}"
                if _is_local(self.fs):
                    self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
                self.fs.put_file(str(path), target)
        except FileNotFoundError:
            if not local.exists():
                return False
            raise
        if _is_local(self.fs):
            self.fs.makedirs(remote, exist_ok=True)
        self.fs.pipe_file(marker, json.dumps({"files": len(files), "time": round(time.time(), 3)}).encode())
        return True

    # listing and pruning --------------------------------------------------------------------------------------
    def listed(self) -> list[str]:
        """Names of every remote checkpoint folder, complete or not, oldest first."""
        self.fs.invalidate_cache()
        try:
            entries = self.fs.ls(f"{self.root}/checkpoints", detail=False)
        except FileNotFoundError:
            return []
        return sorted(name for name in (e.rstrip("/").rsplit("/", 1)[-1] for e in entries) if _STEP.match(name))

    def complete(self) -> list[str]:
        """Names of the remote checkpoints whose marker is present, oldest first."""
        return [n for n in self.listed() if self.fs.exists(f"{self.root}/checkpoints/{n}/{MARKER}")]

    def prune(self, *, best: str | None = None) -> None:
        """Keep the newest ``keep_last`` complete checkpoints and ``best``; drop older ones and cut-off uploads."""
        self.fs.invalidate_cache()
        base = f"{self.root}/checkpoints"
        done = self.complete()
        keep = set(done[-self.keep_last:]) | ({best} if best else set())
        newest = done[-1] if done else None
        for name in self.listed():
            # An incomplete one newer than the newest complete one may still be uploading from another attempt.
            if name not in keep and (name in done or (newest and name < newest)):
                self.fs.rm(f"{base}/{name}", recursive=True)

    # restoring ------------------------------------------------------------------------------------------------
    def restore_newer(self, root: Path, local: Path | None) -> Path | None:
        """The checkpoint to resume from: the newest complete remote one that verifies, downloaded into ``root``,
        when it is newer than ``local`` (the newest good local one; None on a new machine or an emptied disk);
        otherwise ``local``."""
        have = _step(local.name) if local is not None else -1
        done = self.complete()
        for name in self.listed():
            if name not in done and _step(name) > have:
                log.warning("skipping remote checkpoint %s: it has no %s marker (its upload was cut off)", name, MARKER)
        for name in reversed(done):
            if _step(name) <= have:
                break
            try:
                return self._download(name, root)
            except CheckpointError as e:
                log.warning("skipping remote checkpoint %s: %s", name, scrub(str(e)))
        return local

    def _download(self, name: str, root: Path) -> Path:
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
        remote = f"{self.root}/checkpoints/{name}"
        try:
            self.fs.get(remote + "/", str(tmp) + "/", recursive=True)
            (tmp / MARKER).unlink(missing_ok=True)
            CheckpointManager.verify(tmp)
            final = root / name
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except CheckpointError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        except Exception as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"download failed ({type(e).__name__}: {scrub(str(e))})") from None
        log.info("restored checkpoint %s from %s", name, scrub(self.uri))
        return final

    def describe(self) -> dict[str, Any]:
        """For summary.json: where the run was mirrored, what reached it, what failed."""
        return {"uri": scrub(self.uri), "checkpoints_uploaded": len(self.uploaded),
                "last_uploaded": self.uploaded[-1] if self.uploaded else None, "errors": self.errors[-5:]}


def _is_local(fs) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return "file" in protocols or "local" in protocols


def _step(name: str) -> int:
    m = _STEP.match(name)
    return int(m.group(1)) if m else -1

