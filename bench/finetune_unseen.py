"""Fine-tune prsmed-tiny on a visual style and an answer wording it has never seen; score the test split before
and after, on the masks and on the answers.

    python bench/finetune_unseen.py [--work runs/finetune-unseen] [--style retina_fundus] [--phrasing plain]
                                    [--n 400] [--set epochs=3 --set lr=5e-4 ...] [--base PATH]
    python bench/finetune_unseen.py --suite --work runs/finetune-suite      # the six cases of bench/RESULTS.md

The data is `prsmed data synth --style STYLE --phrasing PHRASING` (an unseen look: retina fundus, histology or a
thermal image; answers worded as that phrasing says, e.g. "upper left" and "centre"). The fine-tuning is the
ordinary `prsmed train` path with the model's default settings (``--set FIELD=VALUE`` overrides any TrainConfig
field), and the adapter bundle is loaded back for the second evaluation. Besides the segmentation and zone
metrics it reports how the answers read:

* ``phrasing_match``: answers that name their zones with the dataset's own words (``upper left`` where the
  dataset says so), over the rows with a lesion;
* ``repeats``: answers with a word repeated back to back; ``hit_limit``: answers that ran to the length limit.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

KEYS = ("dice@0.5", "meanDic", "zone_acc_text", "zone_acc_mask", "agreement", "phrasing_match", "repeats",
        "hit_limit")
SUITE = (  # (style, phrasing, images): three unseen looks, three wordings, two small datasets (one in words the tiny
    # tokenizer spells letter by letter, one in words it knows); and the six looks the model knows with a wording it
    # does not, which separates reading a new look from learning new words
    ("retina_fundus", "plain", 400),
    ("histology_slide", "radiology", 400),
    ("thermal_image", "anatomical", 125),
    ("thermal_image", "plain", 125),
    ("standard", "radiology", 400),
    # words the base never wrote (not in prsmed.data.vocabulary): the limit of the tiny model's language
    ("histology_slide", "outermost", 125),
)
MAX_NEW_TOKENS = 48


def follows(answer: str, phrasing: str) -> bool:
    """The answer names each of its zones with the phrasing's own words."""
    from prsmed.data.templates import PHRASINGS
    from prsmed.data.zones import NONE, zones_from_text

    zones = [z for z in zones_from_text(answer) if z != NONE]
    if phrasing not in PHRASINGS:
        return bool(zones)
    words = PHRASINGS[phrasing].quadrants
    return bool(zones) and all(words[z] in answer.lower() for z in zones)


def score(model, data: Path, phrasing: str) -> tuple[dict, list[dict]]:
    from prsmed.data.layout import load_records
    from prsmed.eval.runner import predict_records, summarize
    from prsmed.train.answer_eval import repeats_a_word

    results = predict_records(model, load_records(data, split="test"), batch_size=16,
                              max_new_tokens=MAX_NEW_TOKENS)
    overall = summarize(results)["overall"]
    tok = model.llm.tokenizer
    with_lesion = [r for r in results if r.zones_gt != ["none"]]
    overall["phrasing_match"] = sum(follows(r.answer, phrasing) for r in with_lesion) / max(1, len(with_lesion))
    overall["repeats"] = sum(repeats_a_word(r.answer) for r in results) / max(1, len(results))
    overall["hit_limit"] = sum(len(tok(r.answer, add_special_tokens=False)["input_ids"]) >= MAX_NEW_TOKENS - 1
                               for r in results) / max(1, len(results))
    samples = [{"truth": r.zones_gt, "reference": r.record.answer, "answer": r.answer} for r in results[:6]]
    return overall, samples


