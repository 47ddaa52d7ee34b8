"""Built-in LLM backbones: ``llm/llava`` (LLaVA / LLaVA-Med v1.5) and ``llm/hf-causal-lm`` (text-only causal LMs).

Registered through the ``prsmed.plugins`` entry point like any third-party plugin, in the shape every built-in
family has: one file per component (module, options, contract, builder, ``SPEC``) and this hook registering the
specs. transformers is imported only when a component is built or its contract is asked for, so listing components
stays fast.
"""

from __future__ import annotations

from prsmed.hookspecs import hookimpl

from . import causal_lm, llava


@hookimpl
def prsmed_register_components(register) -> None:
    for spec in (llava.SPEC, causal_lm.SPEC):
        register(spec)
