"""The adapter bundle: one directory holding everything a fine-tuning run changed.

Layout (the Hub repository is this directory)::

    adapter_manifest.json          format version, base model and the identity of its weights, components, LoRA
                                   and training config, metrics, SHA-256 of every other file, intended-use notice
    lora/adapter_config.json       PEFT format, loadable with plain peft on the base LLM
    lora/adapter_model.safetensors
    vision_encoder.safetensors     trained non-LoRA parts (present when they were trained)
    fusion_head.safetensors
    modality_head.safetensors
    README.md                      model card

Loading verifies every hash, that the bundle was made for this base model (architecture) and trained on these base
weights (:mod:`prsmed.base_weights`), before any weight is touched.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

import prsmed
from prsmed.base_weights import WeightsIdentity, identify, weight_paths
from prsmed.fileio import fsync_tree, replace_dir, sha256_file
from prsmed.model.spec import LoraSpec, ModelSpec
from prsmed.weights import CheckpointError, check_fits, read_state_dict, write_state_dict

# 2: the manifest records the base weights' identity (base.weights). Version 1 bundles are read, and refused as
# trained on unknown base weights unless the caller allows other base weights.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST = "adapter_manifest.json"
INTENDED_USE = (
    "Research use only. Not a medical device and not for diagnosis or treatment decisions. Outputs (masks and "
    "position descriptions) can be wrong and must be reviewed by a qualified clinician."
)
PARTS = ("vision_encoder", "fusion_head", "modality_head", "llm_image_path", "llm_output")
OVERRIDE_HINT = "--allow-other-base-weights (in Python: allow_other_base_weights=True)"

log = logging.getLogger(__name__)


class BundleError(ValueError):
    """A bundle is unreadable, tampered with, or made for another base model."""


class BaseWeightsMismatch(BundleError):
    """A bundle was trained on other base weights than the model's, or does not say which."""


class BaseModelRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    revision: str
    fingerprint: str  # the architecture: components and their options
    # The weights the adapter was trained on; None in bundles written before prsmed recorded it (format 1).
    weights: WeightsIdentity | None = None


def model_base_weights(model) -> WeightsIdentity:
    """The identity of ``model``'s base weights: what build_model recorded, else derived from its spec."""
    found = getattr(model, "base_weights", None)
    if found is None:
        found = identify(weight_paths(model.spec))
        model.base_weights = found
    return found


def check_base_weights(recorded: WeightsIdentity | None, local: WeightsIdentity | None, *, what: str, base: str,
                       allow: bool = False) -> None:
    """Refuse an adapter trained on other base weights than ``local`` (None: not on this machine, so only a missing
    record can be told), naming both; with ``allow``, log the same and go on."""
    if recorded is not None and (local is None or recorded.identity == local.identity):
        return
    if recorded is None:
        than = f"than this model's, {local.label()}" if local is not None else "than this prsmed's"
        problem = (f"{what} predates base-weights records: its manifest does not say which {base!r} weights it was "
                   f"trained on, and adapters written before the record were all trained on older weights {than}")
    else:
        problem = f"{what} was trained on {base!r} base weights {recorded.label()} but this model's are {local.label()}"
    if allow:
        log.warning("%s; loading it anyway as asked: its masks and answers may be wrong", problem)
        return
    raise BaseWeightsMismatch(
        f"{problem}. An adapter predicts correctly only on the base weights it was trained on: retrain it on these "
        f"(prsmed train --model {base} ...), or use it with the weights it was trained on; to load it anyway, "
        f"pass {OVERRIDE_HINT}"
    )


class AdapterManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format_version: int = FORMAT_VERSION
    prsmed_version: str = prsmed.__version__
    created_at: str = Field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    base: BaseModelRef
    spec: dict[str, Any]
    lora: LoraSpec | None
    parts: list[str]
    training: dict[str, Any] = Field(default_factory=dict)
    data_manifest_sha256: str | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    files: dict[str, str]
    intended_use: str = INTENDED_USE


