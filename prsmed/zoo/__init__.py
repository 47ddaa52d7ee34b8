"""The model zoo: list presets, describe them without weights, build them."""

from __future__ import annotations

import difflib
from typing import Any

import torch

from prsmed.base_weights import WeightsIdentity, check_record, identify, read_record, weight_paths
from prsmed.components import ComponentError
from prsmed.model.prsmed_model import PRSMedModel
from prsmed.model.spec import ModelSpec
from prsmed.weights import load_strict, read_state_dict
from prsmed.zoo.presets import ASSETS, PRESETS, Preset, list_presets, weights_home

__all__ = ["PRESETS", "Preset", "WeightsMissing", "base_weights", "build_model", "describe", "get_preset",
           "list_presets", "resolve_spec"]


class WeightsMissing(FileNotFoundError):
    """A preset's weight files are not on disk; the message lists each file, where to put it, how to get it."""


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        close = difflib.get_close_matches(name, list(PRESETS), n=len(PRESETS), cutoff=0.0)
        raise ComponentError(f"unknown zoo model {name!r}; known (closest first): {', '.join(close)}")
    return PRESETS[name]


def resolve_spec(name: str, *, weights: bool = True) -> ModelSpec:
    """The preset's spec with weight paths filled in. With ``weights=True`` every file must exist."""
    preset = get_preset(name)
    spec = preset.spec.model_copy(deep=True)
    if not weights:
        return spec
    home = weights_home()
    missing = []
    for wf in preset.weights:
        path = home / wf.relpath
        if not path.exists():
            missing.append(f"  - {path}\n    ({wf.how.format(path=path)})")
            continue
        getattr(spec, wf.kind).options[wf.option] = str(path)
    if missing:
        raise WeightsMissing(
            f"zoo model {name!r} needs weights that are not on this machine (nothing is downloaded automatically). "
            f"Put them here (or set PRSMED_HOME to the folder holding weights/):\n" + "\n".join(missing)
        )
    shipped = ASSETS / name
    for kind in ("vision_encoder", "llm", "fusion_head"):
        path = shipped / f"{kind}.safetensors"
        if path.exists():
            getattr(spec, kind).options["checkpoint"] = str(path)
    return spec


def build_model(name_or_spec: str | ModelSpec, *, weights: bool = True, device: str | torch.device = "cpu") -> PRSMedModel:
    """Build a zoo preset (or any spec). ``weights=False`` builds the architecture without loading weights; with
    ``device="meta"`` nothing is even allocated."""
    spec = name_or_spec if isinstance(name_or_spec, ModelSpec) else resolve_spec(name_or_spec, weights=weights)
    with torch.device(device):
        model = PRSMedModel(spec)
    # The modality head is no registry component, so its shipped weights are loaded here.
    head = _modality_head_file(spec.name, model) if weights and isinstance(name_or_spec, str) else None
    if head is not None:
        load_strict(model.modality_head, read_state_dict(head), source=str(head))
    # The options name every file the components loaded (none for a model built without weights).
    model.base_weights = identify(weight_paths(spec) + ([str(head)] if head else []))
    return model


def _modality_head_file(name: str, model=None):
    head = ASSETS / name / "modality_head.safetensors"
    wanted = model.modality_head is not None if model is not None else PRESETS[name].spec.modality_classes > 0
    return head if wanted and head.exists() else None


def base_weights(name: str) -> WeightsIdentity | None:
    """The identity of the weights ``build_model(name)`` would load, without building it; None when they are not
    on this machine (the 7B presets' external files)."""
    try:
        spec = resolve_spec(name)
    except WeightsMissing:
        return None
    head = _modality_head_file(name)
    return identify(weight_paths(spec) + ([str(head)] if head else []))


def describe(name: str) -> dict[str, Any]:
    """Parameter counts per component, computed on the meta device (no weights read, nothing allocated)."""
    preset = get_preset(name)
    model = build_model(name, weights=False, device="meta")
    counts = model.parameter_counts()
    total = sum(c["total"] for c in counts.values())
    trainable = sum(c["trainable"] for c in counts.values())
    return {
        "name": preset.name,
        "revision": preset.spec.revision,
        "description": preset.description,
        "spec": preset.spec.model_dump(mode="json"),
        "fingerprint": preset.spec.fingerprint(),
        "params": {"total": total, "trainable": trainable, "by_component": counts},
        "weights": [
            {"component": w.kind, "path": str(weights_home() / w.relpath), "present": (weights_home() / w.relpath).exists()}
            for w in preset.weights
        ],
        "shipped_weights": sorted(p.name for p in (ASSETS / name).glob("*.safetensors")) if (ASSETS / name).is_dir() else [],
        "weights_record": _weights_record(name),
        "finetune_defaults": _finetune_defaults(preset),
    }


def _finetune_defaults(preset: Preset) -> dict[str, Any]:
    """What `prsmed train`, a service job and ``client.finetune`` use for this model when the user sets nothing."""
    from prsmed.train.config import TrainConfig

    fields = TrainConfig.model_fields
    chosen = {k: fields[k].default for k in ("epochs", "max_steps", "lr", "batch_size", "lm_weight")}
    chosen.update(preset.finetune)
    lora = preset.spec.lora
    if lora is not None:
        chosen["lora"] = {"r": lora.r, "alpha": lora.alpha, "dropout": lora.dropout,
                          "targets": lora.target_modules or "the LLM's attention projections (q, k, v, o)"}
    return chosen


def _weights_record(name: str) -> dict[str, Any] | None:
    """The shipped weights' record (revision, identity, what they were trained on) and whether the files match it;
    None for presets whose weights are external."""
    folder = ASSETS / name
    if not folder.is_dir():
        return None
    try:
        record = read_record(folder)
    except ValueError as e:
        return {"path": str(folder / "weights.json"), "problems": [str(e)]}
    if record is None:
        return {"path": str(folder / "weights.json"), "problems": check_record(folder)}
    return {"path": str(folder / "weights.json"), **record.model_dump(mode="json"), "problems": check_record(folder)}
