"""Built-in fusion heads: ``fusion_head/prsmed`` (the paper's decoder) and ``fusion_head/two-way`` (SAM-style).

Both take (image features (B, C, h, w), LLM hidden states (B, T, D), optional prompt mask (B, T)) and return mask
logits (B, 1, upsample*h, upsample*w), so either can sit behind any vision encoder and LLM whose widths match.
"""

from __future__ import annotations

from typing import Any, Callable

from pydantic import BaseModel

from prsmed.components import ComponentSpec, FusionHeadContract, parse_options
from prsmed.hookspecs import hookimpl
from prsmed.weights import load_strict, read_state_dict
from prsmed_plugins.fusion_heads.prompted_mask_decoder import PromptedMaskDecoder, PromptedMaskDecoderOptions
from prsmed_plugins.fusion_heads.two_way import TwoWayFusionHead, TwoWayOptions

__all__ = ["PromptedMaskDecoder", "PromptedMaskDecoderOptions", "TwoWayFusionHead", "TwoWayOptions"]


def _spec(name: str, module_cls: Callable, options_cls: type[BaseModel], description: str) -> ComponentSpec:
    component_id = f"fusion_head/{name}"

    def contract(**options: Any) -> FusionHeadContract:
        return parse_options(component_id, options_cls, options).contract()

    def build(**options: Any):
        parsed = parse_options(component_id, options_cls, options)
        module = module_cls(parsed)
        if parsed.checkpoint is not None:
            load_strict(module, read_state_dict(parsed.checkpoint), source=str(parsed.checkpoint))
        return module

    return ComponentSpec(kind="fusion_head", name=name, build=build, contract=contract, description=description)


@hookimpl
def prsmed_register_components(register: Callable[[ComponentSpec], None]) -> None:
    register(
        _spec(
            "prsmed",
            PromptedMaskDecoder,
            PromptedMaskDecoderOptions,
            "PRS-Med's PromptedMaskDecoder: image tokens cross-attend to the LLM states, one encoder layer, conv head, "
            "bilinear x16; loads the authors' mask_decoder.pth",
        )
    )
    register(
        _spec(
            "two-way",
            TwoWayFusionHead,
            TwoWayOptions,
            "SAM-style two-way transformer with a learned mask token and a hypernetwork mask, bilinear to x16",
        )
    )
