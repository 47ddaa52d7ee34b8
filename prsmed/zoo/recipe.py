"""The recipe that trains prsmed-tiny from scratch; ``prsmed zoo build prsmed-tiny`` runs it.

The 7B model starts from LLaVA-Med, whose tower already describes images in a way its LLM reads. The tiny model's
LLM starts from random weights, and trained jointly from scratch it learns the masks quickly but never names the
right zone: a random tower gives the LLM nothing about position to read. So, like LLaVA's own training, it goes in
stages:

1. **Tower stage.** Only the LLM's tower and projector train, with auxiliary heads on the projected image tokens:
   each token predicts whether its own patch touches a lesion, where that patch is (its coordinates), and which
   zone that lesion lies in; the flattened tokens predict the lesion's zones. Afterwards a lesion token's content
   says "lesion here, and it is the top-left one", so the LLM can name the zone by attending to lesion tokens,
   without decoding positions or bounding boxes itself. The auxiliary heads are thrown away. (Measured with
   ``bench/grounding_pilot.py``: per-token presence and zones instead of per-token lesion fractions took the
   grounding stage from 0.79 to 0.87 zone accuracy on fresh images, lung CT from 0.40 to 0.52. The stage
   runs 2,500 steps: at 600 its zone head was still improving, and 2,500 steps alone took the answers from 0.91 to
   0.96.) The tower probe that fine-tuning reads the tower through (prsmed/train/tower_probe.py) is then fitted
   on the finished, frozen tower.
2. **Grounding stage.** With the tower frozen, only the LLM's text model trains, on the real questions answered
   in sentences built from each mask: half of the draws in one house wording with the canonical zone words ("The
   nodule is in the top left.", "The nodule is in the top left, and another nodule is in the bottom right.", "No
   nodule is visible in this image."), a fifth in a report's words (prsmed.data.vocabulary: "superior left
   aspect", "is noted in", "Impression:"), the rest in the synthetic data's varied wording (twenty frames,
   synonyms such as "upper left" or "left upper", "near the centre"), drawn afresh at every draw. The greedy
   answer is then the house sentence, a whole sentence that ends cleanly; the others give the text model the words
   a user's dataset may use, so that fine-tuning only has to prefer them. (Revisions 1-5 answered with the zones alone,
   "top left.": their text model knew no other words, and fine-tuning on sentences broke it.) The questions are
   perturbed (:func:`noisy_question`) so the answer comes to depend on the image alone, which carries it to
   question wordings it never saw. 6% of the images show no lesion, so the model learns to say so. Lung CT
   images have two nodules half of the time, and images with two lesions are drawn three times as often: at their
   natural rate the text model named both zones for none of them (revision 3).
3. **Joint stage.** The ordinary trainer (structure + LM + modality losses) trains the vision encoder, the fusion
   head and the modality head to the end of the cosine schedule, on the house sentences. The whole LLM stays
   frozen: the fusion head learns to read the hidden states the grounding stage produced, and nothing can wash
   out what stages 1 and 2 put there; for the images with no lesion it learns to return an empty mask.

The result is written as safetensors files per component into the package's assets, where the zoo finds them.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from prsmed.data.layout import load_records
from prsmed.data.readers import read_image, read_mask
from prsmed.data.synth import STYLES, synthesize
from prsmed.data.templates import make_qa
from prsmed.data.vocabulary import vocabulary_answer
from prsmed.data.zones import ZONES, zone_of_mask
from prsmed.train.tower_probe import PROBE_FILE, token_targets
from prsmed.weights import write_state_dict
from prsmed.zoo.presets import ASSETS, PRESETS

log = logging.getLogger(__name__)

PARTS = ("vision_encoder", "llm", "fusion_head", "modality_head")


@dataclass
class RecipeConfig:
    n_images: int = 3000
    data_seed: int = 7
    image_size: int = 256
    seed: int = 0
    # 2,500 steps (600 in revision 4): the zone head was still learning at 600, and the text model reads what the
    # tower carries (bench/RESULTS.md, revision 5 pilots).
    tower_steps: int = 2500
    tower_batch: int = 64
    tower_lr: float = 2e-3
    cell_target: str = "presence"  # per-token target of the tower stage: "presence" or "fraction"
    token_zones: bool = True  # tower stage: each lesion token also predicts its lesion's zone
    # Grounding stage: how much more often images with two lesions are drawn than other images of their look
    # (revisions 6-7: 3, with lung CT images having two nodules half of the time; revision 5: 8 with 30%).
    multi_lesion_weight: float = 3.0
    # Lung CT images drawn for the grounding stage alone, from their own seed (none in revision 7, whose text model
    # named both nodules on 0.97 of the recipe's 190 two-nodule training images and on 0.75 of 400 fresh ones: it
    # had learned those few by heart). A candidate revision 8 with 1,000 of them (multi_lesion_weight 1,
    # grounding_steps 5,400) answered better but fine-tuned worse, and was not shipped (bench/RESULTS.md).
    grounding_lung_ct_images: int = 0
    # With extra images: whether each look keeps the share of the draws it has in the recipe's data (draw_weights),
    # or the extra images add draws to their look.
    keep_look_shares: bool = False
    # The share of grounding draws answered with the house sentence, and with a report's words (the position
    # vocabulary, revision 7: "superior left aspect", "is noted in"); the rest in the data's varied wording. Before
    # revision 7 the text model never wrote those words, and fine-tuning on a dataset that uses them broke its
    # sentences ("noted in the left lower region.", bench/RESULTS.md).
    house_fraction: float = 0.5
    vocabulary_fraction: float = 0.2
    # Images with no lesion (an empty mask, an answer that says so), and lung CT images with two nodules.
    no_lesion_fraction: float = 0.06
    two_lesion_fraction: float = 0.5
    # 4,500 (3,500 before revision 7): the draws now spread over three wordings.
    grounding_steps: int = 4500
    grounding_batch: int = 16
    grounding_lr: float = 1e-3
    # Seven epochs (revision 5: six, 1,800 steps at batch 8, whose validation Dice was still rising at the end; 0.87).
    epochs: int = 7
    batch_size: int = 8
    lr: float = 5e-4
    min_lr: float = 1e-5
    max_steps: int | None = None
    # The tower probe that fine-tuning reads the tower through (prsmed/train/tower_probe.py): fitted on the finished
    # tower over this many training rows. Fitted over all 3,000 it read fresh known-look images better (0.92 against
    # 0.77), but taught new looks less well: 0.60 zone accuracy of the answers on a fundus look against 0.83.
    probe_rows: int = 600


def recipe_data(data_dir: Path, cfg: RecipeConfig):
    """The recipe's synthetic dataset (the pilots in bench/ make the same one)."""
    return synthesize(data_dir, n=cfg.n_images, seed=cfg.data_seed, size=cfg.image_size,
                      two_lesion_fraction=cfg.two_lesion_fraction, no_lesion_fraction=cfg.no_lesion_fraction)


