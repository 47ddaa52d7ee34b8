"""Built-in vision encoders: ``vision_encoder/tinysam`` (TinySAM's TinyViT + SAM neck) and
``vision_encoder/sam-vit`` (SAM's ViT via transformers).

Every built-in family has the same shape: one file per component holding its module, options, contract, builder,
checkpoint layouts and ``SPEC``, and this hook registering the specs, as a third-party plugin would
(docs/plugins.md). ``contract(**options)`` answers from the options alone (for ``sam-vit`` with ``pretrained=`` it
reads that model's ``config.json``, never its weights).
"""

from __future__ import annotations

from prsmed.hookspecs import hookimpl

from . import sam_vit, tinysam


@hookimpl
def prsmed_register_components(register) -> None:
    for spec in (tinysam.SPEC, sam_vit.SPEC):
        register(spec)
