"""``python -m prsmed.cloud.fetch URI DEST``: copy a dataset from object storage to a local folder (what a launched
task runs first; Vast.ai and RunPod cannot mount buckets). Credentials as for ``--checkpoint-uri``."""

from __future__ import annotations

import sys
from pathlib import Path

from prsmed.train.remote import RemoteError, open_filesystem, scrub


def fetch(uri: str, dest: Path) -> int:
    """Copy every file under ``uri`` into ``dest`` (then mark it fetched); returns the number of files."""
    fs, root = open_filesystem(uri)
    files = [f for f in fs.find(root) if not f.endswith("/")]
    if not files:
        raise RemoteError(f"{scrub(uri)} holds no files")
    for remote in files:
        local = dest / remote[len(root):].lstrip("/")
        local.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(remote, str(local))
    (dest / ".fetched").write_text(f"{len(files)}\n")
    return len(files)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m prsmed.cloud.fetch URI DEST", file=sys.stderr)
        return 2
    try:
        count = fetch(args[0], Path(args[1]))
    except (RemoteError, OSError) as e:
        print(f"error: {scrub(str(e))}", file=sys.stderr)
        return 1
    print(f"fetched {count} files from {scrub(args[0])} into {args[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
