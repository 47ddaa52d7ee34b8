"""Step time with checkpoints mirrored to object storage (--checkpoint-uri) against without.

Trains prsmed-tiny on a small generated dataset, alternating, with a checkpoint every ``--save-every`` steps (1, the
default, is the worst case: a real run checkpoints every few hundred steps): once with checkpoints on the local disk
only, once also mirrored to an S3 server on 127.0.0.1 (tests/object_store.py: moto in server mode, a separate
process at the lowest priority; the ``test`` extra installs it). Uploads run on a background thread, so the training
step should not wait for them. Reports the median ``step_time_s`` of the training steps (metrics.jsonl) of each, their
ratio, each run's wall time and how many uploads its log reports.

    python bench/checkpoint_upload.py [--steps 12] [--rounds 2] [--save-every 1] [--work runs/bench-upload]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from object_store import start_object_store  # noqa: E402


def train(data: Path, out: Path, steps: int, save_every: int, uri: str | None, env: dict[str, str]) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "prsmed.train", "--model", "prsmed-tiny", "--data", str(data), "--out", str(out),
           "--max-steps", str(steps), "--save-every", str(save_every), "--keep-last", "2", "--no-progress", "--no-tensorboard",
           "--val-answer-rows", "0", "--tower-warmup-steps", "0", "--batch-size", "4"]
    if uri:
        cmd += ["--checkpoint-uri", uri]
    t0 = time.monotonic()
    subprocess.run(cmd, check=True, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.monotonic() - t0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    times = [x["step_time_s"] for x in lines if x["kind"] == "train"][1:]  # the first step warms caches
    log = (out / "train.log").read_text()
    return {"median_step_s": statistics.median(times), "wall_s": wall, "steps": len(times) + 1,
            "uploads_logged": log.count("mirrored to")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--save-every", type=int, default=1)
    parser.add_argument("--work", type=Path, default=Path("runs/bench-upload"))
    args = parser.parse_args()

    from prsmed.data.synth import synthesize

    data = args.work / "data"
    if not data.exists():
        synthesize(data, n=60, seed=5)
    # The store is another machine in real use: here it runs at the lowest priority, so that the figure is the
    # trainer's own cost of uploading, not the stand-in server's CPU.
    store = start_object_store("bench", niceness=19)
    env = {k: v for k, v in store.env().items() if k.startswith("AWS_")}
    try:
        results: dict[str, list[dict]] = {"local": [], "s3": []}
        for r in range(args.rounds):
            results["local"].append(train(data, args.work / "local", args.steps, args.save_every, None, env))
            results["s3"].append(train(data, args.work / "s3", args.steps, args.save_every, f"s3://bench/round{r}",
                                       env))
    finally:
        store.stop()
    local = statistics.median(x["median_step_s"] for x in results["local"])
    s3 = statistics.median(x["median_step_s"] for x in results["s3"])
    summary = {"median_step_s": {"local": round(local, 4), "s3": round(s3, 4)}, "ratio": round(s3 / local, 3),
               "wall_s": {k: [round(x["wall_s"], 1) for x in v] for k, v in results.items()},
               "uploads_per_run": [x["uploads_logged"] for x in results["s3"]], "save_every": args.save_every,
               "steps": args.steps}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
