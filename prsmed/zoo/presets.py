"""Named model presets: one architecture, three sizes.

A preset is a :class:`ModelSpec` plus the weight files it needs. Weight locations are resolved when a model is
built, never when it is listed, so any preset can be described (and built on the meta device) offline.
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prsmed.base_weights import read_record
from prsmed.model.spec import ComponentRef, LoraSpec, ModelSpec, TrainSpec

ASSETS = Path(__file__).parent / "assets"


def shipped_revision(name: str) -> str:
    """The revision of a preset's shipped weights, from the weights.json the recipe writes beside them: the preset
    takes its revision from there, so the two cannot disagree when the weights are rebuilt."""
    try:
        record = read_record(ASSETS / name)
    except ValueError:
        record = None
    # A broken install must not stop the zoo from importing; `prsmed zoo show` and loading adapters say what is wrong.
    return record.revision if record is not None else "unrecorded"


def weights_home() -> Path:
    """Where large official weights are looked for: ``$PRSMED_HOME/weights`` (default ``~/.cache/prsmed``)."""
    return Path(os.environ.get("PRSMED_HOME", Path.home() / ".cache" / "prsmed")) / "weights"


@dataclass(frozen=True)
class WeightFile:
    """A file or directory a preset needs, and how a user gets it."""

    kind: str  # the component it feeds
    option: str  # the component option that receives its path
    relpath: str  # under weights_home()
    how: str  # what to download and run to produce it


@dataclass(frozen=True)
class Preset:
    name: str
    spec: ModelSpec
    description: str
    weights: tuple[WeightFile, ...] = ()
    tags: tuple[str, ...] = field(default_factory=tuple)
    # TrainConfig values this model fine-tunes with where the user sets none (docs/training.md says why).
    finetune: dict[str, Any] = field(default_factory=dict)


_LLAVA_MED_HOW = (
    "download microsoft/llava-med-v1.5-mistral-7b and openai/clip-vit-large-patch14-336, then run "
    "`prsmed convert llava-med <llava-med dir> {path} --vision-tower <clip dir>`"
)
_TINYSAM_HOW = (
    "download tinysam_42.3.pth from the TinySAM releases (github.com/xinghaochen/TinySAM, release 3.0) to {path}"
)

# The tiny model's prompt puts the image after the question, right before the answer cue. Its text model is trained
# from scratch, and with the image first the distance (in RoPE positions) from the answer to each image token
# changes with the question's length, so a position read from that distance does not carry over to questions of
# another length. Revision 1 (image first) named the right zone for 0.43 of fresh images asked with the held-out
# question templates and 0.61 with the training ones; image last, the grounding stage alone already reaches 0.77
# and 0.91 (bench/RESULTS.md). The 7B presets
# keep LLaVA-Med's image-first format, which their weights were trained on.
TINY_PROMPT = "### User: {question} \n<image>\n### Assistant: \n"

# Fine-tuning prsmed-tiny (docs/training.md, "Fine-tuning defaults", has the measurements): a fixed number of steps
# whatever the dataset's size, so that about 100 images get as many updates as 400, at 5e-4 with LoRA r8 on the text
# model's attention. The image tower and projector train in full at 3e-3, taught the dataset's look from its masks
# through the tower probe (tower_weight): without it the answers named the right zone on 0.17-0.33 of the rows of
# looks the model never saw; LoRA on the tower instead learnt too slowly in 150 steps (0.53 at best).
# Before the first step, the tower learns the look alone through the probe for 600 steps (about 15 s): on two fundus
# datasets the answers then named the right zone on 0.975 of the rows each, against 0.825 and 0.625 after 150.
TINY_FINETUNE: dict[str, Any] = {"epochs": 50, "max_steps": 150, "lr": 5e-4, "tower_weight": 1.0, "tower_lr": 3e-3,
                                 "tower_warmup_steps": 600}

_TINY = ModelSpec(
    name="prsmed-tiny",
    revision=shipped_revision("prsmed-tiny"),
    prompt_template=TINY_PROMPT,
    vision_encoder=ComponentRef(
        name="tinysam",
        options={
            "img_size": 256,
            "embed_dims": [24, 48, 64, 96],
            "depths": [1, 1, 2, 1],
            "num_heads": [1, 2, 2, 3],
            "window_sizes": [7, 7, 14, 7],
            "out_channels": 64,
        },
    ),
    llm=ComponentRef(name="llava", options={"preset": "tiny"}),
    fusion_head=ComponentRef(
        name="prsmed",
        options={
            "prompt_dim": 64,
            "image_dim": 64,
            "hidden_dim": 128,
            "cross_heads": 4,
            "encoder_heads": 4,
            "ffn_dim": 128,
        },
    ),
    lora=LoraSpec(r=8, alpha=8, dropout=0.05),
    # Its 34k-parameter image tower trains in full: a new look is learnt from the masks through the tower probe. So
    # does its 65k-parameter output layer: with LoRA on attention alone, a dataset whose answers open otherwise than
    # the model's ("Finding: ...") got answers that opened with a stray token and ran on (bench/RESULTS.md).
    train=TrainSpec(llm_image_path=True, llm_output=True),
)

_LLAVA_MED_7B = ComponentRef(name="llava", options={"preset": "llava-med-v1.5-mistral-7b", "dtype": "bfloat16"})

_PAPER = ModelSpec(
    name="prsmed-llava-med-7b",
    revision="1",
    vision_encoder=ComponentRef(name="tinysam", options={}),
    llm=_LLAVA_MED_7B,
    fusion_head=ComponentRef(name="prsmed", options={"prompt_dim": 4096, "image_dim": 256}),
    lora=LoraSpec(r=16, alpha=16, dropout=0.05),
)

_SAM_VIT_B = ModelSpec(
    name="prsmed-sam-vit-b",
    revision="1",
    vision_encoder=ComponentRef(name="sam-vit", options={}),
    llm=_LLAVA_MED_7B,
    fusion_head=ComponentRef(name="prsmed", options={"prompt_dim": 4096, "image_dim": 256}),
    lora=LoraSpec(r=16, alpha=16, dropout=0.05),
)

_LLAVA_WEIGHTS = WeightFile("llm", "pretrained", "llava-med-v1.5-mistral-7b-hf", _LLAVA_MED_HOW)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "prsmed-tiny",
            _TINY,
            "The paper's architecture at small widths (TinyViT encoder, tiny LLaVA, PRS-Med head); runs on any CPU.",
            tags=("tiny", "cpu"),
            finetune=TINY_FINETUNE,
        ),
        Preset(
            "prsmed-llava-med-7b",
            _PAPER,
            "The paper's model: TinySAM vit_t at 1024, LLaVA-Med v1.5 Mistral-7B with LoRA r16, PRS-Med head.",
            weights=(WeightFile("vision_encoder", "checkpoint", "tinysam_42.3.pth", _TINYSAM_HOW), _LLAVA_WEIGHTS),
            tags=("paper", "gpu"),
        ),
        Preset(
            "prsmed-sam-vit-b",
            _SAM_VIT_B,
            "SAM ViT-B (transformers SamVisionModel) instead of TinySAM, LLaVA-Med v1.5 7B, PRS-Med head.",
            weights=(
                WeightFile(
                    "vision_encoder",
                    "pretrained",
                    "sam-vit-base",
                    "download facebook/sam-vit-base (transformers format) to {path}",
                ),
                _LLAVA_WEIGHTS,
            ),
            tags=("gpu",),
        ),
    )
}


def list_presets(pattern: str = "*") -> list[str]:
    """Preset names matching a shell-style ``pattern`` (``"prsmed-*7b"``)."""
    return sorted(n for n in PRESETS if fnmatch.fnmatch(n, pattern))
