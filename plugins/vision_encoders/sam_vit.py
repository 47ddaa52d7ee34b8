"""``vision_encoder/sam-vit``: SAM's ViT image encoder, as implemented by transformers (``SamVisionEncoder``),
behind the vision-encoder interface; its options, checkpoint layouts, contract and builder.

The module holds the encoder under the attribute ``vision_encoder``, so its state dict uses the same names as
transformers' ``SamModel`` and ``SamVisionModel`` (``vision_encoder.layers.0.attn.qkv.weight`` ...). transformers is
imported only when a module or a config is actually built.
"""

from __future__ import annotations

import contextlib
import logging
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from pydantic import BaseModel, ConfigDict

from prsmed import checkpoint_layouts as layouts
from prsmed.checkpoint_layouts import Layout, SplitCheckpoint
from prsmed.components import ComponentError, ComponentSpec, VisionEncoderContract, parse_options
from prsmed.interfaces import VisionEncoder
from prsmed.weights import CheckpointError, LoadReport

log = logging.getLogger(__name__)


class SamViTOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: Overrides of ``SamVisionConfig`` fields (hidden_size, num_hidden_layers, image_size, ...); applied on top
    #: of the defaults (SAM ViT-B) or of the config found at ``pretrained``.
    config: dict[str, Any] = {}
    #: A local directory written by ``save_pretrained`` (SamModel or SamVisionModel), or a Hub id such as
    #: ``facebook/sam-vit-base``; only a Hub id named here is ever downloaded.
    pretrained: str | None = None
    checkpoint: Path | None = None


# SAM ViT-B: transformers' SamVisionConfig defaults already are ViT-B's dimensions; spelled out so the preset
# does not move if those defaults ever change.
VIT_B = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "global_attn_indexes": [2, 5, 8, 11],
    "image_size": 1024,
    "patch_size": 16,
    "output_channels": 256,
    "window_size": 14,
}


def _config_fields() -> set[str]:
    from transformers import SamVisionConfig

    # Only the SAM-specific fields: PretrainedConfig silently accepts (and keeps) any other keyword.
    return set(SamVisionConfig.__annotations__)


def _is_local(pretrained: str) -> bool:
    return Path(pretrained).expanduser().exists() or pretrained.startswith(("/", ".", "~")) or "\\" in pretrained


