"""Pilot: teach prsmed-tiny's image tower a new look from the masks alone, through its fixed tower probe, and see
whether the text model, unchanged, then names the zones there.

    python bench/tower_adapt_pilot.py --data DATASET [--steps 150] [--batch 8] [--lr 1e-3]

Only the LLM's image tower and projector train, in full, with the shipped probe's loss against targets made from
the dataset's training masks (prsmed/train/tower_probe.py); nothing else changes. Reported: the probe's reading of
the test split's zones before and after, and the text model's greedy answers on the test split afterwards
(``zone_acc_text``), which separates "the tower can learn the look from masks" from everything fine-tuning adds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--phrasing", default="plain", help="the dataset's wording, for phrasing_match")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()

    import torch

    from prsmed.data.layout import load_records
    from prsmed.data.readers import read_image, read_mask
    from prsmed.train.tower_probe import load_probe, token_targets
    from prsmed.zoo import build_model

    sys.path.insert(0, str(Path(__file__).parent))
    from finetune_unseen import score

    torch.manual_seed(0)
    model = build_model("prsmed-tiny")
    model.eval()
    probe = load_probe(model)

    def prepared(split: str):
        records = load_records(args.data, split=split)
        pixels = model.llm.preprocess_images([read_image(r.image_path).convert("RGB") for r in records])
        return pixels, token_targets([read_mask(r.mask_path) for r in records], probe.tokens)

    train_pixels, train_targets = prepared("train")
    test_pixels, test_targets = prepared("test")

    def reads() -> float:
        with torch.no_grad():
            return round(probe.zone_exact(model.llm.image_features(test_pixels), test_targets), 3)

    report = {"probe_reads_test_before": reads()}
    params = list(model.llm_image_path.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps, eta_min=args.lr * 0.05)
    gen = torch.Generator().manual_seed(0)
    t0 = time.monotonic()
    for _ in range(args.steps):
        idx = torch.randint(0, len(train_pixels), (args.batch,), generator=gen)
        loss = probe.loss(model.llm.image_features(train_pixels[idx]), train_targets.rows(idx))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
    report["tower_seconds"] = round(time.monotonic() - t0, 1)
    report["probe_reads_test_after"] = reads()
    overall, samples = score(model, args.data, args.phrasing)
    report["answers_tower_only"] = {k: round(overall[k], 3) for k in ("zone_acc_text", "phrasing_match",
                                                                       "repeats", "hit_limit")}
    report["samples"] = samples[:3]
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
