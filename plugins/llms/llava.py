"""``llm/llava``: transformers' ``LlavaForConditionalGeneration`` (CLIP-style tower + MLP projector + Mistral-style text
model) as the PRS-Med LLM backbone, with LLaVA-Med v1.5's image handling.

Where this differs from the original LLaVA-Med code (``llava_mistral`` + ``tokenizer_image_token``):

* The image sits in ``input_ids`` as ``image_tokens`` copies of a real ``<image>`` token (id = old vocabulary size,
  32000 for LLaVA-Med, 3 for the tiny tokenizer) that transformers replaces by the projected CLIP features; the
  original puts one sentinel id -200 there and splices the features in while re-padding the batch. Both give the
  same sequence to the text model; ours has its length fixed at encode time, so masks and labels line up without
  re-padding. The converted checkpoint has one extra embedding row for ``<image>`` that the image positions never
  read.
* Padding is done once by :meth:`encode` (right for training, left for generation); the original re-pads inside the
  model after splicing. Padding uses the pad id (``<unk>``=0, as LLaVA-Med) and is masked out.
* Position ids count real tokens only (cumsum of the attention mask), which equals the original's arange on a
  right-padded batch and transformers' ``generate`` on a left-padded one.
* Images are padded to a square with the CLIP mean colour, as LLaVA's ``image_aspect_ratio=pad``, then resized
  to the tower's size with PIL bicubic and normalised with the CLIP mean/std (from ``preprocessor_config.json`` when
  the pretrained directory has one). That is CLIPImageProcessor's slow path on a square image.
* Answers are tokenised separately from the prompt and followed by EOS; only those tokens are supervised (the
  authors' training also supervised the question, a known bug).
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict

from prsmed.components import ComponentError, ComponentSpec, LLMContract, parse_options

from .causal_lm import (
    TORCH_DTYPES,
    DType,
    HFBackbone,
    check_pretrained,
    is_local,
    load_checkpoint,
    local_files_only,
    one_source,
)
from .tiny_tokenizer import IMAGE, TINY_TOKENIZER_DIR, VOCAB_SIZE as TINY_VOCAB_SIZE

log = logging.getLogger(__name__)

COMPONENT = "llm/llava"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# PEFT full-matches this against module names: the text model's attention projections only. The CLIP tower's
# ``vision_tower.encoder.layers.N.self_attn.{q,k,v}_proj`` do not match.
LLAVA_LORA_TARGETS = r".*\blanguage_model\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"

MED_7B = "llava-med-v1.5-mistral-7b"
PRESETS: dict[str, dict[str, Any]] = {
    # A few hundred thousand parameters: runs in milliseconds on a CPU, same code path as the 7B model.
    "tiny": {
        "vision_config": {
            "model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "image_size": 96, "patch_size": 8, "projection_dim": 32,
        },
        "text_config": {
            "model_type": "mistral", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": TINY_VOCAB_SIZE,
            "max_position_embeddings": 1024, "rope_theta": 10000.0, "sliding_window": None, "rms_norm_eps": 1e-5,
            "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
        },
        "image_token_index": 3,
        "image_seq_length": 144,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "tie_word_embeddings": False,
    },
    # LLaVA-Med v1.5: Mistral-7B-Instruct-v0.2 text model, CLIP ViT-L/14-336 tower (hidden layer -2, CLS dropped ->
    # 576 tokens), mlp2x_gelu projector 1024 -> 4096 -> 4096, and <image> added as token 32000.
    MED_7B: {
        "vision_config": {
            "model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
            "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336, "patch_size": 14,
            "projection_dim": 768, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
        },
        "text_config": {
            "model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32001,
            "max_position_embeddings": 32768, "rope_theta": 1000000.0, "sliding_window": None,
            "rms_norm_eps": 1e-5, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2,
            "tie_word_embeddings": False,
        },
        "image_token_index": 32000,
        "image_seq_length": 576,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "tie_word_embeddings": False,
    },
}

GET_LLAVA_MED = (
    "download microsoft/llava-med-v1.5-mistral-7b (config.json, the model*.safetensors or pytorch_model*.bin "
    "shards, tokenizer.model, tokenizer_config.json, special_tokens_map.json) and openai/clip-vit-large-patch14-336 "
    "(config.json, preprocessor_config.json, model.safetensors or pytorch_model.bin), convert them with "
    "`prsmed convert llava-med SRC DST` (Python: prsmed_plugins.converters.llava_med.convert_llava_med(SRC, DST, "
    "vision_tower_dir=CLIP_DIR)), then pass pretrained=DST"
)


class LlavaOptions(BaseModel):
    """Options of ``llm/llava``."""

    model_config = ConfigDict(extra="forbid")

    pretrained: str | None = None
    config: dict[str, Any] | None = None
    preset: Literal["tiny", "llava-med-v1.5-mistral-7b"] | None = None
    # Changes to the preset's text model (``{"hidden_size": 256, "num_hidden_layers": 4}``): another shape of the
    # same family without restating the whole config; the planner's calibration uses it for a wider tiny model.
    text_config: dict[str, Any] | None = None
    dtype: DType = "float32"
    checkpoint: str | None = None
    tokenizer: str | None = None


def _options(options: dict[str, Any]) -> LlavaOptions:
    opts = parse_options(COMPONENT, LlavaOptions, options)
    if one_source(COMPONENT, pretrained=opts.pretrained, config=opts.config, preset=opts.preset) is None:
        opts = opts.model_copy(update={"preset": "tiny"})
    if opts.text_config and opts.preset is None:
        raise ComponentError(f"{COMPONENT}: text_config= changes a preset's text model; with pretrained= or config= "
                             "it would be ignored (put the change in config= instead)")
    return opts


def _check_pretrained_dir(path: str) -> None:
    root = Path(path).expanduser()
    config_file = root / "config.json"
    if not config_file.is_file():
        raise ComponentError(f"{COMPONENT}: pretrained={path!r} has no config.json; to use LLaVA-Med, {GET_LLAVA_MED}")
    try:
        model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    except (OSError, json.JSONDecodeError) as e:
        raise ComponentError(f"{COMPONENT}: {config_file} is not readable JSON ({e})") from e
    if model_type != "llava":
        hint = (
            "it is in the original LLaVA layout; " + GET_LLAVA_MED
            if model_type in ("llava_mistral", "llava_llama", "llava_mpt", "llava_mixtral")
            else "expected a transformers LlavaForConditionalGeneration directory"
        )
        raise ComponentError(f"{COMPONENT}: {config_file} has model_type {model_type!r}, not 'llava': {hint}")


def llava_config(opts: LlavaOptions):
    """The transformers ``LlavaConfig`` the options describe (reads at most a config.json, never weights)."""
    from transformers import LlavaConfig

    if opts.pretrained is not None:
        check_pretrained(COMPONENT, opts.pretrained)
        if is_local(opts.pretrained):
            _check_pretrained_dir(opts.pretrained)
        try:
            return LlavaConfig.from_pretrained(opts.pretrained, local_files_only=local_files_only(opts.pretrained))
        except (OSError, ValueError) as e:
            raise ComponentError(
                f"{COMPONENT}: cannot read a Llava config from pretrained={opts.pretrained!r} "
                f"({str(e).splitlines()[0]}); to use LLaVA-Med, {GET_LLAVA_MED}"
            ) from e
    raw = copy.deepcopy(PRESETS[opts.preset] if opts.preset is not None else opts.config or {})
    if opts.text_config:
        raw["text_config"] = {**raw.get("text_config", {}), **opts.text_config}
    try:
        return LlavaConfig(**raw)
    except (ValueError, TypeError, KeyError) as e:
        raise ComponentError(f"{COMPONENT}: invalid config ({e})") from e


def image_token_count(config: Any) -> int:
    vision = config.vision_config
    grid = int(vision.image_size) // int(vision.patch_size)
    return grid * grid + (1 if config.vision_feature_select_strategy == "full" else 0)


def _contract_from(config: Any, dtype: str) -> LLMContract:
    return LLMContract(
        dtype=dtype,
        hidden_size=int(config.text_config.hidden_size),
        vocab_size=int(config.text_config.vocab_size),
        image_size=int(config.vision_config.image_size),
        image_tokens=image_token_count(config),
    )


def llava_contract(**options: Any) -> LLMContract:
    opts = _options(options)
    return _contract_from(llava_config(opts), opts.dtype)


def _image_stats(pretrained: str | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if pretrained is not None and is_local(pretrained):
        for name in ("preprocessor_config.json", "processor_config.json"):
            path = Path(pretrained).expanduser() / name
            if path.is_file():
                data = json.loads(path.read_text(encoding="utf-8"))
                data = data.get("image_processor", data)
                if "image_mean" in data and "image_std" in data:
                    return tuple(data["image_mean"]), tuple(data["image_std"])
    return CLIP_MEAN, CLIP_STD


def build_llava(**options: Any) -> "LlavaBackbone":
    from transformers import LlavaForConditionalGeneration

    opts = _options(options)
    config = llava_config(opts)
    contract = _contract_from(config, opts.dtype)
    dtype = TORCH_DTYPES[opts.dtype]
    if opts.pretrained is not None:
        try:
            model = LlavaForConditionalGeneration.from_pretrained(
                opts.pretrained, dtype=dtype, local_files_only=local_files_only(opts.pretrained)
            )
        except OSError as e:
            raise ComponentError(
                f"{COMPONENT}: cannot load the weights in pretrained={opts.pretrained!r} ({str(e).splitlines()[0]}); "
                f"to use LLaVA-Med, {GET_LLAVA_MED}"
            ) from e
    else:
        if opts.preset == MED_7B and opts.checkpoint is None and not _on_meta():
            log.warning("%s: building preset %s with random weights (no pretrained= or checkpoint=)", COMPONENT, MED_7B)
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype)

    if opts.tokenizer is not None:
        tokenizer_path: str | None = opts.tokenizer
    elif opts.pretrained is not None:
        tokenizer_path = opts.pretrained
    elif opts.preset == "tiny":
        tokenizer_path = str(TINY_TOKENIZER_DIR)
    else:
        tokenizer_path = None
    if opts.preset == MED_7B:
        missing = f"{COMPONENT} preset {MED_7B!r} ships no tokenizer or weights: {GET_LLAVA_MED} (or tokenizer=DST)"
    else:
        missing = f"{COMPONENT} built from config=... has no tokenizer: pass tokenizer=PATH (e.g. {TINY_TOKENIZER_DIR})"
    mean, std = _image_stats(opts.pretrained)
    backbone = LlavaBackbone(
        model, contract, tokenizer_path=tokenizer_path, missing_tokenizer=missing, image_mean=mean, image_std=std
    )
    load_checkpoint(backbone, opts.checkpoint)
    return backbone


def _on_meta() -> bool:
    return torch.empty(0).device.type == "meta"


def pad_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def _as_pil(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        array = image
        if array.dtype != np.uint8:
            raise TypeError(f"numpy images must be uint8 (H, W[, 3]); got dtype {array.dtype}")
        return Image.fromarray(array).convert("RGB")
    raise TypeError(f"images must be PIL images or uint8 numpy arrays; got {type(image).__name__}")


class LlavaBackbone(HFBackbone):
    """LLaVA (CLIP tower + projector + text model) behind the PRS-Med LLM interface."""

    lora_target_modules = LLAVA_LORA_TARGETS

    def __init__(
        self,
        model: torch.nn.Module,
        contract: LLMContract,
        *,
        tokenizer_path: str | None,
        missing_tokenizer: str,
        image_mean: Sequence[float] = CLIP_MEAN,
        image_std: Sequence[float] = CLIP_STD,
    ) -> None:
        super().__init__(model, contract, tokenizer_path=tokenizer_path, missing_tokenizer=missing_tokenizer)
        self.image_mean = tuple(float(m) for m in image_mean)
        self.image_std = tuple(float(s) for s in image_std)

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_index)

    def _load_tokenizer(self):
        tok = super()._load_tokenizer()
        image_id = tok.convert_tokens_to_ids(IMAGE)
        if image_id is not None and image_id != tok.unk_token_id and image_id != self.image_token_id:
            raise ComponentError(
                f"the tokenizer at {self._tokenizer_path} maps {IMAGE} to id {image_id} but the model's "
                f"image_token_index is {self.image_token_id}; they must agree"
            )
        return tok

    def _image_ids(self) -> list[int]:
        return [self.image_token_id] * self.contract.image_tokens

    def preprocess_images(self, images: Sequence[Any]) -> torch.Tensor:
        """LLaVA "pad" preprocessing: (B, 3, S, S) float32 at the tower's size, CLIP-normalised."""
        size = self.contract.image_size
        fill = tuple(int(m * 255) for m in self.image_mean)
        mean = torch.tensor(self.image_mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.image_std, dtype=torch.float32).view(3, 1, 1)
        batch = []
        for image in images:
            square = pad_to_square(_as_pil(image), fill).resize((size, size), Image.Resampling.BICUBIC)
            pixels = torch.from_numpy(np.asarray(square, dtype=np.float32) / 255.0).permute(2, 0, 1)
            batch.append((pixels - mean) / std)
        return torch.stack(batch)

    def image_path(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        llava = self.model.base_model  # transformers LlavaModel
        return llava.vision_tower, llava.multi_modal_projector

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        feats = self.model.base_model.get_image_features(pixel_values=pixels.to(self._pixel_dtype())).pooler_output
        return torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats

    def _pixel_dtype(self) -> torch.dtype:
        return next(self.model.base_model.vision_tower.parameters()).dtype


SPEC = ComponentSpec(
    kind="llm",
    name="llava",
    build=build_llava,
    contract=llava_contract,
    description=(
        "LLaVA (CLIP tower + MLP projector + Mistral-style text model) via transformers; presets 'tiny' "
        "(default, shipped tokenizer) and 'llava-med-v1.5-mistral-7b' (LLaVA-Med v1.5, weights via "
        "`prsmed convert llava-med`); options: pretrained, config, preset, text_config, dtype, checkpoint, tokenizer"
    ),
)
