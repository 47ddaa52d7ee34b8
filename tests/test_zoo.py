"""Zoo presets: described on the meta device, missing weights explained, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from prsmed.zoo import WeightsMissing, build_model, describe, list_presets, resolve_spec


def test_presets_are_listed_and_filtered():
    assert list_presets() == ["prsmed-llava-med-7b", "prsmed-sam-vit-b", "prsmed-tiny"]
    assert list_presets("*7b") == ["prsmed-llava-med-7b"]


def test_paper_preset_parameter_counts_match_the_paper():
    info = describe("prsmed-llava-med-7b")
    by = info["params"]["by_component"]
    assert by["llm"]["lora"] == 13_631_488  # PRSMED.md 1.2: 32 layers x r16 on q,k,v,o
    assert by["fusion_head"]["total"] == 5_366_465  # PRSMED.md 1.3, exact
    assert by["modality_head"]["total"] == 256 * 6 + 6
    assert 5.0e6 < by["vision_encoder"]["total"] < 6.5e6  # TinyViT-5M + SAM neck, about 5.8M
    assert 7.5e9 < by["llm"]["total"] < 7.7e9  # Mistral-7B + CLIP-L/336 + projector, about 7.6B
    trainable = info["params"]["trainable"]
    assert 24e6 < trainable < 26.5e6  # about 25M trainable


def test_sam_vit_b_preset_counts():
    by = describe("prsmed-sam-vit-b")["params"]["by_component"]
    assert 85e6 < by["vision_encoder"]["total"] < 95e6  # SAM ViT-B image encoder, about 89.7M


def test_missing_big_weights_say_what_to_get_and_where(tmp_path, monkeypatch):
    monkeypatch.setenv("PRSMED_HOME", str(tmp_path))
    with pytest.raises(WeightsMissing) as e:
        build_model("prsmed-llava-med-7b")
    msg = str(e.value)
    assert str(tmp_path / "weights" / "tinysam_42.3.pth") in msg
    assert "llava-med-v1.5-mistral-7b-hf" in msg and "prsmed convert llava-med" in msg
    # once the files are there, the spec points at them
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "tinysam_42.3.pth").write_bytes(b"")
    (tmp_path / "weights" / "llava-med-v1.5-mistral-7b-hf").mkdir()
    spec = resolve_spec("prsmed-llava-med-7b")
    assert spec.vision_encoder.options["checkpoint"].endswith("tinysam_42.3.pth")


def test_cli_zoo_show_json():
    proc = subprocess.run([sys.executable, "-m", "prsmed.cli", "zoo", "show", "prsmed-tiny", "--json"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["name"] == "prsmed-tiny" and info["params"]["trainable"] > 0
    bad = subprocess.run([sys.executable, "-m", "prsmed.cli", "zoo", "show", "prsmed-tyny"], capture_output=True, text=True)
    assert bad.returncode == 2 and "prsmed-tiny" in bad.stderr
