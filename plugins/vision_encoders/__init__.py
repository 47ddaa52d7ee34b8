"""Built-in vision encoders: ``vision_encoder/tinysam`` (TinySAM's TinyViT + SAM neck) and
``vision_encoder/sam-vit`` (SAM's ViT via transformers).

Each takes keyword options, validated here; ``contract(**options)`` answers from the options alone (for
``sam-vit`` with ``pretrained=`` it reads that model's ``config.json``, never its weights).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from prsmed.components import ComponentSpec, VisionEncoderContract, parse_options
from prsmed.hookspecs import hookimpl
from prsmed.weights import load_strict, read_state_dict

from . import sam_vit, tinyvit

Positive = Annotated[int, Field(gt=0)]
Four = tuple[Positive, Positive, Positive, Positive]


# --- tinysam ----------------------------------------------------------------------------------------------------

class TinySAMOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    img_size: Positive = 1024
    embed_dims: Four = (64, 128, 160, 320)
    depths: Four = (2, 2, 6, 2)
    num_heads: Four = (2, 4, 5, 10)
    # The first entry is unused (stage 0 is convolutional); kept so configs read like the official ones.
    window_sizes: Four = (7, 7, 14, 7)
    mlp_ratio: Annotated[float, Field(gt=0)] = 4.0
    out_channels: Positive = 256
    checkpoint: Path | None = None

    @model_validator(mode="after")
    def _check(self) -> "TinySAMOptions":
        if self.img_size % tinyvit.STRIDE:
            raise ValueError(f"img_size must be a multiple of {tinyvit.STRIDE}, got {self.img_size}")
        for i in range(1, 4):
            if self.embed_dims[i] % self.num_heads[i]:
                raise ValueError(
                    f"embed_dims[{i}]={self.embed_dims[i]} must be divisible by num_heads[{i}]={self.num_heads[i]}"
                )
        if self.embed_dims[0] % 2:
            raise ValueError(f"embed_dims[0] must be even (the patch embedding halves it), got {self.embed_dims[0]}")
        return self


def tinysam_contract(**options: Any) -> VisionEncoderContract:
    opts = parse_options("vision_encoder/tinysam", TinySAMOptions, options)
    return tinyvit.contract_for(opts.img_size, opts.out_channels)


def build_tinysam(**options: Any) -> tinyvit.TinySAMEncoder:
    opts = parse_options("vision_encoder/tinysam", TinySAMOptions, options)
    module = tinyvit.TinySAMEncoder(
        img_size=opts.img_size,
        embed_dims=opts.embed_dims,
        depths=opts.depths,
        num_heads=opts.num_heads,
        window_sizes=opts.window_sizes,
        mlp_ratio=opts.mlp_ratio,
        out_channels=opts.out_channels,
    )
    module.contract = tinyvit.contract_for(opts.img_size, opts.out_channels)
    module.load_report = None
    if opts.checkpoint is not None:
        source = str(opts.checkpoint)
        split = tinyvit.split_checkpoint(read_state_dict(opts.checkpoint), source=source)
        module.load_report = load_strict(module, split.state, source=f"{source} ({split.layout} layout)",
                                         ignored=split.ignored)
    return module


# --- sam-vit ----------------------------------------------------------------------------------------------------

def sam_vit_contract(**options: Any) -> VisionEncoderContract:
    opts = parse_options("vision_encoder/sam-vit", sam_vit.SamViTOptions, options)
    return sam_vit.contract_for(sam_vit.build_config(opts))


def build_sam_vit(**options: Any) -> sam_vit.SamViTEncoder:
    opts = parse_options("vision_encoder/sam-vit", sam_vit.SamViTOptions, options)
    config = sam_vit.build_config(opts)
    module, report = sam_vit.build_module(opts, config)
    module.load_report = report
    module.contract = sam_vit.contract_for(config)
    if opts.checkpoint is not None:
        source = str(opts.checkpoint)
        split = sam_vit.split_checkpoint(read_state_dict(opts.checkpoint))
        module.load_report = load_strict(module, split.state, source=f"{source} ({split.layout} layout)",
                                         ignored=split.ignored)
    return module


@hookimpl
def prsmed_register_components(register) -> None:
    register(ComponentSpec(
        kind="vision_encoder",
        name="tinysam",
        build=build_tinysam,
        contract=tinysam_contract,
        description="TinySAM vit_t image encoder (TinyViT-5M + SAM neck), 1024x1024 -> 256x64x64; loads "
                    "tinysam_42.3.pth, PRS-Med image_encoder.pth or safetensors",
    ))
    register(ComponentSpec(
        kind="vision_encoder",
        name="sam-vit",
        build=build_sam_vit,
        contract=sam_vit_contract,
        description="SAM ViT image encoder (transformers SamVisionEncoder, ViT-B by default), 1024x1024 -> "
                    "256x64x64; pretrained= a local directory or Hub id",
    ))
