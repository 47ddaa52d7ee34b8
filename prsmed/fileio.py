"""Small file helpers shared by bundles, checkpoints and data manifests: hashing and durable writes."""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_file(path: str | Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: str | Path) -> None:
    """Make a directory's entries (a rename into it) durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    for path in Path(root).rglob("*"):
        if path.is_file():
            fsync_file(path)
    fsync_dir(root)


def replace_dir(tmp: str | Path, dest: str | Path, *, stale_prefix: str | None = None) -> None:
    """Put the finished directory ``tmp`` at ``dest``, replacing what is there.

    ``dest`` is never half-written: it is the old directory until one rename makes it the new one (the old one is
    first renamed aside, then removed). ``stale_prefix`` names the aside copy, so a crash between the renames
    leaves something a cleanup can recognise (default ``.<dest name>.old-``)."""
    tmp, dest = Path(tmp), Path(dest)
    if dest.exists():
        prefix = stale_prefix if stale_prefix is not None else f".{dest.name}.old-"
        old = dest.parent / f"{prefix}{uuid.uuid4().hex[:8]}"
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)
