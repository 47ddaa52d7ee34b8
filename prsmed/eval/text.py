"""Text metrics between generated answers and reference position sentences: BLEU-4 and ROUGE-L.

BLEU-4 is corpus-level (Papineni et al.: clipped n-gram precisions for n = 1..4, geometric mean, brevity penalty),
as the HF ``evaluate`` "bleu" metric the authors use computes it. ROUGE-L is the LCS-based F-measure averaged over
pairs. Both lower-case and split on words; no stemming.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence

_WORD = re.compile(r"[a-z0-9]+")


def tokens(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _ngrams(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def bleu4(predictions: Sequence[str], references: Sequence[str]) -> float:
    if len(predictions) != len(references):
        raise ValueError(f"expected as many predictions as references, got {len(predictions)} and {len(references)}")
    matches, totals = [0] * 4, [0] * 4
    pred_len = ref_len = 0
    for pred, ref in zip(predictions, references):
        p, r = tokens(pred), tokens(ref)
        pred_len, ref_len = pred_len + len(p), ref_len + len(r)
        for n in range(1, 5):
            pn, rn = _ngrams(p, n), _ngrams(r, n)
            matches[n - 1] += sum(min(c, rn[g]) for g, c in pn.items())
            totals[n - 1] += max(len(p) - n + 1, 0)
    if min(matches) == 0 or pred_len == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals)) / 4
    brevity = 1.0 if pred_len > ref_len else math.exp(1 - ref_len / pred_len)
    return brevity * math.exp(log_precision)


def _lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    if len(predictions) != len(references):
        raise ValueError(f"expected as many predictions as references, got {len(predictions)} and {len(references)}")
    if not predictions:
        return float("nan")
    scores = []
    for pred, ref in zip(predictions, references):
        p, r = tokens(pred), tokens(ref)
        lcs = _lcs(p, r)
        if lcs == 0:
            scores.append(0.0)
            continue
        precision, recall = lcs / len(p), lcs / len(r)
        scores.append(2 * precision * recall / (precision + recall))
    return sum(scores) / len(scores)
