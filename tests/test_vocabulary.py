"""The position vocabulary the tiny model is taught: its sentences read back to their zones, they are not the
bench phrasings' sentences, and the tiny tokenizer holds its words whole."""

from __future__ import annotations

import random

import pytest

from prsmed.data.templates import PHRASINGS
from prsmed.data.vocabulary import QUADRANT_NOUNS, VERBS, ZONE_WORDS, vocabulary_answer
from prsmed.data.zones import ZONES, zones_from_text
from prsmed_plugins.llms.tiny_tokenizer import load_tiny_tokenizer

TARGETS = ("tumour", "mass", "nodule", "lesion", "polyp", "skin lesion")


def _draws(n: int, seed: int = 0):
    rng = random.Random(seed)
    for _ in range(n):
        u = rng.random()
        if u < 0.1:
            lesions = []
        elif u < 0.6:
            lesions = [(rng.choice(ZONES), rng.random() < 0.5)]
        else:
            a, b = rng.sample(ZONES, 2)
            lesions = [(a, False), (b, False)]
        target = rng.choice(TARGETS)
        yield lesions, target, vocabulary_answer(lesions, target, rng)


def test_every_sentence_reads_back_to_its_zones():
    wrong = [(lesions, answer, zones_from_text(answer)) for lesions, _, answer in _draws(20000)
             if zones_from_text(answer) != ([z for z, _ in lesions] or ["none"])]
    assert not wrong, wrong[:5]


def test_sentences_are_whole_and_capitalised():
    for _, target, answer in _draws(2000, seed=1):
        assert answer[0].isupper() and answer.endswith(".") and "  " not in answer, answer
        assert target in answer.lower() or "lesions" in answer.lower()


def _bench_sentences() -> set[str]:
    out = set()
    for phrasing in PHRASINGS.values():
        places = list(phrasing.quadrants.values())
        for target in TARGETS:
            for frame in (*phrasing.single, *phrasing.two, *phrasing.none):
                for a in places:
                    for b in places:
                        s = frame.format(target=target, a=a, b=b)
                        out.add(s[:1].upper() + s[1:])
    return out


def test_the_bench_phrasings_stay_unseen():
    """Fine-tuning on a wording the model never saw is measured with PHRASINGS: none of their sentences may be one
    the recipe teaches (the words are shared, the sentences are not)."""
    taught = {answer for _, _, answer in _draws(100000, seed=2)}
    assert len(taught) > 50000
    assert not taught & _bench_sentences()


@pytest.mark.parametrize("word", ["superior", "inferior", "aspect", "noted", "quadrant", "observed", "identified",
                                  "detected", "Impression", "Without", "central"])
def test_tiny_tokenizer_holds_report_words_whole(word):
    assert len(load_tiny_tokenizer().tokenize(" " + word)) == 1


def test_every_taught_position_word_is_at_most_two_tokens():
    tok = load_tiny_tokenizer()
    words = {w for phrase in (*[p for ps in ZONE_WORDS.values() for p in ps], *QUADRANT_NOUNS, *VERBS)
             for w in phrase.replace("-", " ").split()}
    long = {w: tok.tokenize(" " + w) for w in words if len(tok.tokenize(" " + w)) > 2}
    assert not long
