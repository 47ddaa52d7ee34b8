"""A short fine-tune on a small dataset worded in a way the base model does not use: afterwards the answers still
name the right zones and stay well-formed sentences (no word repeated back to back, none cut at the length limit)."""

from __future__ import annotations

import pytest

from prsmed.data.layout import load_records
from prsmed.data.synth import synthesize
from prsmed.eval.runner import predict_records
from prsmed.model.bundle import load_bundle
from prsmed.train.answer_eval import repeats_a_word
from prsmed.train.config import TrainConfig
from prsmed.train.trainer import run_training
from prsmed.zoo import build_model

MAX_NEW_TOKENS = 48


def _degenerate(answer: str, tokens: int) -> bool:
    return tokens >= MAX_NEW_TOKENS - 1 or repeats_a_word(answer)


@pytest.mark.slow
def test_fine_tuning_teaches_a_new_phrasing_and_keeps_the_zones(tmp_path):
    data = tmp_path / "data"
    # The six looks the model knows, answers in the "plain" wording ("upper left", "lower right", "centre").
    synthesize(data, n=150, seed=31, size=256, phrasing="plain")
    # The last weights: this checks what the steps teach; which checkpoint a run keeps is tested elsewhere.
    result = run_training(TrainConfig(model="prsmed-tiny", data=data, out=tmp_path / "run", max_steps=100,
                                      adapter_weights="last", progress=False, tensorboard=False))
    assert result.status == "completed"
    model = build_model("prsmed-tiny")
    load_bundle(tmp_path / "run" / "adapter", model)
    results = predict_records(model, load_records(data, split="test"), batch_size=16, max_new_tokens=MAX_NEW_TOKENS)
    tok = model.llm.tokenizer
    answers = [r.answer for r in results]
    n = len(results)
    right = sum(r.zones_text == r.zones_gt for r in results)
    degenerate = sum(_degenerate(a, len(tok(a, add_special_tokens=False)["input_ids"])) for a in answers)
    assert n >= 12
    assert right > n / 2, answers  # most rows: 8 of 12 when this was written
    assert degenerate == 0, answers
    # Whether the answers take up the dataset's words ("upper left" where the base model says "top left") is
    # measured in bench/RESULTS.md rather than asserted: at the default rate 100 steps are not always enough.
