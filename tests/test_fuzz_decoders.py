"""Property-based fuzzing of the image decoders (hypothesis, a bounded number of examples, derandomized so CI is
repeatable; ``PRSMED_FUZZ_EXAMPLES=5000`` runs a longer campaign).

Each example starts from a valid PNG, JPEG, DICOM or NIfTI file and mutates it: flipped bits, overwritten bytes
(including header fields set to extreme values), truncation, inserted garbage. Whatever comes in, a decoder must
either return an 8-bit image of a sane size or raise :class:`ImageReadError` with a message; any other exception,
a crash or an allocation the size of a header's lie is a bug."""

from __future__ import annotations

import gzip
import io
import os
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from prsmed.data.readers import ImageReadError, read_image, read_mask
from samples import write_dicom

EXAMPLES = int(os.environ.get("PRSMED_FUZZ_EXAMPLES", "250"))
# CI replays the same examples; a longer campaign (PRSMED_FUZZ_EXAMPLES set) draws new ones each run.
DERANDOMIZE = "PRSMED_FUZZ_EXAMPLES" not in os.environ
MAX_PIXELS = 4096 * 4096


def _png(mode: str) -> bytes:
    rng = np.random.default_rng(1)
    arr = {"L": rng.integers(0, 255, (24, 20), dtype=np.uint8),
           "RGB": rng.integers(0, 255, (24, 20, 3), dtype=np.uint8),
           "I;16": rng.integers(0, 65535, (24, 20), dtype=np.uint16)}[mode]
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (24, 20, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _dicom() -> bytes:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        pixels = np.arange(16 * 12, dtype=np.uint16).reshape(16, 12)
        return write_dicom(Path(tmp) / "slice.dcm", pixels, slope=1, intercept=-1024, window=(40, 400)).read_bytes()


def _nifti(compressed: bool) -> bytes:
    img = nib.Nifti1Image(np.random.default_rng(3).normal(size=(10, 9, 4)).astype(np.float32), np.eye(4))
    raw = img.to_bytes()
    return gzip.compress(raw) if compressed else raw


SEEDS = {
    "gray.png": _png("L"), "rgb.png": _png("RGB"), "deep.png": _png("I;16"), "photo.jpg": _jpeg(),
    "slice.dcm": _dicom(), "volume.nii": _nifti(False), "volume.nii.gz": _nifti(True),
}
EXTREMES = [b"\x00" * 4, b"\xff" * 4, struct.pack("<i", -1), struct.pack(">I", 2**31 - 1), struct.pack("<h", 32767),
            struct.pack("<h", -32768), struct.pack("<f", float("nan")), struct.pack("<f", float("inf"))]


@st.composite
def mutated(draw) -> tuple[str, bytes]:
    name = draw(st.sampled_from(sorted(SEEDS)))
    data = bytearray(SEEDS[name])
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "overwrite", "extreme", "truncate", "insert"]))
        # Headers hold most of what a decoder trusts: aim half of the edits at the first 400 bytes.
        end = len(data) if draw(st.booleans()) else min(len(data), 400)
        at = draw(st.integers(0, max(0, end - 1)))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=16))
            data[at:at + len(chunk)] = chunk
        elif kind == "extreme":
            chunk = draw(st.sampled_from(EXTREMES))
            data[at:at + len(chunk)] = chunk
        elif kind == "truncate":
            del data[at:]
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
    return name, bytes(data)


def check_decodes_or_refuses(name: str, data: bytes) -> None:
    try:
        img = read_image(data, name=name)
    except ImageReadError as e:
        assert str(e), "an ImageReadError without a message"
    else:
        arr = np.asarray(img)
        assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3, arr.shape
        assert 0 < arr.shape[0] * arr.shape[1] <= MAX_PIXELS, arr.shape
    try:
        mask = read_mask(data, name=name)
    except ImageReadError:
        pass
    else:
        assert mask.dtype == bool and mask.ndim == 2


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_every_seed_decodes(name):
    check_decodes_or_refuses(name, SEEDS[name])
    assert np.asarray(read_image(SEEDS[name], name=name)).size > 0


@settings(max_examples=EXAMPLES, deadline=None, derandomize=DERANDOMIZE, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(mutated())
def test_mutated_files_decode_or_raise_image_read_error(case):
    check_decodes_or_refuses(*case)


@settings(max_examples=EXAMPLES // 2, deadline=None, derandomize=DERANDOMIZE, database=None)
@given(st.binary(max_size=2048), st.sampled_from(["x.png", "x.jpg", "x.dcm", "x.nii", "x.nii.gz", "x", "x.txt"]))
def test_arbitrary_bytes_under_any_name_decode_or_raise_image_read_error(data, name):
    check_decodes_or_refuses(name, data)


def test_a_nifti_header_with_an_empty_axis_is_refused():
    """Found by a 20,000-example campaign: a NIfTI whose header declares a zero-length axis decoded to an image
    with no pixels."""
    raw = bytearray(SEEDS["volume.nii"])
    raw[44:46] = struct.pack("<h", 0)  # dim[2], the second axis, in the NIfTI-1 header
    with pytest.raises(ImageReadError, match="no pixels"):
        read_image(bytes(raw), name="volume.nii")


def test_a_dicom_element_with_an_unknown_value_representation_is_refused():
    """Found by a campaign: pydicom reads elements lazily, so a damaged one (here WindowCenter with the unknown VR
    'ES') failed with NotImplementedError when the decoder first used it."""
    raw = SEEDS["slice.dcm"]
    at = raw.index(b"\x28\x00\x50\x10")  # the tag (0028,1050) in explicit little endian: group, element, VR
    damaged = raw[:at + 4] + b"ES" + raw[at + 6:]
    with pytest.raises(ImageReadError, match="corrupt DICOM"):
        read_image(damaged, name="slice.dcm")
