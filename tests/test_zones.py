"""Zones: the authors' mask rule, connected components, and reading zones out of text."""

from __future__ import annotations

import itertools
import random
from collections import deque

import numpy as np
import pytest

from prsmed.data.templates import all_position_phrases, make_qa, ANSWERS, POSITION_SENTENCES
from prsmed.data.zones import (
    ZONES,
    find_components,
    label_components,
    parse_zones,
    zone_from_text,
    zone_label,
    zone_of_box,
    zone_of_mask,
    zones_from_text,
)


def _mask(h, w, *boxes):
    m = np.zeros((h, w), bool)
    for x0, y0, x1, y1 in boxes:  # inclusive
        m[y0:y1 + 1, x0:x1 + 1] = True
    return m


# ----------------------------------------------------------------------------------------------------------------
# The mask rule (PRSMED.md 4.5)


@pytest.mark.parametrize(
    "box, zone, near",
    [
        ((45, 45, 55, 55), "center", True),  # contains (50, 50)
        ((50, 10, 60, 50), "center", True),  # touches the centre point: inclusive box
        ((10, 10, 20, 20), "top left", False),
        ((70, 10, 90, 20), "top right", False),
        ((10, 70, 20, 90), "bottom left", False),
        ((70, 70, 90, 90), "bottom right", False),
        ((35, 35, 40, 40), "top left", True),  # box centre (37, 37): 18.4 px < 0.2 * 100
        ((30, 30, 36, 36), "top left", False),  # box centre (33, 33): 24.0 px
        ((51, 20, 60, 30), "top right", False),
        ((40, 20, 60, 30), "top right", False),  # box centre (50, 25): x = cx goes right; 25 px, far
        ((30, 51, 40, 60), "bottom left", True),  # box centre (35, 55): 15.8 px
    ],
)
def test_zone_rule_on_boxes(box, zone, near):
    assert zone_of_box(box, 100, 100) == (zone, near)
    info = zone_of_mask(_mask(100, 100, box))
    assert (info.zone, info.near_center) == (zone, near)
    assert info.bbox == box


def test_zone_rule_integer_conventions_and_non_square_images():
    # image centre is (W // 2, H // 2); the box centre uses floor division, as in the authors' script
    assert zone_of_box((0, 0, 49, 49), 101, 101) == ("top left", False)
    assert zone_of_box((0, 0, 50, 49), 101, 101) == ("top left", False)  # x 0..50 spans cx 50, but y does not
    # the near-centre threshold is 0.2 * W even when H differs: W = 200 -> 40 px, centre (100, 50)
    assert zone_of_box((120, 10, 130, 20), 100, 200) == ("top right", False)  # box centre (125, 15): 43.0 px
    assert zone_of_box((120, 20, 130, 30), 100, 200) == ("top right", True)  # box centre (125, 25): 35.4 px


def test_empty_and_bad_masks():
    info = zone_of_mask(np.zeros((8, 8), np.uint8))
    assert info.zone == "none" and info.components == [] and info.lesions == [] and zone_label(info) == "none"
    with pytest.raises(ValueError, match="expected a 2-D mask"):
        zone_of_mask(np.zeros((2, 3, 4, 5)))
    rgb = np.zeros((10, 10, 3), np.uint8)
    rgb[1:3, 1:3, 0] = 255
    assert zone_of_mask(rgb).zone == "top left"


# ----------------------------------------------------------------------------------------------------------------
# Components


def _bfs_labels(m, connectivity):
    h, w = m.shape
    lab = np.zeros(m.shape, int)
    steps = [(-1, 0), (1, 0), (0, -1), (0, 1)]
    if connectivity == 8:
        steps += [(-1, -1), (-1, 1), (1, -1), (1, 1)]
    n = 0
    for y in range(h):
        for x in range(w):
            if m[y, x] and not lab[y, x]:
                n += 1
                lab[y, x] = n
                q = deque([(y, x)])
                while q:
                    a, b = q.popleft()
                    for dy, dx in steps:
                        c, d = a + dy, b + dx
                        if 0 <= c < h and 0 <= d < w and m[c, d] and not lab[c, d]:
                            lab[c, d] = n
                            q.append((c, d))
    return lab, n


def test_labeling_matches_a_reference_bfs():
    rng = np.random.default_rng(0)
    for _ in range(60):
        m = rng.random((int(rng.integers(1, 25)), int(rng.integers(1, 25)))) < rng.uniform(0.1, 0.7)
        for conn in (4, 8):
            got, n = label_components(m, conn)
            ref, nref = _bfs_labels(m, conn)
            assert n == nref and np.array_equal(got, ref)


def test_diagonal_touch_depends_on_connectivity():
    m = np.eye(4, dtype=bool)
    assert label_components(m, 8)[1] == 1
    assert label_components(m, 4)[1] == 4
    with pytest.raises(ValueError, match="connectivity must be 4 or 8"):
        label_components(m, 6)