def base_model(base_llm: Path | None, lora: dict | None = None):
    """prsmed-tiny as shipped, or with the LLM's weights taken from a pilot's file (``--base-llm``), or with other
    LoRA settings (``--lora r=16 --lora target_modules=REGEX``)."""
    from prsmed.weights import read_state_dict
    from prsmed.zoo import build_model, resolve_spec

    if lora:
        spec = resolve_spec("prsmed-tiny")
        spec.lora = spec.lora.model_copy(update=lora)
        model = build_model(spec)
    else:
        model = build_model("prsmed-tiny")
    if base_llm is not None:
        state = read_state_dict(base_llm)
        own = model.llm.state_dict()
        # The pilot's file has no LoRA; the model's LoRA stays as freshly built (B = 0: no change).
        model.llm.load_state_dict({k: state.get(k.replace(".base_layer", ""), v) for k, v in own.items()})
    return model


def run_case(work: Path, style: str, phrasing: str, n: int, seed: int, overrides: dict,
             base_llm: Path | None, lora: dict | None = None) -> dict:
    from prsmed.data.synth import synthesize
    from prsmed.model.bundle import load_bundle
    from prsmed.train.config import TrainConfig
    from prsmed.train.trainer import run_training

    data = work / "data"
    if not (data / "annotations").is_dir():
        synthesize(data, n=n, seed=seed, size=256, style=style, phrasing=phrasing)
    before, before_samples = score(base_model(base_llm), data, phrasing)
    t0 = time.monotonic()
    run = work / "run"
    config = TrainConfig(model="prsmed-tiny", data=data, out=run, seed=seed, progress=False, resume=run.exists(),
                         **overrides)
    result = run_training(config, model=base_model(base_llm, lora) if base_llm or lora else None)
    seconds = time.monotonic() - t0
    tuned = base_model(base_llm, lora)
    load_bundle(run / "adapter", tuned)
    after, after_samples = score(tuned, data, phrasing)
    tower = json.loads((run / "summary.json").read_text()).get("image_tower")
    return {"style": style, "phrasing": phrasing, "images": n, "overrides": overrides, "lora": lora,
            "before": before,
            "after": after, "train_status": result.status, "train_steps": result.step,
            "train_seconds": round(seconds, 1), "test_rows": before["n"], "image_tower": tower,
            "samples_before": before_samples, "samples_after": after_samples}


def print_case(case: dict) -> None:
    print(f"\n{case['style']} / {case['phrasing']} / {case['images']} images: {case['train_steps']} steps, "
          f"{case['train_seconds']} s, {case['test_rows']} test rows; image tower: {case['image_tower']}")
    print(f"{'metric':15s} {'before':>8s} {'after':>8s}")
    for k in KEYS:
        print(f"{k:15s} {case['before'][k]:8.3f} {case['after'][k]:8.3f}")
    for s in case["samples_after"][:4]:
        print(f"  {s['truth']}: {s['answer']!r}  (dataset: {s['reference']!r})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("runs/finetune-unseen"))
    parser.add_argument("--style", default="retina_fundus")
    parser.add_argument("--phrasing", default="plain")
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--suite", action="store_true", help="run the six cases of bench/RESULTS.md")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a TrainConfig field for the fine-tuning (default: the model's defaults)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--base-llm", type=Path, help="pilots: take the LLM's weights from this safetensors file "
                        "(bench/grounding_pilot.py --save) instead of the shipped ones")
    parser.add_argument("--lora", action="append", default=[], metavar="FIELD=VALUE",
                        help="pilots: a LoraSpec field of the model (r, alpha, dropout, target_modules)")
    args = parser.parse_args()

    lora = {}
    for item in args.lora:
        key, _, value = item.partition("=")
        lora[key] = json.loads(value) if key != "target_modules" else value
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = json.loads(value) if value[:1] in "[{0123456789-" or value in ("true", "false") else value
    cases = SUITE if args.suite else ((args.style, args.phrasing, args.n),)
    out = []
    for style, phrasing, n in cases:
        work = args.work / f"{style}-{phrasing}-{n}" if args.suite else args.work
        case = run_case(work, style, phrasing, n, args.seed, overrides, args.base_llm, lora or None)
        print_case(case)
        out.append(case)
    print(json.dumps(out))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
