"""Pilot of the recipe's first two stages: how well the tiny model's answers name the zone, per modality.

    python bench/grounding_pilot.py [--work runs/pilot] [--test runs/fresh-test] [--set cell_target=presence]
                                    [--set grounding_steps=1500] [--n-test 300] [--threads 2]

Runs the tower stage and the grounding stage of `prsmed zoo build prsmed-tiny` (``prsmed.zoo.recipe``) from
scratch on the recipe's data, with any :class:`RecipeConfig` field overridden by ``--set``, then scores on a fresh
synthetic test split (held-out question templates):

* ``tower_zone_acc``: the tower stage's auxiliary zone head (a linear read of all image tokens) names exactly the
  mask's zones: how much position the image tokens carry;
* ``text_zone_acc``: the text model's greedy answer names exactly the mask's zones: how much of it the LLM reads.

The joint stage is left out: it freezes the LLM, so it cannot change the answers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("runs/pilot"))
    parser.add_argument("--test", type=Path, default=Path("runs/fresh-test"))
    parser.add_argument("--n-test", type=int, default=300)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()

    import torch

    from prsmed.data.layout import load_records
    from prsmed.data.readers import read_image, read_mask
    from prsmed.data.synth import synthesize
    from prsmed.eval.runner import mask_zones, text_zones
    from prsmed.zoo import build_model, recipe
    from prsmed.zoo.presets import PRESETS

    torch.set_num_threads(args.threads)
    cfg = recipe.RecipeConfig()
    for item in args.set:
        key, _, value = item.partition("=")
        current = getattr(cfg, key)
        if isinstance(current, bool):
            setattr(cfg, key, value.lower() in ("1", "true", "yes"))
        else:
            setattr(cfg, key, type(current)(value) if current is not None else value)
    data = args.work / "data"
    if not (data / "annotations").is_dir():
        synthesize(data, n=cfg.n_images, seed=cfg.data_seed, size=cfg.image_size)
    if not (args.test / "annotations").is_dir():
        synthesize(args.test, n=3000, seed=99, size=cfg.image_size)
    train = [r for r in load_records(data) if r.split == "train"]
    test = [r for r in load_records(args.test) if r.split == "test"][: args.n_test]

    spec = PRESETS["prsmed-tiny"].spec.model_copy(deep=True)
    spec.lora = None
    spec.train.llm = True
    torch.manual_seed(cfg.seed)
    model = build_model(spec, weights=False)
    t0 = time.monotonic()
    tower = recipe.train_tower(model, train, cfg)
    for p in recipe._tower_params(model):
        p.requires_grad_(False)
    t_tower = time.monotonic() - t0
    zones = {r.mask_path: recipe.zone_words(r) for r in train}
    recipe.train_grounding(model, train, zones, cfg)
    t_grounding = time.monotonic() - t0 - t_tower

    model.eval()
    truth = [mask_zones(read_mask(r.mask_path)) for r in test]
    tower_ok, text_ok = [], []
    with torch.no_grad():
        for start in range(0, len(test), 16):
            batch = test[start : start + 16]
            pixels = recipe.tower_targets(model, batch)[0]
            hot = tower.zone_head(recipe.tower_features(model, pixels).flatten(1)) > 0
            names = [[z for z, on in zip(recipe.ZONES, row) if on] for row in hot.tolist()]
            images = [read_image(r.image_path) for r in batch]
            inputs = model.llm.encode(model.prompts([r.question for r in batch]), images, None, padding_side="left")
            answers = model.llm.generate_from(model.llm(inputs, use_cache=True), max_new_tokens=12)
            for i, (named, answer) in enumerate(zip(names, answers)):
                want = truth[start + i]
                tower_ok.append(sorted(named) == sorted(want))
                text_ok.append(text_zones(answer) == want)

    groups = {"overall": list(range(len(test))), "two_lesions": [i for i, t in enumerate(truth) if len(t) > 1]}
    for i, r in enumerate(test):
        groups.setdefault(r.modality, []).append(i)

    def rates(flags):
        return {name: round(sum(flags[i] for i in idx) / max(1, len(idx)), 3) for name, idx in groups.items()}

    result = {"set": args.set, "n_test": len(test),
              "seconds": {"tower": round(t_tower), "grounding": round(t_grounding)},
              "tower_zone_acc": rates(tower_ok), "text_zone_acc": rates(text_ok)}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
