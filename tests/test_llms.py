"""The built-in LLM backbones (llm/llava, llm/hf-causal-lm), the tiny tokenizer and the LLaVA-Med converter.

Everything runs offline on tiny models built from configs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from prsmed.components import ComponentError, LLMContract
from prsmed.registry import create_component, get_registry
from prsmed.weights import write_state_dict
from prsmed_plugins.llms import tiny_tokenizer
from prsmed_plugins.llms.causal_lm import IGNORE_INDEX
from prsmed_plugins.llms.llava import MED_7B

PROMPT = "<image>\n### User: As a doctor, and you are seeing the image, {q}\n### Assistant: \n"
LONG_Q = "where is the tumour in this CT scan of the brain, and is it near the center?"
SHORT_Q = "where?"


def images(n: int = 2) -> list[Image.Image]:
    rng = np.random.RandomState(0)
    shapes = [(40, 60), (30, 20), (48, 48)]
    return [Image.fromarray((rng.rand(h, w, 3) * 255).astype("uint8")) for h, w in shapes[:n]]


@pytest.fixture(scope="module")
def llava():
    torch.manual_seed(0)
    return create_component("llm", "llava", preset="tiny").eval()


def hf_greedy(model, inputs, max_new_tokens: int, eos: list[int]) -> list[list[int]]:
    """transformers' own greedy generate, cut at the first EOS like ours."""
    kwargs = dict(
        input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, max_new_tokens=max_new_tokens,
        do_sample=False, pad_token_id=0, eos_token_id=eos,
    )
    if inputs.pixel_values is not None:
        kwargs["pixel_values"] = inputs.pixel_values
    out = model.generate(**kwargs)[:, inputs.input_ids.shape[1]:].tolist()
    return [row[: next((i for i, t in enumerate(row) if t in eos), len(row))] for row in out]


def lora_layers(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict)]


# tiny tokenizer ----------------------------------------------------------------------------------------------------
def test_tiny_tokenizer_files_match_recipe(tmp_path):
    tiny_tokenizer.write_tiny_tokenizer(tmp_path)
    for name in tiny_tokenizer.FILES:
        shipped = (tiny_tokenizer.TINY_TOKENIZER_DIR / name).read_bytes()
        assert (tmp_path / name).read_bytes() == shipped, f"{name} differs from the recipe; rerun the recipe"


def test_tiny_tokenizer_round_trip_and_specials():
    tok = tiny_tokenizer.load_tiny_tokenizer()
    assert len(tok) == tiny_tokenizer.VOCAB_SIZE
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 0)
    assert tok.convert_tokens_to_ids("<image>") == 3
    text = "Where is the tumour in this MRI? The lesion is in the top left of the image, near the centre (ü 42)."
    ids = tok(text).input_ids
    assert ids[0] == 1 and 0 not in ids  # BOS first, nothing unknown thanks to byte fallback
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert len(tok.encode("where is the tumour in this CT scan?", add_special_tokens=False)) <= 10


# llm/llava ---------------------------------------------------------------------------------------------------------
def test_llava_registered_with_contract(llava):
    assert {"llm/llava", "llm/hf-causal-lm"} <= {s.id for s in get_registry().list_components("llm")}
    expected = get_registry().contract("llm", "llava")
    assert llava.contract == expected
    assert expected == LLMContract(hidden_size=64, vocab_size=1024, image_size=96, image_tokens=144)
    with pytest.raises(ComponentError, match="Accepted options: pretrained, config, preset, text_config, dtype"):
        create_component("llm", "llava", presets="tiny")
    with pytest.raises(ComponentError, match="only one of"):
        create_component("llm", "llava", preset="tiny", config={})


