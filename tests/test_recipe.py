"""The prsmed-tiny recipe end to end at toy scale: every stage runs and the weights it writes load back."""

from __future__ import annotations

import json

import pytest
import torch

from prsmed.base_weights import check_record, read_record
from prsmed.zoo import build_model
from prsmed.zoo.presets import PRESETS
from prsmed.zoo.recipe import PARTS, WEIGHTS_REVISION, RecipeConfig, build_tiny


@pytest.mark.slow
def test_recipe_writes_loadable_weights(tmp_path):
    cfg = RecipeConfig(n_images=60, tower_steps=3, tower_batch=8, grounding_steps=3, grounding_batch=4, epochs=1,
                       max_steps=2, batch_size=4, grounding_lung_ct_images=12)
    summary = build_tiny(tmp_path / "work", cfg, assets_dir=tmp_path / "assets", progress=False)
    assert summary["joint_stage"] == {"status": "completed", "steps": 2}
    extra = list((tmp_path / "work" / "grounding-data" / "data" / "lung_CT").glob("train_images/*"))
    assert len(extra) == 12  # the grounding stage's own lung CT images
    assert json.loads((tmp_path / "work" / "recipe.json").read_text())["recipe"]["n_images"] == 60
    assert sorted(p.name for p in (tmp_path / "assets").iterdir()) == sorted(
        [f"{p}.safetensors" for p in PARTS] + ["tower_probe.safetensors", "weights.json"])
    record = read_record(tmp_path / "assets")  # the preset's revision comes from this record
    assert record.revision == WEIGHTS_REVISION and check_record(tmp_path / "assets") == []
    spec = PRESETS["prsmed-tiny"].spec.model_copy(deep=True)
    for kind in ("vision_encoder", "llm", "fusion_head"):
        getattr(spec, kind).options["checkpoint"] = str(tmp_path / "assets" / f"{kind}.safetensors")
    torch.manual_seed(99)
    model = build_model(spec)  # strict loading: every tensor of every part fits the preset
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "assets" / "fusion_head.safetensors"))
    for name, tensor in model.fusion_head.state_dict().items():
        torch.testing.assert_close(tensor, saved[name])


def test_extra_images_leave_each_looks_share_of_the_grounding_draws():
    from types import SimpleNamespace

    from prsmed.zoo.recipe import draw_weights

    def rows(look, n, lesions, tag):  # the mask path says how many lesions: "a/lung_CT/2/7"
        return [SimpleNamespace(modality=look, mask_path=f"{tag}/{look}/{lesions}/{i}") for i in range(n)]

    base = rows("lung_CT", 20, 1, "a") + rows("lung_CT", 20, 2, "a") + rows("skin", 60, 1, "a")
    extra = rows("lung_CT", 100, 1, "b") + rows("lung_CT", 100, 2, "b")
    lesions = {r.mask_path: [("top left", False)] * int(r.mask_path.split("/")[2]) for r in base + extra}
    cfg = RecipeConfig(multi_lesion_weight=3.0, keep_look_shares=True)
    alone = draw_weights(base, lesions, cfg)
    more = draw_weights(base + extra, lesions, cfg, base)

    def share(weights, records, pick):
        return float(sum(w for w, r in zip(weights, records) if pick(r)) / weights.sum())

    for pick in (lambda r: r.modality == "skin", lambda r: len(lesions[r.mask_path]) == 2):
        assert share(more, base + extra, pick) == pytest.approx(share(alone, base, pick))
    assert share(alone, base, lambda r: len(lesions[r.mask_path]) == 2) == pytest.approx(60 / 140)
    two = [w for w, r in zip(more, base + extra) if len(lesions[r.mask_path]) == 2]
    one = [w for w, r in zip(more, base + extra) if r.modality == "lung_CT" and len(lesions[r.mask_path]) == 1]
    assert float(two[0]) == pytest.approx(3 * float(one[0]))