def tower_features(model, pixels: torch.Tensor) -> torch.Tensor:
    """The projected image tokens (batch, tokens, hidden) the LLM reads for CLIP-preprocessed ``pixels``."""
    return model.llm.image_features(pixels)


def tower_targets(model, records, cell_target: str = "fraction") -> tuple[torch.Tensor, ...]:
    """For every record: CLIP pixels; per-token lesion targets on the token grid (the fraction of the patch that is
    lesion, or whether any of it is: ``cell_target="presence"``); multi-hot zones; and per-token zones (the index
    in ZONES of the lesion a token's patch touches, -100 for tokens on no lesion)."""
    tokens = model.contracts["llm"].image_tokens
    grid = int(math.isqrt(tokens))
    pixels, parts = [], []
    for start in range(0, len(records), 64):
        chunk = records[start : start + 64]
        pixels.append(model.llm.preprocess_images([read_image(r.image_path) for r in chunk]))
        masks = [read_mask(r.mask_path) for r in chunk]
        targets = token_targets(masks, tokens)  # presence per token, padded to a square as the tower sees it
        if cell_target != "presence":
            targets.cells = torch.stack([F.adaptive_avg_pool2d(torch.from_numpy(_padded(m))[None, None], grid)
                                         .flatten() for m in masks])
        parts.append(targets)
    return (torch.cat(pixels), torch.cat([t.cells for t in parts]), torch.cat([t.zones for t in parts]),
            torch.cat([t.token_zones for t in parts]))


