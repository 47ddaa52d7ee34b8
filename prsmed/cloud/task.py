"""The SkyPilot task that ``prsmed launch`` submits: a training run as a managed job on a rented GPU.

Built as a plain dict (what the task YAML holds) so that ``--dry-run`` needs no SkyPilot; SkyPilot itself reads it
back (``sky.Task.from_yaml_config``) before anything is launched. What it encodes:

* **Which GPUs.** The planner's rows for this configuration: every GPU in its catalogue on which the run's batch
  fits (with gradient checkpointing when the planner needs it on the smallest of them), as ``resources.any_of``, so
  SkyPilot's optimizer takes the cheapest one offered on the clouds the user has enabled. One batch size for all
  of them: a run recovered onto another GPU type must be the same run (``--resume`` refuses a different batch).
* **Recovery.** A managed job on spot capacity (``use_spot``) is moved to a new machine when preempted; the run
  command always passes ``--resume --checkpoint-uri``, so every recovery continues from the newest complete
  checkpoint in the bucket. Exit status 75 (preempted, resumable) is resumed in place by the run command itself and
  counts as recoverable for SkyPilot (``max_restarts_on_errors``).
* **Secrets.** The Hub token, the storage and wandb credentials are listed under ``envs`` by name with no value;
  ``prsmed launch`` fills them from its own environment when it submits, so no secret is ever written in the YAML.
  (SkyPilot 0.9, the release that installs beside this project's web stack, has no separate ``secrets`` section.)
* **Teardown.** A managed job's cluster is torn down by SkyPilot when the job ends, whatever way it ends.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
from pathlib import Path
from typing import Any

from prsmed.train.config import TrainConfig

CLOUDS = ("vast", "runpod", "lambda", "aws", "gcp", "azure", "kubernetes")
# The planner catalogue's platform names for each SkyPilot cloud (for the table beside the task).
PLATFORMS = {"vast": "Vast.ai", "runpod": "RunPod", "lambda": "Lambda", "aws": "AWS", "gcp": "GCP", "azure": "Azure"}
REMOTE_DATA = "/data"
REMOTE_OUT = "prsmed-run"  # under the job's working folder on the machine; what matters is in the bucket
# Secrets passed by name: (variable, when it is needed).
SECRET_VARS = {
    "HF_TOKEN": "always",  # private Hub models, adapters and datasets
    "AWS_ACCESS_KEY_ID": "s3", "AWS_SECRET_ACCESS_KEY": "s3", "AWS_SESSION_TOKEN": "s3",
    "AWS_ENDPOINT_URL": "s3", "AWS_DEFAULT_REGION": "s3",
    "GOOGLE_APPLICATION_CREDENTIALS": "gs",
    "AZURE_STORAGE_ACCOUNT_NAME": "az", "AZURE_STORAGE_ACCOUNT_KEY": "az", "AZURE_STORAGE_SAS_TOKEN": "az",
    "WANDB_API_KEY": "wandb", "WANDB_PROJECT": "wandb", "WANDB_ENTITY": "wandb",
}
STORE_EXTRA = {"s3": "s3", "gs": "gcs", "az": "azure"}
MAX_RESTARTS_ON_ERRORS = 3


class LaunchError(ValueError):
    """The launch cannot be built as asked; the message says what to change."""


def scheme(uri: str) -> str:
    return uri.split("://", 1)[0].lower() if "://" in uri else ""


def candidates(report: dict[str, Any], *, batch_size: int | None, grad_checkpointing: bool,
               gpus: list[str] | None, clouds: list[str] | None, max_usd_per_hour: float | None) -> dict[str, Any]:
    """From ``prsmed plan``'s report: the batch, accumulation and checkpointing of the run, and the GPUs (with
    their SkyPilot names) on which that run fits (the planner never says a row that needs a 4-bit base fits: the
    trainer cannot load one)."""
    from prsmed.plan.catalogue import load_catalogue

    catalogue = load_catalogue(report["options"].get("catalogue"))
    sky_name = {g.name: g.sky for g in catalogue.gpu}
    # Rows that need another precision are left out: one task is one run, in the precision asked.
    usable = [r for r in report["rows"] if r["fits"] and "--precision" not in (r["needs"] or "")]
    if gpus:
        unknown = sorted(set(gpus) - set(sky_name))
        if unknown:
            raise LaunchError(f"--gpu {', '.join(unknown)}: not in the planner's catalogue (known: "
                              f"{', '.join(sorted(sky_name))})")
        usable = [r for r in usable if r["gpu"] in gpus]
    platforms = {PLATFORMS[c] for c in (clouds or CLOUDS) if c in PLATFORMS}
    if max_usd_per_hour is not None:
        # The catalogue's price where it has one for an enabled cloud; SkyPilot's optimizer has the live figure.
        def cheap(row):
            return row["usd_h"] is None or row["platform"] not in platforms or row["usd_h"] <= max_usd_per_hour
        usable = [r for r in usable if cheap(r)]
    usable = [r for r in usable if sky_name.get(r["gpu"])]
    if not usable:
        raise LaunchError("no GPU in the planner's catalogue fits this run"
                          + (f" among --gpu {', '.join(gpus)}" if gpus else "")
                          + (f" under ${max_usd_per_hour}/h" if max_usd_per_hour is not None else "")
                          + "; see `prsmed plan` for what each GPU would need")
    if batch_size is None:
        # The largest batch (up to the paper's 8) that fits the smallest card: every larger one fits it too.
        smallest = min(usable, key=lambda r: (r["max_batch"], r["vram_gb"]))
        batch, accum = smallest["recommended_batch"], smallest["grad_accum"]
        checkpointing = grad_checkpointing or "--grad-checkpointing" in (smallest["needs"] or "")
    else:
        batch, accum, checkpointing = batch_size, None, grad_checkpointing
    order = [g.name for g in catalogue.gpu]
    chosen = sorted({r["gpu"] for r in usable if r["max_batch"] >= batch
                     and (checkpointing or "--grad-checkpointing" not in (r["needs"] or ""))}, key=order.index)
    if not chosen:
        raise LaunchError(f"no GPU in the planner's catalogue fits batch {batch}"
                          f"{' with' if checkpointing else ' without'} gradient checkpointing")
    return {"batch_size": batch, "grad_accum": accum, "grad_checkpointing": checkpointing,
            "gpus": chosen, "accelerators": [sky_name[g] for g in chosen]}


def _project_root() -> Path | None:
    """The source checkout this package runs from, when it does (then the task ships it as SkyPilot's workdir)."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() and (root / "constraints.txt").is_file() else None


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("prsmed")
    except PackageNotFoundError:
        return "0.0.0"


def _train_args(config: TrainConfig, *, data: str, extra_set: set[str]) -> list[str]:
    """The ``prsmed train`` options for the fields the user set (and the ones the launch fixes)."""
    fields = config.model_dump(mode="json", exclude_unset=True)
    fields.update({k: getattr(config, k) for k in extra_set})
    fields.update(data=data, out=REMOTE_OUT, resume=True)
    args = []
    for name, value in fields.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else f"--no-{name.replace('_', '-')}")
        elif isinstance(value, (list, tuple)):
            args += [flag, *(str(v) for v in value)]
        elif value is not None:
            args += [flag, str(value)]
    return args


