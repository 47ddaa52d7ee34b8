"""The training configuration: one pydantic model, validated at the edge (CLI, service, Python)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Fields that may differ between a run and its resumption: they bound or observe the run but do not change what
# it computes. Everything else must match the checkpoint, or the resumed run would not be the same run.
# grad_checkpointing recomputes the same forward (RNG state included) to save memory: turning it on is how a run
# that ran out of memory goes on.
RESUMABLE_OVERRIDES = frozenset(
    {
        "out", "data", "resume", "save_every", "keep_last", "max_hours", "max_cost", "gpu", "usd_per_hour",
        "on_finish", "stop_after", "progress", "tensorboard", "log_every", "num_workers", "device",
        "early_stop_patience", "adapter_weights", "grad_checkpointing", "val_answer_rows", "val_max_new_tokens",
        "checkpoint_uri", "report_to",
    }
)

Precision = Literal["auto", "fp32", "bf16", "fp16"]
REPORT_TO = ("tensorboard", "wandb")
# How long a run lasts is defaulted as one: a user who sets either gets no model default for the other.
DURATION = frozenset({"epochs", "max_steps"})


def model_train_defaults(model: object) -> dict[str, Any]:
    """The fine-tuning settings a zoo model uses where the user gives none (``Preset.finetune``); {} for a model
    given as a spec file. The paper's model has none: it keeps the paper's recipe, the field defaults below."""
    from prsmed.zoo.presets import PRESETS

    preset = PRESETS.get(model) if isinstance(model, str) else None
    return dict(preset.finetune) if preset is not None else {}


class TrainConfig(BaseModel):
    """Everything a training run needs. Defaults are the paper's recipe (PRSMED.md section 3), except where the
    zoo model has fine-tuning defaults of its own (:func:`model_train_defaults`): a field left out, or given as
    None, takes the model's default first, then the field's. docs/training.md says which and why."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @model_validator(mode="before")
    @classmethod
    def _fill_model_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        # None means "not given": the field's default applies (for a field that accepts None, None stays).
        given = {k: v for k, v in data.items()
                 if v is not None or k not in cls.model_fields or cls.model_fields[k].default is None}
        duration_given = any(given.get(k) is not None for k in DURATION)
        for key, value in model_train_defaults(given.get("model")).items():
            if key in DURATION and duration_given:
                continue
            if given.get(key) is None:
                given[key] = value
        return given

    # what and where
    model: str = Field(description="zoo model name (prsmed zoo list) or a path to a ModelSpec JSON file")
    data: Path = Field(description="dataset root in the PRS-Med layout")
    out: Path = Field(description="run directory: checkpoints/, metrics.jsonl, tb/, adapter/")

    # the recipe
    epochs: int = Field(20, gt=0, description="epochs (default: the model's fine-tuning default, see `prsmed zoo "
                        "show`; the paper: 20)")
    batch_size: int = Field(8, gt=0, description="rows per micro-batch, per process (the paper: 8)")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate (default: the model's; the paper: 1e-4)")
    min_lr: float = Field(1e-6, ge=0, description="cosine floor (eta_min)")
    weight_decay: float = Field(1e-5, ge=0, description="AdamW weight decay")
    adam_eps: float = Field(1e-6, gt=0, description="AdamW epsilon")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas, two numbers")
    grad_clip: float = Field(1.0, ge=0, description="global gradient-norm clip; 0 disables")
    seed: int = Field(42, description="seed for weights init, data order and dropout")
    max_steps: int | None = Field(None, gt=0, description="cap on optimizer steps; the cosine then ends there "
                                  "(default: the model's, unless epochs is given)")

    # losses
    seg_weight: float = Field(1.0, ge=0, description="weight of the structure (mask) loss")
    lm_weight: float = Field(1.0, ge=0, description="weight of the LM loss on answer tokens")
    dice_weight: float = Field(0.0, ge=0, description="extra soft-Dice term in the mask loss")
    cls_weight: float = Field(0.5, ge=0, description="modality-classifier weight in the early epochs")
    cls_epochs: int = Field(5, ge=0, description="epochs during which the classifier loss counts")
    # The LLM's image tower, taught a new look from the masks through the model's tower probe
    # (prsmed/train/tower_probe.py). Off in the paper's recipe, which leaves LLaVA-Med's tower frozen.
    tower_weight: float = Field(0.0, ge=0, description="weight of the tower-probe loss that teaches the LLM's image "
                                "tower a new look from the masks (default: the model's; prsmed-tiny 1, the paper's "
                                "model 0 = off)")
    tower_lr: float | None = Field(None, gt=0, description="learning rate of the LLM's image tower and projector "
                                   "when the model trains them (default: the model's; otherwise lr)")
    tower_warmup_steps: int = Field(0, ge=0, description="steps in which the LLM's image tower learns a new look "
                                    "alone, through its probe, before the first training step (default: the "
                                    "model's; 0: none)")

    # precision and memory
    precision: Precision = Field("auto", description="auto, fp32, bf16 or fp16 (auto: bf16 on a GPU that has it)")
    grad_checkpointing: bool = Field(False, description="recompute LLM activations in backward to save memory")
    cast_frozen: bool = Field(True, description="on a GPU, keep the frozen base LLM in the low-precision dtype")

    # validation and early stopping
    val_fraction: float = Field(0.1, ge=0, lt=1, description="share of train images held out when the data has no "
                                "val split")
    val_max_samples: int | None = Field(None, gt=0, description="validate on at most N rows")
    eval_every: int | None = Field(None, gt=0, description="also validate every N steps (always at epoch ends)")
    early_stop_patience: int | None = Field(None, gt=0, description="stop after N evaluations without a better "
                                            "validation score")
    early_stop_min_delta: float = Field(0.0, ge=0, description="smallest gain of the validation score that counts")
    # Generating answers draws no random numbers and changes no weight, so these two may change on resume.
    val_answer_rows: int = Field(32, ge=0, description="validation rows whose generated answers are scored at each "
                                 "evaluation (0: masks only)")
    val_max_new_tokens: int = Field(48, gt=0, le=4096,
                                    description="length limit of a generated validation answer, in tokens")

    # checkpoints
    save_every: int | None = Field(None, gt=0, description="checkpoint every N steps (and always at epoch ends)")
    keep_last: int = Field(3, gt=0, description="checkpoints kept (the best one is kept too)")
    resume: bool = Field(False, description="continue from the newest good checkpoint in out")
    checkpoint_uri: str | None = Field(None, description="also mirror every checkpoint and the final adapter to this "
                                       "fsspec URL (s3://, gs://, az://, file://); with --resume, a newer checkpoint "
                                       "there is restored first (docs/cloud-training.md)")
    adapter_weights: Literal["best", "last"] = Field("best", description="best or last: the weights written to "
                                                     "RUN/adapter when the run validates")

    # budget and lifecycle
    max_hours: float | None = Field(None, gt=0, description="stop cleanly after H hours of training")
    max_cost: float | None = Field(None, gt=0, description="stop cleanly before spending this many USD")
    gpu: str | None = Field(None, description="GPU name whose price max_cost uses (the planner's catalogue)")
    usd_per_hour: float | None = Field(None, gt=0, description="what this run costs per hour, in USD")
    on_finish: str | None = Field(None, description="shell command to run when the run ends")
    stop_after: int | None = Field(None, gt=0, description="stop resumably (exit 75) after N steps of this "
                                   "invocation")

    # plumbing
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    num_workers: int = Field(0, ge=0, description="data-loading worker processes")
    log_every: int = Field(1, gt=0, description="write metrics every N steps")
    progress: bool = Field(True, description="show a progress bar")
    tensorboard: bool = Field(True, description="write TensorBoard events (off: TensorBoard is left out of "
                              "report_to)")
    report_to: str = Field("tensorboard", description="where metrics go besides metrics.jsonl, comma-separated: "
                           "tensorboard, wandb (the prsmed[wandb] extra; WANDB_PROJECT and WANDB_MODE as wandb reads "
                           "them), or none")

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.gpu is not None:
            from prsmed.plan.catalogue import CatalogueError, load_catalogue

            try:
                load_catalogue().hourly_price(self.gpu)
            except CatalogueError as e:
                raise ValueError(f"--gpu: {e}; or pass --usd-per-hour") from None
        if self.max_cost is not None and self.usd_per_hour is None and self.gpu is None:
            raise ValueError("--max-cost needs a price: pass --usd-per-hour X or --gpu NAME")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas ({self.betas[0]}, {self.betas[1]}) must each be at least 0 and below 1")
        unknown = set(self.destinations()) - set(REPORT_TO)
        if unknown or not self.report_to.strip():
            raise ValueError(f"report_to {self.report_to!r}: expected a comma-separated list of "
                             f"{', '.join(REPORT_TO)}, or none")
        if self.checkpoint_uri is not None and not self.checkpoint_uri.strip():
            raise ValueError("checkpoint_uri is empty: give a URL such as s3://bucket/run, or leave it out")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        return self

    def hourly_cost(self, world_size: int = 1) -> float | None:
        """USD per hour of this run: ``usd_per_hour`` as given (the whole run's price), else the ``--gpu`` price
        times the number of processes (one GPU each)."""
        if self.usd_per_hour is not None:
            return self.usd_per_hour
        if self.gpu is not None:
            from prsmed.plan.catalogue import load_catalogue

            # The median on-demand price of the planner's catalogue (prsmed/plan/catalogue.toml, $PRSMED_CATALOGUE).
            return load_catalogue().hourly_price(self.gpu) * world_size
        return None

    def destinations(self) -> list[str]:
        """The metric destinations this run reports to (``report_to`` less TensorBoard when it is switched off)."""
        named = [d.strip().lower() for d in self.report_to.split(",") if d.strip()]
        if "none" in named:
            return []
        return [d for d in dict.fromkeys(named) if self.tensorboard or d != "tensorboard"]

    def recipe(self) -> dict:
        """The fields that define what the run computes (compared on resume)."""
        return self.model_dump(mode="json", exclude=set(RESUMABLE_OVERRIDES))