def _padded(mask: np.ndarray) -> np.ndarray:
    h, w = mask.shape
    side = max(h, w)
    square = np.zeros((side, side), dtype=np.float32)
    square[(side - h) // 2 : (side - h) // 2 + h, (side - w) // 2 : (side - w) // 2 + w] = mask > 0
    return square


@dataclass
class TowerStage:
    """What stage 1 leaves: its last logged figures and the auxiliary heads (the recipe throws the heads away and
    fits the tower probe afresh on the finished tower)."""

    stats: dict[str, float]
    token_head: nn.Linear
    zone_head: nn.Linear


def train_tower(model, records, cfg: RecipeConfig) -> TowerStage:
    """Stage 1: teach the LLM's tower and projector to carry where the lesion is."""
    params = _tower_params(model)
    hidden = model.contracts["llm"].hidden_size
    tokens = model.contracts["llm"].image_tokens
    # Per token: lesion logit, x and y of the token's patch, and (with cfg.token_zones) the zone of its lesion.
    token_head = nn.Linear(hidden, 3 + (len(ZONES) if cfg.token_zones else 0))
    zone_head = nn.Linear(tokens * hidden, len(ZONES))
    pixels, cells, zones, token_zones = tower_targets(model, records, cfg.cell_target)
    grid = int(math.isqrt(tokens))
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, grid), torch.linspace(-1, 1, grid), indexing="ij")
    coords = torch.stack([xs.flatten(), ys.flatten()], dim=-1)  # raster order, as the tokens come
    opt = torch.optim.AdamW(params + list(token_head.parameters()) + list(zone_head.parameters()), lr=cfg.tower_lr,
                            weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.tower_steps, eta_min=cfg.tower_lr * 0.01)
    gen = torch.Generator().manual_seed(cfg.seed)
    model.llm_image_path.train()
    stats = {}
    for step in range(cfg.tower_steps):
        idx = torch.randint(0, len(pixels), (cfg.tower_batch,), generator=gen)
        feats = tower_features(model, pixels[idx])
        per_token = token_head(feats)
        cell_loss = F.binary_cross_entropy_with_logits(per_token[..., 0], cells[idx])
        coord_loss = F.mse_loss(per_token[..., 1:3], coords.expand_as(per_token[..., 1:3]))
        zone_logits = zone_head(feats.flatten(1))
        zone_loss = F.binary_cross_entropy_with_logits(zone_logits, zones[idx])
        loss = cell_loss + coord_loss + zone_loss
        if cfg.token_zones and (token_zones[idx] >= 0).any():
            loss = loss + F.cross_entropy(per_token[..., 3:].reshape(-1, len(ZONES)), token_zones[idx].reshape(-1),
                                          ignore_index=-100)
        _optimizer_step(opt, sched, loss, params)
        if step % 50 == 0 or step == cfg.tower_steps - 1:
            exact = ((zone_logits > 0) == (zones[idx] > 0.5)).all(dim=1).float().mean().item()
            stats = {"step": step, "cell_loss": cell_loss.item(), "coord_loss": coord_loss.item(),
                     "zone_loss": zone_loss.item(), "zone_exact": exact}
            log.info("tower stage %s", stats)
    return TowerStage(stats, token_head, zone_head)


def grounding_rows(work_dir: Path, train_rows: list, cfg: RecipeConfig) -> list:
    """The grounding stage's rows: the recipe's training rows and ``cfg.grounding_lung_ct_images`` more lung CT
    images (written to ``work_dir/grounding-data`` if missing, from their own seed, all in the train split)."""
    rows = [r for r in train_rows if r.split == "train"]
    if cfg.grounding_lung_ct_images <= 0:
        return rows
    extra_dir = Path(work_dir) / "grounding-data"
    if not (extra_dir / "annotations").is_dir():
        synthesize(extra_dir, n=cfg.grounding_lung_ct_images, seed=cfg.data_seed + 1, size=cfg.image_size,
                   modalities=("lung_CT",), two_lesion_fraction=cfg.two_lesion_fraction,
                   no_lesion_fraction=cfg.no_lesion_fraction, split_fractions=(1.0, 0.0, 0.0))
    return rows + [r for r in load_records(extra_dir) if r.split == "train"]


def fit_tower_probe(model, rows, cfg: RecipeConfig):
    """The probe fine-tuning reads the finished (frozen) tower through, fitted on the recipe's training rows."""
    from prsmed.train.tower_probe import fit_probe

    probe, exact = fit_probe(model, [r for r in rows if r.split == "train"][: cfg.probe_rows], seed=cfg.seed)
    log.info("tower probe: reads the zones of %.3f of its rows exactly", exact)
    return probe


