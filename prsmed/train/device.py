"""Device and precision policy: which device a run uses, which dtype each part of the model keeps, autocast,
gradient checkpointing and seeding. The planner's simulation and measurements apply the same functions, so what
it sizes is what the trainer runs.
"""

from __future__ import annotations

import logging
import random
from contextlib import nullcontext

import numpy as np
import torch

from prsmed.train.distributed import Dist

log = logging.getLogger("prsmed.train")

# The dtype autocast runs in for each mixed precision (4-bit bases compute in bf16).
LOW_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "4bit": torch.bfloat16}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str, dist: Dist) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{dist.local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{dist.local_rank}")
    return device


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        return precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def apply_dtype_policy(model, precision: str, device_type: str, *, cast_frozen: bool = True) -> None:
    """fp32 master copies of every trained parameter; on a GPU with bf16/fp16, the frozen LLM in that dtype. The
    planner's simulation and measurements apply the same policy."""
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    low = LOW_DTYPES.get(precision)
    if low is not None and cast_frozen and device_type == "cuda":
        for p in model.llm.parameters():
            if not p.requires_grad and p.is_floating_point():
                p.data = p.data.to(low)


def enable_grad_checkpointing(model) -> bool:
    """Gradient (activation) checkpointing on the LLM: recompute activations in backward to save memory. Uses the
    backbone's own switch if it has one, else its transformers model's; warns and goes on without. The planner
    calls this too, so what it sizes is what the trainer runs."""
    llm = model.llm
    candidates = [llm] + [m for m in llm.modules() if getattr(m, "supports_gradient_checkpointing", False)]
    for module in candidates:
        for name in ("activation_checkpointing_enable", "gradient_checkpointing_enable"):
            method = getattr(module, name, None)
            if not callable(method):
                continue
            kwargs_name = name.replace("_enable", "_kwargs")
            try:  # non-reentrant: works with frozen inputs and LoRA, no input-grad hooks needed
                method(**{kwargs_name: {"use_reentrant": False}})
            except TypeError:
                method()
            log.info("gradient checkpointing enabled on %s", type(module).__name__)
            return True
    log.warning("--grad-checkpointing: LLM %r has no gradient checkpointing switch; continuing without it",
                model.spec.llm.name)
    return False


def autocast(precision: str, device_type: str):
    """The autocast context for ``precision`` on ``device_type`` (a null context for fp32)."""
    low = LOW_DTYPES.get(precision)
    return torch.autocast(device_type=device_type, dtype=low) if low is not None else nullcontext()
