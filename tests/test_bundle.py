"""Adapter bundles: round trip, tamper detection, refusal of another base model, atomic writes."""

from __future__ import annotations

import json

import pytest
import torch

from prsmed.model.bundle import MANIFEST, BundleError, load_bundle, read_manifest, save_bundle, verify_bundle
from prsmed.model.spec import ComponentRef
from prsmed.zoo import build_model, get_preset


def _perturb(model) -> None:
    """Stand-in for training: move every trainable tensor so a round trip has something to carry."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.01)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("prsmed-tiny")
    _perturb(model)
    out = tmp_path_factory.mktemp("bundles") / "adapter"
    manifest = save_bundle(model, out, training={"epochs": 1}, metrics={"mDice": 0.5})
    return model, out, manifest


def _trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_round_trip_restores_every_trained_tensor(trained):
    model, out, manifest = trained
    assert {"lora/adapter_config.json", "lora/adapter_model.safetensors", "vision_encoder.safetensors",
            "fusion_head.safetensors", "README.md"} <= set(manifest.files)
    cfg = json.loads((out / "lora" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["peft_type"] == "LORA"
    torch.manual_seed(123)
    fresh = build_model("prsmed-tiny")
    before = _trainable_state(fresh)
    load_bundle(out, fresh)
    want, got = _trainable_state(model), _trainable_state(fresh)
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)
    assert any(not torch.equal(before[n], got[n]) for n in got)
    card = (out / "README.md").read_text()
    assert "library_name: peft" in card and "Research use only" in card and "mDice" in card


def test_tampered_file_is_refused(trained, tmp_path):
    _, out, _ = trained
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(out, copy)
    path = copy / "fusion_head.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="fusion_head.safetensors: SHA-256"):
        verify_bundle(copy)
    (copy / "extra.safetensors").write_bytes(b"x")
    with pytest.raises(BundleError, match="extra.safetensors: weight file not listed"):
        verify_bundle(copy)


def test_bundle_for_another_base_model_is_refused_and_leaves_model_untouched(trained):
    _, out, _ = trained
    spec = get_preset("prsmed-tiny").spec.model_copy(deep=True)
    spec.fusion_head = ComponentRef(name="prsmed", options={**spec.fusion_head.options, "hidden_dim": 64})
    other = build_model(spec)
    before = _trainable_state(other)
    with pytest.raises(BundleError, match="was trained on base model 'prsmed-tiny'"):
        load_bundle(out, other)
    after = _trainable_state(other)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_half_written_manifest_is_a_clear_error(trained, tmp_path):
    _, out, _ = trained
    import shutil

    copy = tmp_path / "half"
    shutil.copytree(out, copy)
    text = (copy / MANIFEST).read_text()
    (copy / MANIFEST).write_text(text[: len(text) // 2])
    with pytest.raises(BundleError, match="not valid JSON"):
        read_manifest(copy)


def test_save_is_atomic_and_does_not_clobber(trained, tmp_path):
    model, out, _ = trained
    with pytest.raises(BundleError, match="already exists"):
        save_bundle(model, out)
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []
