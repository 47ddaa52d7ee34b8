"""The shipped prsmed-tiny weights, scored on a fresh synthetic split with looser floors than bench/RESULTS.md.

The recorded figures (on a larger fresh split) are in bench/RESULTS.md; these floors only catch regressions.
"""

from __future__ import annotations

import pytest

from prsmed.data.layout import load_records
from prsmed.data.synth import synthesize
from prsmed.eval.runner import predict_records, summarize
from prsmed.zoo import build_model, describe


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("fresh")
    synthesize(root, n=48, seed=2024, size=256, split_fractions=(0.0, 0.0, 1.0))
    model = build_model("prsmed-tiny")
    return summarize(predict_records(model, load_records(root, split="test"), batch_size=16))


def test_tiny_weights_ship_with_the_package():
    shipped = describe("prsmed-tiny")["shipped_weights"]
    assert shipped == ["fusion_head.safetensors", "llm.safetensors", "modality_head.safetensors",
                       "vision_encoder.safetensors"]


def test_tiny_segments_a_fresh_split(report):
    overall = report["overall"]
    assert overall["n"] == 48
    assert overall["dice@0.5"] >= 0.75  # 0.84 on the 300 rows of bench/RESULTS.md
    assert overall["zone_acc_mask"] >= 0.80


def test_tiny_names_the_zone_in_words(report):
    # Five zones: chance is about 0.2. The recorded figures on 300 rows are 0.80 and 0.77 (bench/RESULTS.md).
    assert report["overall"]["zone_acc_text"] >= 0.65
    assert report["overall"]["agreement"] >= 0.60


@pytest.mark.xfail(strict=True, reason="known gap: the issue's target (0.90) is not reached yet (bench/RESULTS.md)")
def test_tiny_reaches_the_zone_target(report):
    assert report["overall"]["zone_acc_text"] >= 0.90
    assert report["overall"]["agreement"] >= 0.90