def _validation_section(report: Any) -> str:
    """The training run's before / best / last validation and its verdict, when the run recorded them."""
    if not isinstance(report, dict) or "verdict" not in report:
        return ""
    from prsmed.train.report import format_markdown

    return f"\n## Validation\n{format_markdown(report)}\n"


def _model_card(manifest: AdapterManifest) -> str:
    weights = manifest.base.weights
    weights_line = (f"revision {weights.revision or '(none recorded)'}, identity `{weights.identity}` "
                    f"({weights.method})" if weights is not None else "(not recorded)")
    scalars = sorted((k, v) for k, v in manifest.metrics.items() if k != "report")
    metrics = "\n".join(f"| {k} | {v} |" for k, v in scalars) or "| (none recorded) | |"
    validation = _validation_section(manifest.metrics.get("report"))
    training = json.dumps(manifest.training, indent=2, sort_keys=True) if manifest.training else "{}"
    return f"""---
library_name: peft
base_model: {manifest.base.name}
tags: [prsmed, medical, segmentation, lora]
license: apache-2.0
---

# PRS-Med adapter for `{manifest.base.name}` (revision {manifest.base.revision})

Position-reasoning segmentation: given a medical image and a question, the model answers where the lesion is and
returns its mask. This bundle holds a LoRA adapter for the LLM and the trained vision encoder / fusion head.

## Base weights
Trained on `{manifest.base.name}` base weights {weights_line}. `prsmed` loads this adapter only onto those weights
(it refuses others unless told `--allow-other-base-weights`): on other base weights it would load and predict wrongly.

## Intended use
{manifest.intended_use}

## Metrics
| metric | value |
|---|---|
{metrics}
{validation}
## Training configuration
```json
{training}
```

## Loading
With `prsmed` (every file is checked against `adapter_manifest.json` and the base model against your installation):
```bash
prsmed pull OWNER/REPO                     # installs it in .prsmed/adapters, or --to DIR
prsmed predict scan.png -q "Where is the lesion?" --adapter hf://OWNER/REPO
```
```python
from prsmed_sdk import Client              # against a running `prsmed serve`
Client().predict("scan.png", "Where is the lesion?", adapter="hf://OWNER/REPO")

from prsmed.zoo import build_model         # or in-process, from a downloaded copy
from prsmed.model.bundle import load_bundle
model = build_model("{manifest.base.name}")
load_bundle("path/to/this/bundle", model)
```
With plain PEFT, the `lora/` folder is an ordinary adapter for the base LLM:
`PeftModel.from_pretrained(llm, "OWNER/REPO", subfolder="lora")` (the vision encoder and fusion head weights are the
`*.safetensors` files beside it).
"""


def save_bundle(
    model,
    out_dir: str | Path,
    *,
    training: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    data_manifest_sha256: str | None = None,
    overwrite: bool = False,
) -> AdapterManifest:
    """Write ``model``'s trained parts as a bundle. The directory appears whole or not at all."""
    spec: ModelSpec = model.spec

    def write_lora(folder: Path) -> None:
        model.peft_model.save_pretrained(str(folder), safe_serialization=True)

    parts = {part: getattr(model, part).state_dict() for part in PARTS
             if getattr(model, part) is not None and getattr(spec.train, part)}
    lora = write_lora if model.peft_model is not None and spec.train.lora else None
    return write_bundle(spec, model_base_weights(model), parts, lora, out_dir, training=training, metrics=metrics,
                        data_manifest_sha256=data_manifest_sha256, overwrite=overwrite)