def test_components_min_area_and_two_lesions():
    m = _mask(100, 100, (5, 5, 24, 24), (70, 70, 79, 79), (50, 90, 50, 90))  # a 1-px speck
    comps = find_components(m, min_area=4)
    assert [c.zone for c in comps] == ["top left", "bottom right"]
    assert comps[0].area == 400 and comps[0].bbox == (5, 5, 24, 24) and comps[0].centroid == (14.5, 14.5)
    info = zone_of_mask(m, min_area=4)
    assert info.zone == "center"  # the whole mask's box spans the centre: the authors' single-lesion rule
    assert info.lesions == [("top left", False), ("bottom right", False)]
    assert zone_label(info) == "two lesions"
    # all components small: the largest is kept, so the mask still has a lesion
    tiny = _mask(100, 100, (1, 1, 2, 2), (90, 90, 90, 90))
    assert [c.area for c in find_components(tiny, min_area=50)] == [4]
    # three lesions: the two largest, in raster order
    three = _mask(100, 100, (80, 5, 95, 20), (5, 40, 8, 43), (5, 80, 30, 95))
    assert zone_of_mask(three, min_area=4).lesions == [("top right", False), ("bottom left", False)]


def test_labeling_is_fast_enough_for_1024_masks():
    import time

    yy, xx = np.mgrid[:1024, :1024]
    m = ((yy - 300) ** 2 + (xx - 300) ** 2 < 100**2) | ((yy - 700) ** 2 + (xx - 800) ** 2 < 60**2)
    t = time.perf_counter()
    info = zone_of_mask(m)
    assert time.perf_counter() - t < 2.0
    assert [c.zone for c in info.components] == ["top left", "bottom right"]


# ----------------------------------------------------------------------------------------------------------------
# Text


@pytest.mark.parametrize(
    "text, zones",
    [
        ("The tumour is in the top left of the image.", ["top left"]),
        ("It lies in the upper-left quadrant.", ["top left"]),
        ("Located in the left upper region.", ["top left"]),
        ("The lesion is superior and to the left.", ["top left"]),
        ("in the lower right", ["bottom right"]),
        ("The mass is in the inferior right portion.", ["bottom right"]),
        ("bottom-left area", ["bottom left"]),
        ("The top right part of the scan.", ["top right"]),
        ("RIGHT UPPER QUADRANT", ["top right"]),
        ("The nodule is in the upper left, near the centre.", ["top left"]),
        ("close to the center, in the bottom-left quadrant", ["bottom left"]),
        ("It is in the lower right region, towards the middle of the image.", ["bottom right"]),
        ("slightly above and to the left of the center", ["top left"]),
        ("top left center", ["top left"]),  # the authors' lung wording for a box crossing the centre
        ("central upper left region", ["top left"]),
        ("The tumour is in the centre of the image.", ["center"]),
        ("It sits in the middle of the image.", ["center"]),
        ("A centrally located mass.", ["center"]),
        ("The lesion is central.", ["center"]),
        ("One in the top left and another in the bottom right.", ["top left", "bottom right"]),
        ("Two lesions: upper right and lower left.", ["top right", "bottom left"]),
        ("one lies in the lower right while the other lies in the centre", ["bottom right", "center"]),
        ("lesions in the upper and lower left", ["top left", "bottom left"]),
        ("from the upper left to the lower right", ["top left", "bottom right"]),
        ("It is not in the upper left but in the lower right.", ["bottom right"]),
        ("in the lower right rather than the upper left", ["bottom right"]),
        ("No, it is in the upper left.", ["top left"]),
        ("The upper left. Yes, the upper left region.", ["top left"]),
        ("No tumour is visible in this image.", ["none"]),
        ("on the left side", []),
        ("", []),
        ("The image shows healthy tissue.", []),
    ],
)
def test_zones_from_text(text, zones):
    assert zones_from_text(text) == zones
    assert zone_from_text(text) == (zones[0] if zones else None)


def test_near_centre_flag_is_read_as_a_qualifier():
    assert parse_zones("upper left, near the centre")[0].near_center is True
    assert parse_zones("upper left corner")[0].near_center is False
    assert [z.zone for z in parse_zones("top left and top left")] == ["top left", "top left"]


def test_every_template_phrase_reads_back_to_its_zone():
    for label, phrase in all_position_phrases():
        for template in ANSWERS + POSITION_SENTENCES:
            text = template.format(position=phrase, target="tumour")
            got = parse_zones(text)
            assert [z.zone for z in got] == [label[0][0]], text
            if label[0][0] != "center":
                assert got[0].near_center == label[0][1], text


def test_every_two_lesion_combination_reads_back():
    rng = random.Random(0)
    for (a, b), na, nb in itertools.product(itertools.product(ZONES, ZONES), (False, True), (False, True)):
        for split in ("train", "test"):
            qa = make_qa([(a, na), (b, nb)], modality="lung CT", target="nodule", split=split, rng=rng)
            expected = [a] if a == b else [a, b]
            assert zones_from_text(qa.answer) == expected, qa.answer
            assert zones_from_text(qa.position) == expected, qa.position
