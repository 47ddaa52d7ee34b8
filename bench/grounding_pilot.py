"""Pilot of the recipe's first two stages: how well the tiny model's answers name the zone, and how they read.

    python bench/grounding_pilot.py [--work runs/pilot] [--test runs/fresh-test] [--set grounding_steps=1500]
                                    [--two-lesion-test runs/fresh-two-lesions]
                                    [--tower-from PATH/llm.safetensors] [--n-test 300] [--threads 2]

Runs the tower stage and the grounding stage of `prsmed zoo build prsmed-tiny` (``prsmed.zoo.recipe``) from
scratch on the recipe's data, with any :class:`RecipeConfig` field overridden by ``--set``, then scores on a fresh
synthetic test split (held-out question templates) and on a fresh set of images half of which show no lesion:

* ``tower_zone_acc``: the tower stage's auxiliary zone head (a linear read of all image tokens) names exactly the
  mask's zones: how much position the image tokens carry (absent with ``--tower-from``);
* ``text_zone_acc``: the text model's greedy answer names exactly the mask's zones: how much of it the LLM reads;
* ``no_lesion_said``: on the images with no lesion, the answer says there is none;
* ``repeats`` and ``hit_limit``: answers with a word repeated back to back, and answers that ran to the length
  limit instead of ending.

``--tower-from`` skips the tower stage and takes the tower and projector from a shipped ``llm.safetensors`` (the
recipe's tower stage is deterministic for its seed and data, so this pilots the grounding stage alone in a third
less time). The joint stage is left out: it freezes the LLM, so it cannot change the answers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

MAX_NEW_TOKENS = 48


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("runs/pilot"))
    parser.add_argument("--test", type=Path, default=Path("runs/fresh-test"))
    parser.add_argument("--no-lesion-test", type=Path, default=Path("runs/fresh-no-lesion"))
    parser.add_argument("--n-test", type=int, default=300)
    parser.add_argument("--two-lesion-test", type=Path, default=Path("runs/fresh-two-lesions"),
                        help="400 fresh lung CT images with two nodules each, scored as two_lesions_large")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--tower-from", type=Path, help="take the tower and projector from this llm.safetensors")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument("--save", type=Path, help="also write the LLM's weights here (safetensors)")
    args = parser.parse_args()

    import torch

    from prsmed.data.layout import load_records
    from prsmed.data.readers import read_image, read_mask
    from prsmed.data.synth import synthesize
    from prsmed.eval.runner import mask_zones, text_zones
    from prsmed.train.answer_eval import repeats_a_word
    from prsmed.weights import read_state_dict, write_state_dict
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
        recipe.recipe_data(data, cfg)
    if not (args.test / "annotations").is_dir():
        synthesize(args.test, n=3000, seed=99, size=cfg.image_size)
    if not (args.no_lesion_test / "annotations").is_dir():
        synthesize(args.no_lesion_test, n=600, seed=98, size=cfg.image_size, no_lesion_fraction=0.5)
    train = [r for r in load_records(data) if r.split == "train"]
    test = [r for r in load_records(args.test) if r.split == "test"][: args.n_test]
    test += [r for r in load_records(args.no_lesion_test) if r.split == "test"]
    n_main = len(test)
    if args.two_lesion_test:  # the same set as bench/tiny_answers.py
        sys.path.insert(0, str(Path(__file__).parent))
        from tiny_answers import two_lesion_rows

        test += two_lesion_rows(args.two_lesion_test, size=cfg.image_size)

    spec = PRESETS["prsmed-tiny"].spec.model_copy(deep=True)
    spec.lora = None
    spec.train.llm = True
    torch.manual_seed(cfg.seed)
    model = build_model(spec, weights=False)
    t0 = time.monotonic()
    tower = None
    if args.tower_from:
        llava = model.llm.model.model
        shipped = read_state_dict(args.tower_from)
        for name, module in (("vision_tower", llava.vision_tower), ("multi_modal_projector",
                                                                     llava.multi_modal_projector)):
            part = {k.split(f"{name}.", 1)[1]: v for k, v in shipped.items() if f".{name}." in f".{k}"}
            module.load_state_dict(part, strict=True)
    else:
        tower = recipe.train_tower(model, train, cfg)
    for p in recipe._tower_params(model):
        p.requires_grad_(False)
    t_tower = time.monotonic() - t0
    ground = recipe.grounding_rows(args.work, train, cfg)
    lesions = {r.mask_path: recipe.lesions_of(r) for r in ground}
    recipe.train_grounding(model, ground, lesions, cfg, train)
    t_grounding = time.monotonic() - t0 - t_tower
    if args.save:
        write_state_dict(model.llm.state_dict(), args.save)

    model.eval()
    truth = [mask_zones(read_mask(r.mask_path)) for r in test]
    tower_ok, text_ok, repeats, limit, samples = [], [], [], [], []
    with torch.no_grad():
        for start in range(0, len(test), 16):
            batch = test[start : start + 16]
            if tower is not None:
                pixels = recipe.tower_targets(model, batch)[0]
                hot = tower.zone_head(recipe.tower_features(model, pixels).flatten(1)) > 0
                names = [[z for z, on in zip(recipe.ZONES, row) if on] or ["none"] for row in hot.tolist()]
            else:
                names = [[] for _ in batch]
            images = [read_image(r.image_path) for r in batch]
            inputs = model.llm.encode(model.prompts([r.question for r in batch]), images, None, padding_side="left")
            answers = model.llm.generate_from(model.llm(inputs, use_cache=True), max_new_tokens=MAX_NEW_TOKENS)
            lengths = [len(model.llm.tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers]
            for i, (named, answer, n_tok) in enumerate(zip(names, answers, lengths)):
                want = truth[start + i]
                tower_ok.append(sorted(named) == sorted(want))
                text_ok.append(text_zones(answer) == want)
                repeats.append(repeats_a_word(answer))
                limit.append(n_tok >= MAX_NEW_TOKENS - 1)
                if len(samples) < 12 or (len(want) > 1 and len(samples) < 16) or (want == ["none"] and
                                                                                   len(samples) < 20):
                    samples.append({"truth": want, "answer": answer})

    main_truth = truth[:n_main]
    groups = {"overall": [i for i, t in enumerate(main_truth) if t != ["none"]],
              "two_lesions": [i for i, t in enumerate(main_truth) if len(t) > 1],
              "no_lesion": [i for i, t in enumerate(main_truth) if t == ["none"]],
              "two_lesions_large": [i for i in range(n_main, len(test)) if len(truth[i]) > 1]}
    for i, r in enumerate(test[:n_main]):
        if truth[i] != ["none"]:
            groups.setdefault(r.modality, []).append(i)

    def rates(flags):
        return {name: round(sum(flags[i] for i in idx) / max(1, len(idx)), 3) for name, idx in groups.items()}

    every = range(len(test))
    result = {"set": args.set, "tower_from": str(args.tower_from or ""), "n_test": len(test),
              "seconds": {"tower": round(t_tower), "grounding": round(t_grounding)},
              "tower_zone_acc": rates(tower_ok) if tower is not None else None, "text_zone_acc": rates(text_ok),
              "repeats": round(sum(repeats[i] for i in every) / len(test), 3),
              "hit_limit": round(sum(limit[i] for i in every) / len(test), 3), "samples": samples}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
