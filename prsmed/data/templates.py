"""The project's own question, answer and position templates for position-reasoning data.

Like the authors' set (PRSMED.md 4.6) there are 50 training questions and 5 held-out test questions; the test
questions are paraphrases of the five the paper evaluates with and appear in no training row. Questions have a
``{modality}`` slot (e.g. "lung CT") and a ``{target}`` slot (e.g. "nodule"); answers and position sentences
have a ``{position}`` slot filled by a position phrase.

Position phrases cover each quadrant far from and near the centre, the centre itself, and two-lesion
combinations. Every phrase is read back to its zone(s) by :func:`prsmed.data.zones.zones_from_text` (the tests
check all of them), so the text labels and the mask labels cannot drift apart.

All choices go through a caller's ``random.Random``, so a seed fixes every row.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

TRAIN_QUESTIONS: tuple[str, ...] = (
    "In this {modality} scan, where can the {target} be seen?",
    "Which quadrant of this {modality} image contains the {target}?",
    "Is there a {target} in this {modality} image, and where is it?",
    "Where in this {modality} image does the {target} appear?",
    "Point out the region of this {modality} image that holds the {target}.",
    "Which part of the {modality} image shows the {target}?",
    "Tell me where the {target} sits in this {modality} image.",
    "Whereabouts is the {target} in this {modality} study?",
    "In which area of this {modality} image is the {target} found?",
    "Localize the {target} in this {modality} image.",
    "Can you tell which region of this {modality} scan the {target} occupies?",
    "Looking at this {modality} image, which zone contains the {target}?",
    "Find the {target} in this {modality} image and say where it is.",
    "What region of the {modality} image is affected by the {target}?",
    "Report the position of the {target} seen on this {modality}.",
    "Which side and which half of this {modality} image hold the {target}?",
    "On this {modality}, in which quadrant does the {target} lie?",
    "Could you say where the {target} is situated in the {modality} image?",
    "Where does the {target} show up on this {modality}?",
    "Show where the {target} is in the given {modality} image.",
    "Please state the region of this {modality} image in which the {target} lies.",
    "Which portion of this {modality} image does the {target} occupy?",
    "Locate the {target} visible in this {modality} scan.",
    "Where exactly is the {target} on the {modality} image?",
    "In terms of image regions, where is the {target} in this {modality}?",
    "Segment the {target} in this {modality} image and tell me its location.",
    "Give the image region of the {target} in this {modality}.",
    "Within this {modality} image, where would you place the {target}?",
    "Which area of the {modality} scan should I look at to see the {target}?",
    "Describe where on the image the {target} is, for this {modality}.",
    "Identify the region containing the {target} on this {modality} image.",
    "Where is the abnormality, a {target}, in this {modality} image?",
    "Which image quadrant has the {target} in this {modality}?",
    "Outline the {target} in this {modality} and name the region it is in.",
    "Is the {target} in this {modality} central or off to one side, and where?",
    "Explain where the {target} can be found in this {modality} image.",
    "Where on this {modality} should the {target} be marked?",
    "Using this {modality} image, name the zone where the {target} is.",
    "Which part of this {modality} study contains the suspected {target}?",
    "What is the location of the {target} relative to the image centre in this {modality}?",
    "From this {modality}, determine the region of the {target}.",
    "Pinpoint the {target} in the {modality} image.",
    "In what region of the {modality} does the {target} appear?",
    "Mark the {target} on this {modality} and give its position.",
    "Where should a reader look for the {target} in this {modality} image?",
    "Name the quadrant or region of the {target} in this {modality}.",
    "Please find the {target} on this {modality} scan and state where it lies.",
    "Which region of interest in this {modality} corresponds to the {target}?",
    "Where does this {modality} image show a {target}?",
    "What part of the image, in this {modality}, is occupied by the {target}?",
)

TEST_QUESTIONS: tuple[str, ...] = (
    "Can you identify the location of the {target} in this {modality} image?",
    "Describe the position of the {target} in this {modality} image.",
    "What is the anatomical location of the {target} shown in this {modality} image?",
    "Based on this {modality} image, provide the location of the {target}.",
    "Where is the {target} located in this {modality} image?",
)

# Single-lesion answers: {position} is a phrase such as "the upper left region, near the centre".
ANSWERS: tuple[str, ...] = (
    "The {target} is located in {position}.",
    "It can be seen in {position}.",
    "The {target} lies in {position}.",
    "Yes, there is a {target}; it lies in {position}.",
    "It appears in {position}.",
    "The {target} occupies {position}.",
    "You can find the {target} in {position}.",
    "It is situated in {position}.",
    "The {target} is in {position}.",
    "Look at {position}: the {target} is there.",
    "The {target} shows up in {position}.",
    "It sits in {position}.",
    "The segmented {target} is in {position}.",
    "I see the {target} in {position}.",
    "The {target} is found in {position}.",
    "Located in {position}.",
    "The abnormal region is {position}.",
    "The {target} can be found in {position}.",
    "The {target} is positioned in {position}.",
    "In this image the {target} lies in {position}.",
)

# Two-lesion answers: {position} is a phrase such as "one in the top left and another in the bottom right".
TWO_LESION_ANSWERS: tuple[str, ...] = (
    "There are two lesions: {position}.",
    "Two lesions are visible, {position}.",
    "I can see two lesions, {position}.",
    "The image shows two lesions, {position}.",
    "Two separate lesions appear, {position}.",
)

# The `position` column (the reference sentence).
POSITION_SENTENCES: tuple[str, ...] = (
    "The {target} is located in {position}.",
    "The {target} is in {position}.",
    "The {target} lies in {position}.",
    "The {target} can be seen in {position}.",
)
TWO_LESION_POSITION_SENTENCES: tuple[str, ...] = (
    "There are two lesions, {position}.",
    "Two lesions are seen: {position}.",
)

QUADRANT_WORDS: dict[str, tuple[str, ...]] = {
    "top left": ("top left", "upper left", "top-left", "upper-left", "left upper"),
    "top right": ("top right", "upper right", "top-right", "upper-right", "right upper"),
    "bottom left": ("bottom left", "lower left", "bottom-left", "lower-left", "left lower"),
    "bottom right": ("bottom right", "lower right", "bottom-right", "lower-right", "right lower"),
}
FAR_FRAMES: tuple[str, ...] = (
    "the {q} region",
    "the {q} quadrant",
    "the {q} part of the image",
    "the {q} area",
    "the {q} portion of the image",
    "the {q} of the image",
)
NEAR_FRAMES: tuple[str, ...] = (
    "the {q} region, near the centre",
    "the {q} quadrant, close to the centre of the image",
    "the {q} area, near the middle of the image",
    "the {q} part of the image, adjacent to the centre",
    "the {q} region, towards the centre",
    "the {q} quadrant, just off the centre",
)
CENTER_PHRASES: tuple[str, ...] = (
    "the centre of the image",
    "the central region",
    "the middle of the image",
    "the central area of the image",
    "the image centre",
)
# Short per-lesion forms used inside two-lesion phrases.
LESION_FAR: tuple[str, ...] = ("the {q}", "the {q} region", "the {q} area")
LESION_NEAR: tuple[str, ...] = ("the {q}, near the centre,", "the {q} region close to the centre")
LESION_CENTER: tuple[str, ...] = ("the centre", "the middle of the image", "the central region")
TWO_LESION_FRAMES: tuple[str, ...] = (
    "one in {a} and another in {b}",
    "one in {a} and a second one in {b}",
    "one lies in {a} while the other lies in {b}",
    "the first in {a} and the second in {b}",
)
SAME_ZONE_FRAMES: tuple[str, ...] = ("both in {a}", "both lying in {a}")

# Images with no lesion: the answer says so in words, and the mask is empty. Each sentence reads back as "none"
# (:func:`prsmed.data.zones.zones_from_text`) for every target name of the synthetic modalities.
NO_LESION_ANSWERS: tuple[str, ...] = (
    "No {target} is visible in this image.",
    "There is no {target} in this image.",
    "I see no {target} here; the image looks normal.",
    "No {target} can be found in this image.",
)
NO_LESION_POSITION_SENTENCES: tuple[str, ...] = ("No {target} is seen.", "There is no {target} in the image.")


@dataclass(frozen=True)
class Phrasing:
    """Another way of wording the answers, for datasets that say the positions in words of their own.

    ``quadrants`` maps each zone to the phrase this phrasing uses for it; ``single``, ``two`` and ``none`` are the
    answer frames for one lesion, two lesions (``{a}``, ``{b}``) and no lesion.
    """

    quadrants: dict[str, str]
    single: tuple[str, ...]
    two: tuple[str, ...]
    none: tuple[str, ...]


# Phrasings that the synthetic data can be written in (``prsmed data synth --phrasing NAME``). ``standard`` is the
# templates above; the others word the positions differently, as another team's annotations would, and are used to
# check that fine-tuning makes the answers follow a dataset's own words (bench/finetune_unseen.py).
PHRASINGS: dict[str, Phrasing] = {
    "plain": Phrasing(
        {"top left": "upper left", "top right": "upper right", "bottom left": "lower left",
         "bottom right": "lower right", "center": "centre"},
        ("The {target} is in the {a}.", "The {target} is seen in the {a} of the image."),
        ("There are two lesions, in the {a} and in the {b}.",),
        ("No {target} is seen.",),
    ),
    "radiology": Phrasing(
        {"top left": "left upper quadrant", "top right": "right upper quadrant",
         "bottom left": "left lower quadrant", "bottom right": "right lower quadrant", "center": "central region"},
        ("Finding: {target} in the {a}.", "A {target} is noted in the {a}."),
        ("Findings: two lesions, one in the {a} and one in the {b}.",),
        ("Findings: no {target} detected.",),
    ),
    "anatomical": Phrasing(
        {"top left": "superior left aspect", "top right": "superior right aspect",
         "bottom left": "inferior left aspect", "bottom right": "inferior right aspect", "center": "middle"},
        ("{target} at the {a}.", "The {target} occupies the {a} of the field."),
        ("Two lesions: at the {a} and at the {b}.",),
        ("Without {target} on this image.",),
    ),
    # Words the tiny model's vocabulary (prsmed.data.vocabulary) does not hold: what fine-tuning does when a dataset
    # asks for words the base never wrote.
    "outermost": Phrasing(
        {"top left": "uppermost leftmost corner", "top right": "uppermost rightmost corner",
         "bottom left": "lowermost leftmost corner", "bottom right": "lowermost rightmost corner",
         "center": "exact middle"},
        ("{target} sits at the {a}.",),
        ("Lesions at the {a} and at the {b}.",),
        ("No {target} here.",),
    ),
}

assert len(TRAIN_QUESTIONS) == 50 and len(TEST_QUESTIONS) == 5
assert not set(TRAIN_QUESTIONS) & set(TEST_QUESTIONS)


def _zone_phrase(zone: str, near: bool, rng: random.Random, frames_far, frames_near, centers) -> str:
    if zone == "center":
        return rng.choice(centers)
    if zone not in QUADRANT_WORDS:
        raise ValueError(f"unknown zone {zone!r}: expected one of center, {', '.join(QUADRANT_WORDS)}")
    q = rng.choice(QUADRANT_WORDS[zone])
    return rng.choice(frames_near if near else frames_far).format(q=q)


def position_phrase(lesions: Sequence[tuple[str, bool]], rng: random.Random) -> str:
    """A phrase for one lesion ``[(zone, near_center)]`` or two ``[(zone_a, near_a), (zone_b, near_b)]``."""
    if len(lesions) == 1:
        zone, near = lesions[0]
        return _zone_phrase(zone, near, rng, FAR_FRAMES, NEAR_FRAMES, CENTER_PHRASES)
    if len(lesions) == 2:
        (za, na), (zb, nb) = lesions
        if za == zb:
            a = _zone_phrase(za, na and nb, rng, LESION_FAR, LESION_NEAR, LESION_CENTER)
            return rng.choice(SAME_ZONE_FRAMES).format(a=a.rstrip(","))
        a = _zone_phrase(za, na, rng, LESION_FAR, LESION_NEAR, LESION_CENTER)
        b = _zone_phrase(zb, nb, rng, LESION_FAR, LESION_NEAR, LESION_CENTER).rstrip(",")
        return rng.choice(TWO_LESION_FRAMES).format(a=a, b=b).replace(",,", ",")
    raise ValueError(f"a position phrase describes one or two lesions, found {len(lesions)}")


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    position: str


def _sentence(template: str, **slots: str) -> str:
    text = template.format(**slots)
    return text[:1].upper() + text[1:]


def _phrased(lesions: Sequence[tuple[str, bool]], phrasing: Phrasing, target: str, rng: random.Random) -> str:
    if not lesions:
        return _sentence(rng.choice(phrasing.none), target=target)
    if len(lesions) == 1:
        return _sentence(rng.choice(phrasing.single), target=target, a=phrasing.quadrants[lesions[0][0]])
    a, b = (phrasing.quadrants[z] for z, _ in lesions[:2])
    return _sentence(rng.choice(phrasing.two), target=target, a=a, b=b)


def make_qa(lesions: Sequence[tuple[str, bool]], *, modality: str, target: str, split: str,
            rng: random.Random, question: str | None = None, phrasing: str = "standard") -> QA:
    """One question/answer/position triple. ``split == "test"`` draws from the 5 held-out questions, every
    other split from the 50 training questions; ``question`` fixes the question template instead. No lesions
    gives an answer that says there is none. ``phrasing`` names another wording of the answers (:data:`PHRASINGS`);
    its position sentence is its answer."""
    if phrasing != "standard" and phrasing not in PHRASINGS:
        raise ValueError(f"unknown phrasing {phrasing!r}: expected standard or one of {', '.join(PHRASINGS)}")
    if question is None:
        question = rng.choice(TEST_QUESTIONS if split == "test" else TRAIN_QUESTIONS)
    question = _sentence(question, modality=modality, target=target)
    if phrasing != "standard":
        answer = _phrased(lesions, PHRASINGS[phrasing], target, rng)
        return QA(question, answer, answer)
    if not lesions:
        return QA(question, _sentence(rng.choice(NO_LESION_ANSWERS), target=target),
                  _sentence(rng.choice(NO_LESION_POSITION_SENTENCES), target=target))
    phrase = position_phrase(lesions, rng)
    two = len(lesions) == 2
    answer = _sentence(rng.choice(TWO_LESION_ANSWERS if two else ANSWERS), position=phrase, target=target)
    sentences = TWO_LESION_POSITION_SENTENCES if two else POSITION_SENTENCES
    position = _sentence(rng.choice(sentences), position=phrase, target=target)
    return QA(question, answer, position)


def all_position_phrases() -> list[tuple[tuple[tuple[str, bool], ...], str]]:
    """Every single-lesion phrase with its (zone, near) label: for checks that the text reads back right."""
    out = []
    for zone, words in QUADRANT_WORDS.items():
        for q in words:
            out += [(((zone, False),), f.format(q=q)) for f in FAR_FRAMES]
            out += [(((zone, True),), f.format(q=q)) for f in NEAR_FRAMES]
    out += [((("center", True),), c) for c in CENTER_PHRASES]
    return out
