"""The built-in vision encoders: TinySAM (TinyViT + SAM neck) and SAM ViT (transformers).

Everything runs offline on small configurations, except one forward pass of the default TinySAM at 1024x1024.
Checkpoint layouts are built here in the official key layouts; parity with the official TinySAM and segment-anything
code is measured separately (docs/vision_encoders.md).
"""

from __future__ import annotations

import hashlib

import pytest
import torch

from prsmed.components import ComponentError
from prsmed.registry import create_component, get_registry, list_components
from prsmed.weights import CheckpointError, write_state_dict
from prsmed_plugins.vision_encoders import sam_vit, tinysam

TINY = dict(
    img_size=128, embed_dims=[16, 32, 40, 64], depths=[1, 1, 2, 1], num_heads=[1, 2, 2, 4],
    window_sizes=[7, 7, 14, 7], out_channels=32,
)
# Stage resolutions at 128: 32 -> 16 -> 8 -> 8, so windows 7 and 14 both need padding: the padded path is covered.

# The official TinySAM vit_t image encoder (tinysam/modeling/tiny_vit_sam.py, as built by build_sam_vit_t):
# number of state-dict keys, elements (num_batches_tracked excluded), sha256 of the sorted "key:shape" lines.
OFFICIAL_VIT_T = (302, 6075388, "a0e43dd598090d02f89b52d29bd950642a5715a56bc68c20adf8132900e0c482")

SAM_TINY = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=64, patch_size=16, output_channels=16,
    window_size=2, global_attn_indexes=[1], mlp_dim=64,
)


def fingerprint(state):
    text = "\n".join(f"{k}:{tuple(v.shape)}" for k, v in sorted(state.items()))
    elements = sum(v.numel() for k, v in state.items() if not k.endswith("num_batches_tracked"))
    return len(state), elements, hashlib.sha256(text.encode()).hexdigest()


def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-trivial values everywhere (attention biases, BN statistics, norms), so a wrong mapping shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif t.ndim <= 1 and not name.endswith("attention_biases"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.2 + (1.0 if name.endswith("weight") else 0.0))
            else:
                t.copy_(torch.randn(t.shape, generator=g) / max(1, t[0].numel()) ** 0.5)
    return module.eval()