def check_checkpoint_uri(uri: str | None) -> str:
    if not uri or not scheme(uri) or scheme(uri) == "file":
        raise LaunchError("--checkpoint-uri must be object storage (s3://, gs://, az://): the machine's own disk "
                          "goes with it when it is preempted")
    return uri


def build_task(config: TrainConfig, *, data_uri: str, plan: dict[str, Any], clouds: list[str] | None, spot: bool,
               name: str | None = None) -> dict[str, Any]:
    """The task YAML, as a dict, for training ``config`` on one of ``plan['accelerators']``."""
    uri = check_checkpoint_uri(config.checkpoint_uri)
    # What the run reaches beyond the machine: the stores of its checkpoints and data, and wandb if it reports there.
    reaches = {scheme(uri), scheme(data_uri)} | ({"wandb"} if "wandb" in config.destinations() else set())
    extras = sorted({STORE_EXTRA.get(r, r) for r in reaches if r in STORE_EXTRA or r == "wandb"})
    secrets = {var: None for var, need in SECRET_VARS.items() if need == "always" or need in reaches}

    file_mounts: dict[str, Any] = {}
    fetch = ""
    data_arg = REMOTE_DATA
    if scheme(data_uri) in ("s3", "gs", "az"):
        # Fetched by the run itself through fsspec: Vast.ai and RunPod cannot mount buckets.
        fetch = f"[ -e {REMOTE_DATA}/.fetched ] || python -m prsmed.cloud.fetch {shlex.quote(data_uri)} {REMOTE_DATA}\n"
    elif scheme(data_uri) == "hf":
        repo = data_uri.split("://", 1)[1].removeprefix("datasets/")
        fetch = f"hf download --repo-type dataset {shlex.quote(repo)} --local-dir {REMOTE_DATA}\n"
    elif scheme(data_uri):
        raise LaunchError(f"--data {data_uri}: expected a local folder, s3://, gs://, az:// or hf://datasets/...")
    else:
        local = Path(data_uri).expanduser()
        if not local.is_dir():
            raise LaunchError(f"--data {data_uri}: no such folder here (a local dataset is uploaded with the task)")
        file_mounts[REMOTE_DATA] = str(local.resolve())

    extras_spec = f"[{','.join(extras)}]" if extras else ""
    root = _project_root()
    if root is not None:
        setup = (f"python3 -m venv ~/prsmed-venv && . ~/prsmed-venv/bin/activate && "
                 f"pip install -q -c constraints.txt -e './sdk' -e '.{extras_spec}'")
    else:
        setup = (f"python3 -m venv ~/prsmed-venv && . ~/prsmed-venv/bin/activate && "
                 f"pip install -q 'prsmed{extras_spec}=={_version()}'")

    train = config.model_copy(update={"batch_size": plan["batch_size"],
                                      "grad_checkpointing": plan["grad_checkpointing"],
                                      **({"grad_accum": plan["grad_accum"]} if plan["grad_accum"] else {})})
    fixed = {"batch_size", "grad_checkpointing", "checkpoint_uri"} | ({"grad_accum"} if plan["grad_accum"] else set())
    command = "prsmed train " + " ".join(shlex.quote(a) for a in _train_args(train, data=data_arg, extra_set=fixed))
    run = (". ~/prsmed-venv/bin/activate\n" + fetch
           + "# 75: stopped with a checkpoint (SIGTERM, a pause): resume in place; anything else ends the job.\n"
           + f"while true; do\n  {command}\n  status=$?\n  [ $status -ne 75 ] && exit $status\n  sleep 5\ndone\n")

    # Without --clouds, SkyPilot chooses among every cloud the user has enabled (`sky check`).
    any_of = [{**({"cloud": cloud} if cloud else {}), "accelerators": f"{accelerator}:1"}
              for accelerator in plan["accelerators"] for cloud in (clouds or [None])]
    resources: dict[str, Any] = {
        "any_of": any_of,
        "use_spot": spot,
        "disk_size": 100,
        "job_recovery": {"strategy": "EAGER_NEXT_REGION", "max_restarts_on_errors": MAX_RESTARTS_ON_ERRORS},
    }
    digest = hashlib.sha256(json.dumps([config.model, data_uri, uri]).encode()).hexdigest()[:6]
    task: dict[str, Any] = {
        "name": name or f"prsmed-{config.model.replace('/', '-')[:30]}-{digest}",
        "resources": resources,
        "envs": {"PRSMED_VERSION": _version(), **secrets},
        "setup": setup,
        "run": run,
    }
    if root is not None:
        task["workdir"] = str(root)
    if file_mounts:
        task["file_mounts"] = file_mounts
    return task


def secret_overrides(task: dict[str, Any], environ: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """The values of the task's secret variables from this machine's environment (those that are set), as
    SkyPilot's ``env_overrides``: given at submission, never written to the YAML."""
    environ = os.environ if environ is None else environ
    return [(k, environ[k]) for k, v in task["envs"].items() if v is None and environ.get(k)]


def to_yaml(task: dict[str, Any]) -> str:
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    def text(dumper, value: str):  # scripts as readable blocks, not escaped one-liners
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)

    Dumper.add_representer(str, text)
    head = ("# prsmed launch: a SkyPilot managed job. Secrets are listed by name only (null); `prsmed launch` fills\n"
            "# them from its environment when it submits. Run it yourself with: sky jobs launch THIS_FILE "
            "--env HF_TOKEN ...\n")
    return head + yaml.dump(task, Dumper=Dumper, sort_keys=False, width=120)
