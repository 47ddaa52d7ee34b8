"""An adapter knows which base weights it was trained on: the shipped weights' record, bundles that record the
identity, and every loading path refusing a bundle trained on other base weights (or written before the record)
unless told otherwise."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import prsmed.zoo
from prsmed.base_weights import NO_WEIGHTS, check_record, combine, identify, read_record
from prsmed.cli import app
from prsmed.data.synth import synthesize
from prsmed.fileio import sha256_file
from prsmed.infer import BundleError, Predictor
from prsmed.model.bundle import MANIFEST, BaseWeightsMismatch, load_bundle, read_manifest, save_bundle
from prsmed.zoo import PRESETS, build_model
from prsmed.zoo.recipe import WEIGHTS_REVISION

from samples import SHIPPED, train_stand_in, trainable
EXAMPLE = Path(__file__).resolve().parents[1] / "demo" / "examples" / "lung_Xray.png"


@pytest.fixture(scope="module")
def current():
    return read_record(SHIPPED)


@pytest.fixture(scope="module")
def predating_bundle(tmp_path_factory):
    """A bundle as prsmed wrote them before the record: format 1, no base.weights (the files' hashes still match)."""
    model = build_model("prsmed-tiny")
    train_stand_in(model, 4)
    out = tmp_path_factory.mktemp("bundles") / "predating"
    save_bundle(model, out)
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["format_version"] = 1
    del manifest["base"]["weights"]
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return out


# the shipped weights' record ------------------------------------------------------------------------------------

def test_record_matches_the_shipped_files_and_the_preset_revision(current):
    assert current is not None, f"{SHIPPED / 'weights.json'} is missing; run the recipe's save_assets"
    files = {p.name: sha256_file(p) for p in SHIPPED.glob("*.safetensors") if p.name != "tower_probe.safetensors"}
    assert current.files == files and len(files) == 4
    # Read by fine-tuning only: recorded and checked, outside the identity.
    assert current.training_files == {"tower_probe.safetensors": sha256_file(SHIPPED / "tower_probe.safetensors")}
    assert current.identity == combine(files)
    assert check_record(SHIPPED) == []
    assert current.preset == "prsmed-tiny"
    assert current.revision == PRESETS["prsmed-tiny"].spec.revision == WEIGHTS_REVISION
    assert "synthetic" in current.trained_on.lower() and "prsmed data synth" in current.trained_on
    assert "not for real scans" in current.intended_use.lower()


def test_a_model_built_from_the_shipped_files_carries_their_identity(current):
    assert build_model("prsmed-tiny").base_weights == current.as_identity()
    assert build_model("prsmed-tiny", weights=False).base_weights == NO_WEIGHTS
    assert prsmed.zoo.base_weights("prsmed-tiny") == current.as_identity()


def test_check_record_names_a_changed_file(tmp_path):
    folder = tmp_path / "w"
    shutil.copytree(SHIPPED, folder)
    (folder / "fusion_head.safetensors").write_bytes(b"\0" * 16)
    assert any(p.startswith("fusion_head.safetensors: SHA-256") for p in check_record(folder))


def test_large_safetensors_are_sampled_per_tensor_whatever_the_sharding(tmp_path, monkeypatch):
    tensors = {f"layer{i}.weight": torch.randn(300, 300) for i in range(4)}
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    save_file(tensors, str(tmp_path / "one" / "model.safetensors"))
    save_file(dict(list(tensors.items())[:2]), str(tmp_path / "two" / "model-1.safetensors"))
    save_file(dict(list(tensors.items())[2:]), str(tmp_path / "two" / "model-2.safetensors"))
    (tmp_path / "one").rename(tmp_path / "weights")
    first = identify([tmp_path / "weights"])
    (tmp_path / "weights").rename(tmp_path / "one")
    (tmp_path / "two").rename(tmp_path / "weights")
    assert identify([tmp_path / "weights"]) == first and first.method == "sampled"
    moved = load_file(str(tmp_path / "weights" / "model-2.safetensors"))
    moved["layer3.weight"][0, 0] += 1  # in the first 64 KiB of that tensor
    save_file(moved, str(tmp_path / "weights" / "model-2.safetensors"))
    assert identify([tmp_path / "weights"]).identity != first.identity


# refusing other base weights ------------------------------------------------------------------------------------

def test_bundle_records_the_base_weights_and_its_card_names_them(old_bundle, current):
    out, old, _ = old_bundle
    assert read_manifest(out).base.weights == old.as_identity()
    card = (out / "README.md").read_text()
    assert "revision old" in card and old.identity in card


def test_bundle_from_other_base_weights_is_refused_naming_both(old_bundle, current):
    out, old, _ = old_bundle
    model = build_model("prsmed-tiny")
    before = trainable(model)
    with pytest.raises(BaseWeightsMismatch) as refused:
        load_bundle(out, model)
    message = str(refused.value)
    assert f"revision old (identity {old.identity[:12]})" in message
    assert f"revision {current.revision} (identity {current.identity[:12]})" in message
    assert "retrain" in message and "--allow-other-base-weights" in message
    assert all(torch.equal(before[n], p) for n, p in trainable(model).items())


def test_the_override_loads_it_and_says_so(old_bundle, caplog):
    out, _, trained = old_bundle
    model = build_model("prsmed-tiny")
    with caplog.at_level(logging.WARNING, logger="prsmed.model.bundle"):
        load_bundle(out, model, allow_other_base_weights=True)
    assert "loading it anyway" in caplog.text
    got = trainable(model)
    assert all(torch.equal(got[n], trained[n]) for n in trained)


def test_bundle_without_a_record_is_refused_as_predating_it(predating_bundle, current):
    model = build_model("prsmed-tiny")
    with pytest.raises(BaseWeightsMismatch, match="predates base-weights records") as refused:
        load_bundle(predating_bundle, model)
    assert f"identity {current.identity[:12]}" in str(refused.value)
    load_bundle(predating_bundle, model, allow_other_base_weights=True)


def test_predictor_refuses_unless_allowed(old_bundle, tmp_path):
    out, old, _ = old_bundle
    with pytest.raises(BundleError, match=f"identity {old.identity[:12]}"):
        Predictor("prsmed-tiny", adapter_dir=tmp_path).load_adapter(str(out))
    allowed = Predictor("prsmed-tiny", adapter_dir=tmp_path, allow_other_base_weights=True)
    assert allowed.predict(EXAMPLE, "Where is the lesion?", adapter=str(out)).adapter == "old-adapter"


# the commands ---------------------------------------------------------------------------------------------------

def _flat(text: str) -> str:
    return " ".join(text.split())  # rich wraps long lines at the terminal's width


def test_cli_predict_and_eval_refuse_unless_allowed(old_bundle, current, tmp_path):
    out, old, _ = old_bundle
    runner = CliRunner()
    refused = runner.invoke(app, ["predict", str(EXAMPLE), "-q", "Where is the lesion?", "--adapter", str(out)])
    assert refused.exit_code == 2
    assert f"identity {old.identity[:12]}" in _flat(refused.output)
    assert f"identity {current.identity[:12]}" in _flat(refused.output)
    allowed = runner.invoke(app, ["predict", str(EXAMPLE), "-q", "Where is the lesion?", "--adapter", str(out),
                                  "--allow-other-base-weights", "--json"])
    assert allowed.exit_code == 0, allowed.output
    synthesize(tmp_path / "data", n=12, seed=1, size=64)
    refused = runner.invoke(app, ["eval", "--data", str(tmp_path / "data"), "--split", "train", "--adapter", str(out)])
    assert refused.exit_code == 2 and "--allow-other-base-weights" in _flat(refused.output)


def test_zoo_show_names_the_weights_and_what_they_are_for(current):
    shown = CliRunner().invoke(app, ["zoo", "show", "prsmed-tiny"])
    assert shown.exit_code == 0, shown.output
    text = _flat(shown.output)
    assert f"weights: revision {current.revision}, identity {current.identity[:12]}" in text
    assert "Synthetic drawings only" in text and "not for real scans" in text
    assert "weights record problem" not in text
