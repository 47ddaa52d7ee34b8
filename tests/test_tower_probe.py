"""The tower probe: targets made from masks, the trainer teaching the LLM's image tower through it, and the tower
carried by the adapter bundle."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from prsmed.data.synth import synthesize
from prsmed.data.zones import ZONES
from prsmed.model.bundle import load_bundle, read_manifest
from prsmed.train.config import TrainConfig
from prsmed.train.tower_probe import load_probe, token_targets, unstretch
from prsmed.train.trainer import TOWER_READS_ENOUGH, TrainingError, run_training
from prsmed.zoo import build_model, resolve_spec


def test_targets_mark_the_lesion_tokens_and_zones():
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[4:12, 6:14] = 1  # top left
    mask[50:60, 48:58] = 1  # bottom right
    t = token_targets([mask], tokens=16)  # a 4x4 grid: each token covers 16x16 pixels
    cells = t.cells[0].reshape(4, 4)
    assert cells[0, 0] == 1 and cells[3, 3] == 1 and cells.sum() == 2
    tz = t.token_zones[0].reshape(4, 4)
    assert tz[0, 0] == ZONES.index("top left") and tz[3, 3] == ZONES.index("bottom right")
    assert (tz == -100).sum() == 14
    assert t.zones[0].tolist() == [1.0 if z in ("top left", "bottom right") else 0.0 for z in ZONES]
    empty = token_targets([np.zeros((64, 64), dtype=np.uint8)], tokens=16)
    assert empty.cells.sum() == 0 and empty.zones.sum() == 0 and (empty.token_zones == -100).all()


def test_targets_follow_the_towers_padding_of_a_wide_image():
    # A 128x64 image is padded to 128x128 with 32 rows above: a lesion in its top rows lies in the second token row.
    mask = np.zeros((64, 128), dtype=np.uint8)
    mask[0:4, 0:4] = 1
    cells = token_targets([mask], tokens=16).cells[0].reshape(4, 4)
    assert cells[1, 0] == 1 and cells.sum() == 1
    # The trainer's masks are stretched to a square; unstretch gives back the image's aspect.
    square = torch.zeros(8, 8)
    assert unstretch(square, (16, 8)).shape == (4, 8)
    assert unstretch(square, (8, 16)).shape == (8, 4)


def test_the_tiny_model_ships_a_probe_that_reads_its_tower():
    model = build_model("prsmed-tiny")
    probe = load_probe(model)
    assert probe is not None and not any(p.requires_grad for p in probe.parameters())
    assert model.spec.train.llm_image_path
    tower_ids = {id(p) for p in model.llm_image_path.parameters()}
    assert tower_ids and all(p.requires_grad for p in model.llm_image_path.parameters())
    # Of the base LLM only the image path and the output layer train: its text model stays frozen apart from LoRA.
    head_ids = {id(p) for p in model.llm_output.parameters()}
    text = [n for n, p in model.llm.named_parameters() if p.requires_grad and id(p) not in tower_ids | head_ids]
    assert text and all("lora_" in n for n in text)


def _tiny_data(tmp_path, style="histology_slide"):
    data = tmp_path / "data"
    synthesize(data, n=24, seed=5, size=128, style=style)
    return data


def test_fine_tuning_trains_the_tower_through_the_probe_and_the_bundle_carries_it(tmp_path):
    data = _tiny_data(tmp_path)
    out = tmp_path / "run"
    cfg = TrainConfig(model="prsmed-tiny", data=data, out=out, max_steps=4, batch_size=4, val_answer_rows=0,
                      adapter_weights="last", progress=False, tensorboard=False)
    assert (cfg.tower_weight, cfg.tower_lr) == (1.0, 3e-3)  # the tiny model's defaults
    before = {k: v.clone() for k, v in build_model("prsmed-tiny").llm_image_path.state_dict().items()}
    result = run_training(cfg)
    assert result.status == "completed"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss_tower"] for r in rows if "loss_tower" in r]
    assert len(losses) == 4 and all(np.isfinite(losses))
    tower = json.loads((out / "summary.json").read_text())["image_tower"]
    assert tower["trained"] is True and tower["probe_reads_before"] < TOWER_READS_ENOUGH
    manifest = read_manifest(out / "adapter")
    assert "llm_image_path" in manifest.parts
    fresh = build_model("prsmed-tiny")
    load_bundle(out / "adapter", fresh)
    after = fresh.llm_image_path.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "the tower did not change"


def test_the_tower_lr_applies_to_the_tower_alone(tmp_path):
    from prsmed.train.trainer import Trainer

    cfg = TrainConfig(model="prsmed-tiny", data=_tiny_data(tmp_path), out=tmp_path / "run", max_steps=1,
                      tower_lr=7e-3, lr=2e-4, progress=False, tensorboard=False)
    trainer = Trainer(cfg)
    try:
        trainer.setup()
        groups = trainer.optimizer.param_groups
        assert [g["initial_lr"] for g in groups] == [2e-4, 7e-3]
        tower = {id(p) for p in trainer.model.llm_image_path.parameters()}
        assert {id(p) for p in groups[1]["params"]} == tower
    finally:
        trainer.close()


def test_a_model_without_a_probe_refuses_tower_weight(tmp_path):
    spec = resolve_spec("prsmed-tiny")
    spec.name = "my-tiny"  # a user's spec: no probe ships beside its weights
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(spec.model_dump_json())
    cfg = TrainConfig(model=str(spec_file), data=_tiny_data(tmp_path), out=tmp_path / "run", max_steps=1,
                      tower_weight=1.0, progress=False, tensorboard=False)
    result = run_training(cfg)  # a failed run returns its reason; the Trainer raises it
    assert result.status == "failed" and re.search("needs a tower probe.*my-tiny", result.reason)
    from prsmed.train.trainer import Trainer

    with pytest.raises(TrainingError, match="needs a tower probe.*my-tiny"):
        Trainer(cfg.model_copy(update={"out": tmp_path / "run2"})).setup()


def test_a_look_the_tower_already_reads_leaves_it_frozen(tmp_path):
    data = tmp_path / "data"
    synthesize(data, n=32, seed=5, size=256)  # the six looks the recipe taught
    out = tmp_path / "run"
    cfg = TrainConfig(model="prsmed-tiny", data=data, out=out, max_steps=2, batch_size=4, val_answer_rows=0,
                      adapter_weights="last", progress=False, tensorboard=False)
    assert run_training(cfg).status == "completed"
    tower = json.loads((out / "summary.json").read_text())["image_tower"]
    assert tower["probe_reads_before"] >= TOWER_READS_ENOUGH and tower["trained"] is False
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert not any("loss_tower" in r for r in rows)
    base, tuned = build_model("prsmed-tiny"), build_model("prsmed-tiny")
    load_bundle(out / "adapter", tuned)
    assert all(torch.equal(a, b) for a, b in zip(base.llm_image_path.state_dict().values(),
                                                 tuned.llm_image_path.state_dict().values()))


def test_the_tower_warm_up_teaches_the_tower_alone_before_the_first_step(tmp_path):
    from prsmed.data.layout import load_records
    from prsmed.data.readers import read_image, read_mask
    from prsmed.train.trainer import Trainer

    data = _tiny_data(tmp_path)
    cfg = TrainConfig(model="prsmed-tiny", data=data, out=tmp_path / "run", max_steps=1, batch_size=4,
                      tower_warmup_steps=30, progress=False, tensorboard=False)
    trainer = Trainer(cfg)
    try:
        trainer.setup()
        rows = [r for r in load_records(data) if r.split == "train"]
        llm, probe = trainer.model.llm, trainer.tower_probe
        pixels = llm.preprocess_images([read_image(r.image_path).convert("RGB") for r in rows])
        targets = token_targets([read_mask(r.mask_path) for r in rows], probe.tokens)

        def probe_loss() -> float:
            with torch.no_grad():
                return float(probe.loss(llm.image_features(pixels), targets))

        tower = {id(p) for p in trainer.model.llm_image_path.parameters()}
        others = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if id(p) not in tower}
        before = probe_loss()
        trainer.warm_up_tower()
        assert probe_loss() < 0.8 * before
        assert all(torch.equal(p, others[n]) for n, p in trainer.model.named_parameters() if n in others)
    finally:
        trainer.close()
