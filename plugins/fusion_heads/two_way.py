"""A SAM-style two-way transformer fusion head (``fusion_head/two-way``).

Where the PRS-Med head lets every image token read the prompt once and then decodes with convolutions, this head
follows the mask decoder of Segment Anything (Kirillov et al., 2023, section 3 and appendix A): a learned mask
token joins the projected prompt tokens, and a few two-way blocks update the tokens from the image and the image
from the tokens. The image features are then upscaled 4x with transposed convolutions, and the mask is the dot
product of every upscaled pixel with a vector that a small MLP (a "hypernetwork") computes from the mask token.
A final bilinear resize brings the mask to ``upsample`` times the feature grid.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, PositiveInt, model_validator
from torch import nn

from prsmed.components import FusionHeadContract, module_spec
from prsmed.interfaces import FusionHead
from prsmed_plugins.fusion_heads.prompted_mask_decoder import check_inputs


class TwoWayOptions(BaseModel):
    """Options of ``fusion_head/two-way``; the defaults follow SAM's decoder (width 256, depth 2, 8 heads, MLP 2048)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt_dim: PositiveInt = 4096
    image_dim: PositiveInt = 256
    depth: PositiveInt = 2
    heads: PositiveInt = 8
    mlp_dim: PositiveInt = 2048
    upsample: PositiveInt = 16
    checkpoint: str | Path | None = None

    @model_validator(mode="after")
    def _widths_fit(self) -> "TwoWayOptions":
        # Cross-attention runs at half width (as in SAM) and the upscaler narrows to image_dim // 8.
        if self.image_dim % 8:
            raise ValueError(f"image_dim must be divisible by 8, got {self.image_dim}")
        if (self.image_dim // 2) % self.heads:
            raise ValueError(
                f"image_dim // 2 = {self.image_dim // 2} (the cross-attention width) must be divisible by "
                f"heads={self.heads}"
            )
        return self

    def contract(self) -> FusionHeadContract:
        return FusionHeadContract(image_dim=self.image_dim, prompt_dim=self.prompt_dim, upsample=self.upsample)


class _Attention(nn.Module):
    """Multi-head attention whose inner width may be smaller than the model width (SAM's downsampled
    cross-attention saves compute on the many image tokens)."""

    def __init__(self, dim: int, heads: int, inner_dim: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, inner_dim)
        self.k_proj = nn.Linear(dim, inner_dim)
        self.v_proj = nn.Linear(dim, inner_dim)
        self.out_proj = nn.Linear(inner_dim, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.reshape(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``key_keep`` (B, Nk) bool, True where a key may be attended."""
        mask = None if key_keep is None else key_keep[:, None, None, :]
        out = F.scaled_dot_product_attention(
            self._split(self.q_proj(q)), self._split(self.k_proj(k)), self._split(self.v_proj(v)), attn_mask=mask
        )
        b, _, n, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, -1))


class _TwoWayBlock(nn.Module):
    """Tokens self-attend, read the image, pass an MLP; then the image reads the tokens. Positional encodings are
    added to queries and keys at every attention (not to values), so positions steer attention without being
    written into the features. Post-norm after each step, as in SAM."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, first: bool) -> None:
        super().__init__()
        # The first block's tokens are their own positional encoding, so adding it again would double them.
        self.first = first
        self.self_attn = _Attention(dim, heads, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.token_to_image = _Attention(dim, heads, dim // 2)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.ReLU(), nn.Linear(mlp_dim, dim))
        self.norm3 = nn.LayerNorm(dim)
        self.image_to_token = _Attention(dim, heads, dim // 2)
        self.norm4 = nn.LayerNorm(dim)

    def forward(
        self,
        tokens: torch.Tensor,
        image: torch.Tensor,
        token_pe: torch.Tensor,
        image_pe: torch.Tensor,
        token_keep: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.first:
            tokens = self.self_attn(tokens, tokens, tokens, token_keep)
        else:
            q = tokens + token_pe
            tokens = tokens + self.self_attn(q, q, tokens, token_keep)
        tokens = self.norm1(tokens)

        tokens = self.norm2(tokens + self.token_to_image(tokens + token_pe, image + image_pe, image))
        tokens = self.norm3(tokens + self.mlp(tokens))

        image = self.norm4(image + self.image_to_token(image + image_pe, tokens + token_pe, tokens, token_keep))
        return tokens, image


class _LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a (B, C, H, W) map."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def sine_position_encoding(h: int, w: int, dim: int, *, device=None, dtype=None) -> torch.Tensor:
    """Fixed 2-D sine/cosine encoding (B=1, h*w, dim): half the channels encode the row, half the column.

    Computed from the grid size rather than stored, so the head works at any feature resolution and holds no
    buffer that a checkpoint would have to carry.
    """
    quarter = dim // 4
    freqs = torch.exp(-math.log(10000.0) * torch.arange(quarter, device=device, dtype=torch.float32) / quarter)
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h * (2 * math.pi)
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w * (2 * math.pi)
    y = ys[:, None] * freqs[None, :]
    x = xs[:, None] * freqs[None, :]
    y_enc = torch.cat([y.sin(), y.cos()], dim=-1)[:, None, :].expand(h, w, 2 * quarter)
    x_enc = torch.cat([x.sin(), x.cos()], dim=-1)[None, :, :].expand(h, w, 2 * quarter)
    return torch.cat([y_enc, x_enc], dim=-1).reshape(1, h * w, 4 * quarter).to(dtype)


class TwoWayFusionHead(FusionHead):
    """``forward(image_embeddings (B,C,h,w), prompt_embeddings (B,T,D), prompt_mask=None)`` -> logits
    (B, 1, upsample*h, upsample*w).

    Inputs are cast to the head's parameter dtype. ``prompt_mask`` (B, T), True on real tokens, hides padding from
    every attention; the mask token is always visible, so no row is ever left with nothing to attend to.
    """

    def __init__(self, options: TwoWayOptions | None = None) -> None:
        super().__init__()
        o = options or TwoWayOptions()
        self.options = o
        self.contract = o.contract()
        c = o.image_dim
        # LLM hidden states have a few very large channels; the LayerNorm puts the projected tokens on the scale of
        # the image features.
        self.prompt_proj = nn.Sequential(nn.Linear(o.prompt_dim, c), nn.LayerNorm(c))
        self.mask_token = nn.Parameter(torch.empty(1, 1, c))
        self.blocks = nn.ModuleList(_TwoWayBlock(c, o.heads, o.mlp_dim, first=i == 0) for i in range(o.depth))
        self.final_attn = _Attention(c, o.heads, c // 2)
        self.final_norm = nn.LayerNorm(c)
        self.upscale = nn.Sequential(
            nn.ConvTranspose2d(c, c // 4, kernel_size=2, stride=2),
            _LayerNorm2d(c // 4),
            nn.GELU(),
            nn.ConvTranspose2d(c // 4, c // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.hypernet = nn.Sequential(nn.Linear(c, c), nn.ReLU(), nn.Linear(c, c), nn.ReLU(), nn.Linear(c, c // 8))
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(  # type: ignore[override]
        self,
        image_embeddings: torch.Tensor,
        prompt_embeddings: torch.Tensor,
        prompt_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        padding = check_inputs(self.contract, image_embeddings, prompt_embeddings, prompt_mask)
        dtype = self.mask_token.dtype
        b, c, h, w = image_embeddings.shape
        image_map = image_embeddings.to(dtype)
        prompt = self.prompt_proj(prompt_embeddings.to(dtype))

        tokens = torch.cat([self.mask_token.expand(b, -1, -1), prompt], dim=1)
        token_pe = tokens
        token_keep = None
        if padding is not None:
            token_keep = torch.cat([padding.new_ones(b, 1), ~padding], dim=1)
        image = image_map.flatten(2).transpose(1, 2)
        image_pe = sine_position_encoding(h, w, c, device=image.device, dtype=dtype)

        for block in self.blocks:
            tokens, image = block(tokens, image, token_pe, image_pe, token_keep)
        tokens = self.final_norm(tokens + self.final_attn(tokens + token_pe, image + image_pe, image))

        upscaled = self.upscale(image.transpose(1, 2).reshape(b, c, h, w))  # (B, C/8, 4h, 4w)
        weights = self.hypernet(tokens[:, 0])  # (B, C/8)
        logits = torch.einsum("bc,bchw->bhw", weights, upscaled)[:, None]
        size = (h * self.contract.upsample, w * self.contract.upsample)
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


# --- the component ------------------------------------------------------------------------------------------------

SPEC = module_spec(
    "fusion_head",
    "two-way",
    TwoWayFusionHead,
    TwoWayOptions,
    "SAM-style two-way transformer with a learned mask token and a hypernetwork mask, bilinear to x16",
)
