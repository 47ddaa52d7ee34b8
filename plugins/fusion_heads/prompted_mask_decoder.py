"""The PRS-Med fusion head: the authors' ``PromptedMaskDecoder``, rebuilt to load their ``mask_decoder.pth``.

Image tokens attend once to the projected LLM hidden states, go through one transformer encoder layer and a small
feed-forward block, are added back onto the image features, and a three-block convolutional head turns them into
one logit map that is bilinearly upsampled to the input resolution.

Parameter names, initialisation and the order of operations follow the authors' module, so their checkpoint loads
strictly and, in eval mode without ``prompt_mask``, the output matches theirs (see docs/fusion_heads.md).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator
from torch import nn

from prsmed.components import FusionHeadContract, module_spec
from prsmed.interfaces import FusionHead


class PromptedMaskDecoderOptions(BaseModel):
    """Options of ``fusion_head/prsmed``; the defaults are the paper's 7B configuration."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt_dim: PositiveInt = 4096
    image_dim: PositiveInt = 256
    hidden_dim: PositiveInt = 512
    cross_heads: PositiveInt = 8
    encoder_heads: PositiveInt = 16
    ffn_dim: PositiveInt = 512
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    upsample: PositiveInt = 16
    checkpoint: str | Path | None = None

    @model_validator(mode="after")
    def _heads_divide_width(self) -> "PromptedMaskDecoderOptions":
        for name in ("cross_heads", "encoder_heads"):
            heads = getattr(self, name)
            if self.image_dim % heads:
                raise ValueError(f"image_dim={self.image_dim} must be divisible by {name}={heads}")
        if self.image_dim < 4:
            raise ValueError(
                f"image_dim must be at least 4 (the conv head narrows to image_dim // 4), got {self.image_dim}"
            )
        return self

    def contract(self) -> FusionHeadContract:
        return FusionHeadContract(image_dim=self.image_dim, prompt_dim=self.prompt_dim, upsample=self.upsample)


class _ResidualFFN(nn.Module):
    """The block after the encoder layer: fc1 with a residual around it, then fc2 and a LayerNorm.

    ``norm1`` is never used; it exists because the authors' checkpoint carries it.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, dim)
        self.fc2 = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=1e-5)
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        # Unused in forward: frozen so optimisers skip it and DDP needs no unused-parameter search.
        self.norm1.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc1(x)) + x
        return self.norm(F.relu(self.fc2(x)))


class _ConvBlock(nn.Module):
    """One block of the conv head: a residual 3x3 conv, then a 1x1 conv with padding 1 (grows the map by 2 on
    each axis) and an unpadded 3x3 conv that shrinks it back, changing the width from ``c_in`` to ``c_out``."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_in, kernel_size=3, padding=1)
        self.bn1 = nn.InstanceNorm2d(c_in, affine=True)
        self.conv2 = nn.Conv2d(c_in, c_out, kernel_size=1, padding=1)
        self.bn2 = nn.InstanceNorm2d(c_out, affine=True)
        self.conv3 = nn.Conv2d(c_out, c_out, kernel_size=3, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x))) + x
        return self.conv3(self.bn2(self.conv2(x)))


