"""The module interfaces the composite model relies on, one per component kind.

Built-in and third-party components subclass these. They are deliberately small: what the composite PRS-Med model
calls, and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from PIL import Image
from torch import nn

from prsmed.components import FusionHeadContract, LLMContract, VisionEncoderContract


class VisionEncoder(nn.Module):
    """``forward(pixels)``: (B, 3, S, S) float32, already normalised with the contract's mean/std ->
    (B, out_channels, S/stride, S/stride)."""

    contract: VisionEncoderContract

    @staticmethod
    def check_pixels(pixels: torch.Tensor, *, channels: int, size: int, what: str) -> None:
        """Raise ValueError unless ``pixels`` is (B, channels, size, size); ``what`` names the encoder and the
        option that set its size, e.g. "TinySAM encoder configured for img_size=1024"."""
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (channels, size, size):
            raise ValueError(f"{what} expects pixels of shape (B, {channels}, {size}, {size}), got "
                             f"{tuple(pixels.shape)}; resize the image to {size}x{size} first")


class FusionHead(nn.Module):
    """``forward(image_embeddings, prompt_embeddings, prompt_mask=None)`` -> mask logits (B, 1, upsample*h, upsample*w).

    ``prompt_mask`` is (B, T) bool, True on real tokens; ``None`` attends to every position (the authors' behaviour).
    """

    contract: FusionHeadContract


@dataclass
class LLMInputs:
    """A tokenised batch ready for :meth:`LLMBackbone.forward`.

    ``labels`` is -100 everywhere except the answer tokens (None when no answers were given).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor | None = None
    labels: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> "LLMInputs":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return LLMInputs(move(self.input_ids), move(self.attention_mask), move(self.pixel_values), move(self.labels))


@dataclass
class LLMOutput:
    """One LLM pass.

    ``hidden_states`` are the last layer's states (after the final norm) over every position of the expanded
    sequence, image tokens included: (B, T, hidden_size). ``attention_mask`` is (B, T), aligned with them.
    ``past_key_values`` is set when the pass was a prefill for generation; ``loss`` when labels were given.
    """

    hidden_states: torch.Tensor
    attention_mask: torch.Tensor
    logits: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    past_key_values: Any = None


class LLMBackbone(nn.Module):
    """A language model (optionally with its own image path) as PRS-Med uses it."""

    contract: LLMContract

    #: PEFT ``target_modules`` for LoRA: the text model's attention projections only.
    lora_target_modules: Sequence[str] | str

    @property
    def tokenizer(self):  # a transformers tokenizer
        raise NotImplementedError

    def image_path(self) -> tuple[nn.Module, nn.Module] | None:
        """The LLM's own image tower and the projector whose output is the image tokens the text model reads;
        None for a text-only backbone. Fine-tuning with a tower probe trains the tower through these."""
        return None

    def output_layer(self) -> nn.Module | None:
        """The layer that maps the last hidden state to token logits (``lm_head``); a small model's fine-tuning may
        train it in full (spec ``train.llm_output``). None when the backbone cannot say."""
        return None

    def text_model(self) -> nn.Module | None:
        """The decoder stack whose linear layers a 4-bit base would quantise (the planner counts them); None when
        the backbone cannot say."""
        return None

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, image_tokens, hidden) image tokens for ``pixels`` from :meth:`preprocess_images`."""
        raise NotImplementedError(f"{type(self).__name__} has no image path")

    def encode(
        self,
        prompts: Sequence[str],
        images: Sequence[Image.Image] | None = None,
        answers: Sequence[str] | None = None,
        *,
        padding_side: str = "right",
    ) -> LLMInputs:
        """Tokenise ``prompts`` (each holding the ``<image>`` placeholder where the image goes, if the backbone has
        an image path), append ``answers`` (+ EOS) when given, and build labels that supervise the answer only."""
        raise NotImplementedError

    def forward(self, inputs: LLMInputs, *, use_cache: bool = False) -> LLMOutput:  # type: ignore[override]
        raise NotImplementedError

    @torch.no_grad()
    def generate_from(
        self,
        prefill: LLMOutput,
        *,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> list[str]:
        """Continue from a prefill made with ``use_cache=True`` (left-padded batch) and return the decoded answers,
        without re-running the prompt."""
        raise NotImplementedError
