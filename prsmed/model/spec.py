"""The pydantic description of a composite PRS-Med model: which components, with which options, what trains."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

# Options that say where weights live rather than what the model is; they do not change a model's identity.
LOCATION_OPTIONS = frozenset({"checkpoint", "pretrained", "tokenizer", "dtype"})

# The authors' training format (PRSMED.md 1.5). We use the same prompt at inference, cue included, so the fusion
# head sees at test time exactly the states it was trained on (the authors' inference prompt differs).
DEFAULT_PROMPT = "<image>\n### User: {question} \n### Assistant: \n"


class ComponentRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    options: dict[str, Any] = Field(default_factory=dict)

    def identity(self) -> dict[str, Any]:
        return {"name": self.name, "options": {k: v for k, v in self.options.items() if k not in LOCATION_OPTIONS}}


class LoraSpec(BaseModel):
    """LoRA on the LLM (PRSMED.md 1.2: r16, alpha 16, dropout 0.05, q/k/v/o of the text model)."""

    model_config = ConfigDict(extra="forbid")
    r: int = Field(16, gt=0)
    alpha: int = Field(16, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    # None: the LLM plugin's own targets (its text model's attention projections).
    target_modules: list[str] | str | None = None


class TrainSpec(BaseModel):
    """Which parts receive gradients. The base LLM stays frozen; its image tower too, unless ``llm_image_path``."""

    model_config = ConfigDict(extra="forbid")
    vision_encoder: bool = True
    fusion_head: bool = True
    lora: bool = True
    modality_head: bool = True
    # Every LLM parameter, tower and projector included: only for pretraining a base from scratch (the tiny
    # preset's recipe). Fine-tuning a pretrained base uses LoRA instead.
    llm: bool = False
    # The LLM's own image tower and projector, in full: for a small tower, which fine-tuning teaches a new look
    # through the model's tower probe (prsmed-tiny; prsmed/train/tower_probe.py). The 7B models keep LLaVA-Med's.
    llm_image_path: bool = False
    # The LLM's output layer (lm_head), in full: for a small text model, whose LoRA on attention alone cannot move
    # the first word of an answer to a dataset's (prsmed-tiny; docs/training.md). The 7B models keep LLaVA-Med's.
    llm_output: bool = False


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "custom"
    revision: str = "0"
    vision_encoder: ComponentRef
    llm: ComponentRef
    fusion_head: ComponentRef
    lora: LoraSpec | None = Field(default_factory=LoraSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    # The auxiliary modality classifier on the image features (PRSMED.md 1.4); 0 disables it.
    modality_classes: int = Field(6, ge=0)
    prompt_template: str = DEFAULT_PROMPT
    # Which LLM positions the fusion head attends to: "prompt" (prompt tokens without padding: the same states in
    # training and inference, from the same single pass), or "all" (every position, padding and answer included,
    # as the authors do).
    fusion_tokens: str = Field("prompt", pattern="^(prompt|all)$")

    def fingerprint(self) -> str:
        """A hash of what the base model *is* (components and options, not where their weights live)."""
        ident = {
            "vision_encoder": self.vision_encoder.identity(),
            "llm": self.llm.identity(),
            "fusion_head": self.fusion_head.identity(),
            "modality_classes": self.modality_classes,
            "prompt_template": self.prompt_template,
        }
        blob = json.dumps(ident, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]
