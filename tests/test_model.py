"""The composite model on prsmed-tiny: contracts, one LLM pass for both losses, LoRA, and inference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from prsmed.components import ComponentError
from prsmed.model.prsmed_model import IGNORE_INDEX, PRSMedModel
from prsmed.model.spec import ComponentRef
from prsmed.zoo import build_model, get_preset


def _images(n: int, size: int = 96) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (size, size + 10 * i, 3), dtype=np.uint8)) for i in range(n)]


@pytest.fixture(scope="module")
def tiny() -> PRSMedModel:
    torch.manual_seed(0)
    return build_model("prsmed-tiny")


def test_incompatible_combination_fails_before_building(monkeypatch):
    spec = get_preset("prsmed-tiny").spec.model_copy(deep=True)
    spec.fusion_head = ComponentRef(name="prsmed", options={**spec.fusion_head.options, "prompt_dim": 4096})
    built = []
    from prsmed.registry import get_registry

    real_create = get_registry().create
    monkeypatch.setattr(get_registry(), "create", lambda *a, **k: built.append(a) or real_create(*a, **k))
    with pytest.raises(ComponentError) as e:
        PRSMedModel(spec)
    assert "hidden size is 64" in str(e.value) and "prompt_dim=4096" in str(e.value)
    assert built == []  # nothing was built, so no weights were read


def test_trainable_parts_follow_the_spec(tiny):
    counts = tiny.parameter_counts()
    # LoRA, prsmed-tiny's own image tower and projector (spec train.llm_image_path) and its output layer (llm_output)
    image_path = sum(p.numel() for p in tiny.llm_image_path.parameters())
    head = sum(p.numel() for p in tiny.llm_output.parameters())
    assert counts["llm"]["trainable"] == counts["llm"]["lora"] + image_path + head and counts["llm"]["lora"] > 0
    # what `prsmed zoo show` prints beside the LoRA count
    assert counts["llm"]["image_tower"] == image_path > 0 and counts["llm"]["output_layer"] == head == 1024 * 64
    # everything trains but what a component froze itself (TinyViT's unused ImageNet head, the head's unused norm)
    frozen_enc = sum(p.numel() for n, p in tiny.vision_encoder.named_parameters() if n.startswith(("head.", "norm_head.")))
    assert counts["vision_encoder"]["trainable"] == counts["vision_encoder"]["total"] - frozen_enc > 0
    frozen_head = sum(p.numel() for p in tiny.fusion_head.ffn.norm1.parameters())
    assert counts["fusion_head"]["trainable"] == counts["fusion_head"]["total"] - frozen_head
    own = {id(p) for p in (*tiny.llm_image_path.parameters(), *tiny.llm_output.parameters())}
    base_llm = [n for n, p in tiny.llm.named_parameters() if p.requires_grad and "lora_" not in n and id(p) not in own]
    assert base_llm == []  # the text model's own weights and embeddings stay frozen


def test_training_forward_and_backward_from_one_llm_pass(tiny):
    tiny.train()
    images = _images(2)
    seg, inputs = tiny.encode(images, ["where is the tumour?", "which quadrant holds the lesion?"],
                              ["in the top left.", "the bottom right quadrant."])
    calls = []
    handle = tiny.llm.register_forward_hook(lambda *a: calls.append(1))
    out = tiny(seg, inputs)
    handle.remove()
    assert calls == [1]  # one LLM pass serves the mask and the LM loss
    size = tiny.contracts["vision_encoder"].input_size
    assert out.mask_logits.shape == (2, 1, size, size)
    assert out.modality_logits.shape == (2, 6)
    assert torch.isfinite(out.lm_loss)
    target = torch.zeros_like(out.mask_logits)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(out.mask_logits, target) + out.lm_loss
    tiny.zero_grad()
    loss.backward()
    for part in ("vision_encoder", "fusion_head"):
        grads = [p.grad for p in getattr(tiny, part).parameters() if p.requires_grad]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), part
    lora_grads = [p.grad for n, p in tiny.llm.named_parameters() if "lora_B" in n]
    assert any(g is not None and g.abs().sum() > 0 for g in lora_grads)


def test_fusion_head_sees_prompt_states_only(tiny):
    """Training (teacher-forced with answers) and inference (prompt only) give the fusion head the same mask."""
    tiny.eval()
    images = _images(1)
    q = ["where is the lesion?"]
    seg, train_inputs = tiny.encode(images, q, ["it is in the center of the image."])
    _, prompt_inputs = tiny.encode(images, q, padding_side="left")
    with torch.no_grad():
        trained_view = tiny(seg, train_inputs).mask_logits
        pred = tiny.predict(seg, prompt_inputs, max_new_tokens=4)
    assert (train_inputs.labels != IGNORE_INDEX).any()
    torch.testing.assert_close(trained_view, pred.mask_logits, atol=1e-5, rtol=1e-4)


def test_predict_returns_text_and_masks_for_a_batch(tiny):
    tiny.eval()
    images = _images(2)
    seg, inputs = tiny.encode(images, ["where is it?", "describe the position of the tumour in this scan"],
                              padding_side="left")
    pred = tiny.predict(seg, inputs, max_new_tokens=5)
    assert len(pred.answers) == 2 and all(isinstance(a, str) for a in pred.answers)
    size = tiny.contracts["vision_encoder"].input_size
    assert pred.mask_logits.shape == (2, 1, size, size)
    # the cached image embeddings path gives the same mask
    z = tiny.vision_encoder(seg)
    again = tiny.predict(seg, inputs, image_embeddings=z, max_new_tokens=1)
    torch.testing.assert_close(again.mask_logits, pred.mask_logits)


def test_mismatched_batch_is_a_clear_error(tiny):
    with pytest.raises(ValueError, match="2 images, 1 questions"):
        tiny.encode(_images(2), ["one question"])
