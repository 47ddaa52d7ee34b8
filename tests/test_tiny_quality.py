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
    assert overall["dice@0.5"] >= 0.82  # 0.875 on the 300 rows of bench/RESULTS.md (0.877 here)
    assert overall["zone_acc_mask"] >= 0.90  # 0.97 there (0.958 here)


def test_tiny_names_the_zone_in_words(report):
    # Five zones: chance is about 0.2. Recorded on 300 rows (bench/RESULTS.md): 0.91 and 0.883 (0.938 and 0.896
    # here).
    assert report["overall"]["zone_acc_text"] >= 0.90  # the target for the answers, met since revision 3
    assert report["overall"]["agreement"] >= 0.80


# Not strict: on these 48 rows agreement is 43/48, one image below the target, and a last-digit difference in
# floating point on another machine could tip one image either way. The 300-row figures are what count.
@pytest.mark.xfail(strict=False, reason="known gap: agreement 0.883 against the issue's 0.90 (bench/RESULTS.md)")
def test_tiny_reaches_the_agreement_target(report):
    assert report["overall"]["agreement"] >= 0.90