def test_llava_encode_labels_only_on_answers(llava):
    tok = llava.tokenizer
    prompts = [PROMPT.format(q=LONG_Q), PROMPT.format(q=SHORT_Q)]
    answers = ["The tumour is in the top left of the image.", "center"]
    inputs = llava.encode(prompts, images(), answers=answers)
    n_img = llava.contract.image_tokens
    assert inputs.pixel_values.shape == (2, 3, 96, 96)
    for row in range(2):
        ids, mask, labels = inputs.input_ids[row], inputs.attention_mask[row], inputs.labels[row]
        real = ids[mask.bool()].tolist()
        assert real[0] == tok.bos_token_id and real[1 : 1 + n_img] == [3] * n_img  # right padding: row starts at 0
        answer = tok.encode(answers[row], add_special_tokens=False) + [tok.eos_token_id]
        assert labels[labels != IGNORE_INDEX].tolist() == answer
        assert real[-len(answer):] == answer
        assert (ids[~mask.bool()] == 0).all() and (labels[~mask.bool()] == IGNORE_INDEX).all()
    assert inputs.attention_mask[1, -1] == 0  # the shorter row is padded on the right

    out = llava(inputs)
    assert out.hidden_states.shape == (2, inputs.input_ids.shape[1], 64)
    assert torch.equal(out.attention_mask, inputs.attention_mask)
    assert out.logits.shape == (2, inputs.input_ids.shape[1], 1024)
    manual = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].reshape(-1, 1024), inputs.labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
    )
    assert torch.allclose(out.loss, manual, atol=1e-5)
    out.loss.backward()
    assert llava.model.lm_head.weight.grad is not None
    llava.zero_grad(set_to_none=True)

    with pytest.raises(ValueError, match="placeholder"):
        llava.encode([PROMPT.format(q=SHORT_Q)])
    with pytest.raises(ValueError, match="exactly once"):
        llava.encode(["no placeholder"], images(1))


def test_llava_hidden_states_are_final_norm_output(llava):
    inputs = llava.encode([PROMPT.format(q=SHORT_Q)], images(1))
    with torch.no_grad():
        ours = llava(inputs).hidden_states
        theirs = llava.model(
            input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, pixel_values=inputs.pixel_values,
            output_hidden_states=True,
        ).hidden_states[-1]
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_llava_greedy_generation_matches_transformers_generate(llava):
    prompts = [PROMPT.format(q=LONG_Q), PROMPT.format(q=SHORT_Q)]
    inputs = llava.encode(prompts, images(), padding_side="left")
    assert inputs.attention_mask[1, 0] == 0 and inputs.attention_mask[:, -1].all()  # left padded, lengths differ
    with torch.no_grad():
        ours = llava.generate_tokens_from(llava(inputs, use_cache=True), max_new_tokens=8)
    theirs = hf_greedy(llava.model, inputs, 8, eos=[2])
    assert ours == theirs and all(len(r) == 8 for r in ours)

    # Stop per row: declare the token row 0 emits third an end-of-sequence token too.
    stop = ours[0][2]
    llava.model.generation_config.eos_token_id = [2, stop]
    try:
        with torch.no_grad():
            cut = llava.generate_tokens_from(llava(inputs, use_cache=True), max_new_tokens=8)
        assert cut == hf_greedy(llava.model, inputs, 8, eos=[2, stop])
        assert cut[0] == ours[0][: ours[0].index(stop)] and len(cut[0]) <= 2
        texts = llava.generate_from(llava(inputs, use_cache=True), max_new_tokens=8)
        assert texts == [llava.tokenizer.decode(r, skip_special_tokens=True) for r in cut]
    finally:
        llava.model.generation_config.eos_token_id = 2

    prefill = llava(inputs, use_cache=True)
    llava.generate_from(prefill, max_new_tokens=1)
    with pytest.raises(ValueError, match="no KV cache"):
        llava.generate_from(prefill, max_new_tokens=1)


def test_llava_sampling_is_reproducible(llava):
    inputs = llava.encode([PROMPT.format(q=SHORT_Q)] * 2, images(2), padding_side="left")

    def sample(seed):
        gen = torch.Generator().manual_seed(seed)
        return llava.generate_tokens_from(
            llava(inputs, use_cache=True), max_new_tokens=6, do_sample=True, temperature=0.7, top_p=0.95,
            generator=gen,
        )

    assert sample(1) == sample(1)


