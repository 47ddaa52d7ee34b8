"""A fine-tuning run is judged on its answers as well as its masks: validation before the first step and at each
evaluation (dice@0.5, soft Dice, zone_acc_text, agreement, answers cut at the length limit or repeating a word), the
best checkpoint chosen by the combined score, and a before / best / last report with a verdict in the CLI's output,
summary.json, RunResult, the adapter manifest and its model card."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from prsmed_sdk.models import TrainingReport, ValidationScores
from typer.testing import CliRunner

from prsmed.components import ComponentSpec
from prsmed.hookspecs import hookimpl
from prsmed.interfaces import LLMOutput
from prsmed.model.bundle import read_manifest, verify_bundle
from prsmed.model.prsmed_model import PRSMedModel
from prsmed.model.spec import ComponentRef
from prsmed.train import Trainer, run_training
from prsmed.train.answer_eval import AnswerTally, repeats_a_word, score_answers
from prsmed.train.checkpoint import CheckpointManager
from prsmed.train.report import combined_score, format_report
from prsmed.weights import read_state_dict
from small_training import (SPEC, StandInPlugin, VENV_BIN, _build_standin_llm, _standin_llm_contract, build_small,
                          config, make_dataset, metrics, registry)

TESTS = Path(__file__).parent


# --- a small model that answers ----------------------------------------------------------------------------------
# test_trainer's byte-level LLM, able to generate: greedy, one full pass per new token (it has no KV cache).

def _answering_llm(**_):
    llm = _build_standin_llm()
    plain_forward = llm.forward

    def forward(inputs, *, use_cache=False):
        out: LLMOutput = plain_forward(inputs)
        if use_cache:  # its "cache" is the prompt itself, run again with each new token
            out.past_key_values = (inputs.input_ids, inputs.attention_mask)
        return out

    @torch.no_grad()
    def generate_from(prefill, *, max_new_tokens=64, **_):
        ids, mask = prefill.past_key_values
        rows: list[list[int]] = [[] for _ in range(len(ids))]
        done = [False] * len(ids)
        for _ in range(max_new_tokens):
            token = llm.model(input_ids=ids, attention_mask=mask).logits[:, -1].argmax(-1)
            for i, t in enumerate(token.tolist()):
                done[i] = done[i] or t == 2
                if not done[i]:
                    rows[i].append(t)
            if all(done):
                break
            ids = torch.cat([ids, token[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        return [bytes(t - 3 for t in row if 3 <= t < 259).decode("utf-8", "replace") for row in rows]

    llm.forward = forward
    llm.generate_from = generate_from
    return llm


class AnsweringPlugin:
    @staticmethod
    @hookimpl
    def prsmed_register_components(register):
        register(ComponentSpec(kind="llm", name="test-answering-llm", build=_answering_llm,
                               contract=_standin_llm_contract))


ANSWERING = SPEC.model_copy(update={"name": "test-answering", "llm": ComponentRef(name="test-answering-llm")})


def build_answering(seed: int = 42) -> PRSMedModel:
    reg = registry()
    reg.register_plugin(AnsweringPlugin, name="test-answering")
    torch.manual_seed(seed)
    return PRSMedModel(ANSWERING, registry=reg)


def register_answering_globally() -> None:
    """For subprocesses: ``--model spec.json`` with the answering LLM."""
    from prsmed.registry import get_registry

    get_registry().register_plugin(StandInPlugin, name="test-standin")
    get_registry().register_plugin(AnsweringPlugin, name="test-answering")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"), n_train=4, n_val=3)


def fake_scores(dice: float, zone: float, agree: float, limit: float = 0.0, repeats: float = 0.0) -> dict:
    """What Trainer.evaluate returns, with chosen values (no answer both cut and repeating a word)."""
    scores = {"rows": 3, "bad_rows": 0, "soft_dice": dice - 0.01, "dice_at_05": dice, "loss_lm": 1.0,
              "answer_rows": 3, "zone_acc_text": zone, "agreement": agree, "hit_length_limit": limit,
              "repeated_words": repeats, "well_formed": 1 - limit - repeats, "examples": ["in the top left."]}
    return {**scores, "score": combined_score(scores)}


def script_evaluations(monkeypatch, by_step: dict[int, tuple]) -> None:
    def evaluate(self):
        return fake_scores(*by_step[self.step])

    monkeypatch.setattr(Trainer, "evaluate", evaluate)


def assert_follows_the_contract(report: dict) -> None:
    """summary.json's report is what the SDK's TrainingReport types, field for field."""
    assert set(report) == set(TrainingReport.model_fields)
    for name in ("before", "best", "last"):
        if report[name] is not None:
            assert set(report[name]) == set(ValidationScores.model_fields), name
    TrainingReport.model_validate(report)


# --- scoring answers ---------------------------------------------------------------------------------------------

def test_repeated_words_and_tallies_add_up():
    assert repeats_a_word("top left left.") and repeats_a_word("In the the upper right")
    assert not repeats_a_word("in the top left, near the centre.") and not repeats_a_word("")
    a = AnswerTally(rows=2, zone_text_ok=1, agree=2, repeated=0, limit_known=2, hit_limit=1, malformed=1,
                    examples=[(4, "x")])
    b = AnswerTally(rows=1, zone_text_ok=1, agree=0, repeated=1, limit_known=0, hit_limit=0, malformed=1,
                    examples=[(1, "y")])
    summed = AnswerTally.from_tensor(a.to_tensor() + b.to_tensor(), a.examples + b.examples)
    a.add(b)
    assert a == summed
    assert a.metrics() == {"answer_rows": 3, "zone_acc_text": 2 / 3, "agreement": 2 / 3, "hit_length_limit": 0.5,
                           "repeated_words": 1 / 3, "well_formed": 1 / 3, "examples": ["y", "x"]}
    assert AnswerTally().metrics()["zone_acc_text"] is None


def test_prsmed_tiny_answers_are_scored_and_cut_answers_are_counted(tmp_path, tiny_model):
    from prsmed.data.layout import load_records
    from prsmed.data.synth import synthesize
    from prsmed.train.data import RecordDataset, collate

    synthesize(tmp_path / "d", n=4, seed=3, split_fractions=(1.0, 0.0, 0.0))  # at the size the model knows
    model = tiny_model
    ds = RecordDataset(list(load_records(tmp_path / "d")), mask_size=model.contracts["vision_encoder"].input_size)
    batch = collate([ds[i] for i in range(len(ds))])
    full = score_answers(model, batch.images, batch.questions, batch.masks, batch.indices, max_new_tokens=48)
    assert full.rows == full.limit_known == 4 and full.hit_limit == 0 and full.malformed == 0, full
    assert full.zone_text_ok >= 3 and full.agree >= 3, full  # the shipped model names its zones
    assert [i for i, _ in full.examples] == [0, 1, 2]
    cut = score_answers(model, batch.images, batch.questions, batch.masks, batch.indices, max_new_tokens=1)
    assert cut.metrics()["hit_length_limit"] == 1.0 and cut.metrics()["well_formed"] == 0.0


# --- the report --------------------------------------------------------------------------------------------------

def test_prsmed_tiny_cli_reports_before_best_and_last(tmp_path):
    """A real run of `prsmed train` on prsmed-tiny: the end-of-run table, summary.json, the adapter's manifest and
    its model card all carry the same before / best / last report."""
    import typer

    from prsmed.data.synth import synthesize
    from prsmed.train.cli import train

    data = tmp_path / "data"
    synthesize(data, n=10, seed=2, split_fractions=(0.6, 0.4, 0.0))
    out = tmp_path / "run"
    app = typer.Typer()
    app.command()(train)
    res = CliRunner().invoke(app, ["--model", "prsmed-tiny", "--data", str(data), "--out", str(out), "--epochs", "1",
                                   "--batch-size", "2", "--max-steps", "2", "--lr", "1e-3", "--min-lr", "1e-5",
                                   "--no-progress", "--no-tensorboard"])
    assert res.exit_code == 0, res.output
    table = res.stdout
    for text in ("validation: 4 rows of the dataset's val split", "before (step 0)", "best (step 2) *",
                 "last (step 2)", "dice@0.5", "soft Dice", "zone_acc_text", "agreement", "answers at length limit",
                 "answers repeating a word", "answers scored on 4 of 4 validation rows", "verdict: "):
        assert text in table, (text, table)

    summary = json.loads((out / "summary.json").read_text())
    report = summary["report"]
    assert_follows_the_contract(report)
    assert report["rows"] == 4 and report["kept"] == "best" and report["verdict"] in table
    assert [report[k]["step"] for k in ("before", "best", "last")] == [0, 2, 2]
    for k in ("before", "best", "last"):
        scores = report[k]
        assert scores["rows"] == scores["answer_rows"] == 4
        for part in ("score", "dice_at_05", "soft_dice", "zone_acc_text", "agreement", "hit_length_limit",
                     "repeated_words"):
            assert 0.0 <= scores[part] <= 1.0, (k, part, scores)
        assert scores["score"] == pytest.approx((scores["dice_at_05"] + scores["zone_acc_text"]
                                                 + scores["agreement"]) / 3, abs=1e-5)
        assert scores["examples"] and all(isinstance(a, str) for a in scores["examples"])
    assert report["before"]["zone_acc_text"] >= 0.75  # the shipped model, before any step, names the zones
    assert summary["metrics"]["best_step"] == 2 and "best_val_score" in summary["metrics"]
    evals = [m for m in metrics(out) if m["kind"] == "eval"]
    assert [m["step"] for m in evals] == [0, 2] and evals[0]["before_training"] is True
    assert evals[1]["val_zone_acc_text"] == report["last"]["zone_acc_text"]

    manifest = verify_bundle(out / "adapter")
    assert manifest.metrics["report"] == report
    card = (out / "adapter" / "README.md").read_text()
    assert "## Validation" in card and "before training (step 0)" in card and "best (step 2)" in card
    assert f"**Verdict:** {report['verdict']}" in card and "| zone_acc_text |" in card
    assert "| report |" not in card  # the report is its own section, not a row of the metrics table


def test_the_best_checkpoint_follows_the_combined_score_not_dice(tmp_path, data, monkeypatch):
    # (dice@0.5, zone_acc_text, agreement): Dice is best at step 6, the combined score at step 4.
    script_evaluations(monkeypatch, {0: (0.5, 0.5, 0.5), 2: (0.9, 0.2, 0.2), 4: (0.6, 0.9, 0.9),
                                     6: (0.95, 0.3, 0.3)})
    out = tmp_path / "run"
    result = run_training(config(data, out, epochs=3), model=build_small())
    assert result.status == "completed" and result.step == 6, result.reason
    report = result.report
    assert (report["best"]["step"], report["last"]["step"], report["kept"]) == (4, 6, "best")
    assert report["best"]["score"] == pytest.approx(0.8)
    assert result.metrics["best_step"] == 4 and result.metrics["best_val_score"] == pytest.approx(0.8)
    assert report["verdict"].startswith("better than before training: score 0.500 -> 0.800")
    assert read_manifest(out / "adapter").training["weights_from_step"] == 4
    mgr = CheckpointManager(out / "checkpoints")
    state = json.loads((mgr.root / "step-00000006" / "state.json").read_text())
    assert state["best_checkpoint"] == "step-00000004"
    best = read_state_dict(mgr.root / "step-00000004" / "trained.safetensors")
    last = read_state_dict(mgr.root / "step-00000006" / "trained.safetensors")
    adapter = read_state_dict(out / "adapter" / "fusion_head.safetensors")
    trained = [k for k in best if k.startswith("fusion_head.")]
    assert trained and any(not torch.equal(best[k], last[k]) for k in trained)
    for k in trained:
        torch.testing.assert_close(adapter[k.removeprefix("fusion_head.")], best[k], rtol=0, atol=0)
    assert json.loads((out / "summary.json").read_text())["report"] == report


def test_the_best_checkpoint_prefers_whole_sentences_to_answers_that_run_on(tmp_path, data, monkeypatch):
    # Step 2 names more zones right, but a third of its answers run to the length limit: step 4 is kept.
    script_evaluations(monkeypatch, {0: (0.5, 0.5, 0.5), 2: (0.8, 0.8, 0.8, 1 / 3), 4: (0.75, 0.75, 0.75)})
    result = run_training(config(data, tmp_path / "run", epochs=2), model=build_small())
    report = result.report
    assert report["best"]["step"] == 4 and report["best"]["score"] == pytest.approx(0.75)
    assert report["last"]["well_formed"] == 1.0
    assert "well-formed" in report["score_definition"]


def test_early_stopping_follows_the_score(tmp_path, data, monkeypatch):
    # Dice rises at step 4 while the answers collapse: the score falls, and patience 1 stops the run there.
    script_evaluations(monkeypatch, {0: (0.5, 0.5, 0.5), 2: (0.5, 0.9, 0.9), 4: (0.9, 0.2, 0.2)})
    result = run_training(config(data, tmp_path / "run", epochs=6, early_stop_patience=1), model=build_small())
    assert result.status == "early_stopped" and result.step == 4, result.reason
    assert "validation score did not improve" in result.reason
    assert result.report["best"]["step"] == 2


def test_answers_that_end_worse_than_before_training_are_reported_in_plain_words(tmp_path, data, monkeypatch):
    script_evaluations(monkeypatch, {0: (0.5, 0.9, 0.9), 2: (0.9, 0.4, 0.5, 0.5, 0.25),
                                     4: (0.9, 0.4, 0.5, 0.5, 0.25)})
    out = tmp_path / "run"
    result = run_training(config(data, out), model=build_small())
    assert result.status == "completed" and result.exit_code == 0 and result.adapter is not None
    report = result.report
    assert report["answers_worse"] and not report["masks_worse"] and report["kept"] == "best"
    assert report["verdict"] == ("worse than before training: the answers got worse (zone_acc_text 0.900 -> 0.400, "
                                 "agreement 0.900 -> 0.500) in the best checkpoint (step 2)")
    warnings = " | ".join(report["warnings"])
    assert "the answers got worse than before training" in warnings and "check its answers" in warnings
    assert "50% of the answers in the best checkpoint (step 2) ran to the length limit of 48 tokens (before " \
           "training: 0%)" in warnings
    assert "25% of the answers in the best checkpoint (step 2) repeat a word back to back" in warnings
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["report"] == report
    assert_follows_the_contract(report)
    table = format_report(report)
    assert "verdict: worse than before training: the answers got worse" in table
    assert "warning: the answers got worse" in table
    assert "**Verdict:** worse than before training" in (out / "adapter" / "README.md").read_text()


def test_a_run_without_validation_rows_says_it_has_none(tmp_path):
    data = make_dataset(tmp_path / "data", n_val=0)
    out = tmp_path / "run"
    result = run_training(config(data, out, epochs=1, val_fraction=0), model=build_small())
    assert result.status == "completed", result.reason
    report = result.report
    assert report["rows"] == 0 and report["before"] is None and report["best"] is None and report["last"] is None
    assert report["verdict"].startswith("not judged: this run had no validation rows")
    assert report["warnings"] == ["no validation rows: the adapter holds the last weights, unchecked"]
    assert json.loads((out / "summary.json").read_text())["report"] == report
    assert_follows_the_contract(report)
    assert "verdict: not judged: this run had no validation rows" in format_report(report)
    assert not [m for m in metrics(out) if m["kind"] == "eval"]


def test_an_llm_that_cannot_generate_is_scored_on_its_masks_and_says_so(tmp_path, data):
    result = run_training(config(data, tmp_path / "run", epochs=1), model=build_small())
    assert result.status == "completed", result.reason
    best = result.report["best"]
    assert best["answer_rows"] == 0 and best["zone_acc_text"] is None and best["score"] == best["dice_at_05"]
    assert any("answers were not scored: LLM 'test-byte-llm' cannot generate answers" in w
               for w in result.report["warnings"])


def test_a_resumed_run_keeps_its_before_and_best_evaluations(tmp_path, data):
    straight = run_training(config(data, tmp_path / "straight", epochs=2), model=build_answering())
    assert straight.status == "completed" and straight.report["best"]["answer_rows"] == 3, straight.reason
    out = tmp_path / "resumed"
    assert run_training(config(data, out, epochs=2, stop_after=3), model=build_answering()).status == "paused"
    resumed = run_training(config(data, out, epochs=2, resume=True), model=build_answering())
    assert resumed.status == "completed", resumed.reason
    for name in ("before", "best", "last"):
        want, got = straight.report[name], resumed.report[name]
        assert got["step"] == want["step"] and got["examples"] == want["examples"], name
        for key in ("score", "dice_at_05", "soft_dice", "zone_acc_text", "agreement", "repeated_words"):
            assert got[key] == pytest.approx(want[key], abs=1e-5), (name, key)
    assert resumed.report["verdict"] == straight.report["verdict"]
    assert [m["step"] for m in metrics(out) if m["kind"] == "eval"] == [0, 2, 4]  # one "before", never repeated


# --- processes ---------------------------------------------------------------------------------------------------

DRIVER = """
import sys
sys.path.insert(0, {tests!r})
import test_train_report
test_train_report.register_answering_globally()
from prsmed.train.__main__ import main
main()
"""


@pytest.mark.slow
def test_two_processes_score_the_same_answers_as_one(tmp_path, data):
    """Three validation rows over two processes (two and one): the counts and examples add up to one process's."""
    if not (VENV_BIN / "torchrun").exists():
        pytest.skip("torchrun is not installed next to this Python")
    script = tmp_path / "driver.py"
    script.write_text(DRIVER.format(tests=str(TESTS)))
    spec = tmp_path / "spec.json"
    spec.write_text(ANSWERING.model_dump_json())
    common = ["--model", str(spec), "--data", str(data), "--epochs", "1", "--batch-size", "1", "--no-progress",
              "--no-tensorboard", "--lr", "1e-3", "--min-lr", "1e-5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, str(script), *common, "--out", str(tmp_path / "one"), "--max-steps", "2"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([str(VENV_BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", str(script), *common,
                          "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, (two.stdout + two.stderr)[-3000:]
    assert two.stdout.count("verdict: ") == 1  # one table, from rank 0
    before_one = json.loads((tmp_path / "one" / "summary.json").read_text())["report"]["before"]
    before_two = json.loads((tmp_path / "two" / "summary.json").read_text())["report"]["before"]
    assert before_one["answer_rows"] == before_two["answer_rows"] == 3
    assert before_two["examples"] == before_one["examples"]
    for key in ("zone_acc_text", "agreement", "repeated_words", "dice_at_05", "soft_dice"):
        assert before_two[key] == pytest.approx(before_one[key], abs=1e-6), key
