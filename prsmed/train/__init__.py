"""Training: LoRA fine-tuning of a composite PRS-Med model (see docs/training.md).

``prsmed train`` and ``torchrun -m prsmed.train`` run :func:`run_training` on a :class:`TrainConfig`. Names are
imported on first use, so the CLI's command module stays light.
"""

from prsmed._lazy import lazy_exports

_WHERE = {"TrainConfig": "config", "Trainer": "trainer", "run_training": "trainer",
          **{name: "lifecycle" for name in ("EXIT_CODES", "EXIT_PREEMPTED", "RunResult", "TrainingError")}}
__all__ = sorted(_WHERE)
__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
