"""Scoring a model's answers during training, the way ``prsmed eval`` scores them.

For each scored validation row the model answers greedily (up to ``max_new_tokens``) and predicts a mask from the
same left-padded prompt, as at inference. Per row:

* ``zone_acc_text``: the answer's zones (:func:`prsmed.eval.runner.text_zones`) equal the ground-truth mask's
  (:func:`prsmed.eval.runner.mask_zones`);
* ``agreement``: the answer's zones equal those of the predicted mask binarised at 0.5;
* ``hit_length_limit``: the answer ran to ``max_new_tokens`` without ending (known only for an LLM that exposes
  its generated tokens, as the zoo's do);
* ``repeated_words``: some word follows itself ("left left"), the usual sign of a language model collapsing.

Everything is a count, so processes that each score a share of the rows add up exactly to one process scoring all.
How these numbers combine into the run's score is :mod:`prsmed.train.report`'s business.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch

from prsmed.eval.runner import mask_zones, text_zones
from prsmed.eval.text import tokens

# Answers kept per evaluation so that a collapsing model shows in the report, not only in its numbers.
EXAMPLES = 3


def repeats_a_word(answer: str) -> bool:
    words = tokens(answer)
    return any(a == b for a, b in zip(words, words[1:]))


class AnswersUnavailable(RuntimeError):
    """The model's LLM cannot generate, so its answers cannot be scored."""


@dataclass
class AnswerTally:
    """Counts over the scored rows of one or several processes."""

    rows: int = 0
    zone_text_ok: int = 0
    agree: int = 0
    repeated: int = 0
    limit_known: int = 0  # rows whose answer's token count is known
    hit_limit: int = 0
    malformed: int = 0  # rows whose answer repeats a word back to back or was cut at the limit (or both)
    examples: list[tuple[int, str]] = field(default_factory=list)  # (validation row index, answer)

    COUNTS = ("rows", "zone_text_ok", "agree", "repeated", "limit_known", "hit_limit", "malformed")

    def to_tensor(self) -> torch.Tensor:
        return torch.tensor([getattr(self, k) for k in self.COUNTS], dtype=torch.float64)

    @classmethod
    def from_tensor(cls, t: torch.Tensor, examples: Sequence[tuple[int, str]] = ()) -> AnswerTally:
        counts = {k: int(round(float(v))) for k, v in zip(cls.COUNTS, t.tolist())}
        return cls(**counts, examples=sorted(examples)[:EXAMPLES])

    def add(self, other: AnswerTally) -> None:
        for k in self.COUNTS:
            setattr(self, k, getattr(self, k) + getattr(other, k))
        self.examples = sorted(self.examples + other.examples)[:EXAMPLES]

    def metrics(self) -> dict:
        """Fractions of the scored rows; None where nothing could be counted."""
        def share(n: int, of: int) -> float | None:
            return n / of if of else None

        return {
            "answer_rows": self.rows,
            "zone_acc_text": share(self.zone_text_ok, self.rows),
            "agreement": share(self.agree, self.rows),
            "hit_length_limit": share(self.hit_limit, self.limit_known),
            "repeated_words": share(self.repeated, self.rows),
            "well_formed": share(self.rows - self.malformed, self.rows),
            "examples": [answer for _, answer in self.examples],
        }


@torch.no_grad()
def generate(model, images, questions, *, max_new_tokens: int,
             autocast: Callable[[], AbstractContextManager] = nullcontext):
    """Greedy answers, mask logits and, per answer, whether it was cut at ``max_new_tokens`` (None when the LLM
    does not expose its tokens).

    ``model.predict`` returns text only, and a cut answer cannot be told from a finished one by its text; so, for
    an LLM with token-level generation, this runs predict's steps itself and keeps the token counts."""
    device = next(model.parameters()).device
    seg, inputs = model.encode(images, questions, padding_side="left")
    seg, inputs = seg.to(device), inputs.to(device)
    tokens_from = getattr(model.llm, "generate_tokens_from", None)
    try:
        with autocast():
            if tokens_from is None:
                pred = model.predict(seg, inputs, max_new_tokens=max_new_tokens)
                return pred.answers, pred.mask_logits.float(), None
            z_img = model.vision_encoder(seg)
            prefill = model.llm(inputs, use_cache=True)
            logits = model._mask_logits(z_img, prefill, None)
            rows = tokens_from(prefill, max_new_tokens=max_new_tokens)
    except NotImplementedError as e:
        raise AnswersUnavailable(f"LLM {model.spec.llm.name!r} cannot generate answers "
                                 f"({type(e).__name__}: {str(e) or 'generate_from is not implemented'})") from e
    answers = [model.llm.tokenizer.decode(r, skip_special_tokens=True) for r in rows]
    return answers, logits.float(), [len(r) >= max_new_tokens for r in rows]


def score_answers(model, images, questions, masks: torch.Tensor, indices: Sequence[int], *, max_new_tokens: int,
                  autocast: Callable[[], AbstractContextManager] = nullcontext) -> AnswerTally:
    """Answer ``questions`` about ``images`` and count against ``masks`` (B, 1, S, S), the ground truth at the
    model's input size; ``indices`` name the rows for the examples."""
    answers, logits, cut = generate(model, images, questions, max_new_tokens=max_new_tokens, autocast=autocast)
    predicted = (torch.sigmoid(logits) > 0.5).cpu().numpy()[:, 0]
    truth = masks.cpu().numpy()[:, 0] > 0.5
    tally = AnswerTally()
    for i, answer in enumerate(answers):
        said = text_zones(answer)
        tally.rows += 1
        tally.zone_text_ok += said == mask_zones(truth[i])
        tally.agree += said == mask_zones(predicted[i])
        repeats = repeats_a_word(answer)
        tally.repeated += repeats
        if cut is not None:
            tally.limit_known += 1
            tally.hit_limit += cut[i]
        tally.malformed += repeats or bool(cut is not None and cut[i])
        tally.examples.append((int(indices[i]), answer))
    tally.examples = sorted(tally.examples)[:EXAMPLES]
    return tally


def dice_at_05(logits: torch.Tensor, masks: torch.Tensor) -> np.ndarray:
    """Per-row Dice of sigmoid(logits) > 0.5 against the masks, as :func:`prsmed.eval.segmentation.dice_iou`
    counts it (two empty masks agree perfectly)."""
    from prsmed.eval.segmentation import dice_iou

    predicted = (torch.sigmoid(logits.float()) > 0.5).cpu().numpy()[:, 0]
    truth = masks.cpu().numpy()[:, 0] > 0.5
    return np.array([dice_iou(p, t)[0] for p, t in zip(predicted, truth)], dtype=np.float64)
