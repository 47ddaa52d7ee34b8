"""``prsmed train``: the command-line face of :class:`~prsmed.train.config.TrainConfig`.

Mount with ``app.command("train")(train)``; ``python -m prsmed.train`` runs it alone (that is what torchrun runs).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer
from pydantic import ValidationError

from prsmed.validation import as_flag, validation_problems

EXIT_BAD_OPTIONS = 2


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(EXIT_BAD_OPTIONS)


def train(
    model: str = typer.Option(..., "--model", help="Zoo model name (prsmed zoo list) or a ModelSpec JSON file."),
    data: Path = typer.Option(..., "--data", help="Dataset root (PRS-Med layout)."),
    out: Path = typer.Option(..., "--out", help="Run directory: checkpoints/, metrics.jsonl, tb/, adapter/."),
    epochs: Optional[int] = typer.Option(None, help="Epochs (default: the model's fine-tuning default, see "
                                                    "`prsmed zoo show`; the paper: 20)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Rows per micro-batch, per process (paper: 8)."),
    grad_accum: int = typer.Option(1, "--grad-accum", help="Micro-batches per optimizer step."),
    lr: Optional[float] = typer.Option(None, help="AdamW learning rate (default: the model's; the paper: 1e-4)."),
    min_lr: float = typer.Option(1e-6, "--min-lr", help="Cosine floor."),
    weight_decay: float = typer.Option(1e-5, "--weight-decay", help="AdamW weight decay."),
    adam_eps: float = typer.Option(1e-6, "--adam-eps", help="AdamW epsilon."),
    grad_clip: float = typer.Option(1.0, "--grad-clip", help="Global gradient-norm clip; 0 disables."),
    seed: int = typer.Option(42, help="Seed for weights init, data order and dropout."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Cap on optimizer steps (the cosine ends there; "
                                            "default: the model's, unless --epochs is given)."),
    seg_weight: float = typer.Option(1.0, "--seg-weight", help="Weight of the structure (mask) loss."),
    lm_weight: float = typer.Option(1.0, "--lm-weight", help="Weight of the LM loss on answer tokens."),
    dice_weight: float = typer.Option(0.0, "--dice-weight", help="Extra soft-Dice term in the mask loss."),
    cls_weight: float = typer.Option(0.5, "--cls-weight", help="Modality-classifier weight in early epochs."),
    cls_epochs: int = typer.Option(5, "--cls-epochs", help="Epochs during which the classifier loss counts."),
    tower_weight: Optional[float] = typer.Option(
        None, "--tower-weight", help="Weight of the tower-probe loss that teaches the LLM's image tower a new look "
        "from the masks (default: the model's; prsmed-tiny 1, the paper's model 0 = off)."),
    tower_lr: Optional[float] = typer.Option(
        None, "--tower-lr", help="Learning rate of the LLM's image tower and projector when the model trains them "
        "(default: the model's; otherwise --lr)."),
    precision: str = typer.Option("auto", help="auto, fp32, bf16 or fp16 (auto: bf16 on a GPU that has it)."),
    grad_checkpointing: bool = typer.Option(False, "--grad-checkpointing/--no-grad-checkpointing",
                                            help="Recompute LLM activations in backward to save memory."),
    cast_frozen: bool = typer.Option(True, "--cast-frozen/--no-cast-frozen",
                                     help="On GPU, keep the frozen base LLM in the low-precision dtype."),
    val_fraction: float = typer.Option(0.1, "--val-fraction",
                                       help="Share of train images held out when the data has no val split."),
    val_max_samples: Optional[int] = typer.Option(None, "--val-max-samples", help="Validate on at most N rows."),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", help="Also validate every N steps."),
    early_stop_patience: Optional[int] = typer.Option(
        None, "--early-stop-patience", help="Stop after N evaluations without a better validation score."),
    early_stop_min_delta: float = typer.Option(0.0, "--early-stop-min-delta",
                                               help="Smallest gain of the validation score that counts."),
    val_answer_rows: int = typer.Option(32, "--val-answer-rows",
                                        help="Validation rows whose generated answers are scored (0: masks only)."),
    val_max_new_tokens: int = typer.Option(48, "--val-max-new-tokens",
                                           help="Length limit of a generated validation answer, in tokens."),
    save_every: Optional[int] = typer.Option(None, "--save-every", help="Checkpoint every N steps (and each epoch)."),
    keep_last: int = typer.Option(3, "--keep-last", help="Checkpoints kept (the best one is kept too)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest good checkpoint in --out."),
    adapter_weights: str = typer.Option("best", "--adapter-weights", help="best or last: weights for RUN/adapter."),
    max_hours: Optional[float] = typer.Option(None, "--max-hours", help="Stop cleanly after H hours of training."),
    max_cost: Optional[float] = typer.Option(None, "--max-cost", help="Stop cleanly before spending USD."),
    gpu: Optional[str] = typer.Option(None, "--gpu", help="GPU name for --max-cost prices (provisional table)."),
    usd_per_hour: Optional[float] = typer.Option(None, "--usd-per-hour", help="What this run costs per hour."),
    on_finish: Optional[str] = typer.Option(None, "--on-finish", help="Shell command to run when the run ends."),
    stop_after: Optional[int] = typer.Option(None, "--stop-after",
                                             help="Stop resumably (exit 75) after N steps of this invocation."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    num_workers: int = typer.Option(0, "--num-workers", help="Data-loading worker processes."),
    log_every: int = typer.Option(1, "--log-every", help="Write metrics every N steps."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    tensorboard: bool = typer.Option(True, "--tensorboard/--no-tensorboard", help="Write TensorBoard events."),
) -> None:
    """Fine-tune a PRS-Med model (LoRA on the LLM, vision encoder and fusion head trained).

    Exit status: 0 done (completed, early-stopped or budget reached), 75 preempted/paused with a checkpoint
    (rerun with --resume), 1 failed, 2 bad options.
    """
    options = dict(locals())  # first, so it holds exactly the options
    from prsmed.train.config import TrainConfig
    from prsmed.train.trainer import run_training

    try:
        config = TrainConfig(**options)
    except ValidationError as e:
        _fail(validation_problems(e, as_flag))
    result = run_training(config)
    if result.status == "failed":
        typer.echo(f"error: {result.reason}", err=True)
    elif result.report and int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one table, not one per process
        from prsmed.train.report import format_report

        typer.echo(format_report(result.report))
    raise typer.Exit(result.exit_code)
