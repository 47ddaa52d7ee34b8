"""The training loop: LoRA fine-tuning of a composite PRS-Med model, resumable at the exact step.

One optimizer step = ``grad_accum`` micro-batches, each one LLM forward (the composite model feeds the same pass to
the LM loss and, masked to the prompt tokens, to the fusion head). Several processes (``torchrun``) split each
epoch's batches by rank and average gradients with one all-reduce per optimizer step; only rank 0 writes files.

What is not the loop lives beside it: the collectives (distributed.py), device and precision policy (device.py),
one forward and its loss (step.py), what a run reports as it goes (run_log.py), how a run ends, with its exit
codes, signals, ``--on-finish`` and failure summaries (lifecycle.py), checkpoint files (checkpoint.py) and what a
checkpoint must share with the run resuming from it (run_state.py), and the image tower's probe (tower_probe.py).
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prsmed.train.answer_eval import AnswersUnavailable, AnswerTally, dice_at_05, score_answers
from prsmed.train.checkpoint import (
    Checkpoint,
    CheckpointManager,
    CheckpointWriteError,
    capture_rng,
    restore_rng,
)
from prsmed.train.config import TrainConfig
from prsmed.train.data import (
    Batch,
    EpochBatches,
    RecordDataset,
    batches_per_epoch,
    collate,
    make_loader,
    split_records,
)
from prsmed.train.device import (
    apply_dtype_policy,
    autocast,
    enable_grad_checkpointing,
    resolve_device,
    resolve_precision,
    seed_everything,
)
from prsmed.train.distributed import Dist
from prsmed.train.lifecycle import (
    EXIT_CODES,
    EXIT_FAILED,
    RunResult,
    TrainingError,
    install_signal_handlers,
    is_out_of_memory,
    out_of_memory_reason,
    run_on_finish,
    write_failed_summary,
)
from prsmed.train.losses import LossWeights, soft_dice
from prsmed.train.remote import CheckpointMirror, RemoteError, scrub
from prsmed.train.run_log import RunLog, setup_logging
from prsmed.train.run_state import RunIdentity, copy_trained, trained_tensors
from prsmed.train import step as forward_step
from prsmed.train.report import build_report, combined_score, eval_line
from prsmed.train.tower_probe import (
    PROBE_FILE,
    ImageTokens,
    TowerProbe,
    load_probe,
    probe_reads,
    token_targets,
    tower_params,
    unstretch,
    warm_up,
)
from prsmed.weights import CheckpointError

log = logging.getLogger("prsmed.train")

# Stop requests, ordered so the all-reduced maximum is the most important one.
_STOPS = ("", "paused", "budget_exhausted", "preempted")
# The untrained tower's probe reading the zones of this share of training rows or more: the tower stays frozen.
# prsmed-tiny's probe reads 0.77-0.82 of fresh images of the looks it knows, 0.12-0.52 of three it never saw.
TOWER_READS_ENOUGH = 0.7
# How long the end of a run waits for its uploads to --checkpoint-uri: on preemption a cloud gives 30 s to 2 min
# before it kills the machine, and a cut-off upload is harmless (no marker).
MIRROR_WAIT_S = {"preempted": 90.0, "done": 1800.0}
# Loss parts averaged across processes for logging.
_PARTS = ("loss", "loss_seg", "loss_bce", "loss_iou", "loss_dice", "loss_lm", "loss_cls", "cls_weight", "loss_tower")


def build_from_name(name: str):
    """A zoo preset by name, or a model described by a ModelSpec JSON file."""
    from prsmed.zoo import build_model

    path = Path(name)
    if path.suffix == ".json" and path.is_file():
        from prsmed.model.spec import ModelSpec

        return build_model(ModelSpec.model_validate_json(path.read_text()))
    return build_model(name)


def load_dataset(root: Path) -> list[Any]:
    from prsmed.data.layout import load_records

    return list(load_records(root))


def data_manifest(records: Sequence[Any]) -> str:
    """The data layer's content hash of the rows whose files exist (unreadable rows are skipped in training, and
    must not make the hash itself fail)."""
    from prsmed.data.layout import manifest_sha256

    present = [r for r in records if Path(r.image_path).is_file() and Path(r.mask_path).is_file()]
    return manifest_sha256(present)


# --- the trainer ------------------------------------------------------------------------------------------------

class Trainer:
    """Train ``config.model`` on ``config.data``; see :meth:`fit`.

    ``model`` and ``records`` may be passed in (a model already built, rows already loaded) instead of being built
    from the config's zoo name and read from its data directory.
    """

    def __init__(self, config: TrainConfig, *, model=None, records: Sequence[Any] | None = None) -> None:
        self.config = config
        self.out = Path(config.out)
        self.dist = Dist.from_env()
        self.device = resolve_device(config.device, self.dist)
        self.precision = resolve_precision(config.precision, self.device)
        self._model_arg = model
        self._records_arg = records
        self.tower_probe, self.image_tokens, self.tower_reads = None, None, None
        self.started = time.monotonic()
        self.elapsed_before = 0.0  # training seconds spent by earlier invocations of this run
        self._stop_local = ""  # a stop requested in this process (signal handler, budget, --stop-after)
        self._stop_detail = ""
        self.signalled_at: float | None = None  # monotonic time of the first SIGTERM/SIGINT in this process
        # position and counters (all restored on resume)
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.best_metric: float | None = None  # the best validation score (prsmed.train.report)
        self.best_step: int | None = None
        self.before_eval: dict[str, Any] = {}  # validation of the weights the run started from
        self.best_eval: dict[str, Any] = {}
        self.answers_unavailable: str | None = None  # why answers cannot be generated, once found out
        self.evals_without_improvement = 0
        self.bad_rows: dict[int, str] = {}
        self.steps_this_session = 0
        self.step_times: list[float] = []
        self.last_train: dict[str, Any] = {}
        self.last_eval: dict[str, Any] = {}
        self.last_eval_step = -1
        self.last_saved_step = -1
        self.manager = CheckpointManager(self.out / "checkpoints", keep_last=config.keep_last)
        self.runlog = RunLog(self.out, enabled=self.dist.main, destinations=config.destinations(),
                             progress=config.progress, config=config.model_dump(mode="json"))
        self.mirror: CheckpointMirror | None = None  # --checkpoint-uri, on rank 0
        self.mirror_wait = MIRROR_WAIT_S["done"]

    # setup ---------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.config
        self.dist.init(self.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        seed_everything(cfg.seed)
        self.model = self._model_arg if self._model_arg is not None else build_from_name(cfg.model)
        self.prepare_model()
        # Separate streams per process for dropout; identical weights were drawn above from the shared seed.
        seed_everything(cfg.seed + self.dist.rank)
        self.setup_data()
        self.tower_probe, self.image_tokens = self._tower_probe()
        self.optimizer = self.build_optimizer()
        self.scheduler = self.build_scheduler()
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.loss_weights = LossWeights(seg=cfg.seg_weight, lm=cfg.lm_weight, dice=cfg.dice_weight,
                                        cls=cfg.cls_weight, cls_epochs=cfg.cls_epochs)
        if self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
        self._open_mirror()
        resumed = self.resume() if cfg.resume else self._refuse_existing()
        self.runlog.open(step=self.step, resumed=resumed)
        self.dist.broadcast_(self._trained_tensors().values())

    def _open_mirror(self) -> None:
        """Open --checkpoint-uri and prove it writable before the first step (rank 0; every process learns why
        not, so all stop together)."""
        uri = self.config.checkpoint_uri
        if not uri:
            return
        error = None
        if self.dist.main:
            try:
                self.mirror = CheckpointMirror(uri, keep_last=self.config.keep_last)
                self.mirror.check_access()
                log.info("checkpoints are mirrored to %s", scrub(uri))
            except RemoteError as e:
                error = str(e)
        error = self.dist.broadcast_object(error)
        if error:
            raise TrainingError(error)

    def prepare_model(self) -> None:
        """fp32 master copies of every trained parameter; the frozen base LLM optionally in the low dtype."""
        model = self.model
        apply_dtype_policy(model, self.precision, self.device.type, cast_frozen=self.config.cast_frozen)
        if self.config.grad_checkpointing:
            self.enable_grad_checkpointing()
        model.to(self.device)
        self.trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not self.trainable:
            raise TrainingError(f"model {model.spec.name!r} has no trainable parameters (check its spec.train flags)")
        self.mask_size = model.contracts["vision_encoder"].input_size

    def _tower_probe(self) -> tuple[TowerProbe | None, ImageTokens | None]:
        """The frozen probe and the catch of image tokens that train the LLM's tower, when tower_weight asks and
        the tower cannot already read the data's look; otherwise the tower stays frozen."""
        cfg, model = self.config, self.model
        self.tower_reads = None
        if not cfg.tower_weight:
            return None, None
        probe = load_probe(model)
        if probe is None:
            raise TrainingError(f"tower_weight={cfg.tower_weight} needs a tower probe, and model {model.spec.name!r} "
                                f"ships none ({PROBE_FILE} beside its weights); set tower_weight to 0")
        if not self._tower_params():
            raise TrainingError(f"tower_weight={cfg.tower_weight} trains the LLM's image tower, but model "
                                f"{model.spec.name!r} does not train it; set train.llm_image_path in its spec")
        probe = probe.to(self.device)
        self.tower_reads = probe_reads(self.model, probe, self.split.train, device=self.device)
        if self.tower_reads >= TOWER_READS_ENOUGH:
            # Taught anyway, the tower drifts under Adam's steps and the text model misreads it (bench/RESULTS.md).
            for p in self._tower_params():
                p.requires_grad_(False)
            self.trainable = [(n, p) for n, p in self.trainable if p.requires_grad]
            if self.dist.main:
                log.info("the LLM's image tower already reads this data's look (its probe names the zones of %.2f "
                         "of the training rows it read): it stays frozen", self.tower_reads)
            return None, None
        if self.dist.main:
            log.info("the LLM's image tower learns this data's look through its probe (which names the zones of "
                     "%.2f of the training rows it read before training)", self.tower_reads)
        return probe, ImageTokens(model)

    def warm_up_tower(self) -> None:
        """On a fresh run whose tower learns the look, first teach the tower alone through the probe for
        ``tower_warmup_steps`` steps (seconds). A resumed run has its tower in the checkpoint."""
        cfg = self.config
        if self.tower_probe is None or not cfg.tower_warmup_steps:
            return
        t0 = time.monotonic()
        params = self._tower_params()
        loss = warm_up(self.model, self.tower_probe, params, self.split.train, steps=cfg.tower_warmup_steps,
                       lr=cfg.tower_lr or cfg.lr, batch_size=cfg.batch_size, seed=cfg.seed, device=self.device,
                       autocast=self._autocast)
        if loss is None:
            return
        self.dist.broadcast_([p.data for p in params])  # ranks agree exactly, whatever the device's arithmetic
        if self.dist.main:
            log.info("the LLM's image tower learnt the look through its probe for %d steps first (%.1f s, probe "
                     "loss %.3f)", cfg.tower_warmup_steps, time.monotonic() - t0, loss)

    def _tower_params(self) -> list[torch.nn.Parameter]:
        return tower_params(self.model, self.trainable)

    def enable_grad_checkpointing(self) -> None:
        enable_grad_checkpointing(self.model)

    def setup_data(self) -> None:
        cfg = self.config
        records = list(self._records_arg) if self._records_arg is not None else load_dataset(cfg.data)
        split = split_records(records, val_fraction=cfg.val_fraction)
        if not split.train:
            raise TrainingError(f"no training rows in {cfg.data} (found {len(records)} rows in total)")
        self.split = split
        val = split.val[: cfg.val_max_samples] if cfg.val_max_samples else split.val
        self.train_set = RecordDataset(split.train, mask_size=self.mask_size)
        self.val_set = RecordDataset(val, mask_size=self.mask_size)
        # Hashing reads every file once: rank 0 does it and tells the others.
        self.data_sha256 = self.dist.broadcast_object(data_manifest(split.train + split.val) if self.dist.main else None)
        self.batches_per_epoch = batches_per_epoch(len(split.train), batch_size=cfg.batch_size,
                                                   world_size=self.dist.world_size)
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / cfg.grad_accum)
        self.total_steps = self.steps_per_epoch * cfg.epochs
        if cfg.max_steps:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        if cfg.early_stop_patience and not len(self.val_set):
            log.warning("--early-stop-patience needs validation rows and there are none; early stopping is off")
        if self.dist.main:
            log.info("data: %d training rows, validation: %s; %d steps (%d per epoch, %d processes x batch %d x "
                     "accumulation %d)", len(split.train), split.how, self.total_steps, self.steps_per_epoch,
                     self.dist.world_size, cfg.batch_size, cfg.grad_accum)

    def build_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.config
        tower = {id(p) for p in self._tower_params()} if cfg.tower_lr else set()
        groups = [{"params": [p for _, p in self.trainable if id(p) not in tower]}]
        if tower:
            groups.append({"params": [p for _, p in self.trainable if id(p) in tower], "lr": cfg.tower_lr})
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.adam_eps, weight_decay=cfg.weight_decay)

    def build_scheduler(self):
        # Stepped once per optimizer step over the whole run (the authors step per epoch with T_max=epochs).
        return torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=max(1, self.total_steps),
                                                          eta_min=self.config.min_lr)

    # the loop ------------------------------------------------------------------------------------------------
    def fit(self) -> RunResult:
        """Set up (or resume), train to the end or until stopped, and write the final artefacts."""
        self.setup()
        if self.step == 0:
            self.evaluate_before()
            self.warm_up_tower()
        status = self.train_loop()
        return self.finish(status)

    def train_loop(self) -> str:
        cfg = self.config
        self.runlog.start_progress(step=self.step, total=self.total_steps)
        while self.step < self.total_steps and self.epoch < cfg.epochs:
            batches = self._epoch_batches()
            while self.step < self.total_steps and self.batch_in_epoch < self.batches_per_epoch:
                group = min(cfg.grad_accum, self.batches_per_epoch - self.batch_in_epoch)
                self.train_step(batches, group)
                epoch_done = self.batch_in_epoch >= self.batches_per_epoch
                if epoch_done:
                    self.epoch += 1
                    self.batch_in_epoch = 0
                stop = self._after_step(epoch_done)
                if stop:
                    return stop
                if epoch_done:
                    break
        return "completed"

    def _epoch_batches(self) -> Iterator[Batch]:
        cfg = self.config
        sampler = EpochBatches(len(self.train_set), batch_size=cfg.batch_size, seed=cfg.seed, epoch=self.epoch,
                               rank=self.dist.rank, world_size=self.dist.world_size, start=self.batch_in_epoch)
        return iter(make_loader(self.train_set, sampler, num_workers=cfg.num_workers, seed=cfg.seed,
                                epoch=self.epoch))

    def _after_step(self, epoch_done: bool) -> str:
        """Evaluate, checkpoint and decide whether to stop; every process reaches the same decision."""
        cfg = self.config
        self._log_step()
        saved = False
        boundary = epoch_done or self.step >= self.total_steps
        if boundary or (cfg.eval_every and self.step % cfg.eval_every == 0):
            improved = self.evaluate_and_track()
            if boundary or improved:
                self.save(is_best=improved)
                saved = True
        if not saved and cfg.save_every and self.step % cfg.save_every == 0:
            self.save()
            saved = True
        if (cfg.early_stop_patience and len(self.val_set)
                and self.evals_without_improvement >= cfg.early_stop_patience):
            self._stop_detail = (f"validation score did not improve for {self.evals_without_improvement} "
                                 f"evaluations (best {self.best_metric:.4f} at step {self.best_step})")
            if not saved:
                self.save()
            return "early_stopped"
        stop = self._agreed_stop()
        if stop:
            if not saved:
                self.save()
            return stop
        return ""

    # one optimizer step --------------------------------------------------------------------------------------
    def train_step(self, batches: Iterator[Batch], group: int) -> dict[str, float]:
        """Run ``group`` micro-batches, average gradients over processes, clip, step optimizer and schedule."""
        t0 = time.monotonic()
        self.model.train()
        parts, rows = [], 0
        for _ in range(group):
            batch = next(batches)
            self.batch_in_epoch += 1
            self._note_bad(batch.bad)
            if not len(batch):
                continue
            loss, p = self.forward_loss(batch, epoch=self.epoch)
            self.scaler.scale(loss / group).backward()
            parts.append(p)
            rows += len(batch)
        self._sync_gradients()
        self.scaler.unscale_(self.optimizer)
        params = [p for _, p in self.trainable]
        clip = self.config.grad_clip if self.config.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        with warnings.catch_warnings():
            # fp16: the scaler skips the optimizer on overflowing steps; the schedule still counts them
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)`")
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.steps_this_session += 1
        dt = time.monotonic() - t0
        self.step_times.append(dt)
        self.last_train = self._reduce_parts(parts, rows, dt, grad_norm)
        return self.last_train

    def _autocast(self):
        return autocast(self.precision, self.device.type)

    def _run_model(self, batch: Batch, *, epoch: int = 0):
        """(loss, parts, output, float32 mask logits): the forward and loss the planner simulates too."""
        seg, inputs = self.model.encode(batch.images, batch.questions, batch.answers)
        return forward_step.model_loss(self.model, seg.to(self.device), inputs.to(self.device),
                                       batch.masks.to(self.device), batch.modality, epoch=epoch,
                                       weights=self.loss_weights, autocast=self._autocast())

    def forward_loss(self, batch: Batch, *, epoch: int) -> tuple[torch.Tensor, dict[str, float]]:
        loss, parts, _, _ = self._run_model(batch, epoch=epoch)
        if self.tower_probe is not None:
            masks = [unstretch(m, image.size) for m, image in zip(batch.masks, batch.images)]
            targets = token_targets(masks, self.tower_probe.tokens).to(self.device)
            tower = self.tower_probe.loss(self.image_tokens.take(len(batch)), targets)
            loss = loss + self.config.tower_weight * tower
            parts["loss_tower"] = float(tower.detach())
            parts["loss"] = float(loss.detach())
        return loss, parts

    def _sync_gradients(self) -> None:
        """Average gradients over processes: one flat all-reduce per optimizer step, after accumulation. Every
        trained parameter takes part (a missing gradient counts as zero), so skipped rows or an unused head never
        leave the processes disagreeing about what to reduce."""
        grads = []
        for _, p in self.trainable:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        if not self.dist.active:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        self.dist.all_reduce(flat)
        flat /= self.dist.world_size
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset:offset + n].view_as(g))
            offset += n

    def _reduce_parts(self, parts: list[dict[str, float]], rows: int, dt: float, grad_norm: float) -> dict[str, Any]:
        sums = torch.zeros(2 * len(_PARTS) + 1, dtype=torch.float64)
        for p in parts:
            for i, k in enumerate(_PARTS):
                if k in p:
                    sums[2 * i] += p[k]
                    sums[2 * i + 1] += 1
        sums[-1] = rows
        sums = self.dist.all_reduce(sums.to(self._collective_device())).cpu()
        record: dict[str, Any] = {}
        for i, k in enumerate(_PARTS):
            if sums[2 * i + 1] > 0:
                record[k] = float(sums[2 * i] / sums[2 * i + 1])
        total_rows = int(sums[-1])
        record.update({
            "lr": self.optimizer.param_groups[0]["lr"],
            "grad_norm": grad_norm,
            "rows": total_rows,
            "step_time_s": dt,
            "samples_per_s": total_rows / dt if dt > 0 else 0.0,
        })
        if self.scaler.is_enabled():
            record["grad_scale"] = float(self.scaler.get_scale())
        return record

    def _collective_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    # evaluation ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Validation scores: soft Dice, dice@0.5 and LM loss on every validation row, greedy answers on the first
        ``val_answer_rows`` (prsmed.train.answer_eval), and the ``score`` combining them (prsmed.train.report). Rows
        are split across processes and the sums reduced, so the numbers do not depend on the number of processes."""
        if not len(self.val_set):
            return {}
        self.model.eval()
        # soft-Dice sum, rows, LM-loss sum, LM rows, bad rows, dice@0.5 sum
        sums = torch.zeros(6, dtype=torch.float64)
        mine = list(range(self.dist.rank, len(self.val_set), self.dist.world_size))
        bs = self.config.batch_size
        for start in range(0, len(mine), bs):
            batch = collate([self.val_set[i] for i in mine[start:start + bs]])
            sums[4] += len(batch.bad)
            if not len(batch):
                continue
            _, _, out, logits = self._run_model(batch)
            sums[0] += float(soft_dice(logits, batch.masks.to(self.device)).sum())
            sums[5] += float(dice_at_05(logits, batch.masks).sum())
            sums[1] += len(batch)
            if out.lm_loss is not None:
                sums[2] += float(out.lm_loss) * len(batch)
                sums[3] += len(batch)
        answers = self._score_answers()
        self.model.train()
        sums = self.dist.all_reduce(sums.to(self._collective_device())).cpu()
        result: dict[str, Any] = {"rows": int(sums[1]), "bad_rows": int(sums[4])}
        if sums[1] > 0:
            result["soft_dice"] = float(sums[0] / sums[1])
            result["dice_at_05"] = float(sums[5] / sums[1])
        if sums[3] > 0:
            result["loss_lm"] = float(sums[2] / sums[3])
        result.update(answers.metrics())
        result["score"] = combined_score(result)
        return result

    def _score_answers(self) -> AnswerTally:
        """Every process answers its share of the first ``val_answer_rows`` validation rows; the counts are summed
        and the examples gathered, in one all-reduce and one gather whatever happened, so no process waits alone."""
        cfg = self.config
        n = 0 if self.answers_unavailable else min(cfg.val_answer_rows, len(self.val_set))
        mine = list(range(self.dist.rank, n, self.dist.world_size))
        tally, failed = AnswerTally(), None
        for start in range(0, len(mine), cfg.batch_size):
            batch = collate([self.val_set[i] for i in mine[start:start + cfg.batch_size]])
            if not len(batch):
                continue
            try:
                tally.add(score_answers(self.model, batch.images, batch.questions, batch.masks, batch.indices,
                                        max_new_tokens=cfg.val_max_new_tokens, autocast=self._autocast))
            except AnswersUnavailable as e:
                tally, failed = AnswerTally(), str(e)
                break
        counts = self.dist.all_reduce(tally.to_tensor().to(self._collective_device())).cpu()
        shared = self.dist.gather_objects((tally.examples, failed))
        failed = next((f for _, f in shared if f), None)
        if failed:
            if not self.answers_unavailable and self.dist.main:
                log.warning("validation answers are not scored: %s; the score is dice@0.5 alone", failed)
            self.answers_unavailable = failed
            return AnswerTally()
        return AnswerTally.from_tensor(counts, [e for examples, _ in shared for e in examples])

    def evaluate_before(self) -> None:
        """Score the weights the run starts from, so that its end can say whether training helped."""
        self._sync_buffers()
        scores = self.evaluate()
        if scores.get("score") is None:
            return
        self.before_eval = {"step": 0, "epoch": 0, "epoch_progress": 0.0, **scores}
        self.runlog.write({"kind": "eval", "step": 0, "epoch": 0, "epoch_progress": 0.0, "before_training": True,
                           **eval_line(scores), "val_bad_rows": scores["bad_rows"]})
        if self.dist.main:
            log.info("before training: %s", _describe(scores))

    def evaluate_and_track(self) -> bool:
        """Evaluate, log, and update early stopping; True when the validation score improved (the best checkpoint
        and early stopping follow the score, which counts the answers as well as the masks)."""
        self._sync_buffers()
        result = self.evaluate()
        self.last_eval_step = self.step
        if result.get("score") is None:
            return False
        self.last_eval = {"step": self.step, "epoch": self._step_epoch(),
                          "epoch_progress": round(self._epoch_progress(), 6), **result}
        score = result["score"]
        improved = self.best_metric is None or score > self.best_metric + self.config.early_stop_min_delta
        if improved:
            self.best_metric, self.best_step = score, self.step
            self.best_eval = dict(self.last_eval)
            self.evals_without_improvement = 0
        else:
            self.evals_without_improvement += 1
        self.runlog.write({"kind": "eval", "step": self.step, "epoch": self.last_eval["epoch"],
                           "epoch_progress": self.last_eval["epoch_progress"], **eval_line(result),
                           "val_bad_rows": result["bad_rows"], "best_val_score": self.best_metric,
                           "best_step": self.best_step})
        if self.dist.main:
            log.info("step %d: %s (best score %.4f at step %d)", self.step, _describe(result), self.best_metric,
                     self.best_step)
        return improved

    def _sync_buffers(self) -> None:
        """Running statistics (e.g. BatchNorm) drift apart per process; rank 0's are the ones kept and used."""
        if self.dist.active:
            self.dist.broadcast_([b for b in self.model.buffers() if b.is_floating_point()])

    # stopping ------------------------------------------------------------------------------------------------
    def request_stop(self, reason: str = "preempted", detail: str = "") -> None:
        """Ask the loop to stop after the current step with a checkpoint (safe from a signal handler)."""
        if _STOPS.index(reason) > _STOPS.index(self._stop_local or ""):
            self._stop_local = reason
            self._stop_detail = detail or self._stop_detail

    def _check_budget(self) -> None:
        cfg = self.config
        if cfg.stop_after and self.steps_this_session >= cfg.stop_after:
            self.request_stop("paused", f"--stop-after {cfg.stop_after} steps reached in this invocation")
        next_step = float(np.mean(self.step_times[-20:])) if self.step_times else 0.0
        spent = self.elapsed()
        if cfg.max_hours and spent + next_step > cfg.max_hours * 3600:
            self.request_stop("budget_exhausted", f"--max-hours {cfg.max_hours} reached ({spent / 3600:.3f} h used)")
        price = cfg.hourly_cost(self.dist.world_size)
        if cfg.max_cost and price and (spent + next_step) / 3600 * price > cfg.max_cost:
            self.request_stop("budget_exhausted",
                              f"--max-cost {cfg.max_cost} USD reached ({spent / 3600 * price:.2f} USD at {price}/h)")

    def _agreed_stop(self) -> str:
        self._check_budget()
        code = torch.tensor([_STOPS.index(self._stop_local or "")], dtype=torch.int64)
        code = int(self.dist.all_reduce(code.to(self._collective_device()), op="max").item())
        stop = _STOPS[code]
        if stop and not self._stop_detail:
            self._stop_detail = f"another process was asked to stop ({stop})"
        return stop

    def elapsed(self) -> float:
        return self.elapsed_before + (time.monotonic() - self.started)

    # checkpoints ---------------------------------------------------------------------------------------------
    def _trained_tensors(self) -> dict[str, torch.Tensor]:
        return trained_tensors(self.model, self.trainable)

    def _state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "total_steps": self.total_steps,
            "world_size": self.dist.world_size,
            "precision": self.precision,
            "config": self.config.model_dump(mode="json"),
            "recipe": self.config.recipe(),
            "model": {"name": self.model.spec.name, "fingerprint": self.model.spec.fingerprint()},
            "data_manifest_sha256": self.data_sha256,
            "best_metric": self.best_metric,
            "best_metric_name": "score",
            "best_step": self.best_step,
            "best_eval": self.best_eval,
            "before_eval": self.before_eval,
            "evals_without_improvement": self.evals_without_improvement,
            "last_eval": self.last_eval,
            "elapsed_s": self.elapsed(),
            "bad_rows": {str(k): v for k, v in sorted(self.bad_rows.items())},
            "optimizer_params": [n for n, _ in self.trainable],
        }

    def save(self, *, is_best: bool = False) -> Path | None:
        """Write a checkpoint of the current step (rank 0 writes; every process takes part)."""
        self._sync_buffers()
        self._merge_bad_rows()
        rng_tensors, rng_meta = capture_rng()
        gathered = self.dist.gather_objects((rng_tensors, rng_meta))
        path = None
        error = None
        if self.dist.main:
            tensors = {f"rank{r}.{k}": v for r, (t, _) in enumerate(gathered) for k, v in t.items()}
            state = self._state()
            state["rng"] = {str(r): m for r, (_, m) in enumerate(gathered)}
            ckpt = Checkpoint(
                trained={k: v.detach().float() if v.is_floating_point() else v.detach()
                         for k, v in self._trained_tensors().items()},
                optimizer=self.optimizer.state_dict(),
                scheduler=self.scheduler.state_dict(),
                rng_tensors=tensors,
                state=state,
                scaler=self.scaler.state_dict() if self.scaler.is_enabled() else None,
            )
            try:
                path = self.manager.save(ckpt, is_best=is_best)
                log.info("checkpoint %s written", path)
                if self.mirror is not None:
                    self.mirror.submit(path, best=self.manager.best)
            except CheckpointWriteError as e:
                error = str(e)
        # Every process learns whether the write worked, so a failure stops them all together.
        error = self.dist.broadcast_object(error)
        if error:
            raise CheckpointWriteError(error)
        self.last_saved_step = self.step
        return path

    def _refuse_existing(self) -> bool:
        existing = self.dist.broadcast_object([p.name for p in self.manager.checkpoints()] if self.dist.main else None)
        if existing:
            raise TrainingError(f"{self.out} already holds checkpoints ({', '.join(existing[-3:])}); pass --resume to "
                                f"continue that run, or choose a new --out")
        remote = self.dist.broadcast_object(self.mirror.complete() if self.mirror is not None else [])
        if remote:
            raise TrainingError(f"--checkpoint-uri {scrub(self.config.checkpoint_uri or '')} already holds checkpoints "
                                f"({', '.join(remote[-3:])}); pass --resume to continue that run, or choose a new URI")
        return False

    def resume(self) -> bool:
        """Restore the newest good checkpoint: weights, optimizer, schedule, scaler, RNG, data position. With
        --checkpoint-uri, a newer one there than on the local disk is downloaded first."""
        chosen = self.manager.latest_valid() if self.dist.main else None
        if self.mirror is not None:
            chosen = self.mirror.restore_newer(self.manager.root, chosen)
        chosen = self.dist.broadcast_object(None if chosen is None else str(chosen))
        if chosen is None:
            if self.dist.main:
                log.info("--resume: no checkpoint under %s; starting from the beginning", self.manager.root)
            return False
        ckpt = self.manager.load(chosen)
        st = ckpt.state
        self._check_compatible(ckpt)
        copy_trained(self._trained_tensors(), ckpt)
        self.optimizer.load_state_dict(ckpt.optimizer)
        self.scheduler.load_state_dict(ckpt.scheduler)
        if ckpt.scaler is not None and self.scaler.is_enabled():
            self.scaler.load_state_dict(ckpt.scaler)
        self.step, self.epoch, self.batch_in_epoch = st["step"], st["epoch"], st["batch_in_epoch"]
        self.best_metric, self.best_step = st.get("best_metric"), st.get("best_step")
        self.evals_without_improvement = st.get("evals_without_improvement", 0)
        self.best_eval = st.get("best_eval") or {}
        self.before_eval = st.get("before_eval") or {}
        self.last_eval = st.get("last_eval") or {}
        if st.get("best_metric_name") != "score":
            # Written when the best checkpoint was chosen by Dice alone: its best is not comparable with a score.
            if self.dist.main and self.best_metric is not None:
                log.warning("%s chose its best checkpoint by validation Dice alone; the best is chosen again by the "
                            "score from the next evaluation on", chosen)
            self.best_metric, self.best_step, self.evals_without_improvement = None, None, 0
            self.manager.best = None
            self.last_eval = {}
        self.last_eval_step = self.last_eval.get("step", -1)
        self.elapsed_before = float(st.get("elapsed_s", 0.0))
        self.bad_rows = {int(k): v for k, v in st.get("bad_rows", {}).items()}
        self.last_saved_step = self.step
        prefix = f"rank{self.dist.rank}."
        tensors = {k[len(prefix):]: v for k, v in ckpt.rng_tensors.items() if k.startswith(prefix)}
        restore_rng(tensors, st["rng"][str(self.dist.rank)])
        if self.dist.main:
            log.info("resumed from %s: step %d, epoch %d, batch %d of %d", chosen, self.step, self.epoch,
                     self.batch_in_epoch, self.batches_per_epoch)
        return True

    def _check_compatible(self, ckpt: Checkpoint) -> None:
        RunIdentity(world_size=self.dist.world_size, recipe=self.config.recipe(), model_name=self.model.spec.name,
                    fingerprint=self.model.spec.fingerprint(), data=str(self.config.data),
                    data_sha256=self.data_sha256, params=[n for n, _ in self.trainable]).check(ckpt)

    # bad rows --------------------------------------------------------------------------------------------------
    def _note_bad(self, bad: list[tuple[int, str]]) -> None:
        for index, reason in bad:
            if index not in self.bad_rows:
                self.bad_rows[index] = reason
                if len(self.bad_rows) <= 20:
                    log.warning("skipping training row %d: %s", index, reason)
                elif len(self.bad_rows) == 21:
                    log.warning("more rows are being skipped; the count is in metrics.jsonl and summary.json")

    def _merge_bad_rows(self) -> None:
        if self.dist.active:
            for part in self.dist.gather_objects(self.bad_rows):
                self.bad_rows.update(part)

    # logs ------------------------------------------------------------------------------------------------------
    def _log_step(self) -> None:
        rec = self.last_train
        self.runlog.advance(rec)
        if self.step % self.config.log_every and self.step != self.total_steps:
            return
        line = {"kind": "train", "step": self.step, "total_steps": self.total_steps, "epoch": self._step_epoch(),
                "epoch_progress": round(self._epoch_progress(), 6), **rec, "bad_rows": len(self.bad_rows),
                "elapsed_s": round(self.elapsed(), 3)}
        if self.step_times:
            line["eta_s"] = round((self.total_steps - self.step) * float(np.mean(self.step_times[-20:])), 1)
        price = self.config.hourly_cost(self.dist.world_size)
        if price:
            line["cost_usd"] = round(self.elapsed() / 3600 * price, 4)
        self.runlog.write(line)

    def _step_epoch(self) -> int:
        """The (0-based) epoch the last step belonged to; the position has already moved on at an epoch end."""
        return self.epoch - 1 if self.batch_in_epoch == 0 and self.step > 0 else self.epoch

    def _epoch_progress(self) -> float:
        return self.epoch + self.batch_in_epoch / max(1, self.batches_per_epoch)

    # the end ---------------------------------------------------------------------------------------------------
    def finish(self, status: str) -> RunResult:
        """Final evaluation and checkpoint, the adapter bundle (unless preempted), and summary.json."""
        self.runlog.close()
        resumable = status in ("preempted", "paused")
        if not resumable and self.last_saved_step != self.step:
            self.save()
        self._merge_bad_rows()
        latest = self.manager.checkpoints()[-1] if self.dist.main and self.manager.checkpoints() else None
        adapter = None
        report = self.report()
        metrics = self._final_metrics()
        if not resumable:
            adapter = self.write_adapter(status, {**metrics, "report": report})
        if self.mirror is not None and adapter is not None:
            self.mirror.submit_tree(adapter, "adapter")
        self.mirror_wait = MIRROR_WAIT_S["preempted" if resumable else "done"]
        self._flush_mirror()
        reason = self._stop_detail or {"completed": f"trained {self.step} steps"}.get(status, status)
        result = RunResult(status=status, exit_code=EXIT_CODES[status], reason=reason, step=self.step,
                           metrics=metrics, checkpoint=latest, adapter=adapter, bad_rows=len(self.bad_rows),
                           report=report)
        self.write_summary(result)
        if self.mirror is not None:
            self.mirror.submit_file(self.out / "summary.json")
        self.close()
        return result

    def _flush_mirror(self) -> None:
        """Wait for the queued uploads; on preemption this is what the exit waits for (bounded: a checkpoint
        whose upload is cut off has no marker and is never used)."""
        if self.mirror is None:
            return
        timeout = self.mirror_wait
        if not self.mirror.flush(timeout):
            self.mirror_wait = 0.0  # said once; the rest of the exit does not wait again
            log.warning("uploads to %s were still running after %.0f s; the last complete checkpoint there is "
                        "what a resume will use", scrub(self.mirror.uri), timeout)

    def _final_metrics(self) -> dict[str, Any]:
        metrics: dict[str, Any] = {"steps": self.step, "epochs": round(self._epoch_progress(), 4),
                                   "bad_rows": len(self.bad_rows), "training_hours": round(self.elapsed() / 3600, 4)}
        for k in ("loss", "loss_seg", "loss_lm", "loss_cls"):
            if k in self.last_train:
                metrics[f"train_{k}"] = round(self.last_train[k], 6)
        if self.last_eval.get("soft_dice") is not None:
            metrics["val_dice"] = round(self.last_eval["soft_dice"], 6)
            metrics["val_score"] = round(self.last_eval["score"], 6)
        if self.best_metric is not None:
            metrics["best_val_score"] = round(self.best_metric, 6)
            metrics["best_step"] = self.best_step
            if self.best_eval.get("soft_dice") is not None:
                metrics["best_val_dice"] = round(self.best_eval["soft_dice"], 6)
        return metrics

    def _adapter_uses_best(self) -> bool:
        return bool(self.config.adapter_weights == "best" and self.manager.best and self.best_step is not None)

    def report(self) -> dict[str, Any]:
        """Before / best / last and the verdict (prsmed.train.report)."""
        return build_report(validation=self.split.how, rows=len(self.val_set), before=self.before_eval or None,
                            best=self.best_eval or None, last=self.last_eval or None,
                            kept="best" if self._adapter_uses_best() else "last", final_step=self.step,
                            max_new_tokens=self.config.val_max_new_tokens,
                            answers_unavailable=self.answers_unavailable)

    def write_adapter(self, status: str, metrics: dict[str, Any]) -> Path | None:
        """``RUN/adapter/``: the best validated weights when there was validation, else the last ones."""
        if not self.dist.main:
            return None
        from prsmed.model.bundle import save_bundle

        if getattr(self.model.spec.train, "llm", False):
            log.warning("the whole LLM was trained (spec.train.llm), which an adapter bundle cannot hold; no "
                        "RUN/adapter written: the trained weights are in the checkpoints' trained.safetensors")
            return None

        use_best = self._adapter_uses_best()
        if use_best and self.best_step != self.step:
            copy_trained(self._trained_tensors(), self.manager.load(self.manager.root / self.manager.best))
            log.info("adapter: using the best checkpoint (%s, validation score %.4f)", self.manager.best,
                     self.best_metric)
        training = {
            **self.config.model_dump(mode="json"),
            "status": status,
            "steps": self.step,
            "world_size": self.dist.world_size,
            "precision_used": self.precision,
            "weights_from_step": self.best_step if use_best else self.step,
            "validation": self.split.how,
        }
        out = self.out / "adapter"
        save_bundle(self.model, out, training=training, metrics=metrics, data_manifest_sha256=self.data_sha256,
                    overwrite=True)
        log.info("adapter bundle written to %s", out)
        return out

    def write_summary(self, result: RunResult) -> None:
        if not self.dist.main:
            return
        first_bad = dict(sorted(self.bad_rows.items())[:20])
        summary = {
            "status": result.status,
            "exit_code": result.exit_code,
            "reason": result.reason,
            "step": result.step,
            "total_steps": self.total_steps,
            "metrics": result.metrics,
            "checkpoint": str(result.checkpoint) if result.checkpoint else None,
            "adapter": str(result.adapter) if result.adapter else None,
            "bad_rows": {"count": len(self.bad_rows), "first": {str(k): v for k, v in first_bad.items()}},
            "validation": self.split.how,
            "report": result.report,
            "image_tower": None if self.tower_reads is None else {
                "probe_reads_before": round(self.tower_reads, 4), "trained": self.tower_probe is not None},
            "world_size": self.dist.world_size,
            "precision": self.precision,
        }
        if self.mirror is not None:
            summary["checkpoint_uri"] = self.mirror.describe()
        if self.signalled_at is not None and result.status == "preempted":
            # the preemption deadline a cloud gives (30 s to 2 min) is measured against this
            summary["signal_to_checkpoint_s"] = round(time.monotonic() - self.signalled_at, 3)
            log.info("checkpoint written %.2f s after the signal", summary["signal_to_checkpoint_s"])
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        bad = f"; {len(self.bad_rows)} bad rows skipped" if self.bad_rows else ""
        log.info("run %s at step %d/%d: %s%s", result.status, self.step, self.total_steps, result.reason, bad)
        if result.report:
            log.info("validation: %s", result.report["verdict"])
            for warning in result.report["warnings"]:
                log.warning("%s", warning)

    def close(self) -> None:
        self.runlog.close()
        self._flush_mirror()
        if getattr(self, "image_tokens", None) is not None:
            self.image_tokens.close()


def _describe(scores: dict[str, Any]) -> str:
    """One log line's worth of an evaluation."""
    parts = [f"val score {scores['score']:.4f}", f"dice@0.5 {scores['dice_at_05']:.4f}",
             f"soft Dice {scores['soft_dice']:.4f}"]
    for key in ("zone_acc_text", "agreement"):
        if scores.get(key) is not None:
            parts.append(f"{key} {scores[key]:.3f}")
    if scores.get("hit_length_limit"):
        parts.append(f"{scores['hit_length_limit']:.0%} of answers at the length limit")
    if scores.get("repeated_words"):
        parts.append(f"{scores['repeated_words']:.0%} repeating a word")
    return ", ".join(parts)


# --- running a whole job ----------------------------------------------------------------------------------------

def run_training(config: TrainConfig, *, model=None, records: Sequence[Any] | None = None,
                 trainer_cls: type[Trainer] = Trainer) -> RunResult:
    """Run a whole job: train, handle signals, write summary.json, run ``--on-finish``; never raises for a failed
    run (the result says why), so callers map it to an exit status."""
    trainer = trainer_cls(config, model=model, records=records)
    restore_logging = setup_logging(Path(config.out), trainer.dist)
    restore_signals = install_signal_handlers(trainer)
    try:
        result = trainer.fit()
    except Exception as e:
        # Errors about the user's inputs (options, weights, data, disk) carry their explanation; others a traceback.
        reason = str(e)
        if is_out_of_memory(e):
            reason = out_of_memory_reason(e, trainer.step, trainer.device)
            log.error("training failed: %s", reason)
        elif isinstance(e, (TrainingError, CheckpointWriteError, CheckpointError, ValueError, OSError)):
            log.error("training failed: %s", e)
        else:
            log.exception("training failed")
        result = RunResult(status="failed", exit_code=EXIT_FAILED, reason=reason, step=trainer.step,
                           bad_rows=len(trainer.bad_rows))
        write_failed_summary(trainer, result)
        trainer.close()
    finally:
        restore_signals()
    try:
        if config.on_finish and trainer.dist.main:
            run_on_finish(config.on_finish, result, Path(config.out))
    finally:
        trainer.dist.close()
        restore_logging()
    return result


