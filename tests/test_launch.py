"""``prsmed launch``: the task it writes is read back by SkyPilot's own parser, and SkyPilot's optimizer, run in a
separate process with its enabled clouds and price catalogue fixed here (nothing is fetched, nothing launched),
picks the cheapest of the planner's fitting GPUs; no secret reaches the YAML; no enabled cloud is a plain message.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from prsmed.cloud.task import LaunchError, candidates

pytest.importorskip("sky")
PRSMED = [sys.executable, "-m", "prsmed.cli"]

# SkyPilot's catalogue format (its catalogs/v6/<cloud>/vms.csv), seeded for an offline optimizer. A T4 is the
# cheapest GPU offered, and it is not among the candidates the launch names.
_CATALOGUE = {
    "common/accelerators.csv": "AcceleratorName,Clouds\nA100-80GB,\"['RunPod', 'Lambda']\"\n"
                               "H100,\"['RunPod', 'Lambda']\"\nT4,\"['RunPod']\"\n",
    "runpod/vms.csv": "InstanceType,AcceleratorName,AcceleratorCount,vCPUs,MemoryGiB,Price,Region,GpuInfo,SpotPrice\n"
                      "1x_T4_SECURE,T4,1,4,16,0.20,CA,,0.10\n"
                      "1x_A100-80GB_SECURE,A100-80GB,1,8,80,1.64,CA,,0.89\n"
                      "1x_H100_SECURE,H100,1,16,120,2.99,CA,,1.99\n",
    "lambda/vms.csv": "InstanceType,AcceleratorName,AcceleratorCount,vCPUs,MemoryGiB,Price,Region,GpuInfo,SpotPrice\n"
                      "gpu_1x_a100_sxm4,A100-80GB,1,30,200,1.29,us-east-1,,\n"
                      "gpu_1x_h100_pcie,H100,1,26,200,2.49,us-east-1,,\n",
}

_READ_BACK = textwrap.dedent("""
    import json, os, sys
    import sky
    from sky import check, clouds, optimizer
    check.get_cached_enabled_clouds_or_refresh = lambda *a, **k: [clouds.RunPod(), clouds.Lambda()]
    check.check_capability = lambda *a, **k: None
    import yaml
    # What `sky jobs launch FILE --env NAME ...` does: the YAML read by SkyPilot, each secret given at submission.
    config = yaml.safe_load(open(sys.argv[1]))
    secrets = sorted(k for k, v in config["envs"].items() if v is None)
    task = sky.Task.from_yaml_config(config, env_overrides=[(k, "given-at-launch") for k in secrets])
    env = {k: (None if k in secrets else v) for k, v in task.envs.items()}
    res = list(task.resources)
    with sky.Dag() as dag:
        dag.add(task)
    optimizer.Optimizer.optimize(dag, quiet=True)
    best = task.best_resources
    out = {"accelerators": sorted(f"{r.cloud}:{list(r.accelerators)[0]}" for r in res),
           "use_spot": sorted({r.use_spot for r in res}), "job_recovery": res[0].job_recovery,
           "run": task.run, "envs": env, "setup": task.setup, "file_mounts": task.file_mounts,
           "best": [str(best.cloud), list(best.accelerators)[0], best.use_spot]}
    open(sys.argv[2], "w").write(json.dumps(out))
