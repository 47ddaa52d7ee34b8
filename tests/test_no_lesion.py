"""Images with no lesion: a row whose mask is empty trains when its answer says so, and only then."""

from __future__ import annotations

from dataclasses import replace

import pytest

from prsmed.data.layout import load_records
from prsmed.data.readers import read_mask
from prsmed.data.synth import synthesize
from prsmed.train.data import BadRow, read_pair


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    root = tmp_path_factory.mktemp("no-lesion")
    synthesize(root, n=24, seed=5, size=64, no_lesion_fraction=0.4)
    return list(load_records(root))


def test_empty_mask_with_a_no_lesion_answer_is_a_training_row(rows):
    empty = next(r for r in rows if not read_mask(r.mask_path).any())
    image, mask = read_pair(empty)
    assert image.size == (64, 64) and not mask.any()


def test_empty_mask_whose_answer_names_a_position_is_refused(rows):
    empty = next(r for r in rows if not read_mask(r.mask_path).any())
    wrong = replace(empty, answer="The tumour is in the top left.")
    with pytest.raises(BadRow, match="is empty but the answer does not say there is no lesion"):
        read_pair(wrong)