def test_llava_lora_targets_text_attention_only(llava):
    from peft import LoraConfig, get_peft_model

    target = llava.lora_target_modules
    names = [n for n, _ in llava.named_modules()]
    matched = [n for n in names if re.fullmatch(target, n)]
    assert len(matched) == 4 * 2 and all("language_model" in n for n in matched)
    assert any(re.search(r"vision_tower.*self_attn\.q_proj$", n) for n in names)

    fresh = create_component("llm", "llava")
    peft_model = get_peft_model(fresh, LoraConfig(r=4, lora_alpha=4, target_modules=target))
    wrapped = lora_layers(peft_model)
    assert len(wrapped) == 8 and not any("vision_tower" in n for n in wrapped)
    # The backbone still works with the adapters injected in place.
    out = fresh(fresh.encode([PROMPT.format(q=SHORT_Q)], images(1), answers=["top left"]))
    assert torch.isfinite(out.loss)


def test_llava_checkpoint_option_round_trip(llava, tmp_path):
    path = tmp_path / "llm.safetensors"
    write_state_dict(llava.state_dict(), path)
    again = create_component("llm", "llava", checkpoint=str(path)).eval()
    inputs = llava.encode([PROMPT.format(q=SHORT_Q)], images(1))
    with torch.no_grad():
        assert torch.allclose(again(inputs).logits, llava(inputs).logits)


def test_llava_med_7b_builds_on_meta_with_the_expected_sizes():
    with torch.device("meta"):
        model = create_component("llm", "llava", preset=MED_7B, dtype="bfloat16")
    assert model.contract == LLMContract(
        dtype="bfloat16", hidden_size=4096, vocab_size=32001, image_size=336, image_tokens=576
    )
    core = model.model.model

    def count(module):
        return sum(p.numel() for p in module.parameters())

    llm = count(core.language_model) + count(model.model.lm_head)
    assert 7.2e9 < llm < 7.3e9  # Mistral-7B: 7.24B (+ one <image> row in the embeddings and head)
    assert 0.29e9 < count(core.vision_tower) < 0.31e9  # CLIP ViT-L/14-336: 0.30B
    assert count(core.multi_modal_projector) == 1024 * 4096 + 4096 + 4096 * 4096 + 4096  # 21.0M
    assert model.model.config.vision_feature_layer == -2
    assert model.model.config.vision_feature_select_strategy == "default"
    assert model.model.config.text_config.rope_parameters["rope_theta"] == 1e6
    with pytest.raises(ComponentError, match="prsmed convert llava-med"):
        model.tokenizer


def test_llava_pretrained_in_original_layout_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava_mistral"}))
    with pytest.raises(ComponentError, match="convert llava-med"):
        create_component("llm", "llava", pretrained=str(tmp_path))
    with pytest.raises(ComponentError, match="does not exist"):
        create_component("llm", "llava", pretrained=str(tmp_path / "missing"))
    (tmp_path / "config.json").unlink()
    with pytest.raises(ComponentError, match="no config.json"):
        create_component("llm", "llava", pretrained=str(tmp_path))


# llm/hf-causal-lm --------------------------------------------------------------------------------------------------
TINY_QWEN2 = {
    "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "vocab_size": 1100, "max_position_embeddings": 256, "tie_word_embeddings": True,
}


