"""bench/gpu_check.py's CPU path on prsmed-tiny: the same code the GPU run takes (meta build, random weights, the
trainer's step, both prediction paths, the report files), so the first GPU minute is not spent on a typo."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "gpu_check.py"


def test_the_gpu_check_runs_on_cpu_and_writes_its_report(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    out = tmp_path / "check"
    assert gpu_check.main(["--model", "prsmed-tiny", "--device", "cpu", "--batches", "1", "--steps", "1",
                           "--infer-calls", "2", "--out", str(out)]) == 0
    report = json.loads((out / "gpu_check.json").read_text())
    assert [(r["batch"], r["grad_checkpointing"]) for r in report["train"]] == [(1, False), (1, True)]
    for row in report["train"]:
        assert "error" not in row, row
        assert row["loss_finite"] and row["samples_per_s"] > 0 and row["plan_allocated_gib"] > 0
        assert row["flops_per_sample"] > 0
    predict = report["predict"]
    assert "error" not in predict, predict
    assert predict["one_prefill_p50_ms"] > 0 and predict["two_passes_p50_ms"] > 0
    assert predict["image_size"] == 256
    assert "out of memory: CPU" in report["skipped"]
    table = (out / "gpu_check.md").read_text()
    assert table.startswith("# GPU check: prsmed-tiny") and "| 1 | True |" in table and "two passes" in table


def test_a_card_is_matched_to_the_catalogue_by_whole_words():
    from prsmed.plan.catalogue import load_catalogue

    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    gpus = load_catalogue().gpu
    names = {"NVIDIA H100 80GB HBM3": "H100", "NVIDIA A100 80GB PCIe": "A100-80GB", "NVIDIA A100-SXM4-40GB": "A100",
             "NVIDIA GeForce RTX 4090": "RTX4090", "NVIDIA RTX A6000": "A6000", "Tesla T4": "T4", "NVIDIA L4": "L4",
             "NVIDIA RTX 6000 Ada Generation": "RTX6000-Ada", "Tesla V100-SXM2-16GB": "V100", "NVIDIA L40S": None,
             "NVIDIA H200": "H200"}
    for device_name, sky in names.items():
        card = gpu_check.catalogue_card(device_name, gpus)
        assert (card.sky if card else None) == sky, device_name