def add_tower_probe(data_dir: str | Path, assets_dir: str | Path | None = None,
                    cfg: RecipeConfig | None = None) -> Path:
    """Fit the tower probe for weights built without one (revision 6 as first shipped), on the recipe's data
    (``work_dir/data`` of the build, or a fresh one made here), and write it beside them."""
    from prsmed.zoo import build_model

    cfg = cfg or RecipeConfig()
    data_dir = Path(data_dir)
    assets_dir = Path(assets_dir) if assets_dir else ASSETS / "prsmed-tiny"
    if not (data_dir / "annotations").is_dir():
        recipe_data(data_dir, cfg)
    model = build_model("prsmed-tiny")
    model.eval()
    probe = fit_tower_probe(model, load_records(data_dir), cfg)
    write_state_dict(probe.state_dict(), assets_dir / PROBE_FILE, metadata={"preset": "prsmed-tiny"})
    from prsmed.base_weights import read_record, write_record

    record = read_record(assets_dir)
    write_record(assets_dir, preset=record.preset, revision=record.revision, trained_on=record.trained_on,
                 intended_use=record.intended_use, training_only=(PROBE_FILE,))
    return assets_dir / PROBE_FILE


def _tower_params(model) -> list[nn.Parameter]:
    return list(model.llm_image_path.parameters())


def _optimizer_step(opt, sched, loss: torch.Tensor, params: list[nn.Parameter]) -> None:
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()


def lesions_of(record) -> list[tuple[str, bool]]:
    """The record's lesions as (zone, near the centre), from its mask, in reading order; [] when it has none."""
    return zone_of_mask(read_mask(record.mask_path)).lesions


def _zone_phrase(zone: str) -> str:
    return "the centre of the image" if zone == "center" else f"the {zone}"


def house_answer(lesions: Sequence[tuple[str, bool]], target: str) -> str:
    """The base model's own sentence for its lesions: "The nodule is in the top left.", "The nodule is in the top
    left, and another nodule is in the bottom right.", "No nodule is visible in this image."

    One fixed wording with the canonical zone words, so that the greedy answer of the tiny text model is always a
    whole, clean sentence; the varied sentences it is also taught (:func:`grounding_answer`) give it the other
    words a user's dataset may use, which fine-tuning then only has to prefer."""
    if not lesions:
        return f"No {target} is visible in this image."
    first = f"The {target} is in {_zone_phrase(lesions[0][0])}"
    if len(lesions) == 1:
        return first + "."
    # The second lesion comes after the first is named, as a continuation: the model decides whether there is
    # another one once it has found the first, not in its first word (which made it announce two nodules on
    # one-nodule lung CT images: 0.63 right on lung CT against 0.83 with this form, bench/RESULTS.md).
    return f"{first}, and another {target} is in {_zone_phrase(lesions[1][0])}."


def grounding_answer(lesions: Sequence[tuple[str, bool]], target: str, rng: random.Random,
                     house_fraction: float, vocabulary_fraction: float = 0.0) -> str:
    """The answer the grounding stage teaches for one draw: the house sentence ``house_fraction`` of the time, a
    sentence in a report's words (prsmed.data.vocabulary: "superior left aspect", "is noted in", "Impression:")
    ``vocabulary_fraction`` of the time, else one in the synthetic data's varied wording (twenty frames, synonyms
    such as "upper left" or "left upper", "near the centre"); drawn afresh at every draw."""
    u = rng.random()
    if u < house_fraction:
        return house_answer(lesions, target)
    if u < house_fraction + vocabulary_fraction:
        return vocabulary_answer(lesions, target, rng)
    return make_qa(lesions, modality="", target=target, split="train", rng=rng, question="").answer


def target_of(record) -> str:
    info = STYLES.get(record.modality)
    return info.target if info else "lesion"


def noisy_question(question: str, rng: random.Random, pool: Sequence[str]) -> str:
    """The question with some words dropped or swapped for other words of the dataset, or (one time in ten)
    replaced by a string of random words.

    In the grounding stage the answer depends on the image only; training on perturbed questions teaches the text
    model that, so test questions worded unlike any training question (the held-out templates) do not move its
    answer. Measured on held-out templates: 0.77 zone accuracy without, 0.80-0.83 with (see bench/RESULTS.md).
    """
    u = rng.random()
    if u < 0.1:
        return " ".join(rng.choice(pool) for _ in range(rng.randint(4, 16)))
    if u >= 0.6:
        return question
    words = []
    for word in question.split():
        v = rng.random()
        if v < 0.2:
            continue
        words.append(rng.choice(pool) if v < 0.4 else word)
    return " ".join(words)