def test_causal_lm_tiny_qwen2():
    torch.manual_seed(0)
    options = dict(config=TINY_QWEN2, model_type="qwen2", tokenizer=str(tiny_tokenizer.TINY_TOKENIZER_DIR))
    lm = create_component("llm", "hf-causal-lm", **options).eval()
    assert lm.contract == LLMContract(hidden_size=32, vocab_size=1100) == get_registry().contract(
        "llm", "hf-causal-lm", **options
    )
    assert lm.contract.image_tokens == 0 and lm.contract.image_size == 0

    prompts = [PROMPT.format(q=LONG_Q), PROMPT.format(q=SHORT_Q)]
    train = lm.encode(prompts, images(), answers=["top left", "bottom right, near the center"])
    assert train.pixel_values is None and 3 not in train.input_ids.tolist()[0]  # <image> removed, image ignored
    out = lm(train)
    assert out.hidden_states.shape == (2, train.input_ids.shape[1], 32) and torch.isfinite(out.loss)

    gen = lm.encode(prompts, padding_side="left")
    with torch.no_grad():
        ours = lm.generate_tokens_from(lm(gen, use_cache=True), max_new_tokens=6)
    assert ours == hf_greedy(lm.model, gen, 6, eos=[2])

    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(lm, LoraConfig(r=2, target_modules=lm.lora_target_modules))
    assert len(lora_layers(peft_model)) == 4 * 2


def test_causal_lm_default_preset_and_errors():
    lm = create_component("llm", "hf-causal-lm")
    assert lm.contract.hidden_size == 64 and lm.tokenizer.eos_token_id == 2
    with pytest.raises(ComponentError, match="model_type"):
        create_component("llm", "hf-causal-lm", config={"hidden_size": 32})
    no_tok = create_component("llm", "hf-causal-lm", config=TINY_QWEN2, model_type="qwen2")
    with pytest.raises(ComponentError, match="tokenizer=PATH"):
        no_tok.encode(["hello"])
    too_small = create_component("llm", "hf-causal-lm", config={**TINY_QWEN2, "vocab_size": 100}, model_type="qwen2",
                                 tokenizer=str(tiny_tokenizer.TINY_TOKENIZER_DIR))
    with pytest.raises(ComponentError, match="1024 tokens"):
        too_small.tokenizer


