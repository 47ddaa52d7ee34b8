"""A bounded load test of ``POST /v1/predict`` over loopback: bursts of concurrent requests, one connection each.

    python bench/load.py [--model prsmed-tiny] [--concurrency 50 200] [--json OUT]
    python bench/load.py --url http://HOST:3000 --token-file TOKEN   # against a server that is already running

Starts ``prsmed serve`` (with the token check on, and the result cache off so that every request is computed) unless
``--url`` is given. For each concurrency level it sends that many distinct scans at once and reports the status
counts, p50/p99/max latency and throughput. The test suite runs the 200-request burst too
(tests/test_service_hostile.py) and asserts that every answer is a 200.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import tempfile
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from serving import predict_burst, start_server  # noqa: E402
from test_service import png_bytes  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="prsmed-tiny")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[50, 200])
    ap.add_argument("--url", help="an already running server (default: start one)")
    ap.add_argument("--token-file", type=Path, help="with --url: the server's API token")
    ap.add_argument("--json", type=Path, help="write the results here too")
    args = ap.parse_args()

    server = None
    if args.url:
        url = args.url.rstrip("/")
        token = args.token_file.read_text().strip() if args.token_file else None
    else:
        root = Path(tempfile.mkdtemp(prefix="prsmed-load-"))
        token = secrets.token_hex(16)
        (root / "token").write_text(token + "\n")
        server = start_server(root / "data", "--model", args.model, "--token-file", str(root / "token"),
                              env={"PRSMED_SERVE_CACHE_SIZE": "0", "OMP_NUM_THREADS": str(os.cpu_count() or 1)})
        url = server.url
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        warm = httpx.post(url + "/v1/predict", headers=headers, files={"image": ("w.png", png_bytes(seed=10**6))},
                          data={"question": "Where is the lesion?"}, timeout=300)
        warm.raise_for_status()
        results = []
        for n in args.concurrency:
            burst = predict_burst(url, [png_bytes(seed=i) for i in range(n)], headers=headers)
            row = {"concurrency": n, **burst.summary()}
            results.append(row)
            print(json.dumps(row))
    finally:
        if server is not None:
            server.stop()
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
