"""Inputs several test modules share: images, a zipped dataset, adapter bundles (plain functions; the fixtures
built from them are in conftest.py)."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import torch
from PIL import Image

from prsmed.data.synth import synthesize
from prsmed.model.bundle import save_bundle
from prsmed.zoo import build_model
from prsmed.zoo.presets import ASSETS

SHIPPED = ASSETS / "prsmed-tiny"


def png_bytes(size=(96, 80), seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    arr = (rng.random((size[1], size[0])) * 80).astype(np.uint8)
    arr[10:30, 12:34] = 220  # a bright blob in the top left
    buf = io.BytesIO()
    Image.fromarray(arr, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def dataset_zip(tmp_path, n=16) -> bytes:
    root = tmp_path / "ds"
    synthesize(root, n=n, seed=5, size=64)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for path in root.rglob("*"):
            if path.is_file():
                z.write(path, path.relative_to(root).as_posix())
    return buf.getvalue()


def scan(seed: int = 0, size=(120, 100)) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = (rng.random((size[1], size[0])) * 60).astype(np.uint8)
    y, x = rng.integers(10, size[1] - 30), rng.integers(10, size[0] - 30)
    arr[y : y + 20, x : x + 22] = 210
    return Image.fromarray(arr, mode="L").convert("RGB")


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def perturbed_bundle(out, seed: int, *, parts=("fusion_head", "lora")) -> None:
    """A bundle whose weights differ from the base's, so its predictions differ too."""
    model = build_model("prsmed-tiny")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and any(part in name for part in parts):
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    save_bundle(model, out)


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def train_stand_in(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def write_dicom(path, pixels: np.ndarray, *, photometric="MONOCHROME2", slope=None, intercept=None,
                 window=None, signed=False, preamble=True):
    """A CT DICOM file with ``pixels`` (one frame, or several when 3-D) written by pydicom; returns ``path``."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    if pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if signed else 0
    if slope is not None:
        ds.RescaleSlope = str(slope)
        ds.RescaleIntercept = str(intercept)
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = str(window[0]), str(window[1])
    ds.PixelData = pixels.astype(np.int16 if signed else np.uint16).tobytes()
    ds.save_as(str(path), enforce_file_format=preamble)
    return path