def write_bundle(
    spec: ModelSpec,
    base_weights: WeightsIdentity | None,
    parts: dict[str, dict[str, Any]],
    write_lora,
    out_dir: str | Path,
    *,
    training: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    data_manifest_sha256: str | None = None,
    overwrite: bool = False,
) -> AdapterManifest:
    """Write a bundle from its pieces: the state dict of each trained part, and ``write_lora(folder)`` that writes
    the PEFT adapter (None: no LoRA). What :func:`save_bundle` does for a model in memory, and what a converter
    does for weights it read elsewhere. The directory appears whole or not at all."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise BundleError(f"{out_dir} already exists; pass overwrite=True to replace it")
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        if write_lora is not None:
            write_lora(tmp / "lora")
        written = []
        for part in PARTS:
            if part in parts:
                write_state_dict(parts[part], tmp / f"{part}.safetensors", metadata={"prsmed_part": part})
                written.append(part)
        files = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = AdapterManifest(
            base=BaseModelRef(name=spec.name, revision=spec.revision, fingerprint=spec.fingerprint(),
                              weights=base_weights),
            spec=spec.model_dump(mode="json"),
            lora=spec.lora if write_lora is not None else None,
            parts=written,
            training=training or {},
            data_manifest_sha256=data_manifest_sha256,
            metrics=metrics or {},
            files=files,
        )
        (tmp / "README.md").write_text(_model_card(manifest))
        manifest.files["README.md"] = sha256_file(tmp / "README.md")
        (tmp / MANIFEST).write_text(manifest.model_dump_json(indent=2) + "\n")
        fsync_tree(tmp)
        replace_dir(tmp, out_dir)
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_manifest(bundle_dir: str | Path) -> AdapterManifest:
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / MANIFEST
    if not path.is_file():
        raise BundleError(f"{bundle_dir} is not an adapter bundle: {MANIFEST} is missing")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path} is not valid JSON ({e}); the bundle may be half-written") from e
    version = raw.get("format_version") if isinstance(raw, dict) else None
    if version not in READABLE_VERSIONS:
        raise BundleError(f"{path}: format_version {version!r} is not supported (this prsmed reads "
                          f"{', '.join(map(str, READABLE_VERSIONS))}); upgrade prsmed to read it")
    try:
        return AdapterManifest.model_validate(raw)
    except ValidationError as e:
        raise BundleError(f"{path} does not follow the manifest schema: {e}") from e


def verify_bundle(bundle_dir: str | Path) -> AdapterManifest:
    """Check every listed file's SHA-256, and that no weight file is present that the manifest does not list."""
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    problems = []
    for rel, expected in manifest.files.items():
        path = bundle_dir / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            problems.append(f"{rel}: path escapes the bundle")
        elif not path.is_file():
            problems.append(f"{rel}: listed in the manifest but missing")
        elif (found := sha256_file(path)) != expected:
            problems.append(f"{rel}: SHA-256 {found[:12]}… but the manifest says {expected[:12]}…")
    for path in bundle_dir.rglob("*.safetensors"):
        rel = path.relative_to(bundle_dir).as_posix()
        if rel not in manifest.files:
            problems.append(f"{rel}: weight file not listed in the manifest")
    if problems:
        raise BundleError(f"bundle {bundle_dir} failed verification (tampered or incomplete): " + "; ".join(problems))
    return manifest


@dataclass
class BundleWeights:
    """Weights for the parts a bundle may replace, in memory and checked against a model, ready to be applied (again
    and again): read from a bundle (:func:`read_bundle`), or captured from a model (:meth:`capture`)."""

    path: Path | None
    manifest: AdapterManifest | None
    parts: dict[str, dict[str, Any]]  # part name -> state dict
    lora: dict[str, Any] | None  # PEFT state dict of the LoRA weights

    @classmethod
    def capture(cls, model) -> "BundleWeights":
        """A copy of ``model``'s own weights for every part a bundle for it may carry (the parts its spec trains;
        :func:`read_bundle` refuses others), to restore them later. Untrained parts are not copied: for the 7B
        model, its CLIP tower and output layer would cost gigabytes for nothing."""
        train = model.spec.train
        parts = {
            part: {k: v.detach().clone() for k, v in getattr(model, part).state_dict().items()}
            for part in PARTS
            if getattr(model, part) is not None and getattr(train, part)
        }
        lora = None
        if model.peft_model is not None:
            from peft.utils import get_peft_model_state_dict

            lora = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model.peft_model).items()}
        return cls(None, None, parts, lora)


