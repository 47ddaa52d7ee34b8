"""The built-in fusion heads: contract, authors' key layout, checkpoints, prompt mask, gradients."""

from __future__ import annotations

import pytest
import torch

from prsmed.components import ComponentError, FusionHeadContract
from prsmed.registry import create_component, get_registry, list_components
from prsmed.weights import CheckpointError, write_state_dict

# Small but valid widths: image_dim divisible by the heads (and by 8 for the two-way upscaler).
TINY = {
    "prsmed": dict(prompt_dim=32, image_dim=16, hidden_dim=24, cross_heads=4, encoder_heads=2, ffn_dim=32),
    "two-way": dict(prompt_dim=32, image_dim=16, depth=2, heads=2, mlp_dim=32),
}
NAMES = sorted(TINY)


def tiny(name: str, **extra) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_component("fusion_head", name, **TINY[name], **extra)


def inputs(b=2, c=16, h=4, w=5, t=7, d=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, h, w, generator=g), torch.randn(b, t, d, generator=g)


def test_both_heads_are_registered():
    ids = {s.id for s in list_components("fusion_head")}
    assert {"fusion_head/prsmed", "fusion_head/two-way"} <= ids


def test_prsmed_default_parameter_count_on_meta():
    with torch.device("meta"):
        head = create_component("fusion_head", "prsmed")
    assert all(p.is_meta for p in head.parameters())
    assert sum(p.numel() for p in head.parameters()) == 5_366_465


def test_two_way_builds_on_meta():
    with torch.device("meta"):
        head = create_component("fusion_head", "two-way")
    assert all(p.is_meta for p in head.parameters())
    assert 3_000_000 < sum(p.numel() for p in head.parameters()) < 6_000_000


def test_prsmed_key_layout_matches_the_authors_checkpoint():
    with torch.device("meta"):
        keys = set(create_component("fusion_head", "prsmed").state_dict())
    prefixes = {k.rsplit(".", 1)[0] for k in keys}
    expected = {
        "prompt_projection.0", "prompt_projection.1", "prompt_projection.3", "prompt_projection.4",
        "prompt_norm", "image_norm", "attn", "attn.out_proj", "norm1",
        "encoder_layer.self_attn", "encoder_layer.self_attn.out_proj", "encoder_layer.linear1",
        "encoder_layer.linear2", "encoder_layer.norm1", "encoder_layer.norm2",
        "ffn.fc1", "ffn.fc2", "ffn.norm", "ffn.norm1", "out_dec",
    } | {f"mask_generation.{i}.{m}" for i in range(3) for m in ("conv1", "bn1", "conv2", "bn2", "conv3")}
    assert prefixes == expected
    assert {"attn.in_proj_weight", "attn.in_proj_bias"} <= keys


def test_prsmed_copies_the_authors_initialisation():
    head = tiny("prsmed")
    assert torch.all(head.prompt_projection[0].bias == 1) and torch.all(head.prompt_projection[4].bias == 1)
    assert torch.all(head.attn.in_proj_bias == 1) and torch.all(head.encoder_layer.linear2.bias == 1)
    assert torch.all(head.ffn.fc1.bias == 1) and torch.all(head.ffn.fc2.bias == 0)
    assert torch.all(head.out_dec.bias == 0)


@pytest.mark.parametrize("name", NAMES)
def test_contract_and_output_shape(name):
    head = tiny(name, upsample=8).eval()
    expected = FusionHeadContract(image_dim=16, prompt_dim=32, upsample=8)
    assert head.contract == expected
    assert get_registry().contract("fusion_head", name, **TINY[name], upsample=8) == expected
    image, prompt = inputs(h=4, w=5)
    with torch.no_grad():
        out = head(image, prompt)
    assert out.shape == (2, 1, 32, 40) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
def test_low_precision_inputs_give_float32_logits(name):
    head = tiny(name).eval()
    image, prompt = inputs()
    with torch.no_grad():
        out = head(image.bfloat16(), prompt.half())
    assert out.dtype == torch.float32 and out.shape == (2, 1, 64, 80)


