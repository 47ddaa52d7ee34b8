"""Teaching the LLM's image tower a new look from the masks, read through a fixed probe.

The text model names a lesion's zone by reading the image tokens of the LLM's own tower (LLaVA's CLIP tower and
projector). prsmed-tiny's tower was taught six synthetic looks; on a seventh it does not mark the lesion, so
fine-tuning the text model alone cannot make the answers right there (bench/RESULTS.md, "Fine-tuning on a look
the model never saw"), and the language-model loss alone is too weak a signal to retrain the tower in a short
run. The masks carry that signal densely.

A *tower probe* is a pair of linear heads fitted once, on the shipped tower's tokens over the looks it knows: per
token, "does this patch touch a lesion", the patch's position, and the zone of that lesion; over all tokens, the
image's zones. During fine-tuning the probe is frozen and its loss, against targets made from each row's mask,
trains the tower's LoRA weights: the tower learns to write "lesion here, top left" on the new look in the same
directions the probe (and the text model, which was trained on those tokens) already reads. The answer stays the
text model's own generation; the probe is used in training only and never at prediction.

A model has a probe when its weights ship one (``tower_probe.safetensors`` beside them: prsmed-tiny). The 7B
model has none: LLaVA-Med's tower already describes real images, and the paper's recipe leaves it frozen.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from prsmed.data.zones import ZONES, find_components
from prsmed.eval.runner import mask_zones

PROBE_FILE = "tower_probe.safetensors"
# Lesion tokens are a few in a hundred: weighted up, or the cheapest fit on a new look is "no lesion anywhere".
LESION_TOKEN_WEIGHT = 10.0


class TowerProbe(nn.Module):
    """Per token: lesion logit, (x, y) of the token's patch, zone logits of its lesion; per image: zone logits."""

    def __init__(self, hidden: int, tokens: int) -> None:
        super().__init__()
        self.tokens = tokens
        self.token_head = nn.Linear(hidden, 3 + len(ZONES))
        self.zone_head = nn.Linear(tokens * hidden, len(ZONES))
        grid = math.isqrt(tokens)
        if grid * grid != tokens:
            raise ValueError(f"a tower probe needs a square token grid, got {tokens} image tokens")
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, grid), torch.linspace(-1, 1, grid), indexing="ij")
        self.register_buffer("coords", torch.stack([xs.flatten(), ys.flatten()], dim=-1), persistent=False)

    def loss(self, image_tokens: torch.Tensor, targets: "TokenTargets") -> torch.Tensor:
        """The probe's loss on ``image_tokens`` (batch, tokens, hidden) against ``targets`` of the same rows."""
        out = self.token_head(image_tokens.float())
        weight = torch.tensor(LESION_TOKEN_WEIGHT, device=out.device)
        loss = F.binary_cross_entropy_with_logits(out[..., 0], targets.cells, pos_weight=weight)
        loss = loss + F.mse_loss(out[..., 1:3], self.coords.expand_as(out[..., 1:3]))
        if (targets.token_zones >= 0).any():
            loss = loss + F.cross_entropy(out[..., 3:].reshape(-1, len(ZONES)), targets.token_zones.reshape(-1),
                                          ignore_index=-100)
        zone_logits = self.zone_head(image_tokens.float().flatten(1))
        return loss + F.binary_cross_entropy_with_logits(zone_logits, targets.zones)

    @torch.no_grad()
    def zone_exact(self, image_tokens: torch.Tensor, targets: "TokenTargets") -> float:
        """Share of rows whose zones the probe reads exactly: how much position the tokens carry."""
        logits = self.zone_head(image_tokens.float().flatten(1))
        return ((logits > 0) == (targets.zones > 0.5)).all(dim=1).float().mean().item()


class TokenTargets:
    """What the probe should read from each row's image tokens, made from its mask."""

    def __init__(self, cells: torch.Tensor, token_zones: torch.Tensor, zones: torch.Tensor) -> None:
        self.cells = cells  # (B, T) float: the token's patch touches a lesion
        self.token_zones = token_zones  # (B, T) long: index in ZONES of that lesion, -100 for no lesion
        self.zones = zones  # (B, len(ZONES)) float multi-hot

    def to(self, device: torch.device | str) -> "TokenTargets":
        return TokenTargets(self.cells.to(device), self.token_zones.to(device), self.zones.to(device))

    def rows(self, index: torch.Tensor) -> "TokenTargets":
        return TokenTargets(self.cells[index], self.token_zones[index], self.zones[index])


