"""The SDK's COCO run-length encoding against pycocotools, the reference implementation."""

from __future__ import annotations

import numpy as np
import pytest

from prsmed_sdk import rle


def masks():
    rng = np.random.default_rng(0)
    for i in range(200):
        h, w = (int(v) for v in rng.integers(1, 48, 2))
        m = rng.random((h, w)) < rng.random()
        if i % 9 == 0:
            m[:] = False
        if i % 13 == 0:
            m[:] = True
        yield m
    big = np.zeros((512, 640), dtype=bool)
    big[100:300, 50:400] = True  # runs longer than one five-bit group, and differences of both signs
    big[350:360, 500:640] = True
    yield big


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside pycocotools
def test_encoding_matches_pycocotools_both_ways():
    from pycocotools import mask as coco
    for m in masks():
        ours = rle.encode(m)
        theirs = coco.encode(np.asfortranarray(m.astype(np.uint8)))
        assert ours["size"] == list(theirs["size"])
        assert ours["counts"] == theirs["counts"].decode("ascii")
        assert (coco.decode({"size": ours["size"], "counts": ours["counts"].encode()}) == m).all()
        assert (rle.decode(ours) == m).all()
        assert (rle.decode({"size": ours["size"], "counts": rle.runs(m)}) == m).all()  # the uncompressed form


def test_damaged_encodings_are_refused_with_what_was_found():
    good = rle.encode(np.eye(5, dtype=bool))
    with pytest.raises(ValueError, match="cover"):
        rle.decode({"size": [5, 6], "counts": good["counts"]})
    with pytest.raises(ValueError, match="ends inside a number"):
        rle.decode({"size": [5, 5], "counts": "0" + chr(48 + 0x20)})
    with pytest.raises(ValueError, match="expected"):
        rle.decode({"counts": good["counts"]})
    with pytest.raises(ValueError, match="2-D"):
        rle.encode(np.zeros((2, 2, 2), dtype=bool))
