"""Built-in fusion heads: ``fusion_head/prsmed`` (the paper's decoder) and ``fusion_head/two-way`` (SAM-style).

Both take (image features (B, C, h, w), LLM hidden states (B, T, D), optional prompt mask (B, T)) and return mask
logits (B, 1, upsample*h, upsample*w), so either can sit behind any vision encoder and LLM whose widths match.
Each file holds one component: its module, options, contract, builder and ``SPEC``; this hook registers the specs.
"""

from __future__ import annotations

from collections.abc import Callable

from prsmed.components import ComponentSpec
from prsmed.hookspecs import hookimpl

from . import prompted_mask_decoder, two_way
from .prompted_mask_decoder import PromptedMaskDecoder, PromptedMaskDecoderOptions
from .two_way import TwoWayFusionHead, TwoWayOptions

__all__ = ["PromptedMaskDecoder", "PromptedMaskDecoderOptions", "TwoWayFusionHead", "TwoWayOptions"]


@hookimpl
def prsmed_register_components(register: Callable[[ComponentSpec], None]) -> None:
    for spec in (prompted_mask_decoder.SPEC, two_way.SPEC):
        register(spec)
