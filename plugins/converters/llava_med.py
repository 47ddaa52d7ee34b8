"""Convert a checkpoint in the original LLaVA(-Med v1.5) layout into a transformers ``LlavaForConditionalGeneration``
directory that ``llm/llava`` loads with ``pretrained=DST``.

The original layout (``model_type`` ``llava_mistral``, the ``LlavaMistralForCausalLM`` of the LLaVA code base):

* ``config.json``: a Mistral config plus ``mm_vision_tower`` (a Hub id or path of a CLIP model),
  ``mm_hidden_size``, ``mm_projector_type`` (``mlp2x_gelu``: Linear, GELU, Linear), ``mm_vision_select_layer``
  (-2) and ``mm_vision_select_feature`` (``patch``: CLS dropped);
* weights ``model.embed_tokens.*``, ``model.layers.*``, ``model.norm.*``, ``lm_head.*`` and
  ``model.mm_projector.{0,2}.*`` in one or several ``*.safetensors`` or ``pytorch_model*.bin`` files;
* the CLIP tower in its own directory (CLIPModel or CLIPVisionModel layout, keys under ``vision_model.``), unless
  the checkpoint carries it under ``model.vision_tower.vision_tower.vision_model.``.

What the conversion does: adds ``<image>`` to the tokenizer (id = old vocabulary size, 32000 for LLaVA-Med), grows
``embed_tokens`` and ``lm_head`` by one row initialised to the mean of the existing rows, sets
``image_token_index``, renames keys to transformers 5's Llava layout (``model.language_model.*``,
``model.vision_tower.*``, ``model.multi_modal_projector.linear_{1,2}.*``, ``lm_head.*``) shard by shard, and writes
the tokenizer and a ``LlavaProcessor`` (CLIP preprocessing at the tower's size) beside the weights. Every tensor is
checked against the model the new config describes, so a wrong or partial download fails here, not at load time.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from prsmed.weights import CheckpointError, mismatch_report, read_state_dict, write_state_dict

log = logging.getLogger(__name__)

TEXT_MODEL_TYPES = {"llava_mistral": "mistral", "llava_llama": "llama", "llava": "llama"}
# Fields of the original config that describe the text model; everything else (mm_*, training flags) is dropped.
TEXT_FIELDS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling",
    "sliding_window", "attention_dropout", "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id",
    "tie_word_embeddings", "vocab_size",
)
SELECT_STRATEGY = {"patch": "default", "cls_patch": "full"}
IMAGE_TOKEN = "<image>"
INDEX_FILE = "model.safetensors.index.json"
TOWER_PREFIX_IN_CHECKPOINT = "model.vision_tower.vision_tower."
CLIP_CHECKPOINT = "openai/clip-vit-large-patch14-336"


def convert_llava_med(
    src_dir: str | Path,
    dst_dir: str | Path,
    *,
    vision_tower_dir: str | Path | None = None,
    tokenizer_dir: str | Path | None = None,
) -> Path:
    """Convert ``src_dir`` (original LLaVA-Med v1.5 layout) into ``dst_dir`` and return ``dst_dir``.

    ``vision_tower_dir`` is a local copy of the CLIP tower (``openai/clip-vit-large-patch14-336`` for LLaVA-Med);
    it defaults to ``mm_vision_tower`` from the config when that is an existing directory. ``tokenizer_dir``
    defaults to ``src_dir``. ``dst_dir`` must be new or empty.
    """
    from transformers import CLIPVisionConfig, LlavaConfig

    src, dst = Path(src_dir).expanduser(), Path(dst_dir).expanduser()
    original = _read_original_config(src)
    weight_files = _weight_files(src)
    tower = _tower_dir(original, vision_tower_dir)
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"{dst} is not empty; convert into a new or empty directory")

    vision_config = CLIPVisionConfig.from_pretrained(str(tower), local_files_only=True)
    tokenizer = _load_tokenizer(Path(tokenizer_dir).expanduser() if tokenizer_dir else src)
    old_vocab = int(original["vocab_size"])
    if len(tokenizer) != old_vocab:
        raise CheckpointError(
            f"the tokenizer has {len(tokenizer)} tokens but config.json says vocab_size={old_vocab}; expected the "
            f"tokenizer that came with the checkpoint"
        )
    config = LlavaConfig(
        vision_config=vision_config.to_dict(),
        text_config=_text_config(original, vocab_size=old_vocab + 1),
        image_token_index=old_vocab,
        image_seq_length=_image_tokens(vision_config, original),
        projector_hidden_act="gelu",
        vision_feature_layer=int(original.get("mm_vision_select_layer", -2)),
        vision_feature_select_strategy=SELECT_STRATEGY[original.get("mm_vision_select_feature", "patch")],
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(original.get("tie_word_embeddings", False)),
    )
    expected = _expected_shapes(config)

    dst.mkdir(parents=True, exist_ok=True)
    try:
        # One source file at a time, so a 7B conversion needs about one shard of memory, not the whole model.
        found: dict[str, tuple[int, ...]] = {}
        parts = []
        for i, f in enumerate(weight_files):
            log.info("converting %s (%d of %d)", f.name, i + 1, len(weight_files))
            shard = _convert_language_shard(read_state_dict(f), f, old_vocab)
            parts.append(_write_part(shard, dst, i, found))
        if not any(k.startswith("model.vision_tower.") for k in found):
            parts.append(_write_part(_tower_state(tower), dst, len(weight_files), found))
        _check_against(expected, found, src, tower)
        _finish_shards(parts, dst)
        config.dtype = original.get("torch_dtype", original.get("dtype", "float16"))
        config.save_pretrained(str(dst))
        generation = src / "generation_config.json"
        if generation.is_file():
            shutil.copyfile(generation, dst / "generation_config.json")
        _write_tokenizer_and_processor(tokenizer, tower, vision_config, config, dst)
    except BaseException:
        shutil.rmtree(dst, ignore_errors=True)
        raise
    log.info("converted %s into %s (%d tensors)", src, dst, len(expected))
    return dst


# config ------------------------------------------------------------------------------------------------------------
def _read_original_config(src: Path) -> dict[str, Any]:
    path = src / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{src} has no config.json; expected a LLaVA-Med download (model_type llava_mistral)")
    config = json.loads(path.read_text(encoding="utf-8"))
    if "text_config" in config:
        raise CheckpointError(
            f"{path} is already a transformers Llava config (it has text_config); load it directly with pretrained="
        )
    model_type = config.get("model_type")
    if model_type not in TEXT_MODEL_TYPES:
        raise CheckpointError(
            f"{path} has model_type {model_type!r}; expected one of {sorted(TEXT_MODEL_TYPES)} (the original LLaVA "
            f"layout, e.g. llava_mistral for LLaVA-Med v1.5)"
        )
    projector = config.get("mm_projector_type", "linear")
    if projector != "mlp2x_gelu":
        raise CheckpointError(
            f"{path} has mm_projector_type {projector!r}; only 'mlp2x_gelu' (Linear, GELU, Linear) maps onto "
            f"transformers' Llava projector"
        )
    if config.get("mm_use_im_start_end") or config.get("mm_use_im_patch_token"):
        raise CheckpointError(f"{path} uses image start/end or patch tokens, which this conversion does not support")
    feature = config.get("mm_vision_select_feature", "patch")
    if feature not in SELECT_STRATEGY:
        raise CheckpointError(f"{path} has mm_vision_select_feature {feature!r}; expected 'patch' or 'cls_patch'")
    if "vocab_size" not in config or "hidden_size" not in config:
        raise CheckpointError(f"{path} lacks vocab_size or hidden_size; is it a LLaVA model config?")
    return config


def _text_config(original: dict[str, Any], *, vocab_size: int) -> dict[str, Any]:
    text = {k: original[k] for k in TEXT_FIELDS if k in original}
    text["vocab_size"] = vocab_size
    text["model_type"] = TEXT_MODEL_TYPES[original["model_type"]]
    return text


def _image_tokens(vision_config: Any, original: dict[str, Any]) -> int:
    grid = vision_config.image_size // vision_config.patch_size
    return grid * grid + (1 if original.get("mm_vision_select_feature", "patch") == "cls_patch" else 0)


def _expected_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# weights -----------------------------------------------------------------------------------------------------------
def _weight_files(src: Path) -> list[Path]:
    files = sorted(p for p in src.glob("*.safetensors"))
    if not files:
        files = sorted(p for p in src.glob("pytorch_model*.bin"))
    if not files:
        raise CheckpointError(
            f"{src} holds no weights: expected *.safetensors or pytorch_model*.bin files next to config.json"
        )
    return files


def _tower_dir(original: dict[str, Any], given: str | Path | None) -> Path:
    if given is not None:
        tower = Path(given).expanduser()
        if not (tower / "config.json").is_file():
            raise CheckpointError(f"vision_tower_dir={tower} has no config.json; expected a CLIP model directory")
        return tower
    named = original.get("mm_vision_tower") or original.get("vision_tower")
    if named and (Path(named).expanduser() / "config.json").is_file():
        return Path(named).expanduser()
    raise CheckpointError(
        f"the CLIP tower's config is needed and the checkpoint's config names {named!r}, which is not a local "
        f"directory: download {named or CLIP_CHECKPOINT} (config.json, preprocessor_config.json, model.safetensors "
        f"or pytorch_model.bin) and pass vision_tower_dir=THAT_DIR"
    )


def _rename_language_key(key: str) -> str | None:
    """Original LLaVA key -> transformers 5 Llava key (None: drop it)."""
    if key.endswith("rotary_emb.inv_freq"):
        return None  # a buffer older transformers saved; recomputed from the config
    if key.startswith(TOWER_PREFIX_IN_CHECKPOINT):
        rest = key[len(TOWER_PREFIX_IN_CHECKPOINT):]
        return _rename_tower_key(rest)
    match = re.fullmatch(r"model\.mm_projector\.(0|2)\.(weight|bias)", key)
    if match:
        layer = "linear_1" if match.group(1) == "0" else "linear_2"
        return f"model.multi_modal_projector.{layer}.{match.group(2)}"
    if key.startswith("lm_head."):
        return key
    for part in ("embed_tokens.", "layers.", "norm."):
        if key.startswith("model." + part):
            return "model.language_model." + key[len("model."):]
    raise CheckpointError(f"unexpected key {key!r} in the LLaVA checkpoint; is it a llava_mistral model?")


def _rename_tower_key(key: str) -> str | None:
    if key.startswith("vision_model."):
        key = key[len("vision_model."):]
    elif key.startswith(("text_model.", "visual_projection.", "text_projection.", "logit_scale")):
        return None  # CLIPModel parts LLaVA never uses
    if key.endswith("position_ids"):
        return None  # a non-persistent buffer in current transformers
    return "model.vision_tower." + key


def _grow_rows(weight: torch.Tensor) -> torch.Tensor:
    mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)
    return torch.cat([weight, mean], dim=0)


def _convert_language_shard(state: dict[str, torch.Tensor], source: Path, old_vocab: int) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        new = _rename_language_key(key)
        if new is None:
            continue
        if new in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
            if tensor.shape[0] != old_vocab:
                raise CheckpointError(
                    f"{source}: {key} has {tensor.shape[0]} rows but config.json says vocab_size={old_vocab}"
                )
            tensor = _grow_rows(tensor)
        out[new] = tensor
    return out


def _tower_state(tower: Path) -> dict[str, torch.Tensor]:
    files = sorted(tower.glob("*.safetensors")) or sorted(tower.glob("pytorch_model*.bin"))
    if not files:
        raise CheckpointError(f"{tower} holds no weights: expected model.safetensors or pytorch_model.bin")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        for key, tensor in read_state_dict(f).items():
            new = _rename_tower_key(key)
            if new is not None:
                out[new] = tensor
    return out


def _write_part(
    shard: dict[str, torch.Tensor], dst: Path, number: int, found: dict[str, tuple[int, ...]]
) -> tuple[Path, list[str], int] | None:
    if not shard:
        return None
    duplicated = sorted(set(shard) & set(found))
    if duplicated:
        raise CheckpointError(f"tensor {duplicated[0]} appears in more than one weight file")
    path = dst / f"part-{number:05d}.safetensors"
    write_state_dict(shard, path, metadata={"format": "pt"})
    found.update({k: tuple(v.shape) for k, v in shard.items()})
    return path, list(shard), sum(t.numel() * t.element_size() for t in shard.values())


def _check_against(
    expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], src: Path, tower: Path
) -> None:
    report = mismatch_report(expected, found)
    if report:
        raise CheckpointError(
            f"{src} with the tower in {tower} does not convert into the Llava model the config describes: "
            + report + ". Is the download complete, and is the tower the one the model was trained with?"
        )


def _finish_shards(parts: list[tuple[Path, list[str], int] | None], dst: Path) -> None:
    """Give the parts transformers' shard names and write the index."""
    kept = [p for p in parts if p is not None]
    weight_map: dict[str, str] = {}
    total = 0
    for i, (path, keys, nbytes) in enumerate(kept, start=1):
        name = f"model-{i:05d}-of-{len(kept):05d}.safetensors"
        path.rename(dst / name)
        weight_map.update({k: name for k in keys})
        total += nbytes
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (dst / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


# tokenizer and processor -------------------------------------------------------------------------------------------
def _load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # transformers raises many types here; all mean "cannot read this tokenizer"
        raise CheckpointError(
            f"could not load the tokenizer in {path} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
            f"Reading a SentencePiece tokenizer.model needs the sentencepiece and protobuf packages; alternatively "
            f"put a tokenizer.json of the same vocabulary (LLaVA-Med v1.5 uses Mistral-7B-Instruct-v0.2's) there, "
            f"or pass tokenizer_dir="
        ) from e
    if IMAGE_TOKEN in tokenizer.get_vocab():
        raise CheckpointError(
            f"the tokenizer in {path} already has {IMAGE_TOKEN}; is the checkpoint converted already?"
        )
    return tokenizer


def _write_tokenizer_and_processor(tokenizer: Any, tower: Path, vision_config: Any, config: Any, dst: Path) -> None:
    from transformers import CLIPImageProcessor, LlavaProcessor

    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_id != config.image_token_index:
        raise CheckpointError(
            f"{IMAGE_TOKEN} got id {image_id} in the tokenizer but the model expects {config.image_token_index}"
        )
    if tokenizer.pad_token is None:
        # LLaVA-Med pads with <unk> (id 0).
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    size = int(vision_config.image_size)
    if (tower / "preprocessor_config.json").is_file():
        image_processor = CLIPImageProcessor.from_pretrained(str(tower), local_files_only=True)
    else:
        image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=int(vision_config.patch_size),
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )
    processor.save_pretrained(str(dst))
