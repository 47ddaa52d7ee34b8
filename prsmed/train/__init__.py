"""Training: LoRA fine-tuning of a composite PRS-Med model (see docs/training.md).

``prsmed train`` and ``torchrun -m prsmed.train`` run :func:`run_training` on a :class:`TrainConfig`.
"""

from prsmed.train.config import TrainConfig
from prsmed.train.trainer import EXIT_CODES, EXIT_PREEMPTED, RunResult, Trainer, TrainingError, run_training

__all__ = [
    "EXIT_CODES",
    "EXIT_PREEMPTED",
    "RunResult",
    "TrainConfig",
    "Trainer",
    "TrainingError",
    "run_training",
]