""")


@pytest.fixture()
def sky_home(tmp_path) -> Path:
    """A HOME of its own for SkyPilot (its state and catalogues live under ~/.sky), with the catalogue seeded."""
    home = tmp_path / "home"
    for name, text in _CATALOGUE.items():
        path = home / ".sky" / "catalogs" / "v6" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return home


@pytest.fixture(scope="module")
def plan_cache(tmp_path_factory) -> Path:
    """One planner cache for the module's launches: the tiny model's step is simulated once, not per launch."""
    return tmp_path_factory.mktemp("plan-cache")


def _launch(args: list[str], home: Path, plan_cache: Path, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "HOME": str(home), "PRSMED_HOME": str(home / "prsmed"), "PRSMED_PLAN_CACHE": str(plan_cache),
            **env}
    return subprocess.run([*PRSMED, "launch", *args], capture_output=True, text=True, env=full, timeout=300)


def _read_back(task_file: Path, home: Path) -> dict:
    out = task_file.with_suffix(".json")
    script = task_file.parent / "read_back.py"
    script.write_text(_READ_BACK)
    done = subprocess.run([sys.executable, str(script), str(task_file), str(out)], capture_output=True, text=True,
                          env={**os.environ, "HOME": str(home)}, timeout=300)
    assert done.returncode == 0 and out.exists(), done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    from prsmed.data.synth import synthesize

    root = tmp_path_factory.mktemp("launch-data") / "d"
    synthesize(root, n=12, seed=3)
    return root


@pytest.mark.parametrize("spot", [True, False])
def test_the_task_is_read_by_skypilot_and_its_optimizer_picks_the_cheapest_fitting_gpu(tmp_path, sky_home, dataset,
                                                                                         plan_cache, spot):
    task_file = tmp_path / "task.yaml"
    secret = "secret-value-never-in-the-yaml"
    done = _launch(["--model", "prsmed-tiny", "--data", str(dataset), "--checkpoint-uri", "s3://bucket/runs/one",
                    "--gpu", "a100-80gb", "--gpu", "h100", "--clouds", "runpod,lambda", "--epochs", "2",
                    "--spot" if spot else "--on-demand", "--dry-run", "--task-file", str(task_file)],
                   sky_home, plan_cache, AWS_SECRET_ACCESS_KEY=secret, HF_TOKEN="hf_" + secret)
    assert done.returncode == 0, done.stderr[-3000:]
    text = task_file.read_text()
    assert text.split("\n", 2)[2] in done.stdout  # --dry-run prints the same task it wrote
    assert "A100 80GB" in done.stdout and "hours" in done.stdout  # and the planner's table
    assert secret not in text and secret not in done.stdout

    task = _read_back(task_file, sky_home)
    assert task["accelerators"] == ["Lambda:A100-80GB", "Lambda:H100", "RunPod:A100-80GB", "RunPod:H100"]
    assert task["use_spot"] == [spot]
    assert task["job_recovery"]["max_restarts_on_errors"] >= 1
    assert "--resume" in task["run"] and "--checkpoint-uri s3://bucket/runs/one" in task["run"]
    assert "[ $status -ne 75 ]" in task["run"]  # 75 (stopped with a checkpoint) resumes in place
    assert {"HF_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(task["envs"])
    assert task["envs"]["AWS_SECRET_ACCESS_KEY"] is None and task["envs"]["HF_TOKEN"] is None
    assert "-c constraints.txt" in task["setup"] and ".[s3]" in task["setup"]
    assert task["file_mounts"] == {"/data": str(dataset)}
    # Lambda has no spot capacity: spot goes to RunPod's A100 at $0.89; on demand, Lambda's A100 at $1.29 is
    # cheapest. The $0.10 T4 is never chosen: it is not a candidate.
    assert task["best"] == (["RunPod", "A100-80GB", True] if spot else ["Lambda", "A100-80GB", False])


def test_without_an_enabled_cloud_the_launch_says_what_to_run(tmp_path, sky_home, dataset, plan_cache):
    done = _launch(["--model", "prsmed-tiny", "--data", str(dataset), "--checkpoint-uri", "s3://bucket/runs/two",
                    "--clouds", "runpod", "--max-steps", "2"], sky_home, plan_cache)
    assert done.returncode == 3, (done.stdout[-2000:], done.stderr[-2000:])
    assert "no cloud is enabled" in done.stderr and "sky check" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_checkpoint_uri_on_the_machines_own_disk_is_refused(tmp_path, sky_home, dataset, plan_cache):
    done = _launch(["--model", "prsmed-tiny", "--data", str(dataset), "--checkpoint-uri", f"file://{tmp_path}/c",
                    "--dry-run"], sky_home, plan_cache)
    assert done.returncode == 2 and "must be object storage" in done.stderr


def _row(gpu, *, fits=True, needs=None, max_batch=8, vram=24.0, batch=8, accum=1):
    return {"gpu": gpu, "fits": fits, "needs": needs, "max_batch": max_batch, "vram_gb": vram,
            "recommended_batch": batch, "grad_accum": accum, "platform": "RunPod", "usd_h": 1.0}


def test_candidates_share_one_batch_that_fits_every_gpu_offered():
    report = {"options": {"catalogue": None}, "rows": [
        _row("v100", fits=False, needs="a 4-bit base and --grad-checkpointing", max_batch=1, vram=16),
        _row("t4", needs="--precision fp16, --grad-checkpointing", max_batch=1, vram=15),
        _row("rtx4090", needs="--grad-checkpointing", max_batch=2, vram=24, batch=2, accum=4),
        _row("a100-80gb", max_batch=8, vram=80),
        _row("h100", max_batch=8, vram=80),
        _row("l4", fits=False, max_batch=0, vram=22),
    ]}
    got = candidates(report, batch_size=None, grad_checkpointing=False, gpus=None, clouds=None, max_usd_per_hour=None)
    # The smallest card that can run it sets the batch: 2 x 4 with checkpointing, which the larger ones run too.
    assert (got["batch_size"], got["grad_accum"], got["grad_checkpointing"]) == (2, 4, True)
    assert got["gpus"] == ["rtx4090", "a100-80gb", "h100"] and got["accelerators"] == ["RTX4090", "A100-80GB", "H100"]
    # A batch the user names leaves out the cards it does not fit.
    got = candidates(report, batch_size=8, grad_checkpointing=False, gpus=None, clouds=None, max_usd_per_hour=None)
    assert got["gpus"] == ["a100-80gb", "h100"]
    with pytest.raises(LaunchError, match="no GPU"):
        candidates(report, batch_size=None, grad_checkpointing=False, gpus=["t4", "v100", "l4"], clouds=None,
                   max_usd_per_hour=None)
