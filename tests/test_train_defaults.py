"""Fine-tuning defaults per zoo model: prsmed-tiny's own, the paper's for the 7B model, the user's values win."""

from __future__ import annotations

from prsmed.train.config import TrainConfig
from prsmed.zoo.presets import PRESETS, TINY_FINETUNE


def _config(model: str, **given) -> TrainConfig:
    return TrainConfig(model=model, data="data", out="run", **given)


def test_tiny_takes_its_own_defaults_and_the_paper_model_the_papers():
    tiny = _config("prsmed-tiny")
    assert (tiny.epochs, tiny.max_steps, tiny.lr) == (TINY_FINETUNE["epochs"], TINY_FINETUNE["max_steps"],
                                                      TINY_FINETUNE["lr"])
    paper = _config("prsmed-llava-med-7b")
    assert (paper.epochs, paper.max_steps, paper.lr) == (20, None, 1e-4)
    assert not PRESETS["prsmed-llava-med-7b"].finetune
    assert PRESETS["prsmed-llava-med-7b"].spec.lora.r == 16


def test_given_values_win_and_none_means_not_given():
    assert _config("prsmed-tiny", lr=1e-3).lr == 1e-3
    assert _config("prsmed-tiny", lr=None).lr == TINY_FINETUNE["lr"]
    # A user who sets how long the run lasts gets exactly that: no model cap on top of their epochs.
    chosen = _config("prsmed-tiny", epochs=2, max_steps=None)
    assert (chosen.epochs, chosen.max_steps) == (2, None)
    capped = _config("prsmed-tiny", max_steps=7)
    assert capped.max_steps == 7 and capped.epochs == TrainConfig.model_fields["epochs"].default


def test_a_resolved_config_round_trips_unchanged():
    tiny = _config("prsmed-tiny", epochs=3)
    again = TrainConfig.model_validate(tiny.model_dump(mode="json"))
    assert again.recipe() == tiny.recipe()


def test_assignment_still_validates():
    tiny = _config("prsmed-tiny")
    tiny.val_answer_rows = 3
    tiny.max_steps = 40
    assert (tiny.val_answer_rows, tiny.max_steps, tiny.lr) == (3, 40, TINY_FINETUNE["lr"])
