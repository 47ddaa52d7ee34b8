"""What a run reports as it goes: ``metrics.jsonl``, TensorBoard events and Weights & Biases (``report_to``), the
progress bar and ``train.log``."""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prsmed.train.distributed import Dist

log = logging.getLogger("prsmed.train")


class RunLog:
    """``metrics.jsonl``, TensorBoard events, a wandb run and the progress bar. Inert unless ``enabled`` (rank 0).
    ``config`` is what the wandb run records as its configuration."""

    def __init__(self, out: Path, *, enabled: bool, destinations: list[str], progress: bool,
                 config: dict[str, Any] | None = None) -> None:
        self.path = out / "metrics.jsonl"
        self.enabled, self.progress = enabled, progress
        self.tensorboard, self.wandb = "tensorboard" in destinations, "wandb" in destinations
        self.config = config or {}
        self._writer = None
        self._wandb = None
        self._bar = None
        self._redirect = None

    def open(self, *, step: int, resumed: bool) -> None:
        """Start fresh, or after a resume drop what was logged past ``step`` (those steps run again)."""
        if not self.enabled:
            return
        if not resumed:
            self.path.write_text("")
        elif self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if step_of(line) <= step]
            self.path.write_text("".join(line + "\n" for line in kept))
        if self.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(self.path.parent / "tb"), purge_step=step + 1 if resumed else None)
            except ImportError as e:
                log.warning("TensorBoard logging is off (%s); install tensorboard to enable it", e)
        if self.wandb:
            self._wandb = open_wandb(self.path.parent, self.config)

    def start_progress(self, *, step: int, total: int) -> None:
        if self.enabled and self.progress:
            from tqdm.auto import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._bar = tqdm(total=total, initial=step, desc="train", unit="step", dynamic_ncols=True)
            # Log lines go above the bar instead of through it.
            consoles = [lg for lg in (logging.getLogger(), logging.getLogger("prsmed"))
                        if any(type(h) is logging.StreamHandler for h in lg.handlers)]
            self._redirect = logging_redirect_tqdm(loggers=consoles)
            self._redirect.__enter__()

    def advance(self, record: dict[str, Any]) -> None:
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4f}", lr=f"{record['lr']:.2e}")

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")
        # Charts are named train/<metric> and val/<metric> (val/score, not val/val_score).
        prefix = "val" if record.get("kind") == "eval" else "train"
        scalars = {f"{prefix}/{k.removeprefix(prefix + '_')}": v for k, v in record.items()
                   if k not in ("kind", "step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._writer is not None:
            for name, v in scalars.items():
                self._writer.add_scalar(name, v, record["step"])
        if self._wandb is not None and scalars:
            self._wandb.log({**scalars, "step": record["step"]})

    def close(self) -> None:
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
            self._redirect = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def open_wandb(out: Path, config: dict[str, Any]):
    """A wandb run for this run directory. Its id is kept in ``RUN/wandb-run-id``, so a resumed run (a new
    process, a new machine with the same --out or --checkpoint-uri) continues the same wandb run. Project, entity
    and mode come from wandb's own variables (WANDB_PROJECT, default "prsmed"; WANDB_MODE=offline for none)."""
    from prsmed.extras import require

    require("wandb")
    import wandb

    id_file = out / "wandb-run-id"
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id + "\n")
    run = wandb.init(project=os.environ.get("WANDB_PROJECT", "prsmed"), id=run_id, resume="allow", dir=str(out),
                     name=out.name, config=config)
    # Our step counter is the x axis of every chart, so a resumed run's repeated steps overwrite, not append.
    run.define_metric("step")
    run.define_metric("*", step_metric="step")
    return run


def step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, TypeError, ValueError, AttributeError):
        return 0


def setup_logging(out: Path, dist: Dist) -> Callable[[], None]:
    handlers: list[logging.Handler] = []
    logger = logging.getLogger("prsmed")
    old_level = logger.level
    logger.setLevel(logging.INFO if dist.main else logging.WARNING)
    if dist.main:
        try:
            out.mkdir(parents=True, exist_ok=True)
            fh = logging.FileHandler(out / "train.log")
            fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            handlers.append(fh)
        except OSError as e:  # the run itself will report why --out is unusable
            logging.getLogger("prsmed.train").warning("cannot write %s/train.log: %s", out, e)
    if not logging.getLogger().handlers:  # nobody configured logging: show ours on stderr
        sh = logging.StreamHandler()
        sh.setFormatter(logging.Formatter(f"[rank {dist.rank}] %(levelname)s: %(message)s" if dist.active
                                          else "%(levelname)s: %(message)s"))
        handlers.append(sh)
    for h in handlers:
        logger.addHandler(h)

    def restore() -> None:
        for h in handlers:
            logger.removeHandler(h)
            h.close()
        logger.setLevel(old_level)

    return restore