def draw_weights(records, lesions: dict, cfg: RecipeConfig, base_rows=None) -> torch.Tensor:
    """How often the grounding stage draws each record: within a look, an image with two lesions
    ``cfg.multi_lesion_weight`` times as often as one with one or none; across looks, with
    ``cfg.keep_look_shares``, each look as often as its share of ``base_rows`` (the recipe's training rows),
    however many extra images it has (grounding_rows), else each record alike."""
    base = Counter(r.modality for r in (base_rows if base_rows is not None and cfg.keep_look_shares else records))
    have = Counter(r.modality for r in records)
    return torch.tensor([(cfg.multi_lesion_weight if len(lesions[r.mask_path]) > 1 else 1.0)
                         * base[r.modality] / have[r.modality] for r in records])


def train_grounding(model, records, lesions: dict, cfg: RecipeConfig, base_rows=None) -> dict[str, float]:
    """Stage 2: the text model learns to answer in sentences that name the zones it reads from the (frozen) image
    tokens. ``lesions`` maps each record's mask path to its lesions (:func:`lesions_of`); ``base_rows``: the
    recipe's own training rows, whose looks' shares the draws keep (:func:`draw_weights`)."""
    frozen = {id(p) for p in _tower_params(model)}
    params = [p for p in model.llm.parameters() if id(p) not in frozen]
    states = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    images = {r.image_path: read_image(r.image_path) for r in records}
    opt = torch.optim.AdamW(params, lr=cfg.grounding_lr, weight_decay=1e-5)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.grounding_steps, eta_min=cfg.grounding_lr * 0.1)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    words = random.Random(cfg.seed + 2)
    pool = sorted({w for r in records for w in r.question.split()})
    answers = random.Random(cfg.seed + 3)
    weights = draw_weights(records, lesions, cfg, base_rows)
    model.llm.train()
    stats = {}
    for step in range(cfg.grounding_steps):
        picks = torch.multinomial(weights, cfg.grounding_batch, replacement=True, generator=gen)
        batch = [records[i] for i in picks]
        questions = [noisy_question(r.question, words, pool) for r in batch]
        targets = [grounding_answer(lesions[r.mask_path], target_of(r), answers, cfg.house_fraction,
                                    cfg.vocabulary_fraction) for r in batch]
        inputs = model.llm.encode(model.prompts(questions), [images[r.image_path] for r in batch], targets)
        loss = model.llm(inputs).loss
        _optimizer_step(opt, sched, loss, params)
        if step % 100 == 0 or step == cfg.grounding_steps - 1:
            stats = {"step": step, "loss": loss.item()}
            log.info("grounding stage %s", stats)
    for p in model.parameters():
        p.requires_grad_(states[id(p)])
    return stats


# The revision the recipe's weights are written as; the prsmed-tiny preset takes its revision from the weights.json
# that save_assets writes, so raising this one constant before a rebuild is all a new revision needs.
WEIGHTS_REVISION = "7"
WEIGHTS_TRAINED_ON = (
    "Synthetic drawings only: procedural images in six imaging styles standing for the paper's six modalities "
    "(brain MRI, ultrasound, lung CT, chest X-ray, endoscopy, dermoscopy), generated by `prsmed data synth`, "
    "6% of them with no lesion; answers are sentences in the synthetic data's wording and in a fixed vocabulary of "
    "report words for positions. No real scan was used."
)
WEIGHTS_INTENDED_USE = (
    "A small model for demonstrations, tests and fine-tuning experiments on CPU. Not for clinical use and not for "
    "real scans: on real images its masks and answers mean nothing."
)


