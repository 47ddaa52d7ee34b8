"""Fine-tune prsmed-tiny on a visual style it has never seen, and score the test split before and after.

    python bench/finetune_unseen.py [--work runs/finetune-unseen] [--n 400] [--epochs 3] [--lr 5e-4]

The data is `prsmed data synth --style unseen` (a retina-fundus-like look, none of the six training styles). The
fine-tuning is the ordinary `prsmed train` path: LoRA on the LLM, the vision encoder and fusion head trained, the
adapter bundle loaded back for the second evaluation.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

KEYS = ("dice@0.5", "meanDic", "zone_acc_text", "zone_acc_mask", "agreement")


def score(model, data: Path) -> dict:
    from prsmed.data.layout import load_records
    from prsmed.eval.runner import predict_records, summarize

    return summarize(predict_records(model, load_records(data, split="test"), batch_size=16))["overall"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("runs/finetune-unseen"))
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()

    from prsmed.data.synth import synthesize
    from prsmed.model.bundle import load_bundle
    from prsmed.train.config import TrainConfig
    from prsmed.train.trainer import run_training
    from prsmed.zoo import build_model

    data = args.work / "data"
    if not (data / "annotations").is_dir():
        synthesize(data, n=args.n, seed=args.seed, size=256, style="unseen")
    before = score(build_model("prsmed-tiny"), data)
    t0 = time.monotonic()
    run = args.work / "run"
    result = run_training(TrainConfig(model="prsmed-tiny", data=data, out=run, epochs=args.epochs, lr=args.lr,
                                      batch_size=8, seed=args.seed, progress=False, resume=run.exists()))
    seconds = time.monotonic() - t0
    tuned = build_model("prsmed-tiny")
    load_bundle(run / "adapter", tuned)
    after = score(tuned, data)
    print(f"{'metric':14s} {'before':>8s} {'after':>8s}")
    for k in KEYS:
        print(f"{k:14s} {before[k]:8.4f} {after[k]:8.4f}")
    print(json.dumps({"before": before, "after": after, "train_status": result.status, "train_steps": result.step,
                      "train_seconds": round(seconds, 1), "test_rows": before["n"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