def build_config(opts: SamViTOptions):
    """The ``SamVisionConfig`` the options describe (reads ``config.json`` at ``pretrained``, never weights)."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import SamVisionConfig

    unknown = sorted(set(opts.config) - _config_fields())
    if unknown:
        raise ComponentError(
            f"vision_encoder/sam-vit: unknown SamVisionConfig field(s) {', '.join(map(repr, unknown))} in config; "
            f"accepted fields: {', '.join(sorted(_config_fields()))}"
        )
    try:
        if opts.pretrained is None:
            config = SamVisionConfig(**{**VIT_B, **opts.config})
        else:
            local = _is_local(opts.pretrained)
            if local and not Path(opts.pretrained).expanduser().is_dir():
                raise ComponentError(
                    f"vision_encoder/sam-vit: pretrained={opts.pretrained!r} looks like a local path but is not a "
                    "directory; give a directory written by save_pretrained or a Hub id such as facebook/sam-vit-base"
                )
            source = str(Path(opts.pretrained).expanduser()) if local else opts.pretrained
            config = SamVisionConfig.from_pretrained(source, local_files_only=local, **opts.config)
    except ComponentError:
        raise
    except (TypeError, ValueError, OSError, StrictDataclassError) as e:
        raise ComponentError(f"vision_encoder/sam-vit: cannot make a SamVisionConfig from the options: {e}") from e
    _check_geometry(config)
    return config


def _square(value: Any, name: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ComponentError(f"vision_encoder/sam-vit: {name} must be square, got {list(value)}")
        value = value[0]
    return int(value)


def _check_geometry(config) -> None:
    size, patch = _square(config.image_size, "image_size"), _square(config.patch_size, "patch_size")
    if size % patch:
        raise ComponentError(
            f"vision_encoder/sam-vit: image_size ({size}) must be a multiple of patch_size ({patch})"
        )
    if config.hidden_size % config.num_attention_heads:
        raise ComponentError(
            f"vision_encoder/sam-vit: hidden_size ({config.hidden_size}) must be divisible by num_attention_heads "
            f"({config.num_attention_heads})"
        )
    bad = [i for i in config.global_attn_indexes if not 0 <= i < config.num_hidden_layers]
    if bad:
        raise ComponentError(
            f"vision_encoder/sam-vit: global_attn_indexes {bad} are outside the {config.num_hidden_layers} layers"
        )


def contract_for(config) -> VisionEncoderContract:
    return VisionEncoderContract(
        input_size=_square(config.image_size, "image_size"),
        in_channels=config.num_channels,
        out_channels=config.output_channels,
        stride=_square(config.patch_size, "patch_size"),
    )


class SamViTEncoder(VisionEncoder):
    """pixels (B, 3, image_size, image_size), ImageNet-normalised -> SAM neck output (B, 256, grid, grid)."""

    def __init__(self, vision_encoder: torch.nn.Module):
        super().__init__()
        self.vision_encoder = vision_encoder
        self.image_size = _square(vision_encoder.config.image_size, "image_size")
        self.in_channels = vision_encoder.config.num_channels

    @property
    def config(self):
        return self.vision_encoder.config

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        self.check_pixels(pixels, channels=self.in_channels, size=self.image_size,
                          what=f"SAM ViT encoder configured for image_size={self.image_size}")
        return self.vision_encoder(pixel_values=pixels).last_hidden_state


@contextlib.contextmanager
def _quiet_transformers_load_report():
    # transformers prints a table of every unexpected key; a SamModel checkpoint has hundreds (its prompt encoder
    # and mask decoder), all expected here. Problems are re-checked and reported below instead.
    logger = logging.getLogger("transformers.modeling_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def build_module(opts: SamViTOptions, config) -> tuple[SamViTEncoder, LoadReport | None]:
    from transformers import SamVisionModel
    from transformers.models.sam.modeling_sam import SamVisionEncoder

    if opts.pretrained is None:
        return SamViTEncoder(SamVisionEncoder(config)), None
    local = _is_local(opts.pretrained)
    source = str(Path(opts.pretrained).expanduser()) if local else opts.pretrained
    try:
        with _quiet_transformers_load_report():
            model, info = SamVisionModel.from_pretrained(
                source, config=config, local_files_only=local, dtype=torch.float32, output_loading_info=True,
                ignore_mismatched_sizes=True,  # so the mismatches come back listed instead of as a bare error
            )
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"cannot load SAM vision weights from {opts.pretrained!r}: {e}") from e
    skipped = next(layout.skipped for layout in LAYOUTS if layout.name == "transformers")
    unexpected = sorted(info.get("unexpected_keys") or ())
    problems = {
        "missing": sorted(info.get("missing_keys") or ()),
        "unexpected": [k for k in unexpected if not k.startswith(skipped)],
        "shape mismatch": [str(m) for m in info.get("mismatched_keys") or ()],
    }
    if any(problems.values()):
        detail = "; ".join(
            f"{len(v)} {label}: {', '.join(v[:5])}{f' (+{len(v) - 5} more)' if len(v) > 5 else ''}"
            for label, v in problems.items() if v
        )
        raise CheckpointError(
            f"{opts.pretrained!r} does not hold a SAM vision encoder matching this config ({detail})"
        )
    module = SamViTEncoder(model.vision_encoder)
    report = LoadReport(loaded=list(module.state_dict()), ignored=unexpected)
    log.info("%s: %s", opts.pretrained, report.summary())
    return module, report


# --- checkpoint layouts -----------------------------------------------------------------------------------------

# segment-anything's ImageEncoderViT names -> transformers' SamVisionEncoder names (below 'image_encoder.').
_ORIGINAL_RENAMES = [
    (re.compile(r"^patch_embed\.proj\."), "patch_embed.projection."),
    (re.compile(r"^blocks\.(\d+)\.norm1\."), r"layers.\1.layer_norm1."),
    (re.compile(r"^blocks\.(\d+)\.norm2\."), r"layers.\1.layer_norm2."),
    (re.compile(r"^blocks\.(\d+)\."), r"layers.\1."),
    (re.compile(r"^neck\.0\."), "neck.conv1."),
    (re.compile(r"^neck\.1\."), "neck.layer_norm1."),
    (re.compile(r"^neck\.2\."), "neck.conv2."),
    (re.compile(r"^neck\.3\."), "neck.layer_norm2."),
]

def _rename_original(key: str) -> str:
    for pattern, repl in _ORIGINAL_RENAMES:
        new, n = pattern.subn(repl, key)
        if n:
            return new
    return key


LAYOUTS: tuple[Layout, ...] = (
    # transformers SamModel / SamVisionModel state dicts, and this module's own.
    Layout("transformers", "vision_encoder.", "transformers SamModel / SamVisionModel, or this encoder's own state "
           "dict", prefix="vision_encoder.", add="vision_encoder.",
           skipped=("prompt_encoder.", "mask_decoder.", "shared_image_embedding.")),
    # segment-anything's sam_vit_*.pth: a full SAM state dict with the original module names.
    Layout("segment-anything", "image_encoder.", "segment-anything sam_vit_*.pth", prefix="image_encoder.",
           add="vision_encoder.", rename=_rename_original, skipped=("prompt_encoder.", "mask_decoder.")),
    # A bare SamVisionEncoder state dict.
    Layout("encoder", "patch_embed.projection.", "a bare SamVisionEncoder", add="vision_encoder."),
)
WHAT = "SAM ViT image-encoder"


def detect_layout(keys) -> str:
    return layouts.detect_layout(keys, LAYOUTS, what=WHAT).name


def split_checkpoint(state: Mapping[str, torch.Tensor]) -> SplitCheckpoint:
    """Map ``state`` onto :class:`SamViTEncoder` names; keys of other SAM parts are listed as ignored, unknown
    keys pass through so the strict load refuses them by name."""
    return layouts.split_checkpoint(state, LAYOUTS, what=WHAT)


# --- the component: contract, builder ---------------------------------------------------------------------------

def sam_vit_contract(**options: Any) -> VisionEncoderContract:
    opts = parse_options("vision_encoder/sam-vit", SamViTOptions, options)
    return contract_for(build_config(opts))


def build_sam_vit(**options: Any) -> SamViTEncoder:
    opts = parse_options("vision_encoder/sam-vit", SamViTOptions, options)
    config = build_config(opts)
    module, report = build_module(opts, config)
    module.load_report = report
    module.contract = contract_for(config)
    if opts.checkpoint is not None:
        module.load_report = layouts.load_checkpoint(module, opts.checkpoint, split_checkpoint)
    return module


SPEC = ComponentSpec(
    kind="vision_encoder",
    name="sam-vit",
    build=build_sam_vit,
    contract=sam_vit_contract,
    description="SAM ViT image encoder (transformers SamVisionEncoder, ViT-B by default), 1024x1024 -> 256x64x64; "
                "pretrained= a local directory or Hub id",
)