def pixels(size: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny_source():
    torch.manual_seed(0)
    return randomize(create_component("vision_encoder", "tinysam", **TINY), seed=1)


@pytest.fixture(scope="module")
def tiny_input():
    return pixels(128)


def run(module, x):
    with torch.no_grad():
        return module.eval()(x)


# --- registration and options -----------------------------------------------------------------------------------

def test_both_encoders_are_registered_by_the_builtin_plugin():
    ids = {s.id for s in list_components("vision_encoder")}
    assert {"vision_encoder/tinysam", "vision_encoder/sam-vit"} <= ids
    plugin = get_registry().get("vision_encoder", "tinysam").plugin
    assert plugin == get_registry().get("vision_encoder", "sam-vit").plugin


def test_contracts_come_from_the_options():
    reg = get_registry()
    default = reg.contract("vision_encoder", "tinysam")
    assert (default.input_size, default.out_channels, default.stride, default.grid) == (1024, 256, 16, 64)
    assert default.pixel_mean == (0.485, 0.456, 0.406)
    tiny = reg.contract("vision_encoder", "tinysam", **TINY)
    assert (tiny.input_size, tiny.out_channels, tiny.grid) == (128, 32, 8)
    sam = reg.contract("vision_encoder", "sam-vit")
    assert (sam.input_size, sam.out_channels, sam.stride) == (1024, 256, 16)
    sam_tiny = reg.contract("vision_encoder", "sam-vit", config=SAM_TINY)
    assert (sam_tiny.input_size, sam_tiny.out_channels, sam_tiny.grid) == (64, 16, 4)


@pytest.mark.parametrize(
    "name, options, needle",
    [
        ("tinysam", {"embed_dim": 64}, "unknown option 'embed_dim'"),
        ("tinysam", {"img_size": 1000}, "multiple of 16"),
        ("tinysam", {"embed_dims": [16, 32, 40, 64], "num_heads": [1, 3, 2, 4]}, "divisible by num_heads[1]"),
        ("tinysam", {"depths": [1, 1, 1]}, "depths"),
        ("sam-vit", {"hidden_size": 32}, "unknown option 'hidden_size'"),
        ("sam-vit", {"config": {"hidden_sise": 32}}, "'hidden_sise'"),
        ("sam-vit", {"config": {"image_size": 100}}, "multiple of patch_size"),
        ("sam-vit", {"config": {"hidden_size": "wide"}}, "expected int"),
        ("sam-vit", {"pretrained": "./no/such/dir"}, "not a directory"),
    ],
)
def test_bad_options_are_refused_with_a_clear_message(name, options, needle):
    with pytest.raises(ComponentError) as err:
        get_registry().contract("vision_encoder", name, **options)
    assert needle in str(err.value)
    if "unknown option" in needle:
        assert "Accepted options:" in str(err.value) and "checkpoint" in str(err.value)


# --- TinySAM: architecture ------------------------------------------------------------------------------------------

def test_tinysam_default_builds_on_meta_with_the_official_key_layout():
    with torch.device("meta"):
        enc = create_component("vision_encoder", "tinysam")
    state = enc.state_dict()
    assert fingerprint(state) == OFFICIAL_VIT_T
    assert enc.contract == get_registry().contract("vision_encoder", "tinysam")
    # Spot checks of names and shapes a loader relies on.
    assert state["layers.1.blocks.0.attn.attention_biases"].shape == (4, 49)
    assert state["layers.2.blocks.5.attn.attention_biases"].shape == (5, 196)
    assert state["layers.2.downsample.conv2.c.weight"].shape == (320, 1, 3, 3)
    assert state["layers.0.blocks.1.conv3.bn.running_var"].shape == (64,)
    assert "layers.3.downsample.conv1.c.weight" not in state
    assert state["neck.0.weight"].shape == (256, 320, 1, 1) and "neck.0.bias" not in state
    # The bias index table is derived, never stored.
    buffers = dict(enc.named_buffers())
    assert "layers.1.blocks.0.attn.attention_bias_idxs" in buffers
    assert not any(k.endswith("attention_bias_idxs") for k in state)
    # The ImageNet classifier is carried for strict loading only: frozen and outside the forward pass.
    assert not any(p.requires_grad for p in enc.head.parameters())
    assert not any(p.requires_grad for p in enc.norm_head.parameters())


def test_relative_offset_index_matches_first_seen_offset_order():
    for window in (2, 7, 14):
        points = [(r, c) for r in range(window) for c in range(window)]
        seen: dict[tuple[int, int], int] = {}
        expected = [[seen.setdefault((abs(a[0] - b[0]), abs(a[1] - b[1])), len(seen)) for b in points] for a in points]
        assert torch.equal(tinysam.relative_offset_index(window), torch.tensor(expected))


def test_tinysam_default_forward_at_1024():
    torch.manual_seed(0)
    enc = create_component("vision_encoder", "tinysam").eval()
    with torch.no_grad():
        out = enc(pixels(1024, batch=1))
    assert out.shape == (1, 256, 64, 64) and torch.isfinite(out).all()


def test_tinysam_small_variant_shape_and_input_check(tiny_source, tiny_input):
    out = run(tiny_source, tiny_input)
    assert out.shape == (2, 32, 8, 8)
    expected = r"img_size=128 expects pixels of shape \(B, 3, 128, 128\), got \(1, 3, 64, 64\)"
    with pytest.raises(ValueError, match=expected):
        tiny_source(pixels(64, batch=1))


def test_tinysam_trains_end_to_end(tiny_input):
    enc = create_component("vision_encoder", "tinysam", **TINY).train()
    enc(tiny_input).square().mean().backward()
    trainable = [n for n, p in enc.named_parameters() if p.requires_grad]
    assert all(dict(enc.named_parameters())[n].grad is not None for n in trainable)
    assert enc.layers[1].blocks[0].attn.attention_biases.grad.abs().sum() > 0


def test_attention_bias_is_never_a_stale_cache(tiny_source, tiny_input):
    """The official module caches the bias gather in eval() and its builder loads weights afterwards; ours must
    use the biases it holds at call time."""
    enc = create_component("vision_encoder", "tinysam", **TINY).eval()
    run(enc, tiny_input)  # a first eval-mode pass, as a cache would be filled here
    enc.load_state_dict(tiny_source.state_dict())
    torch.testing.assert_close(run(enc, tiny_input), run(tiny_source, tiny_input), rtol=0, atol=0)
    # ... and the biases do matter, so the comparison above would catch zeros left over from init.
    with torch.no_grad():
        enc.layers[2].blocks[0].attn.attention_biases.add_(1.0)
    assert not torch.allclose(run(enc, tiny_input), run(tiny_source, tiny_input))


# --- TinySAM: checkpoints -----------------------------------------------------------------------------------------

FAKE_SAM_PARTS = {
    "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix": torch.randn(2, 128),
    "mask_decoder.iou_token.weight": torch.randn(1, 256),
}


def official_layout(module):
    return {**{f"image_encoder.{k}": v for k, v in module.state_dict().items()}, **FAKE_SAM_PARTS}


def authors_layout(module):
    sam = {f"sam.{k}": v for k, v in official_layout(module).items()}
    return {**sam, **{f"image_encoder.{k}": v.clone() for k, v in module.state_dict().items()}}


@pytest.mark.parametrize(
    "keys, layout",
    [
        (["image_encoder.patch_embed.seq.0.c.weight", "prompt_encoder.x", "mask_decoder.y"], "sam"),
        (["sam.image_encoder.patch_embed.seq.0.c.weight", "image_encoder.patch_embed.seq.0.c.weight"],
         "prsmed-authors"),
        (["patch_embed.seq.0.c.weight", "neck.0.weight"], "module"),
    ],
)
def test_detect_layout(keys, layout):
    assert tinysam.detect_layout(keys) == layout


def test_detect_layout_refuses_other_checkpoints():
    with pytest.raises(CheckpointError, match="not a TinySAM image-encoder checkpoint.*found model.embed_tokens"):
        tinysam.detect_layout(["model.embed_tokens.weight", "lm_head.weight"])


def test_split_strips_a_distributed_wrapper_prefix(tiny_source):
    wrapped = {f"module.{k}": v for k, v in official_layout(tiny_source).items()}
    split = tinysam.split_checkpoint(wrapped)
    assert split.layout == "sam" and set(split.state) == set(tiny_source.state_dict())


def test_loads_the_official_tinysam_layout(tmp_path, tiny_source, tiny_input):
    path = tmp_path / "tinysam_42.3.pth"
    torch.save(official_layout(tiny_source), path)
    enc = create_component("vision_encoder", "tinysam", checkpoint=str(path), **TINY)
    assert sorted(enc.load_report.ignored) == sorted(FAKE_SAM_PARTS)
    torch.testing.assert_close(run(enc, tiny_input), run(tiny_source, tiny_input), rtol=0, atol=0)


def test_loads_the_prsmed_authors_layout(tmp_path, tiny_source, tiny_input):
    path = tmp_path / "image_encoder.pth"
    torch.save(authors_layout(tiny_source), path)
    enc = create_component("vision_encoder", "tinysam", checkpoint=path, **TINY)
    ignored = enc.load_report.ignored
    assert {"sam.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix", "sam.mask_decoder.iou_token.weight",
            "image_encoder.neck.0.weight"} <= set(ignored)
    torch.testing.assert_close(run(enc, tiny_input), run(tiny_source, tiny_input), rtol=0, atol=0)


def test_authors_layout_with_two_different_encoders_is_refused(tmp_path, tiny_source):
    state = authors_layout(tiny_source)
    state["image_encoder.neck.0.weight"] = state["image_encoder.neck.0.weight"] + 1
    path = tmp_path / "image_encoder.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="two image encoders that differ.*neck.0.weight"):
        create_component("vision_encoder", "tinysam", checkpoint=path, **TINY)


def test_loads_own_safetensors(tmp_path, tiny_source, tiny_input):
    path = tmp_path / "vision_encoder.safetensors"
    write_state_dict(tiny_source.state_dict(), path)
    enc = create_component("vision_encoder", "tinysam", checkpoint=path, **TINY)
    assert enc.load_report.ignored == []
    torch.testing.assert_close(run(enc, tiny_input), run(tiny_source, tiny_input), rtol=0, atol=0)


def test_checkpoint_for_other_widths_is_refused(tmp_path, tiny_source):
    path = tmp_path / "tinysam.pth"
    torch.save(official_layout(tiny_source), path)
    expected = r"shape mismatch: .*neck\.0\.weight: checkpoint \(32, 64, 1, 1\) vs model \(16, 64, 1, 1\)"
    with pytest.raises(CheckpointError, match=expected):
        create_component("vision_encoder", "tinysam", checkpoint=path, **{**TINY, "out_channels": 16})


def test_checkpoint_with_stray_keys_is_refused(tmp_path, tiny_source):
    state = official_layout(tiny_source)
    state["decoder.extra"] = torch.zeros(1)
    del state["image_encoder.neck.3.bias"]
    path = tmp_path / "tinysam.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"1 missing: neck\.3\.bias; 1 unexpected: decoder\.extra"):
        create_component("vision_encoder", "tinysam", checkpoint=path, **TINY)


# --- SAM ViT --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sam_source():
    torch.manual_seed(0)
    return randomize(create_component("vision_encoder", "sam-vit", config=SAM_TINY), seed=2)


def test_sam_vit_default_builds_on_meta_as_vit_b():
    with torch.device("meta"):
        enc = create_component("vision_encoder", "sam-vit")
    cfg = enc.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (768, 12, 12)
    assert list(cfg.global_attn_indexes) == [2, 5, 8, 11]
    assert sum(p.numel() for p in enc.parameters()) == 89_670_912  # SAM ViT-B image encoder
    assert enc.contract == get_registry().contract("vision_encoder", "sam-vit")


def test_sam_vit_tiny_forward_and_input_check(sam_source):
    out = run(sam_source, pixels(64))
    assert out.shape == (2, 16, 4, 4)
    with pytest.raises(ValueError, match=r"image_size=64 expects pixels of shape \(B, 3, 64, 64\)"):
        sam_source(pixels(32, batch=1))


def test_sam_vit_own_safetensors_round_trip(tmp_path, sam_source):
    path = tmp_path / "vision_encoder.safetensors"
    write_state_dict(sam_source.state_dict(), path)
    enc = create_component("vision_encoder", "sam-vit", config=SAM_TINY, checkpoint=path)
    torch.testing.assert_close(run(enc, pixels(64)), run(sam_source, pixels(64)), rtol=0, atol=0)


def to_segment_anything_names(key: str) -> str:
    """transformers names -> segment-anything's ImageEncoderViT names, spelled out independently of the loader."""
    key = key.removeprefix("vision_encoder.")
    for new, old in [("patch_embed.projection.", "patch_embed.proj."), ("neck.conv1.", "neck.0."),
                     ("neck.layer_norm1.", "neck.1."), ("neck.conv2.", "neck.2."), ("neck.layer_norm2.", "neck.3.")]:
        key = key.replace(new, old)
    if key.startswith("layers."):
        key = "blocks." + key[len("layers."):]
        key = key.replace(".layer_norm1.", ".norm1.").replace(".layer_norm2.", ".norm2.")
    return "image_encoder." + key


def test_sam_vit_loads_segment_anything_layout(tmp_path, sam_source):
    state = {to_segment_anything_names(k): v for k, v in sam_source.state_dict().items()}
    assert "image_encoder.blocks.0.mlp.lin1.weight" in state and "image_encoder.neck.1.weight" in state
    path = tmp_path / "sam_vit_tiny.pth"
    torch.save({**state, **FAKE_SAM_PARTS}, path)
    enc = create_component("vision_encoder", "sam-vit", config=SAM_TINY, checkpoint=path)
    assert sorted(enc.load_report.ignored) == sorted(FAKE_SAM_PARTS)
    torch.testing.assert_close(run(enc, pixels(64)), run(sam_source, pixels(64)), rtol=0, atol=0)


def test_sam_vit_refuses_a_tinysam_checkpoint(tmp_path, tiny_source):
    path = tmp_path / "tinysam.pth"
    torch.save(official_layout(tiny_source), path)
    with pytest.raises(CheckpointError, match="does not fit SamViTEncoder"):
        create_component("vision_encoder", "sam-vit", config=SAM_TINY, checkpoint=path)


def test_sam_vit_pretrained_from_a_local_sam_model_directory(tmp_path):
    from transformers import SamConfig, SamModel

    torch.manual_seed(0)
    model = SamModel(SamConfig(
        vision_config=SAM_TINY,
        prompt_encoder_config=dict(hidden_size=16, image_size=64, patch_size=16),
        mask_decoder_config=dict(hidden_size=16, num_hidden_layers=1, mlp_dim=32, num_attention_heads=2,
                                 iou_head_hidden_dim=16),
    )).eval()
    model.save_pretrained(tmp_path)
    contract = get_registry().contract("vision_encoder", "sam-vit", pretrained=str(tmp_path))
    assert (contract.input_size, contract.out_channels) == (64, 16)
    enc = create_component("vision_encoder", "sam-vit", pretrained=str(tmp_path))
    assert enc.contract == contract
    assert any(k.startswith("mask_decoder.") for k in enc.load_report.ignored)
    with torch.no_grad():
        expected = model.vision_encoder(pixel_values=pixels(64)).last_hidden_state
    torch.testing.assert_close(run(enc, pixels(64)), expected, rtol=0, atol=0)


def test_sam_vit_pretrained_with_incompatible_override_is_refused(tmp_path, sam_source):
    from transformers import SamVisionModel

    model = SamVisionModel(sam_source.config)
    model.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        create_component("vision_encoder", "sam-vit", pretrained=str(tmp_path), config={"output_channels": 8})


def test_sam_vit_split_keeps_only_the_vision_encoder():
    split = sam_vit.split_checkpoint({"vision_encoder.neck.conv1.weight": torch.zeros(1),
                                      "shared_image_embedding.positional_embedding": torch.zeros(1),
                                      "prompt_encoder.no_mask_embed.weight": torch.zeros(1)})
    assert split.layout == "transformers" and list(split.state) == ["vision_encoder.neck.conv1.weight"]
    assert len(split.ignored) == 2
    with pytest.raises(CheckpointError, match="not a SAM ViT image-encoder checkpoint"):
        sam_vit.detect_layout(["layers.0.weight"])
