"""A small model and dataset for trainer tests: the paper's fusion head at tiny widths behind stand-in components,
with the helpers the trainer's test modules share (and the subprocess tests import, through DRIVER).

A step of this model takes a fraction of a second on a CPU; prsmed-tiny itself is trained in the slow tests.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from prsmed.model.prsmed_model import PRSMedModel
from prsmed.model.spec import ComponentRef, LoraSpec, ModelSpec
from prsmed.train import TrainConfig, run_training
from prsmed.train import checkpoint as ckpt_mod
from prsmed.train.checkpoint import CheckpointManager
from prsmed.weights import read_state_dict

TESTS = Path(__file__).parent
SIGTERM_DEADLINE_S = 30.0
VENV_BIN = Path(sys.executable).parent


# The paper's fusion head at tiny widths behind a 64-pixel patch-embedding encoder (with BatchNorm) and a byte-level
# 1-layer Llama (a transformers model, so LoRA applies as on the real ones).

LLM_HIDDEN = 32


def _standin_llm_contract(**_):
    from prsmed.components import LLMContract

    return LLMContract(hidden_size=LLM_HIDDEN, vocab_size=260)


def _build_standin_llm(**_):
    from transformers import LlamaConfig, LlamaForCausalLM

    from prsmed.interfaces import LLMBackbone, LLMInputs, LLMOutput

    class ByteLLM(LLMBackbone):
        lora_target_modules = ("q_proj", "k_proj", "v_proj", "o_proj")

        def __init__(self):
            super().__init__()
            cfg = LlamaConfig(hidden_size=LLM_HIDDEN, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2, num_key_value_heads=1, vocab_size=260,
                              max_position_embeddings=256)
            self.model = LlamaForCausalLM(cfg)
            self.contract = _standin_llm_contract()

        def encode(self, prompts, images=None, answers=None, *, padding_side="right"):
            rows, labels = [], []
            for i, p in enumerate(prompts):
                ids = [1] + [b + 3 for b in p.encode()]
                lab = [-100] * len(ids)
                if answers is not None:
                    a = [b + 3 for b in answers[i].encode()] + [2]
                    ids, lab = ids + a, lab + a
                rows.append(ids)
                labels.append(lab)
            n = max(map(len, rows))

            def pad(r, v):
                return r + [v] * (n - len(r)) if padding_side == "right" else [v] * (n - len(r)) + r

            return LLMInputs(torch.tensor([pad(r, 0) for r in rows]),
                             torch.tensor([pad([1] * len(r), 0) for r in rows]), None,
                             torch.tensor([pad(x, -100) for x in labels]) if answers is not None else None)

        def forward(self, inputs, *, use_cache=False):
            out = self.model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                             output_hidden_states=True)
            loss = None
            if inputs.labels is not None:
                loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(),
                                                         inputs.labels[:, 1:].flatten(), ignore_index=-100)
            return LLMOutput(out.hidden_states[-1], inputs.attention_mask, out.logits, loss)

    return ByteLLM()


def _patch_encoder_contract(**_):
    from prsmed.components import VisionEncoderContract

    return VisionEncoderContract(input_size=64, out_channels=32, stride=16)


def _build_patch_encoder(**_):
    """A 16x16 patch embedding with BatchNorm: a few convolutions instead of TinyViT's hundreds (CPU autocast makes
    every convolution slow), and running statistics that checkpoints must carry."""
    from prsmed.interfaces import VisionEncoder

    class PatchEncoder(VisionEncoder):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 16, stride=16), torch.nn.BatchNorm2d(32),
                                            torch.nn.GELU(), torch.nn.Conv2d(32, 32, 1))
            self.contract = _patch_encoder_contract()

        def forward(self, pixels):
            return self.body(pixels)

    return PatchEncoder()


class StandInPlugin:
    """Registers the small test components (the subprocess tests register them through DRIVER)."""

    @staticmethod
    def prsmed_register_components(register):
        from prsmed.components import ComponentSpec

        register(ComponentSpec(kind="llm", name="test-byte-llm", build=_build_standin_llm,
                               contract=_standin_llm_contract))
        register(ComponentSpec(kind="vision_encoder", name="test-patch-encoder", build=_build_patch_encoder,
                               contract=_patch_encoder_contract))


def _hookimpl(plugin):
    from prsmed.hookspecs import hookimpl

    plugin.prsmed_register_components = staticmethod(hookimpl(plugin.prsmed_register_components))
    return plugin


_hookimpl(StandInPlugin)

SPEC = ModelSpec(
    name="test-small",
    vision_encoder=ComponentRef(name="test-patch-encoder"),
    llm=ComponentRef(name="test-byte-llm"),
    fusion_head=ComponentRef(name="prsmed", options={
        "prompt_dim": LLM_HIDDEN, "image_dim": 32, "hidden_dim": 32, "cross_heads": 2, "encoder_heads": 2,
        "ffn_dim": 32}),
    lora=LoraSpec(r=4, alpha=4, dropout=0.05),
)



def registry():
    from prsmed.registry import Registry

    reg = Registry()
    reg.register_plugin(StandInPlugin, name="test-standin")
    return reg


def build_small(seed: int = 42, spec: ModelSpec = SPEC) -> PRSMedModel:
    """What the trainer does before building: seed, then build (so two builds give the same frozen base)."""
    torch.manual_seed(seed)
    return PRSMedModel(spec, registry=registry())


def register_standin_globally() -> None:
    """For subprocesses: make ``test-byte-llm`` available to ``--model spec.json``."""
    from prsmed.registry import get_registry

    get_registry().register_plugin(StandInPlugin, name="test-standin")


FAIL_SAVES_ENV = "PRSMED_TEST_FAIL_SAVE_FILES_AFTER"


def inject_faults_from_env() -> None:
    """For subprocesses: with ``PRSMED_TEST_FAIL_SAVE_FILES_AFTER=n``, every checkpoint file write after the n-th
    fails with ENOSPC, as on a disk that has just filled up."""
    after = os.environ.get(FAIL_SAVES_ENV)
    if after is None:
        return
    real, calls = ckpt_mod.save_torch, {"n": 0}

    def disk_full(obj, path):
        calls["n"] += 1
        if calls["n"] > int(after):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(obj, path)

    ckpt_mod.save_torch = disk_full


# --- a small dataset ---------------------------------------------------------------------------------------------

MODALITIES = ("brain", "polyp", "skin", "lung_CT", "unknown-modality")


def make_dataset(root: Path, *, n_train: int = 4, n_val: int = 1, size: int = 32, bad: bool = False) -> Path:
    """A JSONL-manifest dataset of noisy images with one bright square lesion each."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n_train + n_val):
        img = rng.integers(0, 120, (size, size, 3), dtype=np.uint8)
        mask = np.zeros((size, size), dtype=np.uint8)
        y, x = rng.integers(0, size // 2, 2)
        mask[y:y + size // 3, x:x + size // 3] = 255
        img[mask > 0] = 230
        Image.fromarray(img).save(root / f"img{i}.png")
        Image.fromarray(mask).save(root / f"mask{i}.png")
        quadrant = ("top" if y < size // 4 else "bottom") + (" left" if x < size // 4 else " right")
        rows.append({"image": f"img{i}.png", "mask": f"mask{i}.png", "question": "where is the lesion?",
                     "answer": f"in the {quadrant}.", "modality": MODALITIES[i % len(MODALITIES)],
                     "split": "train" if i < n_train else "val"})
    if bad:
        Image.fromarray(np.zeros((size, size), dtype=np.uint8)).save(root / "empty.png")
        Image.fromarray(np.full((size + 5, size), 255, dtype=np.uint8)).save(root / "wide.png")
        for image, mask in (("missing.png", "mask0.png"), ("img0.png", "empty.png"), ("img1.png", "wide.png")):
            rows.append({"image": image, "mask": mask, "question": "where?", "answer": "here.", "modality": "brain",
                         "split": "train"})
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def config(data: Path, out: Path, **overrides) -> TrainConfig:
    base = {"model": "test-small", "data": data, "out": out, "epochs": 2, "batch_size": 2, "progress": False,
            "tensorboard": False, "lr": 1e-3, "min_lr": 1e-5}
    return TrainConfig(**{**base, **overrides})


def run(cfg: TrainConfig, **kwargs):
    return run_training(cfg, model=build_small(cfg.seed), **kwargs)


def trained_state(run_dir: Path) -> dict[str, torch.Tensor]:
    latest = CheckpointManager(run_dir / "checkpoints").checkpoints()[-1]
    return read_state_dict(latest / "trained.safetensors")


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# --- subprocesses ------------------------------------------------------------------------------------------------

DRIVER = """
import sys
sys.path.insert(0, {tests!r})
import small_training
small_training.register_standin_globally()
small_training.inject_faults_from_env()
from prsmed.train.__main__ import main
main()
"""


def driver(tmp_path: Path) -> tuple[Path, Path]:
    script = tmp_path / "driver.py"
    script.write_text(DRIVER.format(tests=str(TESTS)))
    spec = tmp_path / "spec.json"
    spec.write_text(SPEC.model_dump_json())
    return script, spec


def assert_same_weights(want_dir: Path, got_dir: Path, why: str) -> None:
    want, got = trained_state(want_dir), trained_state(got_dir)
    assert want.keys() == got.keys(), why
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6, msg=lambda m, k=k: f"{k} ({why}): {m}")


# 4 training rows, batch 1, 3 epochs: 12 steps, a checkpoint every 3 and at each epoch end.
SINGLE = {"epochs": 3, "batch_size": 1, "save_every": 3}


def single_process_args(script: Path, spec: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(script), "--model", str(spec), "--data", str(data), "--out", str(out),
            "--epochs", str(SINGLE["epochs"]), "--batch-size", str(SINGLE["batch_size"]),
            "--save-every", str(SINGLE["save_every"]), "--no-progress", "--no-tensorboard", "--lr", "1e-3",
            "--min-lr", "1e-5", *extra]