# LLaVA-Med conversion ----------------------------------------------------------------------------------------------
def _source_tokenizer(path: Path, size: int) -> None:
    """A word-level tokenizer with LLaVA-Med's special ids (<unk>=0, <s>=1, </s>=2) and no <image>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    text = PROMPT.format(q=LONG_Q).replace("<image>", "") + " top left right bottom center the is in"
    words = sorted(set(text.split()))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words[: size - 3])}}
    vocab.update({f"w{i}": i for i in range(len(vocab), size)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.save_pretrained(str(path))


def _original_checkpoint(root: Path, fmt: str):
    """A tiny LLaVA-Med-layout checkpoint, plus the reference modules it was made from."""
    from transformers import CLIPConfig, CLIPVisionModel, MistralConfig, MistralForCausalLM

    torch.manual_seed(1)
    vocab = 50
    text_cfg = MistralConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=vocab, max_position_embeddings=256, rope_theta=1e6, sliding_window=None, rms_norm_eps=1e-5,
    )
    mistral = MistralForCausalLM(text_cfg).eval()
    clip_cfg = CLIPConfig(
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2},
        vision_config={"hidden_size": 24, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": 32, "patch_size": 8},
        projection_dim=8,
    )
    tower = CLIPVisionModel(clip_cfg.vision_config).eval()
    projector = torch.nn.Sequential(torch.nn.Linear(24, 32), torch.nn.GELU(), torch.nn.Linear(32, 32)).eval()

    src, clip_dir = root / "llava-med", root / "clip"
    src.mkdir()
    clip_dir.mkdir()
    # The CLIP download is a full CLIPModel: vision_model.* plus text parts LLaVA never uses.
    clip_cfg.save_pretrained(str(clip_dir))
    clip_state = {f"vision_model.{k}": v for k, v in tower.state_dict().items()}
    clip_state.update({"text_model.embeddings.token_embedding.weight": torch.zeros(10, 16),
                       "visual_projection.weight": torch.zeros(8, 24), "logit_scale": torch.tensor(2.0)})
    write_state_dict(clip_state, clip_dir / "model.safetensors")

    state = {("lm_head.weight" if k == "lm_head.weight" else k): v for k, v in mistral.state_dict().items()}
    state.update({f"model.mm_projector.{k}": v for k, v in projector.state_dict().items()})
    config = {
        **{k: v for k, v in text_cfg.to_dict().items() if k not in ("model_type", "architectures")},
        "model_type": "llava_mistral", "architectures": ["LlavaMistralForCausalLM"], "rope_theta": 1e6,
        "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_hidden_size": 24,
        "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
        "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "image_aspect_ratio": "pad",
        "tokenizer_model_max_length": 2048, "torch_dtype": "float32",
    }
    (src / "config.json").write_text(json.dumps(config))
    keys = sorted(state)
    halves = [dict((k, state[k]) for k in keys[: len(keys) // 2]), dict((k, state[k]) for k in keys[len(keys) // 2:])]
    if fmt == "safetensors":
        for i, half in enumerate(halves, start=1):
            write_state_dict(half, src / f"model-0000{i}-of-00002.safetensors")
    else:
        torch.save(state, src / "pytorch_model.bin")
    _source_tokenizer(src, vocab)
    return src, clip_dir, mistral, tower, projector


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_convert_llava_med_matches_the_original_computation(tmp_path, fmt):
    from prsmed_plugins.converters.llava_med import convert_llava_med

    src, clip_dir, mistral, tower, projector = _original_checkpoint(tmp_path, fmt)
    dst = convert_llava_med(src, tmp_path / "converted", vision_tower_dir=clip_dir)
    converted = json.loads((dst / "config.json").read_text())
    assert converted["model_type"] == "llava" and converted["image_token_index"] == 50
    assert converted["text_config"]["vocab_size"] == 51

    llm = create_component("llm", "llava", pretrained=str(dst)).eval()
    assert llm.contract == LLMContract(hidden_size=32, vocab_size=51, image_size=32, image_tokens=16)
    assert llm.tokenizer.convert_tokens_to_ids("<image>") == 50 and llm.tokenizer.pad_token_id == 0
    embed = llm.model.get_input_embeddings().weight
    assert torch.allclose(embed[50], embed[:50].mean(0), atol=1e-6)

    # Text only: the converted text model is the source Mistral.
    text = llm.encode(["### User: where is the tumour in the image ?"])
    with torch.no_grad():
        ours = llm(text).logits[..., :50]
        ref = mistral(input_ids=text.input_ids, attention_mask=text.attention_mask).logits
    assert torch.allclose(ours, ref, atol=1e-5)

    # With an image: LLaVA's computation by hand (tower layer -2 without CLS, projector, spliced after BOS).
    prompt = PROMPT.format(q="where is the tumour ?")
    inputs = llm.encode([prompt], images(1))
    with torch.no_grad():
        feats = projector(tower(inputs.pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:])
        before, after = prompt.split("<image>")
        ids_after = llm.tokenizer.encode(after, add_special_tokens=False)
        embeds = torch.cat([
            mistral.get_input_embeddings()(torch.tensor([[1]])), feats,
            mistral.get_input_embeddings()(torch.tensor([ids_after])),
        ], dim=1)
        ref = mistral.model(inputs_embeds=embeds).last_hidden_state
        ours = llm(inputs).hidden_states
    assert ours.shape == ref.shape == (1, 1 + 16 + len(ids_after), 32)
    assert torch.allclose(ours, ref, atol=1e-5)

    # transformers' own processor, as saved by the conversion, loads too.
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(dst), local_files_only=True)
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == 50


def test_convert_llava_med_reports_what_is_missing(tmp_path):
    from prsmed.weights import CheckpointError
    from prsmed_plugins.converters.llava_med import convert_llava_med

    src, clip_dir, *_ = _original_checkpoint(tmp_path, "safetensors")
    with pytest.raises(CheckpointError, match="vision_tower_dir"):
        convert_llava_med(src, tmp_path / "out")
    next(src.glob("model-00002*")).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        convert_llava_med(src, tmp_path / "out", vision_tower_dir=clip_dir)
    assert not (tmp_path / "out").exists()