@pytest.mark.parametrize("name", NAMES)
def test_wrong_input_shapes_are_explained(name):
    head = tiny(name)
    image, prompt = inputs()
    with pytest.raises(ValueError, match=r"image_embeddings must be \(B, 16, h, w\)"):
        head(image[:, :8], prompt)
    with pytest.raises(ValueError, match=r"prompt_embeddings must be \(B, T, 32\)"):
        head(image, prompt[..., :8])
    with pytest.raises(ValueError, match="prompt_mask must be"):
        head(image, prompt, torch.ones(2, 3, dtype=torch.bool))


@pytest.mark.parametrize("name", NAMES)
def test_unknown_and_invalid_options_are_refused(name):
    with pytest.raises(ComponentError, match="unknown option 'nope'.*Accepted options: prompt_dim"):
        create_component("fusion_head", name, nope=1)
    with pytest.raises(ComponentError, match="divisible"):
        get_registry().contract("fusion_head", name, image_dim=20)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_checkpoint_round_trip(name, fmt, tmp_path):
    source = tiny(name).eval()
    path = tmp_path / f"head.{fmt}"
    if fmt == "pth":
        torch.save(source.state_dict(), path)  # the authors' mask_decoder.pth format: a plain state dict
    else:
        write_state_dict(source.state_dict(), path)
    torch.manual_seed(123)  # a different init, so equality below proves the weights were loaded
    loaded = create_component("fusion_head", name, **TINY[name], checkpoint=str(path)).eval()
    image, prompt = inputs()
    with torch.no_grad():
        assert torch.equal(source(image, prompt), loaded(image, prompt))


def test_checkpoint_of_another_model_or_shape_is_refused(tmp_path):
    other = tmp_path / "two_way.safetensors"
    write_state_dict(tiny("two-way").state_dict(), other)
    with pytest.raises(CheckpointError, match=r"does not fit PromptedMaskDecoder: \d+ missing: .*\d+ unexpected"):
        create_component("fusion_head", "prsmed", **TINY["prsmed"], checkpoint=str(other))

    narrow = tmp_path / "hidden24.pth"
    torch.save(tiny("prsmed").state_dict(), narrow)
    options = dict(TINY["prsmed"], hidden_dim=40)
    expected = r"shape mismatch: prompt_projection\.0\.weight: checkpoint \(24, 32\) vs model \(40, 32\)"
    with pytest.raises(CheckpointError, match=expected):
        create_component("fusion_head", "prsmed", **options, checkpoint=str(narrow))


@pytest.mark.parametrize("name", NAMES)
def test_prompt_mask_hides_padding(name):
    head = tiny(name).eval()
    image, prompt = inputs(t=7)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, 4:] = False
    mask[1, 6:] = False
    changed = prompt.clone()
    changed[~mask] = torch.randn(int((~mask).sum()), 32) * 5
    with torch.no_grad():
        masked_a, masked_b = head(image, prompt, mask), head(image, changed, mask)
        plain_a, plain_b = head(image, prompt), head(image, changed)
        all_real = head(image, prompt, torch.ones_like(mask))
    torch.testing.assert_close(masked_a, masked_b, rtol=0, atol=1e-5)
    assert (plain_a - plain_b).abs().max() > 1e-3
    torch.testing.assert_close(all_real, plain_a, rtol=0, atol=1e-5)
    # An integer attention mask (as tokenizers return) is accepted too.
    with torch.no_grad():
        torch.testing.assert_close(head(image, prompt, mask.long()), masked_a, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_row_without_real_tokens_stays_finite(name):
    head = tiny(name).eval()
    image, prompt = inputs()
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1] = False
    with torch.no_grad():
        out = head(image, prompt, mask)
    assert torch.isfinite(out).all()
    if name == "prsmed":  # falls back to attending to every position, the authors' behaviour
        with torch.no_grad():
            torch.testing.assert_close(out[1], head(image, prompt)[1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_backward_reaches_every_used_parameter(name):
    head = tiny(name).train()
    image, prompt = inputs()
    image.requires_grad_(True)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, 5:] = False
    head(image, prompt, mask).sigmoid().mean().backward()
    assert image.grad is not None and torch.isfinite(image.grad).all()
    # ffn.norm1 is carried for the authors' checkpoint but never used in their forward.
    unused = {"ffn.norm1.weight", "ffn.norm1.bias"} if name == "prsmed" else set()
    no_grad = {n for n, p in head.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()}
    assert no_grad == unused