class PromptedMaskDecoder(FusionHead):
    """``forward(image_embeddings (B,C,h,w), prompt_embeddings (B,T,D), prompt_mask=None)`` -> logits
    (B, 1, upsample*h, upsample*w).

    Both inputs are cast to float32 first, as the authors do, so a bf16/fp16 LLM can feed a float32 head.
    ``prompt_mask`` (B, T), True on real tokens, hides padding from the cross-attention; a row with no real token
    attends to every position instead (the authors' behaviour), since attending to nothing is undefined.
    """

    def __init__(self, options: PromptedMaskDecoderOptions | None = None) -> None:
        super().__init__()
        o = options or PromptedMaskDecoderOptions()
        self.options = o
        self.contract = o.contract()
        c = o.image_dim
        self.prompt_projection = nn.Sequential(
            nn.Linear(o.prompt_dim, o.hidden_dim),
            nn.LayerNorm(o.hidden_dim, eps=1e-5),
            nn.ReLU(),
            nn.Linear(o.hidden_dim, c),
            nn.LayerNorm(c, eps=1e-5),
            nn.ReLU(),
        )
        self.attn = nn.MultiheadAttention(c, o.cross_heads, batch_first=True)
        self.norm1 = nn.LayerNorm(c, eps=1e-5)
        self.ffn = _ResidualFFN(c)
        self.encoder_layer = nn.TransformerEncoderLayer(
            d_model=c, nhead=o.encoder_heads, dim_feedforward=o.ffn_dim, dropout=o.dropout,
            activation="relu", batch_first=True,
        )
        self.mask_generation = nn.Sequential(_ConvBlock(c, c), _ConvBlock(c, c // 2), _ConvBlock(c // 2, c // 4))
        self.out_dec = nn.Conv2d(c // 4, 1, kernel_size=1)
        self.image_norm = nn.LayerNorm(c, eps=1e-5)
        self.prompt_norm = nn.LayerNorm(c, eps=1e-5)
        self._init_like_authors()

    @torch.no_grad()
    def _init_like_authors(self) -> None:
        # Their biases of 1 (and LayerNorm bias 1 in the projection) shape early training; copying them keeps a run
        # from scratch comparable with theirs. The conv blocks keep PyTorch's defaults, as in theirs.
        for layer in self.prompt_projection:
            if isinstance(layer, nn.Linear):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.ones_(layer.bias)
            elif isinstance(layer, nn.LayerNorm):
                nn.init.ones_(layer.weight)
                nn.init.ones_(layer.bias)
        for mha in (self.attn, self.encoder_layer.self_attn):
            nn.init.xavier_uniform_(mha.in_proj_weight)
            nn.init.xavier_uniform_(mha.out_proj.weight)
            nn.init.ones_(mha.in_proj_bias)
            nn.init.ones_(mha.out_proj.bias)
        for linear in (self.encoder_layer.linear1, self.encoder_layer.linear2, self.ffn.fc1):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.ones_(linear.bias)
        for layer in (self.ffn.fc2, self.out_dec):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(  # type: ignore[override]
        self,
        image_embeddings: torch.Tensor,
        prompt_embeddings: torch.Tensor,
        prompt_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        key_padding_mask = check_inputs(self.contract, image_embeddings, prompt_embeddings, prompt_mask)
        if key_padding_mask is not None:
            # A row of padding only would attend to nothing (NaN); let it see every position instead.
            key_padding_mask = key_padding_mask & ~key_padding_mask.all(dim=1, keepdim=True)
            if not bool(key_padding_mask.any()):
                key_padding_mask = None
        b, c, h, w = image_embeddings.shape
        image = image_embeddings.float()
        prompt = self.prompt_norm(self.prompt_projection(prompt_embeddings.float()))

        tokens = self.image_norm(image.flatten(2).transpose(1, 2))
        # need_weights stays at its default, as in the authors' call, which keeps outputs bit-identical to theirs;
        # need_weights=False takes a fused kernel that saves memory but differs by ~5e-6.
        fused, _ = self.attn(tokens, prompt, prompt, key_padding_mask=key_padding_mask)
        tokens = self.norm1(fused + tokens)
        tokens = self.ffn(self.encoder_layer(tokens))

        fused_map = tokens.transpose(1, 2).reshape(b, c, h, w) + image
        logits = self.out_dec(self.mask_generation(fused_map))
        return F.interpolate(logits, scale_factor=self.contract.upsample, mode="bilinear", align_corners=True)


def check_inputs(
    contract: FusionHeadContract,
    image_embeddings: torch.Tensor,
    prompt_embeddings: torch.Tensor,
    prompt_mask: torch.Tensor | None,
) -> torch.Tensor | None:
    """Check shapes against ``contract`` and turn ``prompt_mask`` (True = real token) into a key-padding mask
    (True = ignore), or None when no mask was given."""
    if image_embeddings.ndim != 4 or image_embeddings.shape[1] != contract.image_dim:
        raise ValueError(
            f"image_embeddings must be (B, {contract.image_dim}, h, w), got {tuple(image_embeddings.shape)}"
        )
    if prompt_embeddings.ndim != 3 or prompt_embeddings.shape[-1] != contract.prompt_dim:
        raise ValueError(
            f"prompt_embeddings must be (B, T, {contract.prompt_dim}), got {tuple(prompt_embeddings.shape)}"
        )
    if prompt_embeddings.shape[0] != image_embeddings.shape[0]:
        raise ValueError(
            f"batch sizes differ: image_embeddings has {image_embeddings.shape[0]}, "
            f"prompt_embeddings has {prompt_embeddings.shape[0]}"
        )
    if prompt_mask is None:
        return None
    if tuple(prompt_mask.shape) != tuple(prompt_embeddings.shape[:2]):
        raise ValueError(
            f"prompt_mask must be (B, T) = {tuple(prompt_embeddings.shape[:2])}, got {tuple(prompt_mask.shape)}"
        )
    return ~prompt_mask.to(device=prompt_embeddings.device, dtype=torch.bool)


# --- the component ------------------------------------------------------------------------------------------------

SPEC = module_spec(
    "fusion_head",
    "prsmed",
    PromptedMaskDecoder,
    PromptedMaskDecoderOptions,
    "PRS-Med's PromptedMaskDecoder: image tokens cross-attend to the LLM states, one encoder layer, conv head, "
    "bilinear x16; loads the authors' mask_decoder.pth",
)
