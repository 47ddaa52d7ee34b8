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
                       max_steps=2, batch_size=4)
    summary = build_tiny(tmp_path / "work", cfg, assets_dir=tmp_path / "assets", progress=False)
    assert summary["joint_stage"] == {"status": "completed", "steps": 2}
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
