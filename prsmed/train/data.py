"""Training data: the train/val split, a deterministic resumable batch order, and rows that fail to load.

* Split: rows whose ``split`` is ``val`` (or ``validation``) validate; if there are none, a deterministic
  ``val_fraction`` of the training *images* is held out, chosen by the SHA-256 of each image path (so it does not
  depend on the seed, the row order, or the machine, and every question about one image lands on the same side).
  ``test`` rows are never used in training.
* Order: epoch ``e`` visits the training rows in the permutation drawn from ``seed + e``. With several processes
  the permutation is padded to a multiple of the world size and process ``r`` takes every ``world``-th index from
  ``r`` (as ``DistributedSampler`` does), so a position is simply (epoch, micro-batches done), and a resumed run
  continues with the very next batch.
* Bad rows: a row whose image or mask cannot be read, whose mask is empty while its answer names a position, or
  whose mask and image sizes differ is dropped from its batch and reported (its index and the reason); the run
  goes on. An empty mask whose answer says there is no lesion ("No nodule is visible in this image.") is a row
  like any other: it teaches the model to say so and to return an empty mask.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from prsmed.data.zones import NONE, zones_from_text
from prsmed.train.losses import modality_id, resize_mask

VAL_SPLITS = ("val", "validation", "valid")
TEST_SPLITS = ("test",)


# --- split ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Split:
    train: list[Any]
    val: list[Any]
    how: str  # a sentence for the log and the run summary


def _split_name(record: Any) -> str:
    return str(getattr(record, "split", None) or "").strip().lower()


def _image_key(record: Any) -> str:
    return Path(str(record.image_path)).as_posix()


def split_records(records: Sequence[Any], *, val_fraction: float) -> Split:
    val = [r for r in records if _split_name(r) in VAL_SPLITS]
    train = [r for r in records if _split_name(r) not in VAL_SPLITS + TEST_SPLITS]
    if val:
        return Split(train, val, f"{len(val)} rows of the dataset's val split")
    if not val_fraction or len(train) < 2:
        return Split(train, [], "no validation (no val split and val_fraction=0)")
    # Hold out whole images, ranked by a hash of their path: stable across runs, machines and row orders.
    images = sorted({_image_key(r) for r in train}, key=lambda k: hashlib.sha256(k.encode()).hexdigest())
    n_val = min(max(1, math.ceil(val_fraction * len(images))), len(images) - 1)
    held = set(images[:n_val])
    val = [r for r in train if _image_key(r) in held]
    train = [r for r in train if _image_key(r) not in held]
    return Split(train, val, f"{len(val)} rows ({n_val} images, {val_fraction:.0%} of the train images by path hash)")


# --- order ------------------------------------------------------------------------------------------------------

def epoch_order(n: int, *, seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """This process's indices for one epoch: the seed+epoch permutation, padded and sharded by rank."""
    g = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(n, generator=g).tolist()
    per_rank = math.ceil(n / world_size) if n else 0
    padded = order + order[: per_rank * world_size - n] if n else []
    return padded[rank::world_size]


def batches_per_epoch(n: int, *, batch_size: int, world_size: int = 1) -> int:
    """Micro-batches each process runs per epoch (the last one may be short)."""
    per_rank = math.ceil(n / world_size) if n else 0
    return math.ceil(per_rank / batch_size)


class EpochBatches(torch.utils.data.Sampler):
    """The micro-batches of one epoch for one process, starting after ``start`` already-done micro-batches."""

    def __init__(self, n: int, *, batch_size: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1,
                 start: int = 0) -> None:
        self.order = epoch_order(n, seed=seed, epoch=epoch, rank=rank, world_size=world_size)
        self.batch_size = batch_size
        self.start = start

    def __iter__(self) -> Iterator[list[int]]:
        for b in range(self.start, len(self)):
            yield self.order[b * self.batch_size:(b + 1) * self.batch_size]

    def __len__(self) -> int:
        return math.ceil(len(self.order) / self.batch_size)


