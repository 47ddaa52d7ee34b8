"""The GPU planner: simulated steps against real allocations, the paper model's figures, the plan's logic, the
catalogue, and the CLI."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from prsmed.cli import app
from prsmed.plan.catalogue import CatalogueError, load_catalogue
from prsmed.plan.estimate import GIB, Memory, PlanOptions, plan
from prsmed.plan.simulate import simulate
from prsmed.zoo import resolve_spec

SMALL_CATALOGUE = """
date = "2026-01-01"
[[gpu]]
name = "big"
label = "Big 80GB"
vram_gib = 80
bf16 = true
tflops_bf16 = 300
tflops_fp16 = 300
tflops_fp32 = 20
[[gpu]]
name = "crumb"
label = "Crumb"
vram_gib = 0.77
bf16 = false
tflops_bf16 = 0
tflops_fp16 = 10
tflops_fp32 = 5
[[platform]]
name = "Cloud"
spot_discount = 0.5
[[offer]]
platform = "Cloud"
gpu = "big"
usd_h = 2.0
[[offer]]
platform = "Cloud"
gpu = "crumb"
usd_h = 0.1
"""


@pytest.fixture(autouse=True)
def _no_shared_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("PRSMED_PLAN_CACHE", str(tmp_path / "plan-cache"))


@pytest.fixture()
def catalogue(tmp_path):
    path = tmp_path / "catalogue.toml"
    path.write_text(SMALL_CATALOGUE)
    return path


@pytest.mark.slow
def test_calibrate_estimate_is_within_15_percent_of_the_measured_peak():
    # A child process runs three real training steps of prsmed-tiny; its peak RSS is compared with the estimate.
    result = CliRunner().invoke(app, ["plan", "calibrate", "--only", "tiny b4", "--json"])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.output)["configs"]
    assert row["measured_mib"] > 100  # the step really allocated: activations of 4 images at 256 px
    assert abs(row["error_pct"]) <= 15, json.dumps(row)


def test_step_memory_above_the_fixed_part_is_linear_in_batch():
    spec = resolve_spec("prsmed-tiny", weights=False)
    one = Memory.from_trace(simulate(spec, batch=1, text_len=40, count_flops=False), "bf16")
    three = simulate(spec, batch=3, text_len=40, count_flops=False)
    predicted = one.gradients + 3 * one.activations_per_sample
    assert three.peak_bytes == pytest.approx(predicted, rel=0.05)


@pytest.mark.slow
def test_paper_model_parameters_memory_and_flops_from_its_configuration():
    report = plan(PlanOptions(model="prsmed-llava-med-7b", gpu="rtx4090"))
    by = report["params"]["by_component"]
    assert by["llm"]["lora"] == 13_631_488  # PRSMED.md 1.2: 32 layers x (2x16x(4096+4096) + 2x16x(4096+1024))
    assert by["fusion_head"]["total"] == 5_366_465  # PRSMED.md 1.3, exact
    m = report["memory_gb"]
    assert 13.9 < m["frozen_weights"] < 14.3  # 7.24B Mistral + 0.30B CLIP + projector in bf16
    assert m["optimizer_states"] == pytest.approx(2 * m["trained_weights"], rel=0.01)  # AdamW: two fp32 moments
    assert m["activations_by_component_per_sample"]["llm"] > m["activations_by_component_per_sample"]["fusion_head"]
    # Forward FLOPs: at least 2 x (text-model parameters) per token of the 656-token sequence, and not far above it
    # (the encoder at 1024 px, the head and the CLIP tower add the rest).
    tokens = report["sequence"]["total"]
    assert tokens == 576 + 80
    text_params = 7.1e9
    assert 2 * text_params * tokens < report["flops_per_sample"]["forward"] < 1.3 * 2 * text_params * tokens
    # A 24 GB card holds batch 1 without checkpointing, so the paper's batch of 8 becomes 1 x 8 accumulation.
    row = report["rows"][0]
    assert row["fits"] and row["needs"] is None
    assert (row["recommended_batch"], row["grad_accum"]) == (1, 8)
    assert row["memory_gb"] <= row["vram_gb"]
    # Inference holds the weights and one prefill: between the weights alone and one training sample more.
    assert m["frozen_weights"] < m["inference"] < m["frozen_weights"] + m["activations_per_sample"]


def test_plan_rows_fit_sort_and_cost(catalogue):
    report = plan(PlanOptions(model="prsmed-tiny", catalogue=str(catalogue), epochs=2, dataset_size=1000))
    big, crumb = report["rows"]
    assert big["gpu"] == "big" and big["fits"] and big["recommended_batch"] * big["grad_accum"] == 8
    assert big["cost_usd"] == pytest.approx(big["hours"] * 2.0, abs=0.01)
    assert big["cost_usd_spot"] == pytest.approx(big["cost_usd"] / 2, abs=0.01)
    # 0.77 GiB leaves 0.02 GiB after the CUDA context: nothing fits, whatever is tried, and the row says so.
    assert not crumb["fits"] and crumb["cost_usd"] is None and "does not fit" in crumb["why"]
    assert "no bfloat16" in " ".join(crumb["notes"])
    assert report["recommendation"].startswith("cheapest that fits: Big 80GB on Cloud")
    mem = report["memory_gb"]
    parts = ("frozen_weights", "trained_weights", "optimizer_states", "gradients", "activations", "overhead")
    assert mem["total"] == pytest.approx(sum(mem[p] for p in parts), abs=0.005)
    # A twice larger dataset takes twice as long.
    longer = plan(PlanOptions(model="prsmed-tiny", catalogue=str(catalogue), epochs=2, dataset_size=2000))
    assert longer["rows"][0]["hours"] == pytest.approx(2 * big["hours"], rel=0.02)


def test_plan_cli_prints_json_and_a_table(catalogue):
    runner = CliRunner()
    out = runner.invoke(app, ["plan", "--model", "prsmed-tiny", "--catalogue", str(catalogue), "--json"])
    assert out.exit_code == 0, out.output
    report = json.loads(out.output)
    assert {"model", "params", "memory_gb", "rows"} <= set(report)
    assert {"total", "trainable", "by_component"} <= set(report["params"])
    assert {"platform", "gpu", "vram_gb", "fits", "max_batch", "recommended_batch", "grad_accum", "hours", "cost_usd",
            "cost_usd_spot"} <= set(report["rows"][0])
    table = runner.invoke(app, ["plan", "--model", "prsmed-tiny", "--catalogue", str(catalogue)])
    assert table.exit_code == 0, table.output
    assert "Big 80GB" in table.output and "too small" in table.output


def test_bad_catalogues_and_options_say_what_is_wrong(tmp_path, catalogue):
    bad = tmp_path / "bad.toml"
    bad.write_text("date = \n")
    with pytest.raises(CatalogueError, match="not valid TOML"):
        load_catalogue(bad)
    bad.write_text(SMALL_CATALOGUE.replace('gpu = "crumb"', 'gpu = "unicorn"'))
    with pytest.raises(CatalogueError, match="names GPU 'unicorn'"):
        load_catalogue(bad)
    runner = CliRunner()
    out = runner.invoke(app, ["plan", "--model", "prsmed-tiny", "--catalogue", str(catalogue), "--gpu", "h100"])
    assert out.exit_code == 2 and "unknown GPU 'h100'" in out.output
    out = runner.invoke(app, ["plan", "--model", "prsmed-tinyy"])
    assert out.exit_code == 2 and "unknown zoo model" in out.output and "prsmed-tiny" in out.output
    out = runner.invoke(app, ["plan", "--model", "prsmed-tiny", "--precision", "int3"])
    assert out.exit_code == 2 and "precision" in out.output


def test_shipped_catalogue_covers_the_guides_platforms_and_gpus():
    cat = load_catalogue()
    assert {p.name for p in cat.platform} >= {"Vast.ai", "RunPod", "Lambda", "Colab Pro", "Colab Pro+", "AWS", "GCP",
                                              "Azure"}
    assert {g.name for g in cat.gpu} >= {"rtx3090", "rtx4090", "v100", "t4", "a6000", "rtx6000-ada", "l4",
                                         "a100-40gb", "a100-80gb", "h100", "h200"}
    assert all(any(o.gpu == g.name for o in cat.offer) for g in cat.gpu)
    assert cat.gpu_named("A100-80GB").vram_gib == 80 and GIB == 2**30


def test_attention_swap_applies_only_to_the_simulating_thread():
    # The service plans in one worker thread while it predicts in others: their attention must stay real.
    import threading

    import torch
    import torch.nn.functional as F

    from prsmed.plan.simulate import _gpu_attention

    q = torch.randn(1, 2, 5, 4)
    expected = torch.softmax(q @ q.transpose(-1, -2) / 2.0, dim=-1) @ q
    results = {}
    original = F.scaled_dot_product_attention
    with _gpu_attention():
        worker = threading.Thread(target=lambda: results.setdefault("out", F.scaled_dot_product_attention(q, q, q)))
        worker.start()
        worker.join()
    assert torch.allclose(results["out"], expected, atol=1e-5)
    assert F.scaled_dot_product_attention is original


def test_the_planner_simulates_the_trainers_own_forward_and_loss(monkeypatch, tmp_path):
    """The planner's simulation and the trainer both compute a step through prsmed.train.step.model_loss, so a
    change to the forward or the loss reaches both; a planner with a copy of its own would fail here."""
    from prsmed.data.synth import synthesize
    from prsmed.train import TrainConfig, run_training, step

    real, callers = step.model_loss, []

    def spy(model, *args, **kwargs):
        callers.append(type(args[0]).__name__)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(step, "model_loss", spy)
    simulate(resolve_spec("prsmed-tiny", weights=False), batch=1, text_len=8, count_flops=False)
    planned = len(callers)
    assert planned >= 1, "the planner's simulation did not run the trainer's forward and loss"
    data = tmp_path / "data"
    synthesize(data, n=12, seed=3, size=64)
    result = run_training(TrainConfig(model="prsmed-tiny", data=data, out=tmp_path / "run", max_steps=1, batch_size=2,
                                      val_answer_rows=0, val_max_samples=2, progress=False, tensorboard=False,
                                      tower_weight=0))
    assert result.status == "completed", result.reason
    assert len(callers) > planned, "the trainer's step did not go through prsmed.train.step.model_loss"


def _card(name: str, vram: float, *, bf16: bool = True) -> str:
    return (f'[[gpu]]\nname = "{name}"\nlabel = "{name}"\nvram_gib = {vram:.4f}\nbf16 = {str(bf16).lower()}\n'
            f'tflops_bf16 = {100 if bf16 else 0}\ntflops_fp16 = 100\ntflops_fp32 = 10\n'
            f'[[offer]]\nplatform = "Cloud"\ngpu = "{name}"\nusd_h = 1.0\n')


def test_a_row_never_fits_with_options_the_trainer_lacks_and_names_those_it_needs(tmp_path):
    from prsmed.plan.estimate import trace_for

    opts = PlanOptions(model="prsmed-tiny", epochs=1, dataset_size=100)
    plain = Memory.from_trace(trace_for(opts), "bf16")
    checkpointed = Memory.from_trace(trace_for(opts, grad_checkpointing=True), "bf16")
    four_bit = Memory.from_trace(trace_for(opts, grad_checkpointing=True), "4bit")
    assert four_bit.total(1) < checkpointed.total(1) < plain.total(1)
    mid = lambda lo, hi: (lo + hi) / 2 / GIB  # noqa: E731 - a card whose memory sits between two needs
    cards = [_card("qlora-only", mid(four_bit.total(1), checkpointed.total(1))),
             _card("ckpt-only", mid(checkpointed.total(1), plain.total(1))),
             _card("tight", plain.total(8) / 0.95 / GIB), _card("roomy", 80), _card("no-bf16", 80, bf16=False)]
    path = tmp_path / "cards.toml"
    path.write_text('date = "2026-01-01"\n[[platform]]\nname = "Cloud"\n' + "".join(cards))
    report = plan(opts.model_copy(update={"catalogue": str(path)}))
    rows = {r["gpu"]: r for r in report["rows"]}

    qlora = rows["qlora-only"]
    assert not qlora["fits"] and "4-bit" in qlora["why"] and "cannot load" in qlora["why"]
    assert rows["ckpt-only"]["fits"] and rows["ckpt-only"]["needs"] == "--grad-checkpointing"
    assert rows["no-bf16"]["fits"] and rows["no-bf16"]["needs"] == "--precision fp16"
    assert rows["tight"]["fits"] and rows["tight"]["tight"] and not rows["roomy"]["tight"]
    assert rows["roomy"]["needs"] is None
    # Asking for a 4-bit base outright: every row is an estimate, none fits, and nothing is recommended.
    asked = plan(opts.model_copy(update={"catalogue": str(path), "precision": "4bit"}))
    assert not any(r["fits"] for r in asked["rows"]) and asked["train_command"] is None
    # The recommendation comes with the command line that runs it.
    assert report["train_command"].startswith("prsmed train --model prsmed-tiny --data DATA --out RUN")
    best = next(r for r in report["rows"] if r["fits"])
    assert f"--batch-size {best['recommended_batch']} --grad-accum {best['grad_accum']}" in report["train_command"]
    table = CliRunner().invoke(app, ["plan", "--model", "prsmed-tiny", "--catalogue", str(path), "--epochs", "1",
                                     "--dataset-size", "100"])
    assert table.exit_code == 0, table.output
    assert "prsmed train --model prsmed-tiny" in table.output and "cannot load" in table.output
    assert "yes, tight" in table.output
