"""How prsmed-tiny answers images unlike its training data: blank images, real CT and MR slices, scans with no
lesion. The answers should still be whole sentences, and where the model finds no lesion it should say so.

    python bench/answers_off_domain.py [--adapter DIR] [--json runs/off-domain.json]

Inputs: an all-black and an all-grey 256² image, a 1×1 grey image, the real CT and MR slices that pydicom ships
as test files (``CT_small.dcm``, ``MR_small.dcm``; read from the installed package, not copied into this
repository), and 30 fresh synthetic images with no lesion (5 per style). For each: the answer, whether it is a
well-formed sentence (ends with a full stop, no word repeated back to back, stopped before the length limit),
whether it says there is no lesion, the mask's area and the confidence.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

MAX_NEW_TOKENS = 64


def well_formed(answer: str, n_tokens: int) -> bool:
    from prsmed.train.answer_eval import repeats_a_word

    return (answer.endswith(".") and not repeats_a_word(answer) and n_tokens < MAX_NEW_TOKENS - 1
            and len(answer.split()) >= 3)


def inputs(tmp: Path) -> list[tuple[str, str, str]]:
    """(name, path, kind) for every input."""
    from pydicom.data import get_testdata_file

    from prsmed.data.layout import load_records
    from prsmed.data.synth import synthesize

    out = []
    for name, arr in (("black 256²", np.zeros((256, 256), np.uint8)), ("grey 256²", np.full((256, 256), 128, np.uint8)),
                      ("grey 1×1", np.full((1, 1), 128, np.uint8))):
        path = tmp / (name.split()[0] + str(arr.shape[0]) + ".png")
        Image.fromarray(arr).save(path)
        out.append((name, str(path), "blank"))
    for name in ("CT_small.dcm", "MR_small.dcm"):
        out.append((f"real {name}", get_testdata_file(name), "real scan"))
    synthesize(tmp / "normal", n=300, seed=1234, size=256, no_lesion_fraction=0.5)
    empty = [r for r in load_records(tmp / "normal") if not np.asarray(Image.open(r.mask_path)).any()]
    by_style: dict[str, int] = {}
    for r in empty:
        if by_style.get(r.modality, 0) < 5:
            by_style[r.modality] = by_style.get(r.modality, 0) + 1
            out.append((f"no lesion, {r.modality}", str(r.image_path), "synthetic, no lesion"))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", type=Path)
    parser.add_argument("--question", default="Where is the lesion in this image?")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from prsmed.data.zones import NONE, zones_from_text
    from prsmed.infer.predictor import Predictor

    predictor = Predictor("prsmed-tiny", max_new_tokens=MAX_NEW_TOKENS)
    adapter = None
    if args.adapter:
        adapter = predictor.load_adapter(args.adapter).name
    tok = predictor.model.llm.tokenizer
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, path, kind in inputs(Path(tmp)):
            res = predictor.predict(path, args.question, adapter=adapter)
            n_tok = len(tok(res.answer, add_special_tokens=False)["input_ids"])
            rows.append({"input": name, "kind": kind, "answer": res.answer,
                         "well_formed": well_formed(res.answer, n_tok),
                         "says_no_lesion": zones_from_text(res.answer) == [NONE],
                         "mask_area": round(res.area_fraction, 4), "confidence": round(res.confidence, 3)})
    for r in rows:
        print(f"{r['input']:34s} {'ok ' if r['well_formed'] else 'BAD'} {'none' if r['says_no_lesion'] else '    '} "
              f"area {r['mask_area']:.3f}  {r['answer']!r}")
    kinds = sorted({r["kind"] for r in rows})
    summary = {k: {"n": sum(r["kind"] == k for r in rows),
                   "well_formed": sum(r["well_formed"] for r in rows if r["kind"] == k),
                   "says_no_lesion": sum(r["says_no_lesion"] for r in rows if r["kind"] == k),
                   "empty_mask": sum(r["mask_area"] == 0 for r in rows if r["kind"] == k)} for k in kinds}
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
