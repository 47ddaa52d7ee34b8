"""The composite PRS-Med model: vision encoder + LLM backbone (with LoRA) + fusion head.

One LLM pass serves both outputs. In training, that pass is teacher-forced over prompt and answer: its logits give
the LM loss and its hidden states feed the fusion head. Because the LLM is causal, the states at prompt positions do
not depend on the answer that follows, so (with ``fusion_tokens="prompt"``) the fusion head sees exactly the states
an inference prefill over the prompt produces, and that same prefill's KV cache then generates the answer.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from prsmed.components import ComponentError, check_compatible
from prsmed.interfaces import LLMInputs, LLMOutput
from prsmed.model.spec import ModelSpec
from prsmed.registry import Registry, get_registry

IGNORE_INDEX = -100


@dataclass
class PRSMedOutput:
    mask_logits: torch.Tensor  # (B, 1, S, S) at the vision encoder's input size
    llm: LLMOutput
    modality_logits: torch.Tensor | None = None

    @property
    def lm_loss(self) -> torch.Tensor | None:
        return self.llm.loss


@dataclass
class Prediction:
    answers: list[str]
    mask_logits: torch.Tensor  # (B, 1, S, S)


def _split_options(options: dict) -> tuple[dict, dict]:
    """Options for the contract (no weight locations needed) and the full set for building."""
    contract_opts = {k: v for k, v in options.items() if k != "checkpoint"}
    return contract_opts, dict(options)


class PRSMedModel(nn.Module):
    def __init__(self, spec: ModelSpec, *, registry: Registry | None = None) -> None:
        super().__init__()
        reg = registry or get_registry()
        self.spec = spec
        # The identity of the base weights loaded (prsmed.base_weights.WeightsIdentity), which adapter bundles
        # record and check. prsmed.zoo.build_model sets it, knowing every file it loaded; left None, bundles derive
        # it from the spec's weight options.
        self.base_weights = None
        refs = {"vision_encoder": spec.vision_encoder, "llm": spec.llm, "fusion_head": spec.fusion_head}
        # Check the combination from contracts alone, before any module is built or any weight is read.
        contracts = {kind: reg.contract(kind, ref.name, **_split_options(ref.options)[0]) for kind, ref in refs.items()}
        check_compatible(
            contracts["vision_encoder"],
            contracts["llm"],
            contracts["fusion_head"],
            names={kind: f"{kind} {ref.name!r}" for kind, ref in refs.items()},
        )
        self.contracts = contracts
        self.vision_encoder = reg.create("vision_encoder", spec.vision_encoder.name, **spec.vision_encoder.options)
        self.llm = reg.create("llm", spec.llm.name, **spec.llm.options)
        self.fusion_head = reg.create("fusion_head", spec.fusion_head.name, **spec.fusion_head.options)
        channels = contracts["vision_encoder"].out_channels
        self.modality_head = (
            nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, spec.modality_classes))
            if spec.modality_classes
            else None
        )
        if self.modality_head is not None and not _on_meta(self.modality_head):
            nn.init.xavier_uniform_(self.modality_head[2].weight)
            nn.init.constant_(self.modality_head[2].bias, 1.0)  # the authors' init (PRSMED.md 1.4)
        # Parts a component froze itself (unused heads kept only so official checkpoints load) stay frozen.
        self._self_frozen = {
            f"{part}.{n}"
            for part in ("vision_encoder", "fusion_head")
            for n, p in getattr(self, part).named_parameters()
            if not p.requires_grad
        }
        self.__dict__["peft_model"] = None
        if spec.lora is not None:
            self._apply_lora()
        self.set_trainable()

    # LoRA ------------------------------------------------------------------------------------------------------
    def _hf_attr(self) -> str:
        from transformers import PreTrainedModel

        for name, child in self.llm.named_children():
            if isinstance(child, PreTrainedModel):
                return name
        raise ComponentError(
            f"LLM component {self.spec.llm.name!r} holds no transformers PreTrainedModel child, so LoRA cannot be "
            f"applied; set lora=None in the model spec"
        )

    def lora_config(self):
        from peft import LoraConfig

        lora = self.spec.lora
        targets = lora.target_modules if lora.target_modules is not None else self.llm.lora_target_modules
        if not isinstance(targets, str):
            targets = list(targets)
        return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets, bias="none")

    def _apply_lora(self) -> None:
        from peft import get_peft_model

        # PEFT swaps the target layers inside the transformers model in place, so the LLM component keeps calling
        # its own model object unchanged. The PeftModel wrapper is kept only to save and load the adapter in PEFT
        # format; it is stored outside the module tree so its parameters are not registered twice.
        with warnings.catch_warnings():
            # PeftModel.__init__ (peft 0.21.2, the newest release) reads `is_gradient_checkpointing`, which
            # transformers 5 deprecated in favour of `is_activation_checkpointing` and warns about on every read, so
            # every model build, and so every `prsmed predict`, printed that FutureWarning. The read is PEFT's, not
            # ours: only that message is ignored, and only around this call. Drop this once PEFT reads the new name.
            warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated",
                                    category=FutureWarning)
            self.__dict__["peft_model"] = get_peft_model(getattr(self.llm, self._hf_attr()), self.lora_config())

    # what trains -----------------------------------------------------------------------------------------------
    def set_trainable(self) -> None:
        train = self.spec.train
        for p in self.llm.parameters():
            p.requires_grad_(train.llm)
        if self.peft_model is not None and train.lora:
            for n, p in self.llm.named_parameters():
                if "lora_" in n:
                    p.requires_grad_(True)
        if train.llm_image_path and self.llm_image_path is not None:
            for n, p in self.llm_image_path.named_parameters():
                p.requires_grad_(True)
        if train.llm_output and self.llm_output is not None:
            for p in self.llm_output.parameters():
                p.requires_grad_(True)
        for part, flag in (("vision_encoder", train.vision_encoder), ("fusion_head", train.fusion_head)):
            for n, p in getattr(self, part).named_parameters():
                p.requires_grad_(flag and f"{part}.{n}" not in self._self_frozen)
        if self.modality_head is not None:
            for p in self.modality_head.parameters():
                p.requires_grad_(train.modality_head)

    @property
    def llm_image_path(self) -> nn.Module | None:
        """The LLM's own image tower and projector as one module (a view: the weights stay where they are), or None
        for a text-only LLM. A bundle carries it as a part when the spec trains it."""
        path = self.llm.image_path()
        if path is None:
            return None
        return nn.ModuleDict({"tower": path[0], "projector": path[1]})

    @property
    def llm_output(self) -> nn.Module | None:
        """The LLM's output layer (``lm_head``), or None when the LLM cannot say. A bundle carries it as a part
        when the spec trains it."""
        return self.llm.output_layer()

    def parameter_counts(self) -> dict[str, dict[str, int]]:
        counts = {}
        for name in ("vision_encoder", "llm", "fusion_head", "modality_head"):
            module = getattr(self, name)
            if module is None:
                continue
            params = list(module.parameters())
            counts[name] = {
                "total": sum(p.numel() for p in params),
                "trainable": sum(p.numel() for p in params if p.requires_grad),
            }
        lora = sum(p.numel() for n, p in self.llm.named_parameters() if "lora_" in n)
        counts["llm"]["lora"] = lora
        path = self.llm.image_path()
        if path is not None:
            # Trained in full when the spec says so (prsmed-tiny's tower learns a new look through its probe).
            counts["llm"]["image_tower"] = sum(p.numel() for m in path for p in m.parameters() if p.requires_grad)
        head = self.llm_output
        if head is not None:
            counts["llm"]["output_layer"] = sum(p.numel() for p in head.parameters() if p.requires_grad)
        return counts

    # inputs ----------------------------------------------------------------------------------------------------
    def seg_pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """The segmentation branch's input: resize to the encoder's square size (aspect ratio not kept, as the
        authors do), scale to [0, 1], normalise with the encoder's mean and std."""
        c = self.contracts["vision_encoder"]
        size = c.input_size
        batch = []
        for im in images:
            arr = np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0
            batch.append(torch.from_numpy(arr).permute(2, 0, 1))
        x = torch.stack(batch)
        mean = torch.tensor(c.pixel_mean).view(1, 3, 1, 1)
        std = torch.tensor(c.pixel_std).view(1, 3, 1, 1)
        return (x - mean) / std

    def prompts(self, questions: Sequence[str]) -> list[str]:
        template = self.spec.prompt_template
        if self.contracts["llm"].image_tokens == 0:
            template = template.replace("<image>\n", "").replace("<image>", "")
        return [template.format(question=q.strip()) for q in questions]

    def encode(
        self,
        images: Sequence[Image.Image],
        questions: Sequence[str],
        answers: Sequence[str] | None = None,
        *,
        padding_side: str = "right",
    ) -> tuple[torch.Tensor, LLMInputs]:
        if len(images) != len(questions) or (answers is not None and len(answers) != len(questions)):
            raise ValueError(
                f"expected as many images as questions (and answers); got {len(images)} images, {len(questions)} "
                f"questions, {None if answers is None else len(answers)} answers"
            )
        llm_images = list(images) if self.contracts["llm"].image_tokens else None
        inputs = self.llm.encode(self.prompts(questions), llm_images, answers, padding_side=padding_side)
        return self.seg_pixels(images), inputs

    # forward ---------------------------------------------------------------------------------------------------
    def _fusion_mask(self, out: LLMOutput, labels: torch.Tensor | None) -> torch.Tensor | None:
        if self.spec.fusion_tokens == "all":
            return None
        mask = out.attention_mask.bool()
        if labels is not None:
            if labels.shape != mask.shape:
                raise ComponentError(
                    f"LLM {self.spec.llm.name!r} returned states for {mask.shape[1]} positions but labels for "
                    f"{labels.shape[1]}; its encode() and forward() must agree"
                )
            mask = mask & (labels == IGNORE_INDEX)
        return mask

    def _mask_logits(self, z_img: torch.Tensor, out: LLMOutput, labels: torch.Tensor | None) -> torch.Tensor:
        return self.fusion_head(z_img, out.hidden_states, prompt_mask=self._fusion_mask(out, labels))

    def forward(self, seg_pixels: torch.Tensor, llm_inputs: LLMInputs) -> PRSMedOutput:
        z_img = self.vision_encoder(seg_pixels)
        out = self.llm(llm_inputs)
        logits = self._mask_logits(z_img, out, llm_inputs.labels)
        modality = self.modality_head(z_img) if self.modality_head is not None else None
        return PRSMedOutput(mask_logits=logits, llm=out, modality_logits=modality)

    @torch.no_grad()
    def predict(
        self,
        seg_pixels: torch.Tensor,
        llm_inputs: LLMInputs,
        *,
        image_embeddings: torch.Tensor | None = None,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> Prediction:
        """Answer and mask from one prefill of the (left-padded) prompts; ``image_embeddings`` skips the encoder."""
        z_img = image_embeddings if image_embeddings is not None else self.vision_encoder(seg_pixels)
        prefill = self.llm(llm_inputs, use_cache=True)
        logits = self._mask_logits(z_img, prefill, None)
        answers = self.llm.generate_from(
            prefill,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_p=top_p,
            generator=generator,
        )
        return Prediction(answers=answers, mask_logits=logits)


def _on_meta(module: nn.Module) -> bool:
    return any(p.is_meta for p in module.parameters())