def token_targets(masks: Sequence[np.ndarray], tokens: int) -> TokenTargets:
    """Targets for masks at their images' own size: the tower sees each image padded to a centred square (LLaVA's
    "pad"), cut into a ``sqrt(tokens)``-sided grid of patches."""
    grid = math.isqrt(tokens)
    cells, token_zones, zones = [], [], []
    for mask in masks:
        mask = np.asarray(mask) > 0
        h, w = mask.shape
        side = max(h, w)
        top, left = (side - h) // 2, (side - w) // 2
        square = np.zeros((side, side), dtype=np.float32)
        square[top : top + h, left : left + w] = mask
        cells.append(F.adaptive_max_pool2d(torch.from_numpy(square)[None, None], grid).flatten())
        hot = torch.zeros(len(ZONES))
        per_token = torch.full((grid * grid,), -100, dtype=torch.long)
        for zone in mask_zones(mask):
            if zone in ZONES:
                hot[ZONES.index(zone)] = 1
        for comp in find_components(mask):
            x0, y0, x1, y1 = comp.bbox
            part = np.zeros_like(square)
            part[top + y0 : top + y1 + 1, left + x0 : left + x1 + 1] = square[top + y0 : top + y1 + 1,
                                                                                left + x0 : left + x1 + 1]
            touched = F.adaptive_max_pool2d(torch.from_numpy(part)[None, None], grid).flatten() > 0
            per_token[touched] = ZONES.index(comp.zone)
        zones.append(hot)
        token_zones.append(per_token)
    return TokenTargets(torch.stack(cells), torch.stack(token_zones), torch.stack(zones))


