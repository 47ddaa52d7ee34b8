"""Import the PRS-Med authors' trained checkpoint folder as a verified adapter bundle (``prsmed convert
prsmed-authors SRC --to BUNDLE``), so that ``prsmed predict --adapter BUNDLE``, the service and the SDK use their
trained weights on ``prsmed-llava-med-7b``.

The folder (``llm_seg_<epoch>/``, PRSMED.md section 9.3)::

    lora_adapter/adapter_config.json      PEFT; base_model_name_or_path points at the authors' own disk
    lora_adapter/adapter_model.safetensors    base_model.model.model.layers.N.self_attn.{q,k,v,o}_proj.lora_{A,B}.weight
    image_encoder.pth     the wrapper's state dict: sam.image_encoder.*, sam.prompt_encoder.*, sam.mask_decoder.*,
                          and the same encoder again as image_encoder.* (the two copies must agree)
    mask_decoder.pth      the fusion head, under this project's names (the module follows theirs)
    cls.pth               the modality classifier: 2.weight, 2.bias
    tokenizer/            not needed: the base model's tokenizer is used

Every tensor is mapped onto the target model built on the meta device (no weights read, nothing allocated), and
checked there: a key that maps nowhere, a tensor of another shape, or a LoRA configuration other than the model's
(rank, alpha, dropout, target modules) stops the import with the names, before anything is written.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from prsmed.model.bundle import AdapterManifest, write_bundle
from prsmed.weights import CheckpointError, check_fits, read_state_dict

log = logging.getLogger(__name__)

AUTHORS_PREFIX = "base_model.model."
FILES = ("image_encoder.pth", "mask_decoder.pth", "cls.pth", "lora_adapter/adapter_config.json")


class ImportRefused(ValueError):
    """The folder is not the authors' checkpoint for this model; the message names what does not fit."""


def convert_prsmed_authors(src: str | Path, dst: str | Path, *, model: str = "prsmed-llava-med-7b",
                           overwrite: bool = False, revision: str | None = None) -> AdapterManifest:
    """Read the authors' folder ``src`` (a local folder, or a Hub id ``owner/name`` downloaded once) and write an
    adapter bundle for ``model`` (a zoo name or a ModelSpec JSON file) at ``dst``."""
    folder = _local_folder(src, revision)
    missing = [f for f in FILES if not (folder / f).is_file()]
    lora_file = _lora_weights(folder)
    if missing or lora_file is None:
        absent = missing + ([] if lora_file else ["lora_adapter/adapter_model.safetensors"])
        raise ImportRefused(f"{src} is not a PRS-Med checkpoint folder (llm_seg_<epoch>/): {', '.join(absent)} "
                            f"missing")
    spec, base_weights = _target_spec(model)
    from prsmed.zoo import build_model

    target = build_model(spec, weights=False, device="meta")
    parts = {
        "vision_encoder": _vision_encoder(folder / "image_encoder.pth", target),
        "fusion_head": _plain(folder / "mask_decoder.pth", target.fusion_head),
        "modality_head": _plain(folder / "cls.pth", target.modality_head),
    }
    config = _check_lora_config(folder / "lora_adapter" / "adapter_config.json", target)
    lora = map_lora_keys(read_state_dict(lora_file), target, source=str(lora_file))

    def write_lora(out: Path) -> None:
        from safetensors.torch import save_file

        out.mkdir(parents=True, exist_ok=True)
        target.peft_model.peft_config["default"].save_pretrained(str(out))
        save_file({k: v.contiguous() for k, v in lora.items()}, str(out / "adapter_model.safetensors"))

    training = {"source": "prsmed-authors", "imported_from": str(src),
                "authors_base_model_name_or_path": config.get("base_model_name_or_path")}
    return write_bundle(spec, base_weights, parts, write_lora, dst, training=training, overwrite=overwrite)


def _local_folder(src: str | Path, revision: str | None) -> Path:
    path = Path(src).expanduser()
    if path.is_dir():
        return path
    text = str(src)
    if path.exists() or text.count("/") != 1 or text.startswith((".", "/", "~")):
        raise ImportRefused(f"{src}: no such folder (give a local llm_seg_<epoch>/ folder or a Hub id owner/name)")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id=text, revision=revision))


def _lora_weights(folder: Path) -> Path | None:
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (folder / "lora_adapter" / name).is_file():
            return folder / "lora_adapter" / name
    return None