# --- rows -------------------------------------------------------------------------------------------------------

class BadRow(Exception):
    """A row that cannot be used; the message says why."""


def read_pair(record: Any) -> tuple[Image.Image, np.ndarray]:
    """The RGB image and the binary mask of a row, read with the data layer's readers, checked for use."""
    from prsmed.data import readers

    try:
        image = readers.read_image(record.image_path)
    except Exception as e:  # a reader may fail in many ways on a broken file; all mean "skip this row"
        raise BadRow(f"image {record.image_path} cannot be read: {e}") from e
    if record.mask_path is None:
        raise BadRow(f"row has no mask (image {record.image_path})")
    try:
        mask = np.asarray(readers.read_mask(record.mask_path))
    except Exception as e:
        raise BadRow(f"mask {record.mask_path} cannot be read: {e}") from e
    if mask.ndim != 2:
        raise BadRow(f"mask {record.mask_path} has shape {mask.shape}, expected a 2-D mask")
    if (mask.shape[1], mask.shape[0]) != image.size:
        raise BadRow(f"mask {record.mask_path} is {mask.shape[1]}x{mask.shape[0]} but image {record.image_path} is "
                     f"{image.size[0]}x{image.size[1]}")
    if not mask.any() and zones_from_text(record.answer) != [NONE]:
        raise BadRow(f"mask {record.mask_path} is empty but the answer does not say there is no lesion")
    return image, mask


@dataclass
class Sample:
    index: int
    image: Image.Image
    mask: torch.Tensor  # (S, S) float {0, 1}
    question: str
    answer: str
    modality: int


@dataclass
class Batch:
    images: list[Image.Image] = field(default_factory=list)
    masks: torch.Tensor | None = None  # (B, 1, S, S)
    questions: list[str] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    modality: torch.Tensor | None = None  # (B,) long, IGNORE_INDEX for unknown
    indices: list[int] = field(default_factory=list)
    bad: list[tuple[int, str]] = field(default_factory=list)  # rows dropped from this batch, with the reason

    def __len__(self) -> int:
        return len(self.images)


class RecordDataset(torch.utils.data.Dataset):
    """Rows -> :class:`Sample` (mask resized NEAREST to ``mask_size``), or ``(index, reason)`` for a bad row."""

    def __init__(self, records: Sequence[Any], *, mask_size: int) -> None:
        self.records = list(records)
        self.mask_size = mask_size

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample | tuple[int, str]:
        record = self.records[index]
        try:
            image, mask = read_pair(record)
        except BadRow as e:
            return (index, str(e))
        return Sample(
            index=index,
            image=image.convert("RGB"),
            mask=resize_mask(mask, self.mask_size),
            question=str(record.question),
            answer=str(record.answer),
            modality=modality_id(getattr(record, "modality", None)),
        )


def collate(items: Sequence[Sample | tuple[int, str]]) -> Batch:
    batch = Batch()
    good = [s for s in items if isinstance(s, Sample)]
    batch.bad = [s for s in items if not isinstance(s, Sample)]
    batch.images = [s.image for s in good]
    batch.questions = [s.question for s in good]
    batch.answers = [s.answer for s in good]
    batch.indices = [s.index for s in good]
    batch.modality = torch.tensor([s.modality for s in good], dtype=torch.long)
    batch.masks = torch.stack([s.mask for s in good])[:, None] if good else None
    return batch


def make_loader(dataset: RecordDataset, sampler: torch.utils.data.Sampler, *, num_workers: int, seed: int,
                epoch: int) -> torch.utils.data.DataLoader:
    # A private generator: creating the loader's iterator draws a seed from it, and drawing that from the global
    # RNG would make a resumed run's dropout masks differ from an uninterrupted run's.
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed + 7919 * (epoch + 1)),
    )