def save_assets(model, out_dir: Path, probe=None) -> dict[str, str]:
    from prsmed.base_weights import RECORD, write_record

    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    if probe is not None:
        write_state_dict(probe.state_dict(), out_dir / PROBE_FILE, metadata={"preset": "prsmed-tiny"})
        written["tower_probe"] = PROBE_FILE
    for part in PARTS:
        module = getattr(model, part)
        if module is None:
            continue
        path = out_dir / f"{part}.safetensors"
        write_state_dict(module.state_dict(), path, metadata={"prsmed_part": part, "preset": "prsmed-tiny"})
        written[part] = path.name
    # Written last, from the files as they are on disk, so the record always describes the weights beside it.
    write_record(out_dir, preset="prsmed-tiny", revision=WEIGHTS_REVISION, trained_on=WEIGHTS_TRAINED_ON,
                 intended_use=WEIGHTS_INTENDED_USE, training_only=(PROBE_FILE,))
    written["record"] = RECORD
    return written


def build_tiny(work_dir: str | Path, cfg: RecipeConfig | None = None, *, assets_dir: str | Path | None = None,
               progress: bool = True) -> dict:
    """Run the whole recipe; returns a summary (also written to ``work_dir/recipe.json``)."""
    from prsmed.train.config import TrainConfig
    from prsmed.train.trainer import run_training
    from prsmed.zoo import build_model

    cfg = cfg or RecipeConfig()
    work_dir = Path(work_dir)
    assets_dir = Path(assets_dir) if assets_dir else ASSETS / "prsmed-tiny"
    t0 = time.monotonic()
    data_dir = work_dir / "data"
    if not (data_dir / "annotations").is_dir():
        recipe_data(data_dir, cfg)
    train_rows = [r for r in load_records(data_dir) if r.split in ("train", "val")]

    spec = PRESETS["prsmed-tiny"].spec.model_copy(deep=True)
    spec.lora = None
    spec.train.llm = True
    torch.manual_seed(cfg.seed)
    model = build_model(spec)
    tower = train_tower(model, [r for r in train_rows if r.split == "train"], cfg)
    for p in _tower_params(model):
        p.requires_grad_(False)
    probe = fit_tower_probe(model, train_rows, cfg)
    t_tower = time.monotonic() - t0
    # Each record's lesions, from its mask read once; stages 2 and 3 both use them.
    ground = grounding_rows(work_dir, train_rows, cfg)
    unique = {r.mask_path: r for r in [*train_rows, *ground]}  # ground repeats the training split's rows
    lesions = {path: lesions_of(r) for path, r in unique.items()}
    grounding = train_grounding(model, ground, lesions, cfg, [r for r in train_rows if r.split == "train"])
    # The answers are final here (the joint stage freezes the LLM): kept for pilots of fine-tuning
    # (bench/finetune_unseen.py --base-llm) while the joint stage runs.
    write_state_dict(model.llm.state_dict(), work_dir / "grounded-llm.safetensors")
    t_grounding = time.monotonic() - t0 - t_tower

    train_cfg = TrainConfig(
        model="prsmed-tiny", data=data_dir, out=work_dir / "joint", epochs=cfg.epochs, batch_size=cfg.batch_size,
        lr=cfg.lr, min_lr=cfg.min_lr, seed=cfg.seed, max_steps=cfg.max_steps, precision="fp32", progress=progress,
        tower_weight=0.0,  # the whole LLM is frozen here; the probe is for fine-tuning
        # The earlier stages are deterministic for a seed, so an interrupted joint stage resumes where it stopped.
        resume=(work_dir / "joint" / "checkpoints").is_dir(),
    )
    for p in model.llm.parameters():
        p.requires_grad_(False)
    # The LLM is frozen here, so the answers only feed the (unused) LM loss; the house sentences keep it honest.
    house = [replace(r, answer=house_answer(lesions[r.mask_path], target_of(r))) for r in train_rows]
    result = run_training(train_cfg, model=model, records=house)
    if result.status != "completed":
        raise RuntimeError(f"the joint stage ended {result.status!r} at step {result.step}: {result.reason}; rerun "
                           f"`prsmed zoo build prsmed-tiny --work-dir {work_dir}` to resume it")
    written = save_assets(model, assets_dir, probe)
    summary = {
        "recipe": cfg.__dict__,
        "tower_stage": tower.stats,
        "grounding_stage": grounding,
        "joint_stage": {"status": result.status, "steps": result.step},
        "seconds": {"tower": round(t_tower, 1), "grounding": round(t_grounding, 1),
                    "total": round(time.monotonic() - t0, 1)},
        "assets": {k: str(assets_dir / v) for k, v in written.items()},
    }
    (work_dir / "recipe.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary

