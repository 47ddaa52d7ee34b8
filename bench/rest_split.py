"""Where a REST prediction's time goes: the same images in this process, over REST, and the server's own
``timings_ms.total`` for those requests (the model's time inside the server).

    python bench/rest_split.py [--n 15]

Starts one real ``prsmed serve`` (tests/serving.py) with as many torch threads as this process and the encoder
cache off; one kept-open connection. Prints the three medians in milliseconds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from predict import scans  # noqa: E402
from serving import start_server  # noqa: E402

QUESTION = "Where is the lesion in this image?"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=15)
    args = ap.parse_args()
    import httpx
    import torch

    from prsmed.infer import Predictor

    data = scans(args.n)
    predictor = Predictor("prsmed-tiny", cache_size=0)
    predictor.predict(data[0], QUESTION)
    here = []
    for d in data:
        t = time.perf_counter()
        predictor.predict(d, QUESTION)
        here.append((time.perf_counter() - t) * 1000)
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(Path(tmp) / "s", env={"PRSMED_SERVE_CACHE_SIZE": "0",
                                                    "OMP_NUM_THREADS": str(torch.get_num_threads())})
        try:
            with httpx.Client(base_url=server.url, timeout=60) as client:
                def post(d):
                    r = client.post("/v1/predict", files={"image": ("s.png", d)}, data={"question": QUESTION})
                    r.raise_for_status()
                    return r.json()["timings_ms"]["total"]

                post(data[0])
                rest, inside = [], []
                for d in data:
                    t = time.perf_counter()
                    inside.append(post(d))
                    rest.append((time.perf_counter() - t) * 1000)
        finally:
            server.stop()
    print(f"in this process: {statistics.median(here):.1f} ms; REST: {statistics.median(rest):.1f} ms; "
          f"the server's own total: {statistics.median(inside):.1f} ms (medians of {args.n})")


if __name__ == "__main__":
    main()