def read_bundle(bundle_dir: str | Path, model, *, allow_other_base_weights: bool = False) -> BundleWeights:
    """Verify ``bundle_dir``, check it was made for ``model`` (architecture and base weights) and that every tensor
    fits; touches no weight. ``allow_other_base_weights`` loads a bundle trained on other base weights, or written
    before they were recorded, with a warning instead of :class:`BaseWeightsMismatch`."""
    bundle_dir = Path(bundle_dir)
    manifest = verify_bundle(bundle_dir)
    spec: ModelSpec = model.spec
    if manifest.base.fingerprint != spec.fingerprint():
        raise BundleError(
            f"bundle {bundle_dir} was trained on base model {manifest.base.name!r} (revision {manifest.base.revision}, "
            f"fingerprint {manifest.base.fingerprint}) but this model is {spec.name!r} (revision {spec.revision}, "
            f"fingerprint {spec.fingerprint()}); load it on the model it was made for"
        )
    check_base_weights(manifest.base.weights, model_base_weights(model), what=f"bundle {bundle_dir}",
                       base=manifest.base.name, allow=allow_other_base_weights)
    if manifest.lora is not None:
        if model.peft_model is None:
            raise BundleError(f"bundle {bundle_dir} carries a LoRA adapter but this model was built without LoRA")
        if manifest.lora != spec.lora:
            raise BundleError(
                f"bundle {bundle_dir} LoRA config {manifest.lora.model_dump()} differs from this model's "
                f"{spec.lora.model_dump() if spec.lora else None}"
            )
    untrained = [part for part in manifest.parts if not getattr(spec.train, part, False)]
    if untrained:
        raise BundleError(f"bundle {bundle_dir} carries weights for {', '.join(untrained)}, which this model's spec "
                          f"({spec.name!r}) does not train; load it on a model whose spec trains them")
    states = {part: read_state_dict(bundle_dir / f"{part}.safetensors") for part in manifest.parts}
    lora_state = read_state_dict(bundle_dir / "lora" / "adapter_model.safetensors") if manifest.lora else None
    for part, state in states.items():
        module = getattr(model, part)
        if module is None:
            raise BundleError(f"bundle {bundle_dir} has weights for {part} but this model has none")
        try:
            check_fits(module, state, source=f"{bundle_dir}/{part}.safetensors")
        except CheckpointError as e:
            raise BundleError(str(e)) from e
    if lora_state is not None:
        _check_lora(model, lora_state, source=str(bundle_dir / "lora"))
    return BundleWeights(bundle_dir, manifest, states, lora_state)


def apply_bundle(weights: BundleWeights, model) -> None:
    """Copy checked bundle weights into ``model`` (see :func:`read_bundle`)."""
    for part, state in weights.parts.items():
        getattr(model, part).load_state_dict(state, strict=True)
    if weights.lora is not None:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model.peft_model, weights.lora)


def load_bundle(bundle_dir: str | Path, model, *, allow_other_base_weights: bool = False) -> AdapterManifest:
    """Verify ``bundle_dir`` and load it into ``model``; nothing is loaded if any check fails (see
    :func:`read_bundle` for ``allow_other_base_weights``)."""
    weights = read_bundle(bundle_dir, model, allow_other_base_weights=allow_other_base_weights)
    apply_bundle(weights, model)
    return weights.manifest


def _check_lora(model, state: dict, *, source: str) -> None:
    from peft.utils import get_peft_model_state_dict

    own = get_peft_model_state_dict(model.peft_model)
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or extra or wrong:
        raise BundleError(
            f"{source}: LoRA weights do not fit this model ({len(missing)} missing, e.g. {missing[:2]}; "
            f"{len(extra)} unexpected, e.g. {extra[:2]}; {len(wrong)} of another shape, e.g. {wrong[:2]})"
        )
