"""``vision_encoder/tinysam``: TinyViT with the SAM neck, the image encoder of TinySAM / MobileSAM (``vit_t``): the
module, its checkpoint layouts, and the component's options, contract and builder.

The module tree reproduces the official parameter names exactly (``patch_embed.seq.0.c.weight``,
``layers.1.blocks.0.attn.attention_biases``, ``neck.3.bias`` ...), so the official ``image_encoder.*`` tensors load
strictly once their prefix is stripped, and a state dict saved from here loads into the official code.

Two deliberate departures from the official code, neither of which changes the numbers for its weights:

* the output grid is derived from the configured ``img_size`` (the official code hard-codes 64x64), so reduced
  variants work; an input of any other size is refused;
* the attention bias table is gathered on every forward pass. The official attention caches that gather when
  ``eval()`` is called, and its builder calls ``eval()`` *before* loading the weights, so the cache keeps the
  initial (zero) biases until the module is switched to train and back.

The ImageNet classifier (``norm_head``, ``head``) is kept, unused and frozen, because the official checkpoints hold
it: keeping it makes loading strict in both directions at the cost of 0.32M idle parameters at the default widths.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from prsmed import checkpoint_layouts as layouts
from prsmed.checkpoint_layouts import Layout, SplitCheckpoint
from prsmed.components import ComponentSpec, VisionEncoderContract, parse_options
from prsmed.interfaces import VisionEncoder
from prsmed.weights import CheckpointError

#: Total downsampling from pixels to the output grid: 4 in the patch embedding, 2 in each of the first two
#: patch-merging steps; the last merge keeps the resolution.
STRIDE = 16
IMAGENET_CLASSES = 1000


class ConvBN(nn.Sequential):
    """Conv (no bias) then BatchNorm; the children are named ``c`` and ``bn`` as in the official checkpoints."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1, bn_weight: float = 1.0):
        super().__init__()
        self.c = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        nn.init.constant_(self.bn.weight, bn_weight)
        nn.init.zeros_(self.bn.bias)


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of an NCHW tensor (SAM's neck norm, eps 1e-6)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) * torch.rsqrt(var + self.eps)
        return x * self.weight[:, None, None] + self.bias[:, None, None]


class PatchEmbed(nn.Module):
    """Two stride-2 3x3 Conv-BN layers: pixels -> (B, dim, S/4, S/4)."""

    def __init__(self, in_channels: int, dim: int):
        super().__init__()
        self.seq = nn.Sequential(ConvBN(in_channels, dim // 2, 3, 2), nn.GELU(), ConvBN(dim // 2, dim, 3, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual block of the convolutional first stage (NCHW in and out)."""

    def __init__(self, dim: int, expand_ratio: float):
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = ConvBN(dim, hidden, 1)
        self.conv2 = ConvBN(hidden, hidden, 3, groups=hidden)
        # Zero-initialised last BN: each block starts as the identity (before the final GELU).
        self.conv3 = ConvBN(hidden, dim, 1, bn_weight=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.gelu(self.conv1(x))
        y = F.gelu(self.conv2(y))
        return F.gelu(x + self.conv3(y))


class PatchMerging(nn.Module):
    """Pointwise, strided depthwise, pointwise: (B, dim, H, W) -> (B, out_dim, H/stride, W/stride)."""

    def __init__(self, dim: int, out_dim: int, stride: int):
        super().__init__()
        self.conv1 = ConvBN(dim, out_dim, 1)
        self.conv2 = ConvBN(out_dim, out_dim, 3, stride, groups=out_dim)
        self.conv3 = ConvBN(out_dim, out_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.conv1(x))
        x = F.gelu(self.conv2(x))
        return self.conv3(x)


def relative_offset_index(window: int) -> torch.Tensor:
    """(N, N) index into a table of ``window*window`` biases, N = window*window tokens in row-major order.

    Tokens (r1, c1) and (r2, c2) share a bias when |r1-r2| and |c1-c2| are equal; offset (dr, dc) is entry
    ``dr * window + dc``, the order in which the official code first meets each offset.
    """
    token = torch.arange(window * window)
    rows, cols = token // window, token % window
    return (rows[:, None] - rows[None, :]).abs() * window + (cols[:, None] - cols[None, :]).abs()


class Attention(nn.Module):
    """Multi-head self-attention inside one window, with a learned bias per head and relative offset."""

    def __init__(self, dim: int, num_heads: int, window: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window * window))
        # Derived from the window size alone, so it is not part of any checkpoint.
        self.register_buffer("attention_bias_idxs", relative_offset_index(window), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, C), N = window*window
        b, n, c = x.shape
        # The checkpoints lay out qkv per head: [q | k | v] for head 0, then head 1, ...
        qkv = self.qkv(self.norm(x)).view(b, n, self.num_heads, 3, self.head_dim)
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)
        # Gathered on every call: a cached copy goes stale whenever new weights are loaded.
        bias = self.attention_biases[:, self.attention_bias_idxs].to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class TinyViTBlock(nn.Module):
    """Windowed attention, a depthwise local conv, then an MLP; channels-last (B, H, W, C) in and out."""

    def __init__(self, dim: int, num_heads: int, window: int, mlp_ratio: float, local_conv: int):
        super().__init__()
        self.window = window
        self.attn = Attention(dim, num_heads, window)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.local_conv = ConvBN(dim, dim, local_conv, groups=dim)

    def windowed_attention(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        ws = self.window
        pad_b, pad_r = (-h) % ws, (-w) % ws
        # Zero padding is attended to (not masked), as in the official code; the weights were trained that way.
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        hp, wp = h + pad_b, w + pad_r
        windows = x.reshape(b, hp // ws, ws, wp // ws, ws, c).transpose(2, 3).reshape(-1, ws * ws, c)
        windows = self.attn(windows)
        x = windows.reshape(b, hp // ws, wp // ws, ws, ws, c).transpose(2, 3).reshape(b, hp, wp, c)
        return x[:, :h, :w]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.windowed_attention(x)
        x = self.local_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.mlp(x)


class ConvStage(nn.Module):
    def __init__(self, dim: int, depth: int, expand_ratio: float, downsample: PatchMerging):
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, expand_ratio) for _ in range(depth))
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x)


class AttentionStage(nn.Module):
    def __init__(self, dim: int, depth: int, num_heads: int, window: int, mlp_ratio: float, local_conv: int,
                 downsample: PatchMerging | None):
        super().__init__()
        self.blocks = nn.ModuleList(
            TinyViTBlock(dim, num_heads, window, mlp_ratio, local_conv) for _ in range(depth)
        )
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # NCHW in and out
        x = x.permute(0, 2, 3, 1)
        for block in self.blocks:
            x = block(x)
        x = x.permute(0, 3, 1, 2)
        return x if self.downsample is None else self.downsample(x)


class TinySAMEncoder(VisionEncoder):
    """pixels (B, 3, img_size, img_size), ImageNet-normalised -> (B, out_channels, img_size/16, img_size/16)."""

    def __init__(
        self,
        img_size: int = 1024,
        embed_dims: Sequence[int] = (64, 128, 160, 320),
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (2, 4, 5, 10),
        window_sizes: Sequence[int] = (7, 7, 14, 7),
        mlp_ratio: float = 4.0,
        out_channels: int = 256,
        mbconv_expand_ratio: float = 4.0,
        local_conv_size: int = 3,
        in_channels: int = 3,
    ):
        super().__init__()
        if len({len(embed_dims), len(depths), len(num_heads), len(window_sizes)}) != 1 or len(depths) != 4:
            raise ValueError(
                "TinySAMEncoder has four stages: embed_dims, depths, num_heads and window_sizes need 4 entries each, "
                f"got {list(embed_dims)}, {list(depths)}, {list(num_heads)}, {list(window_sizes)}"
            )
        self.img_size = img_size
        self.in_channels = in_channels
        dims = list(embed_dims)
        self.patch_embed = PatchEmbed(in_channels, dims[0])
        first = ConvStage(dims[0], depths[0], mbconv_expand_ratio, PatchMerging(dims[0], dims[1], 2))
        self.layers = nn.ModuleList([first])
        for i in range(1, 4):
            # The official code keeps the resolution in the last merge (it keys that on out_dim in {320, 448, 576},
            # which is the last merge for every published TinyViT); keying it on the position keeps stride 16
            # for any widths.
            merge = None if i == 3 else PatchMerging(dims[i], dims[i + 1], 2 if i < 2 else 1)
            self.layers.append(
                AttentionStage(dims[i], depths[i], num_heads[i], window_sizes[i], mlp_ratio, local_conv_size, merge)
            )
        self.norm_head = nn.LayerNorm(dims[-1])
        self.head = nn.Linear(dims[-1], IMAGENET_CLASSES)
        self.apply(_init_weights)
        self.norm_head.requires_grad_(False)
        self.head.requires_grad_(False)
        self.neck = nn.Sequential(
            nn.Conv2d(dims[-1], out_channels, 1, bias=False),
            LayerNorm2d(out_channels),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            LayerNorm2d(out_channels),
        )

    @property
    def grid(self) -> int:
        return self.img_size // STRIDE

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        self.check_pixels(pixels, channels=self.in_channels, size=self.img_size,
                          what=f"TinySAM encoder configured for img_size={self.img_size}")
        x = self.patch_embed(pixels)
        for layer in self.layers:
            x = layer(x)
        return self.neck(x)


def _init_weights(m: nn.Module) -> None:
    # The official recipe: truncated-normal linear weights, zero biases, unit LayerNorms; convs keep torch's default.
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# --- checkpoint layouts -----------------------------------------------------------------------------------------

# Most specific first: the authors' file also holds the 'image_encoder.' keys of the "sam" layout.
LAYOUTS: tuple[Layout, ...] = (
    # PRS-Med authors' image_encoder.pth: the wrapper registers the encoder twice, as sam.image_encoder and as
    # image_encoder; the second copy is checked to be identical and skipped.
    Layout("prsmed-authors", "sam.image_encoder.", "PRS-Med image_encoder.pth", prefix="sam.image_encoder.",
           skipped=("sam.prompt_encoder.", "sam.mask_decoder.", "image_encoder.")),
    # Official tinysam_42.3.pth (and MobileSAM's mobile_sam.pt): a full SAM state dict.
    Layout("sam", "image_encoder.", "official TinySAM/MobileSAM SAM state dict", prefix="image_encoder.",
           skipped=("prompt_encoder.", "mask_decoder.")),
    # A state dict of this module, e.g. our own safetensors.
    Layout("module", "patch_embed.", "this encoder's own state dict"),
)
WHAT = "TinySAM image-encoder"


def detect_layout(keys: Sequence[str] | Mapping[str, object]) -> str:
    """Name the layout of a TinySAM checkpoint from its keys: ``prsmed-authors``, ``sam`` or ``module``."""
    return layouts.detect_layout(keys, LAYOUTS, what=WHAT).name


def split_checkpoint(state: Mapping[str, torch.Tensor], *, source: str = "checkpoint") -> SplitCheckpoint:
    """Keep the encoder tensors of ``state`` under this module's names and list the ones that were skipped
    (prsmed.checkpoint_layouts); the authors' two copies of the encoder must agree."""
    state = layouts.unwrapped(state)
    split = layouts.split_checkpoint(state, LAYOUTS, what=WHAT)
    if split.layout == "prsmed-authors":
        _check_duplicate(state, split.state, source)
    return split


def _check_duplicate(state: Mapping[str, torch.Tensor], kept: Mapping[str, torch.Tensor], source: str) -> None:
    differing = [
        k for k, v in kept.items()
        if f"image_encoder.{k}" in state
        and (state[f"image_encoder.{k}"].shape != v.shape or not torch.equal(state[f"image_encoder.{k}"], v))
    ]
    if differing:
        raise CheckpointError(
            f"{source} holds two image encoders that differ ('sam.image_encoder.*' and 'image_encoder.*' should be "
            f"the same tensors registered twice; {len(differing)} differ, e.g. {differing[0]}); refusing to guess "
            "which one is meant"
        )


def contract_for(img_size: int, out_channels: int) -> VisionEncoderContract:
    return VisionEncoderContract(input_size=img_size, out_channels=out_channels, stride=STRIDE)


# --- the component: options, contract, builder ---------------------------------------------------------------

Positive = Annotated[int, Field(gt=0)]
Four = tuple[Positive, Positive, Positive, Positive]


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
        if self.img_size % STRIDE:
            raise ValueError(f"img_size must be a multiple of {STRIDE}, got {self.img_size}")
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
    return contract_for(opts.img_size, opts.out_channels)


def build_tinysam(**options: Any) -> TinySAMEncoder:
    opts = parse_options("vision_encoder/tinysam", TinySAMOptions, options)
    module = TinySAMEncoder(
        img_size=opts.img_size,
        embed_dims=opts.embed_dims,
        depths=opts.depths,
        num_heads=opts.num_heads,
        window_sizes=opts.window_sizes,
        mlp_ratio=opts.mlp_ratio,
        out_channels=opts.out_channels,
    )
    module.contract = contract_for(opts.img_size, opts.out_channels)
    module.load_report = None
    if opts.checkpoint is not None:
        module.load_report = layouts.load_checkpoint(
            module, opts.checkpoint, lambda state: split_checkpoint(state, source=str(opts.checkpoint)))
    return module


SPEC = ComponentSpec(
    kind="vision_encoder",
    name="tinysam",
    build=build_tinysam,
    contract=tinysam_contract,
    description="TinySAM vit_t image encoder (TinyViT-5M + SAM neck), 1024x1024 -> 256x64x64; loads "
                "tinysam_42.3.pth, PRS-Med image_encoder.pth or safetensors",
)
