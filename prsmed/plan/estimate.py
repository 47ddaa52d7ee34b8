"""From one simulated step to a plan: memory and its parts, the batch that fits each GPU, hours and dollars.

Memory of a training step at batch B (bytes)::

    frozen weights + trained weights (fp32 masters) + AdamW states      (fixed)
    + gradients of the trained weights                                  (fixed, freed each step)
    + B x activations per sample                                        (the simulated peak, less the gradients)
    + CUDA overhead: context and library workspaces (a constant) and the caching allocator's slack (a fraction)

The simulation (:mod:`prsmed.plan.simulate`) runs one sample; the step's memory above the fixed part grows linearly
with the batch (checked in tests against a second simulation at batch 2). Time is FLOPs per sample over the GPU's
peak rate times a utilisation factor (model FLOPs utilisation, ``--mfu``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from prsmed.plan.catalogue import Catalogue, load_catalogue
from prsmed.plan.simulate import StepTrace, simulate

GIB = 2**30
# Outside what the allocator reports: the CUDA context, cuBLAS and cuDNN workspaces. Commonly 0.3-1 GiB on recent
# GPUs and drivers; taken at 0.75 GiB. Not yet measured by this project on a GPU (see bench/RESULTS.md).
CUDA_CONTEXT_GIB = 0.75
# The caching allocator rounds blocks and keeps freed ones; what it reserves runs a few percent above what it
# hands out. Taken at 5%.
ALLOCATOR_SLACK = 0.05
# What a CPU process's heap holds beyond its tensors once it has run a step (oneDNN and autograd caches): 14-18 MiB
# in `prsmed plan calibrate` on the tiny model (bench/RESULTS.md).
CPU_RUNTIME_GIB = 16 / 1024
# NF4 as bitsandbytes stores it: 4 bits per weight plus one float32 scale per block of 64.
FOUR_BIT_BYTES_PER_PARAM = 0.5 + 4 / 64
# A row whose estimate leaves less than this share of the card free is flagged as tight.
TIGHT_HEADROOM = 0.10
# The paper's batch (PRSMED.md section 3); recommendations keep it as batch x gradient accumulation.
PAPER_EFFECTIVE_BATCH = 8
# PosMed's training rows, from the authors' logs: 5,260 iterations per epoch at batch 4.
POSMED_TRAIN_ROWS = 21040
DEFAULT_MFU = 0.30


class PlanOptions(BaseModel):
    """What ``prsmed plan`` asks (CLI flags, ``POST /v1/plan``, ``client.plan``)."""

    model_config = ConfigDict(extra="forbid")
    model: str = "prsmed-llava-med-7b"
    precision: str = Field("bf16", pattern="^(fp32|bf16|fp16|4bit)$")
    batch_size: int | None = Field(None, ge=1, le=4096, description="per-GPU batch; default: the largest that fits, "
                                                                      "up to the paper's effective batch of 8")
    grad_checkpointing: bool = False
    image_size: int | None = Field(None, ge=32, le=4096, description="the vision encoder's input size")
    seq_len: int = Field(80, ge=1, le=32768, description="text tokens per sample (question and answer); the image "
                                                         "tokens are added")
    gpu: str = "all"
    epochs: int = Field(20, ge=1, le=10000)
    dataset_size: int = Field(POSMED_TRAIN_ROWS, ge=1)
    mfu: float = Field(DEFAULT_MFU, gt=0, le=1, description="model FLOPs utilisation assumed for the time estimate")
    max_new_tokens: int = Field(64, ge=1, le=4096)
    catalogue: str | None = None


@functools.lru_cache(maxsize=64)
def _cached_trace(spec_json: str, batch: int, text_len: int, precision: str, grad_checkpointing: bool, mode: str,
                  device: str) -> StepTrace:
    from prsmed.model.spec import ModelSpec

    spec = ModelSpec.model_validate_json(spec_json)
    key = _disk_key(spec_json, batch, text_len, precision, grad_checkpointing, mode, device)
    path = _cache_dir() / f"{key}.json" if _cache_dir() else None
    if path is not None and path.is_file():
        try:
            return StepTrace(**json.loads(path.read_text()))
        except (ValueError, TypeError):
            pass  # a stale or half-written entry: simulate again
    trace = simulate(spec, batch=batch, text_len=text_len, precision=precision,
                     grad_checkpointing=grad_checkpointing, device=device, mode=mode)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(trace)))
        os.replace(tmp, path)
    return trace


def _cache_dir() -> Path | None:
    """Simulations of big models take a minute; their results are kept here (``PRSMED_PLAN_CACHE=off`` disables)."""
    setting = os.environ.get("PRSMED_PLAN_CACHE")
    if setting == "off":
        return None
    if setting:
        return Path(setting)
    return Path(os.environ.get("PRSMED_HOME", Path.home() / ".cache" / "prsmed")) / "plan-cache"


def _disk_key(*parts: Any) -> str:
    import torch
    import transformers

    blob = json.dumps([parts, torch.__version__, transformers.__version__, _code_fingerprint()], default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


@functools.lru_cache(maxsize=1)
def _code_fingerprint() -> str:
    """A hash of the code a simulation runs (the library and every registered plugin's package, built-in or
    third-party), so an edited or upgraded install never reads an older result."""
    import sys

    import prsmed
    from prsmed.registry import get_registry

    registry = get_registry()
    registry.load()
    roots = {Path(prsmed.__file__).parent}
    for plugin in registry.pm.get_plugins():
        name = plugin.__name__ if isinstance(plugin, type(sys)) else type(plugin).__module__
        top = sys.modules.get(name.split(".")[0])
        source = getattr(top, "__file__", None)
        if source:
            path = Path(source)
            roots.add(path.parent if path.name == "__init__.py" else path)
    digest = hashlib.sha256()
    for root in sorted(roots):
        files = sorted(root.rglob("*.py")) if root.is_dir() else [root]
        for path in files:
            digest.update(path.relative_to(root.parent).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def trace_for(opts: PlanOptions, *, grad_checkpointing: bool | None = None, mode: str = "train",
              device: str = "cuda") -> StepTrace:
    spec = model_spec(opts)
    gc = opts.grad_checkpointing if grad_checkpointing is None else grad_checkpointing
    return _cached_trace(spec.model_dump_json(), 1, opts.seq_len, opts.precision, gc, mode, device)


def model_spec(opts: PlanOptions):
    from prsmed.zoo import resolve_spec

    spec = resolve_spec(opts.model, weights=False)
    if opts.image_size is not None:
        spec.vision_encoder.options["img_size"] = opts.image_size
    return spec


@dataclasses.dataclass
class Memory:
    """Bytes of one configuration, split into the parts a user can act on."""

    frozen_weights: float
    trained_weights: float
    optimizer: float
    gradients: float
    activations_per_sample: float
    device: str = "cuda"

    @classmethod
    def from_trace(cls, trace: StepTrace, precision: str, device: str = "cuda") -> Memory:
        frozen = float(trace.weight_bytes["frozen"])
        if precision == "4bit":
            q = trace.weight_params.get("frozen_quantizable", 0)
            frozen += q * (FOUR_BIT_BYTES_PER_PARAM - 2.0)  # the simulation held them in bf16
        grads = float(trace.weight_bytes["trained"])
        per_sample = max(0.0, trace.peak_bytes - grads) / trace.batch
        return cls(frozen, float(trace.weight_bytes["trained"]), float(trace.optimizer_bytes), grads, per_sample,
                   device)

    def fixed(self) -> float:
        return self.frozen_weights + self.trained_weights + self.optimizer + self.gradients

    def overhead(self, batch: int) -> float:
        if self.device == "cpu":
            return CPU_RUNTIME_GIB * GIB
        return CUDA_CONTEXT_GIB * GIB + ALLOCATOR_SLACK * (self.fixed() + self.activations_per_sample * batch)

    def total(self, batch: int) -> float:
        return self.fixed() + self.activations_per_sample * batch + self.overhead(batch)

    def max_batch(self, vram_gib: float) -> int:
        """The largest batch whose total fits ``vram_gib`` (0 if not even one sample fits)."""
        budget = (vram_gib - CUDA_CONTEXT_GIB) * GIB / (1 + ALLOCATOR_SLACK) - self.fixed()
        if budget <= 0:
            return 0
        if self.activations_per_sample <= 0:
            return 4096
        return int(budget // self.activations_per_sample)

    def parts_gib(self, batch: int) -> dict[str, float]:
        return {
            "total": _gib(self.total(batch)),
            "batch": batch,
            "frozen_weights": _gib(self.frozen_weights),
            "trained_weights": _gib(self.trained_weights),
            "optimizer_states": _gib(self.optimizer),
            "gradients": _gib(self.gradients),
            "activations": _gib(self.activations_per_sample * batch),
            "activations_per_sample": _gib(self.activations_per_sample),
            "overhead": _gib(self.overhead(batch)),
        }


def _gib(x: float) -> float:
    return round(x / GIB, 3)


def _recommend(max_batch: int, effective: int) -> tuple[int, int]:
    """Per-GPU batch and gradient accumulation that multiply to ``effective`` with the batch as large as fits."""
    for b in range(min(max_batch, effective), 0, -1):
        if effective % b == 0:
            return b, effective // b
    return 0, 0


def _hours(flops_per_sample: float, opts: PlanOptions, tflops: float) -> float:
    samples = opts.dataset_size * opts.epochs
    return samples * flops_per_sample / (tflops * 1e12 * opts.mfu) / 3600


def plan(opts: PlanOptions, *, catalogue: Catalogue | None = None) -> dict[str, Any]:
    """The whole plan as the JSON ``prsmed plan --json`` prints."""
    cat = catalogue or load_catalogue(opts.catalogue)
    gpus = cat.gpu if opts.gpu == "all" else [cat.gpu_named(opts.gpu)]
    effective = opts.batch_size or PAPER_EFFECTIVE_BATCH

    trace = trace_for(opts)
    memory = Memory.from_trace(trace, opts.precision)
    flops = trace.flops_forward + trace.flops_backward
    infer = trace_for(opts, mode="infer")

    # Alternatives tried for a GPU the requested configuration does not fit, cheapest change first.
    alternatives: list[tuple[str, Memory, float]] = []

    def alternative_list() -> list[tuple[str, Memory, float]]:
        if alternatives:
            return alternatives
        gc = trace if opts.grad_checkpointing else trace_for(opts, grad_checkpointing=True)
        gc_flops = gc.flops_forward + gc.flops_backward
        if not opts.grad_checkpointing:
            alternatives.append(("--grad-checkpointing", Memory.from_trace(gc, opts.precision), gc_flops))
        if opts.precision != "4bit":
            alternatives.append(("a 4-bit base and --grad-checkpointing", Memory.from_trace(gc, "4bit"), gc_flops))
        return alternatives

    rows = []
    for gpu in gpus:
        precision = opts.precision
        notes = []
        options = []  # options the user did not ask for that this row needs, as `prsmed train` spells them
        if precision == "bf16" and not gpu.bf16:
            options.append("--precision fp16")
            notes.append("no bfloat16 on this GPU: fp16 with loss scaling")
        max_batch = memory.max_batch(gpu.vram_gib)
        row_memory, row_flops, alternative = memory, flops, None
        if max_batch < 1:
            for label, alt_memory, alt_flops in alternative_list():
                alt_max = alt_memory.max_batch(gpu.vram_gib)
                if alt_max >= 1:
                    row_memory, row_flops, alternative, max_batch = alt_memory, alt_flops, label, alt_max
                    break
        four_bit = opts.precision == "4bit" or bool(alternative and "4-bit" in alternative)
        if alternative == "--grad-checkpointing":
            options.append("--grad-checkpointing")
        estimated = max_batch >= 1
        # The trainer cannot load a 4-bit base (QLoRA): such a row is an estimate, never "fits".
        fits = estimated and not four_bit
        needs = alternative if four_bit and alternative else (", ".join(options) or None)
        batch, accum = _recommend(max_batch, effective) if estimated else (0, 0)
        why = ""
        if not estimated:
            why = (f"needs {_gib(memory.total(1))} GiB at batch 1 (has {gpu.vram_gib}); does not fit even with "
                   f"gradient checkpointing and a 4-bit base")
        elif four_bit:
            why = ("fits only with a 4-bit base (QLoRA), which prsmed train cannot load: an estimate, not a run it "
                   f"can do (at batch 1 in {'bf16' if opts.precision == '4bit' else opts.precision}: "
                   f"{_gib(memory.total(1))} GiB, has {gpu.vram_gib})")
            notes.append("prsmed train cannot load a 4-bit base: estimate only")
        elif options:
            why = f"needs {needs}" + (f" (at batch 1 without it: {_gib(memory.total(1))} GiB, has {gpu.vram_gib})"
                                      if alternative else "")
        tight = fits and row_memory.total(batch) > (1 - TIGHT_HEADROOM) * gpu.vram_gib * GIB
        if tight:
            notes.append(f"tight: under {TIGHT_HEADROOM:.0%} of the card's memory left at batch {batch}")
        hours = _hours(row_flops, opts, gpu.tflops(precision)) if estimated else None
        offers = [o for o in cat.offer if o.gpu == gpu.name]
        for offer in offers or [None]:
            row: dict[str, Any] = {
                "platform": offer.platform if offer else None,
                "gpu": gpu.name,
                "gpu_label": gpu.label,
                "vram_gb": gpu.vram_gib,
                "fits": fits,
                "tight": tight,
                "needs": needs,
                "why": why,
                "max_batch": max_batch if estimated else 0,
                "recommended_batch": batch,
                "grad_accum": accum,
                "memory_gb": _gib(row_memory.total(batch)) if estimated else _gib(memory.total(1)),
                "hours": float(f"{hours:.3g}") if hours is not None else None,
                "usd_h": offer.usd_h if offer else None,
                "usd_h_spot": cat.spot_price(offer) if offer else None,
                "cost_usd": None,
                "cost_usd_spot": None,
                "price_source": offer.source if offer else None,
                "notes": list(notes),
            }
            if offer is not None and hours is not None:
                platform = cat.platform_named(offer.platform)
                if offer.usd_h is not None:
                    row["cost_usd"] = round(hours * offer.usd_h, 2)
                    spot = cat.spot_price(offer)
                    row["cost_usd_spot"] = round(hours * spot, 2) if spot is not None else None
                elif platform.subscription_usd_month is not None:
                    months = max(1, math.ceil(hours / (30 * 24)))
                    row["cost_usd"] = round(months * platform.subscription_usd_month, 2)
                    row["notes"].append(f"subscription (${platform.subscription_usd_month:g}/month); compute units "
                                        f"may run out first")
                if platform.session_hours and hours > platform.session_hours:
                    row["notes"].append(f"longer than one {platform.session_hours:g} h session: resume from "
                                        f"checkpoints across sessions")
            rows.append(row)
    # Fitting rows priced by the hour first, cheapest first; then subscriptions; then what does not fit.
    rows.sort(key=lambda r: (not r["fits"], r["usd_h"] is None, r["cost_usd"] is None, r["cost_usd"] or 0.0, r["gpu"]))

    # The recommendation is a run prsmed train can do today, priced by the hour.
    best = next((r for r in rows if r["fits"] and r["usd_h"] is not None and r["cost_usd"] is not None), None)
    infer_bytes = (infer.weight_bytes["frozen"] + infer.weight_bytes["trained"] + infer.peak_bytes
                   + infer.kv_bytes_per_token * (opts.max_new_tokens))
    if opts.precision == "4bit":
        infer_bytes += infer.weight_params.get("frozen_quantizable", 0) * (FOUR_BIT_BYTES_PER_PARAM - 2.0)
    infer_total = infer_bytes * (1 + ALLOCATOR_SLACK) + CUDA_CONTEXT_GIB * GIB
    shown_batch = opts.batch_size or 1
    parts = memory.parts_gib(shown_batch)
    parts["inference"] = _gib(infer_total)
    parts["activations_by_component_per_sample"] = {k: _gib(v) for k, v in trace.activation_by_component.items()}
    return {
        "model": opts.model,
        "options": opts.model_dump(),
        "params": {
            "total": sum(c["total"] for c in trace.params.values()),
            "trainable": sum(c["trainable"] for c in trace.params.values()),
            "by_component": trace.params,
        },
        "sequence": {"image_tokens": trace.seq_len - opts.seq_len, "text_tokens": opts.seq_len,
                     "total": trace.seq_len, "image_size": trace.image_size},
        "memory_gb": parts,
        "flops_per_sample": {"forward": trace.flops_forward, "backward": trace.flops_backward, "total": flops},
        "assumptions": {
            "mfu": opts.mfu, "cuda_context_gb": CUDA_CONTEXT_GIB, "allocator_slack": ALLOCATOR_SLACK,
            "effective_batch": effective, "dataset_size": opts.dataset_size, "epochs": opts.epochs,
            "catalogue": cat.path, "catalogue_date": cat.date,
            "units": "GB here are GiB (2^30 bytes), as nvidia-smi's MiB / 1024",
        },
        "recommendation": _recommendation(best, opts),
        "train_command": train_command(best, opts),
        "rows": rows,
    }


def train_command(best: dict[str, Any] | None, opts: PlanOptions) -> str | None:
    """The ``prsmed train`` command line that realises the recommended row (data and run folder left to fill)."""
    if best is None:
        return None
    needs = best["needs"] or ""
    precision = "fp16" if "--precision fp16" in needs else opts.precision
    parts = ["prsmed train", f"--model {opts.model}", "--data DATA", "--out RUN", f"--precision {precision}",
             f"--batch-size {best['recommended_batch']}", f"--grad-accum {best['grad_accum']}"]
    if opts.grad_checkpointing or "--grad-checkpointing" in needs:
        parts.append("--grad-checkpointing")
    parts.append(f"--epochs {opts.epochs}")
    return " ".join(parts)


def _recommendation(best: dict[str, Any] | None, opts: PlanOptions) -> str:
    if best is None:
        return "no GPU in the catalogue fits this configuration"
    how = f"batch {best['recommended_batch']}"
    if best["grad_accum"] > 1:
        how += f" x gradient accumulation {best['grad_accum']}"
    if best["needs"]:
        how += f", with {best['needs']}"
    return (f"cheapest that fits: {best['gpu_label']} on {best['platform']} at {how}: about {best['hours']} h, "
            f"${best['cost_usd']} on demand" + (f", ${best['cost_usd_spot']} spot" if best["cost_usd_spot"] else ""))
