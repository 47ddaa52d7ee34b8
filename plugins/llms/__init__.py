"""Built-in LLM backbones: ``llm/llava`` (LLaVA / LLaVA-Med v1.5) and ``llm/hf-causal-lm`` (text-only causal LMs).

Registered through the ``prsmed.plugins`` entry point like any third-party plugin. transformers is imported only
when a component is built or its contract is asked for, so listing components stays fast.
"""

from __future__ import annotations

from typing import Any

from prsmed.components import ComponentSpec
from prsmed.hookspecs import hookimpl


def _build_llava(**options: Any):
    from .llava import build_llava

    return build_llava(**options)


def _llava_contract(**options: Any):
    from .llava import llava_contract

    return llava_contract(**options)


def _build_causal_lm(**options: Any):
    from .causal_lm import build_causal_lm

    return build_causal_lm(**options)


def _causal_lm_contract(**options: Any):
    from .causal_lm import causal_lm_contract

    return causal_lm_contract(**options)


@hookimpl
def prsmed_register_components(register) -> None:
    register(
        ComponentSpec(
            kind="llm",
            name="llava",
            build=_build_llava,
            contract=_llava_contract,
            description=(
                "LLaVA (CLIP tower + MLP projector + Mistral-style text model) via transformers; presets 'tiny' "
                "(default, shipped tokenizer) and 'llava-med-v1.5-mistral-7b' (LLaVA-Med v1.5, weights via "
                "`prsmed convert llava-med`); options: pretrained, config, preset, dtype, checkpoint, tokenizer"
            ),
        )
    )
    register(
        ComponentSpec(
            kind="llm",
            name="hf-causal-lm",
            build=_build_causal_lm,
            contract=_causal_lm_contract,
            description=(
                "a text-only transformers causal LM (Mistral, Llama, Qwen2, ...); no image path; options: "
                "pretrained, config + model_type, preset ('tiny'), dtype, checkpoint, tokenizer"
            ),
        )
    )
