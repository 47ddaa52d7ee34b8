"""The position vocabulary: the words reports use to say where a finding is, and sentences built from them.

A model that starts from LLaVA-Med knows these words from its pretraining; the tiny text model knows only what
its recipe teaches it. Two users:

* the tiny tokenizer's corpus (prsmed_plugins.llms.tiny_tokenizer), so that "superior", "aspect" or "noted" are
  one or two tokens instead of being spelt out letter by letter;
* the recipe's grounding stage (prsmed.zoo.recipe), which answers a share of its draws with
  :func:`vocabulary_answer`, so the text model has produced each word before a user's dataset asks for it, and
  fine-tuning only has to prefer the dataset's words.

The frames here are deliberately not the phrasings of ``prsmed data synth --phrasing`` (prsmed.data.templates
PHRASINGS), with which bench/finetune_unseen.py measures fine-tuning on an unseen wording: the words are shared,
the sentences are not (a test checks that no sentence drawn here is one of theirs). Every sentence reads back to
its zones with prsmed.data.zones.zones_from_text (also tested).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

# The words for each zone, in the orders reports use.
ZONE_WORDS: dict[str, tuple[str, ...]] = {
    "top left": ("top left", "upper left", "left upper", "superior left", "left superior", "upper-left"),
    "top right": ("top right", "upper right", "right upper", "superior right", "right superior", "upper-right"),
    "bottom left": ("bottom left", "lower left", "left lower", "inferior left", "left inferior", "lower-left"),
    "bottom right": ("bottom right", "lower right", "right lower", "inferior right", "right inferior",
                     "lower-right"),
}
CENTRE_WORDS: tuple[str, ...] = (
    "centre", "center", "middle", "central region", "central part", "central field", "middle third",
)
# What follows a quadrant's words: "the left upper quadrant", "the superior right aspect".
QUADRANT_NOUNS: tuple[str, ...] = (
    "quadrant", "region", "area", "aspect", "portion", "part", "field", "zone", "sector", "corner",
)
# Where the quadrant lies in: "of the image", "of the field of view".
OF_WHAT: tuple[str, ...] = (
    "", "", "", " of the image", " of the field", " of the scan", " of the view", " of the study", " of the frame",
)
VERBS: tuple[str, ...] = (
    "is noted in", "is observed in", "is identified in", "is detected in", "is located in",
    "is present in", "is visible in", "is demonstrated in", "is situated in", "lies in", "appears in",
    "is found in", "sits in", "is evident in", "is depicted in", "is shown in",
)
NEAR_CENTRE: tuple[str, ...] = (
    ", near the centre", ", close to the midpoint", ", adjacent to the centre", ", just off the middle",
    ", towards the centre",
)
SINGLE_FRAMES: tuple[str, ...] = (
    "The {target} {verb} {where}.",
    "One {target} {verb} {where}.",
    "There is a {target} in {where}.",
    "Impression: a {target} in {where}.",
    "Observation: the {target} {verb} {where}.",
    "Assessment: {target} within {where}.",
    "Result: a single {target}, in {where}.",
    "Report: the {target} projects over {where}.",
    "The study shows a {target} in {where}.",
    "The {target} fills {where}.",
    "In {where} there is a {target}.",
    "Findings: a {target} in {where}.",
    "{target} {verb} {where}.",
)
TWO_FRAMES: tuple[str, ...] = (
    "One {target} {verb} {a}, and another {verb} {b}.",
    "Impression: two lesions, in {a} and in {b}.",
    "The study shows two lesions: {a} and {b}.",
    "Observation: a {target} in {a} and a second one in {b}.",
    "Result: lesions within {a} and within {b}.",
    "There is a {target} in {a}, and another in {b}.",
)
NONE_FRAMES: tuple[str, ...] = (
    "No {target} is identified.",
    "No {target} is noted in this study.",
    "Impression: no {target} is present.",
    "Observation: no {target} is visible.",
    "The study is normal; no {target} is found.",
    "There is no {target} to report.",
    "Without a {target}: the study is normal.",
    "Findings: no {target} is seen.",
)
# General report words: the tokenizer's corpus holds them, so they are whole tokens for a user's own data.
REPORT_WORDS: tuple[str, ...] = (
    "finding", "findings", "impression", "conclusion", "observation", "assessment", "result", "report", "study",
    "normal", "abnormal", "evidence", "suspicious", "benign", "malignant", "focal", "diffuse", "solitary",
    "multiple", "single", "bilateral", "unilateral", "ipsilateral", "contralateral", "lateral", "medial",
    "anterior", "posterior", "proximal", "distal", "peripheral", "central", "apical", "basal", "cranial",
    "caudal", "dorsal", "ventral", "superficial", "deep", "margin", "border", "edge", "wall", "lobe", "segment",
    "hemisphere", "cortex", "lesion", "lesions", "nodule", "nodules", "mass", "masses", "tumour", "tumor",
    "polyp", "cyst", "opacity", "density", "enhancement", "region", "regions", "quadrant", "quadrants", "aspect",
    "superior", "inferior", "upper", "lower", "left", "right", "middle", "centre", "center", "size", "shape",
    "round", "oval", "irregular", "smooth", "well", "defined", "ill", "measuring", "approximately", "millimetres",
    "located", "noted", "seen", "observed", "identified", "detected", "present", "absent", "visible", "evident",
    "demonstrated", "situated", "within", "without", "adjacent", "near", "towards", "along", "between", "beneath",
    "above", "below", "involving", "extending", "consistent", "compatible", "suggestive", "likely", "possible",
)


def zone_words(zone: str, rng: random.Random) -> str:
    """``the superior left aspect of the image``, ``the middle``: one zone in words drawn from this vocabulary."""
    if zone == "center":
        return f"the {rng.choice(CENTRE_WORDS)}{rng.choice(OF_WHAT)}"
    return f"the {rng.choice(ZONE_WORDS[zone])} {rng.choice(QUADRANT_NOUNS)}{rng.choice(OF_WHAT)}"


def vocabulary_answer(lesions: Sequence[tuple[str, bool]], target: str, rng: random.Random) -> str:
    """An answer for ``lesions`` (zone, near the centre) in a report's words drawn from this vocabulary."""
    if not lesions:
        return _capitalised(rng.choice(NONE_FRAMES).format(target=target))
    if len(lesions) == 1:
        zone, near = lesions[0]
        where = zone_words(zone, rng) + (rng.choice(NEAR_CENTRE) if near and zone != "center" else "")
        frame = rng.choice(SINGLE_FRAMES)
        return _capitalised(frame.format(target=target, verb=rng.choice(VERBS), where=where))
    a, b = (zone_words(z, rng) for z, _ in lesions[:2])
    return _capitalised(rng.choice(TWO_FRAMES).format(target=target, verb=rng.choice(VERBS), a=a, b=b))


def _capitalised(sentence: str) -> str:
    return sentence[:1].upper() + sentence[1:]


def corpus_lines() -> list[str]:
    """Deterministic text for the tokenizer: sentences of every frame and zone word, and the report words."""
    rng = random.Random(0)
    zones = [*ZONE_WORDS, "center"]
    targets = ("tumour", "mass", "nodule", "lesion", "polyp", "skin lesion")
    lines = []
    for i in range(1200):
        lesions = [] if i % 10 == 0 else [(zones[i % 5], i % 3 == 0)] if i % 4 else [(zones[i % 5], False),
                                                                                    (zones[(i + 2) % 5], False)]
        lines.append(vocabulary_answer(lesions, targets[i % len(targets)], rng))
    for word_set in (ZONE_WORDS.values(), [CENTRE_WORDS], [QUADRANT_NOUNS], [VERBS]):
        for words in word_set:
            lines.extend(" ".join(words) for _ in range(5))
    lines.extend(["Without Findings Finding Impression Observation Result Assessment Report"] * 20)
    lines.extend(" ".join(REPORT_WORDS[k : k + 12]) for k in range(0, len(REPORT_WORDS), 12) for _ in range(8))
    return lines