def _target_spec(model: str):
    """The spec to import for, and the identity of its base weights where they are on this machine."""
    from prsmed.base_weights import identify, weight_paths
    from prsmed.model.spec import ModelSpec
    from prsmed.zoo import resolve_spec

    if Path(model).is_file():
        spec = ModelSpec.model_validate_json(Path(model).read_text())
        return spec, identify(weight_paths(spec))
    spec = resolve_spec(model, weights=False)
    try:
        with_weights = resolve_spec(model, weights=True)
    except Exception as e:  # noqa: BLE001 - the weights are not here; the bundle then records no identity
        log.warning("the base weights of %s are not on this machine (%s); the bundle records no base-weights "
                    "identity, so loading it needs --allow-other-base-weights", model, str(e).splitlines()[0])
        return spec, None
    return spec, identify(weight_paths(with_weights))


def _fits(module, state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    try:
        check_fits(module, state, source=source)
    except CheckpointError as e:
        raise ImportRefused(str(e)) from None
    own = module.state_dict()
    return {k: v.to(own[k].dtype) if v.is_floating_point() else v for k, v in state.items()}


def _plain(path: Path, module) -> dict[str, torch.Tensor]:
    from prsmed.checkpoint_layouts import unwrapped

    return _fits(module, dict(unwrapped(read_state_dict(path))), str(path))


def _vision_encoder(path: Path, target) -> dict[str, torch.Tensor]:
    name = target.spec.vision_encoder.name
    if name != "tinysam":
        raise ImportRefused(f"the authors trained a TinySAM encoder; this model's vision encoder is {name!r}")
    from prsmed_plugins.vision_encoders.tinysam import split_checkpoint

    try:
        split = split_checkpoint(read_state_dict(path), source=str(path))
    except CheckpointError as e:
        raise ImportRefused(str(e)) from None
    if split.layout != "prsmed-authors":
        raise ImportRefused(f"{path}: expected the authors' wrapper (sam.image_encoder.* and image_encoder.*), "
                            f"found the {split.layout!r} layout")
    return _fits(target.vision_encoder, split.state, str(path))


def _check_lora_config(path: Path, target) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ImportRefused(f"{path} is not readable JSON ({e})") from None
    from peft.utils import get_peft_model_state_dict

    ours = target.lora_config()
    # Our targets are a pattern over the text model's layers; compare the projections it reaches, by name.
    reached = sorted({k.split(".lora_")[0].rsplit(".", 1)[-1] for k in get_peft_model_state_dict(target.peft_model)})
    given = config.get("target_modules") or []
    theirs = {"peft_type": config.get("peft_type"), "r": config.get("r"), "lora_alpha": config.get("lora_alpha"),
              "lora_dropout": config.get("lora_dropout"),
              "target_modules": sorted(given) if isinstance(given, list) else given}
    want = {"peft_type": "LORA", "r": ours.r, "lora_alpha": ours.lora_alpha, "lora_dropout": ours.lora_dropout,
            "target_modules": reached}
    differ = [f"{k}: theirs {theirs[k]!r}, this model {want[k]!r}" for k in want
              if (abs(theirs[k] - want[k]) > 1e-9 if isinstance(want[k], float) and theirs[k] is not None
                  else theirs[k] != want[k])]
    if differ:
        raise ImportRefused(f"{path}: a LoRA configuration for another model ({'; '.join(differ)})")
    return config


def _suffix(key: str) -> str | None:
    """``layers.N.self_attn.q_proj.lora_A.weight`` from any text-model LoRA key (adapter name dropped)."""
    key = key.replace(".default.", ".")
    at = key.find("layers.")
    return key[at:] if at >= 0 else None


def map_lora_keys(state: dict[str, torch.Tensor], target, *, source: str) -> dict[str, torch.Tensor]:
    """The authors' LoRA tensors under the target's PEFT names (its text model's layers), checked for shape."""
    from peft.utils import get_peft_model_state_dict

    own = get_peft_model_state_dict(target.peft_model)
    by_suffix: dict[str, str] = {}
    for key in own:
        suffix = _suffix(key)
        if suffix is not None and "vision" not in key:
            by_suffix[suffix] = key
    mapped, unmapped, wrong = {}, [], []
    for key, tensor in state.items():
        suffix = _suffix(key[len(AUTHORS_PREFIX):] if key.startswith(AUTHORS_PREFIX) else key)
        ours = by_suffix.get(suffix) if suffix else None
        if ours is None:
            unmapped.append(key)
        elif tuple(tensor.shape) != tuple(own[ours].shape):
            wrong.append(f"{key} {tuple(tensor.shape)} (this model: {tuple(own[ours].shape)})")
        else:
            mapped[ours] = tensor.to(own[ours].dtype)
    missing = sorted(set(own) - set(mapped))
    if unmapped or wrong or missing:
        raise ImportRefused(f"{source}: the LoRA weights do not fit this model: {len(unmapped)} keys map to none of "
                            f"its layers (e.g. {unmapped[:3]}); {len(wrong)} of another shape (e.g. {wrong[:2]}); "
                            f"{len(missing)} of its LoRA tensors absent (e.g. {missing[:3]})")
    return mapped