def unstretch(mask: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """A square training mask (resized to the vision encoder's input) back to its image's aspect ``size`` (w, h),
    at the square's resolution: the tower pads rather than stretches."""
    side = mask.shape[-1]
    w, h = size
    scale = side / max(w, h)
    shape = (max(1, round(h * scale)), max(1, round(w * scale)))
    return F.interpolate(mask.reshape(1, 1, side, side).float(), size=shape, mode="nearest")[0, 0].numpy()


def probe_file(model) -> Path | None:
    """The tower probe shipped with a zoo model's weights, or None."""
    from prsmed.zoo.presets import ASSETS

    path = ASSETS / model.spec.name / PROBE_FILE
    return path if path.exists() else None


def load_probe(model) -> TowerProbe | None:
    """The model's tower probe, frozen; None when its weights ship none or its LLM has no image path."""
    from prsmed.weights import load_strict, read_state_dict

    path = probe_file(model)
    if path is None or model.llm.image_path() is None:
        return None
    contract = model.contracts["llm"]
    probe = TowerProbe(contract.hidden_size, contract.image_tokens)
    load_strict(probe, read_state_dict(path), source=str(path))
    probe.requires_grad_(False)
    return probe


@torch.no_grad()
def probe_reads(model, probe: TowerProbe, records: Sequence, *, rows: int = 64, device="cpu") -> float:
    """Share of ``rows`` records, spread over ``records``, whose zones the probe reads from the model's tower as it
    is now: whether the tower already reads the data's look. Rows that cannot be read are skipped."""
    from prsmed.train.data import BadRow, read_pair

    pairs = []
    for record in list(records)[:: max(1, len(records) // rows)][:rows]:
        try:
            pairs.append(read_pair(record))
        except BadRow:
            continue
    if not pairs:
        return 0.0
    pixels = model.llm.preprocess_images([image.convert("RGB") for image, _ in pairs]).to(device)
    targets = token_targets([mask for _, mask in pairs], probe.tokens).to(device)
    return probe.zone_exact(model.llm.image_features(pixels), targets)


class ImageTokens:
    """Catches the image tokens the text model reads (the output of the LLM's projector) during a forward pass.
    The rest of the model reads them unchanged, so the language-model loss reaches the tower too: stopping it there
    kept the sentences cleaner on a histology look but left the fundus look's answers at 0.73 zone accuracy
    instead of 0.90 and out of the dataset's words (bench/RESULTS.md)."""

    def __init__(self, model) -> None:
        path = model.llm.image_path()
        if path is None:
            raise ValueError(f"LLM {model.spec.llm.name!r} has no image path to read image tokens from")
        self.tokens: torch.Tensor | None = None
        self._handle = path[1].register_forward_hook(self._keep)
        self.image_tokens = model.contracts["llm"].image_tokens

    def _keep(self, _module, _inputs, output) -> None:
        self.tokens = output

    def take(self, rows: int) -> torch.Tensor:
        """The last forward's tokens as (rows, tokens, hidden), then forgotten."""
        tokens, self.tokens = self.tokens, None
        if tokens is None:
            raise RuntimeError("no image tokens were caught: the forward pass did not run the LLM's image path")
        return tokens.reshape(rows, self.image_tokens, -1)

    def close(self) -> None:
        self._handle.remove()


def fit_probe(model, records: Sequence, *, steps: int = 400, batch: int = 128, seed: int = 0) -> tuple[TowerProbe, float]:
    """Fit a probe on the model's frozen tower over ``records`` (rows of the looks it knows); returns it with the
    share of rows whose zones it reads exactly."""
    from prsmed.data.readers import read_image, read_mask

    contract = model.contracts["llm"]
    targets = token_targets([read_mask(r.mask_path) for r in records], contract.image_tokens)
    pixels = model.llm.preprocess_images([read_image(r.image_path) for r in records])
    with torch.no_grad():
        feats = torch.cat([model.llm.image_features(pixels[i : i + 64]).float() for i in range(0, len(pixels), 64)])
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        probe = TowerProbe(contract.hidden_size, contract.image_tokens)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(probe.parameters(), lr=3e-3, weight_decay=1e-4)
    for _ in range(steps):
        idx = torch.randint(0, len(feats), (min(batch, len(feats)),), generator=gen)
        loss = probe.loss(feats[idx], targets.rows(idx))
        opt.zero_grad()
        loss.backward()
        opt.step()
    probe.requires_grad_(False)
    return probe, probe.zone_exact(feats, targets)


def tower_params(model, trainable: Sequence[tuple[str, nn.Parameter]]) -> list[nn.Parameter]:
    """The trained parameters that sit on the LLM's image path (its tower and projector); [] when it has none."""
    path = model.llm.image_path()
    if path is None:
        return []
    inside = {id(p) for module in path for p in module.parameters()}
    return [p for _, p in trainable if id(p) in inside]


def warm_up(model, probe: TowerProbe, params: list[nn.Parameter], records: Sequence, *, steps: int, lr: float,
            batch_size: int, seed: int, device, autocast) -> float | None:
    """Teach the tower alone through the frozen probe for ``steps`` steps on up to 512 of ``records``, so the text
    model's LoRA then adapts to image tokens that already mark the lesion rather than to ones still moving.
    Returns the last probe loss, or None when no row could be read. ``autocast`` makes a fresh autocast context."""
    from prsmed.train.data import BadRow, read_pair

    pairs = []
    for record in list(records)[:512]:
        try:
            pairs.append(read_pair(record))
        except BadRow:  # the loop reports unreadable rows
            continue
    if not pairs:
        return None
    llm = model.llm
    pixels = llm.preprocess_images([image.convert("RGB") for image, _ in pairs]).to(device)
    targets = token_targets([mask for _, mask in pairs], probe.tokens).to(device)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=lr * 0.05)
    gen = torch.Generator().manual_seed(seed)
    loss = torch.zeros(())
    for _ in range(steps):
        idx = torch.randint(0, len(pixels), (min(batch_size, len(pixels)),), generator=gen).to(device)
        with autocast():
            tokens = llm.image_features(pixels[idx])
        loss = probe.loss(tokens.float(), targets.rows(idx))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
    return float(loss.detach())
