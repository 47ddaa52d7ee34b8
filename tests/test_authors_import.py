"""``prsmed convert prsmed-authors``: a folder built here in exactly the authors' key layout (PRSMED.md 9.3), at
small widths (the paper's architecture: TinySAM, LLaVA, the PRS-Med head, LoRA r16 on q, k, v, o), becomes a bundle
that loads into the model and reproduces its weights; keys that map nowhere, other shapes and another LoRA
configuration are refused by name; and every key of the full 7B layout maps (on the meta device)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft.utils import get_peft_model_state_dict
from typer.testing import CliRunner

from prsmed.cli import app
from prsmed.model.bundle import load_bundle
from prsmed.model.spec import LoraSpec, TrainSpec
from prsmed.zoo import build_model
from prsmed.zoo import get_preset
from prsmed_plugins.converters.prsmed_authors import ImportRefused, convert_prsmed_authors, map_lora_keys

LORA_CONFIG = {"peft_type": "LORA", "r": 16, "lora_alpha": 16, "lora_dropout": 0.05,
               "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "task_type": "CAUSAL_LM",
               "base_model_name_or_path": "/home/authors/checkpoints/llava-med-v1.5-mistral-7b"}


def small_spec():
    """The paper's architecture at prsmed-tiny's widths, trained the paper's way (no tower, no output layer)."""
    base = get_preset("prsmed-tiny").spec
    return base.model_copy(update={"name": "authors-small", "train": TrainSpec(),
                                   "lora": LoraSpec(r=16, alpha=16, dropout=0.05)}, deep=True)


def authors_lora_key(ours: str) -> str:
    """Our PEFT key (..model.language_model.layers.N...) as the authors' LLaVA-Mistral wrapper names it."""
    return "base_model.model.model.layers." + ours.split(".layers.", 1)[1]


def write_authors_folder(model, folder: Path, *, lora_config: dict | None = None) -> Path:
    folder.mkdir(parents=True)
    encoder = model.vision_encoder.state_dict()
    wrapper = {f"sam.image_encoder.{k}": v for k, v in encoder.items()}
    wrapper.update({f"image_encoder.{k}": v.clone() for k, v in encoder.items()})  # the duplicate registration
    wrapper["sam.prompt_encoder.point_embeddings.0.weight"] = torch.randn(1, 256)
    wrapper["sam.mask_decoder.iou_token.weight"] = torch.randn(1, 256)
    torch.save(wrapper, folder / "image_encoder.pth")
    torch.save(model.fusion_head.state_dict(), folder / "mask_decoder.pth")
    torch.save(model.modality_head.state_dict(), folder / "cls.pth")
    (folder / "lora_adapter").mkdir()
    (folder / "lora_adapter" / "adapter_config.json").write_text(json.dumps(lora_config or LORA_CONFIG))
    from safetensors.torch import save_file

    lora = {authors_lora_key(k): v.contiguous() for k, v in get_peft_model_state_dict(model.peft_model).items()}
    save_file(lora, str(folder / "lora_adapter" / "adapter_model.safetensors"))
    (folder / "tokenizer").mkdir()
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small model whose every imported part differs from a fresh build's, and its spec file."""
    spec = small_spec()
    torch.manual_seed(1)
    model = build_model(spec, weights=False)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    root = tmp_path_factory.mktemp("authors")
    spec_file = root / "spec.json"
    spec_file.write_text(spec.model_dump_json())
    return model, spec_file, root


def test_the_authors_folder_becomes_a_bundle_with_their_weights(trained, tmp_path):
    model, spec_file, _ = trained
    src = write_authors_folder(model, tmp_path / "llm_seg_13")
    result = CliRunner().invoke(app, ["convert", "prsmed-authors", str(src), "--to", str(tmp_path / "bundle"),
                                      "--model", str(spec_file)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "bundle" / "adapter_manifest.json").read_text())
    assert manifest["parts"] == ["vision_encoder", "fusion_head", "modality_head"]
    assert manifest["training"]["authors_base_model_name_or_path"] == LORA_CONFIG["base_model_name_or_path"]

    torch.manual_seed(7)
    fresh = build_model(small_spec(), weights=False)
    load_bundle(tmp_path / "bundle", fresh)
    for part in ("vision_encoder", "fusion_head", "modality_head"):
        want, got = getattr(model, part).state_dict(), getattr(fresh, part).state_dict()
        assert want.keys() == got.keys()
        assert all(torch.equal(want[k], got[k]) for k in want), part
    want, got = get_peft_model_state_dict(model.peft_model), get_peft_model_state_dict(fresh.peft_model)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


@pytest.mark.parametrize("damage, words", [
    ("extra key", "bogus.weight"),
    ("classifier shape", "2.weight"),
    ("lora rank", "r: theirs 8, this model 16"),
    ("encoder copies differ", "image_encoder"),
    ("lora key", "map to none of its layers"),
])
def test_what_does_not_fit_is_refused_by_name(trained, tmp_path, damage, words):
    model, spec_file, _ = trained
    src = write_authors_folder(model, tmp_path / "src",
                               lora_config={**LORA_CONFIG, "r": 8} if damage == "lora rank" else None)
    if damage == "extra key":
        state = torch.load(src / "mask_decoder.pth", weights_only=True)
        state["bogus.weight"] = torch.zeros(3)
        torch.save(state, src / "mask_decoder.pth")
    elif damage == "classifier shape":
        torch.save({"2.weight": torch.zeros(7, 64), "2.bias": torch.zeros(7)}, src / "cls.pth")
    elif damage == "encoder copies differ":
        state = torch.load(src / "image_encoder.pth", weights_only=True)
        key = next(k for k in state if k.startswith("image_encoder."))
        state[key] = state[key] + 1
        torch.save(state, src / "image_encoder.pth")
    elif damage == "lora key":
        from safetensors.torch import load_file, save_file

        path = src / "lora_adapter" / "adapter_model.safetensors"
        state = load_file(str(path))
        state["base_model.model.model.mm_projector.lora_A.weight"] = torch.zeros(16, 8)
        save_file(state, str(path))
    with pytest.raises((ImportRefused, ValueError), match=words.replace("(", r"\(")):
        convert_prsmed_authors(src, tmp_path / "bundle", model=str(spec_file))
    assert not (tmp_path / "bundle").exists()


def test_every_key_of_the_full_7b_layout_maps():
    """On the meta device: the authors' 32 layers x q, k, v, o x A, B LoRA keys, their encoder wrapper and their
    head names all land on prsmed-llava-med-7b's tensors with the right shapes."""
    from prsmed_plugins.converters.prsmed_authors import _fits
    from prsmed_plugins.vision_encoders.tinysam import split_checkpoint

    target = build_model("prsmed-llava-med-7b", weights=False, device="meta")
    own = get_peft_model_state_dict(target.peft_model)
    theirs = {authors_lora_key(k): v for k, v in own.items()}
    assert len(theirs) == 32 * 4 * 2
    assert "base_model.model.model.layers.31.self_attn.o_proj.lora_B.weight" in theirs
    mapped = map_lora_keys(theirs, target, source="7b")
    assert mapped.keys() == own.keys()
    encoder = target.vision_encoder.state_dict()
    split = split_checkpoint({f"sam.image_encoder.{k}": v for k, v in encoder.items()}, source="7b")
    assert split.layout == "prsmed-authors"
    _fits(target.vision_encoder, split.state, "image_encoder.pth")
    _fits(target.fusion_head, dict(target.fusion_head.state_dict()), "mask_decoder.pth")
    assert target.fusion_head.prompt_projection[0].weight.shape == (512, 4096)
