"""Image and mask readers: every format is written here, then read back and checked pixel by pixel."""

from __future__ import annotations

import gzip
import io

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from prsmed.data.readers import (
    WINDOW_PRESETS,
    ImageReadError,
    apply_window,
    read_image,
    read_mask,
    sniff_format,
)
from samples import write_dicom


def _px(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    return np.asarray(img)


def _gray(img: Image.Image) -> np.ndarray:
    a = _px(img)
    assert np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 0], a[..., 2])
    return a[..., 0]


# ----------------------------------------------------------------------------------------------------------------
# Rasters


def test_png_modes_become_rgb(tmp_path):
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    Image.fromarray(gray, mode="L").save(tmp_path / "l.png")
    assert np.array_equal(_gray(read_image(tmp_path / "l.png")), gray)

    bw = Image.fromarray(gray > 100).convert("1")
    bw.save(tmp_path / "b.png")
    assert set(np.unique(_gray(read_image(tmp_path / "b.png")))) == {0, 255}

    pal = Image.fromarray(gray, mode="L").convert("P")
    pal.save(tmp_path / "p.png")
    assert np.abs(_px(read_image(tmp_path / "p.png")).astype(int)[..., 0] - gray).max() <= 8

    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 255
    rgba[0, 0, 3] = 0  # fully transparent: background
    rgba[1, 1, 3] = 128
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    out = _px(read_image(tmp_path / "a.png"))
    assert tuple(out[2, 2]) == (200, 0, 0) and tuple(out[0, 0]) == (0, 0, 0) and out[1, 1, 0] == 100

    la = Image.fromarray(np.stack([gray, np.full_like(gray, 255)], -1), mode="LA")
    la.save(tmp_path / "la.png")
    assert np.array_equal(_gray(read_image(tmp_path / "la.png")), gray)


def test_16bit_png_is_minmax_scaled_by_default_and_dtype_scaled_on_request(tmp_path):
    raw = np.array([[1000, 2000], [3000, 4000]], dtype=np.uint16)
    Image.fromarray(raw).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    assert _gray(read_image(tmp_path / "deep.png")).tolist() == [[0, 85], [170, 255]]
    dtype = _gray(read_image(tmp_path / "deep.png", window="dtype"))
    assert dtype.tolist() == [[4, 8], [12, 16]]  # 1000/65535*255 = 3.9 -> 4
    assert _gray(read_image(tmp_path / "deep.png", window=(2500, 2000))).tolist() == [[0, 64], [191, 255]]


def test_jpeg_and_bytes_input(tmp_path):
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[..., 1] = 180
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=95)
    data = buf.getvalue()
    assert sniff_format(data) == "jpeg"
    out = _px(read_image(data, name="upload.jpg"))
    assert out.shape == (16, 16, 3) and abs(int(out[8, 8, 1]) - 180) <= 3
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))
    buf = io.BytesIO()
    cmyk.save(buf, format="JPEG")
    assert read_image(buf.getvalue()).mode == "RGB"


# ----------------------------------------------------------------------------------------------------------------
# DICOM


def test_dicom_rescale_and_file_window(tmp_path):
    stored = np.array([[0, 500], [1000, 1524]], dtype=np.uint16)
    path = write_dicom(tmp_path / "ct.dcm", stored, slope=1, intercept=-1024, window=(40, 400))
    hu = stored.astype(float) - 1024  # -1024, -524, -24, 500
    expected = np.rint(np.clip((hu - (40 - 200)) / 400, 0, 1) * 255).astype(np.uint8)
    assert np.array_equal(_gray(read_image(path)), expected)
    # presets override the file's window; values are in HU after the rescale
    lung = np.rint(np.clip((hu - (-600 - 750)) / 1500, 0, 1) * 255).astype(np.uint8)
    assert np.array_equal(_gray(read_image(path, window="lung")), lung)
    assert _gray(read_image(path, window="lung"))[0, 0] == 55
    assert np.array_equal(_gray(read_image(path, window="minmax")), np.rint(stored / 1524 * 255))


def test_dicom_slope_and_all_presets(tmp_path):
    stored = np.array([[10, 20], [30, 40]], dtype=np.uint16)
    path = write_dicom(tmp_path / "s.dcm", stored, slope=2.5, intercept=-50)
    values = stored * 2.5 - 50  # -25, 0, 25, 50
    for name, (c, w) in WINDOW_PRESETS.items():
        assert np.array_equal(_gray(read_image(path, window=name)), apply_window(values, c, w)), name
    assert WINDOW_PRESETS["brain"] == (40.0, 80.0) and WINDOW_PRESETS["lung"] == (-600.0, 1500.0)
    assert WINDOW_PRESETS["bone"] == (400.0, 1800.0) and WINDOW_PRESETS["mediastinum"] == (50.0, 350.0)
    assert WINDOW_PRESETS["abdomen"] == (50.0, 400.0)
    # no window in the file: min-max
    assert np.array_equal(_gray(read_image(path)), [[0, 85], [170, 255]])


def test_dicom_monochrome1_is_inverted_and_signed_pixels(tmp_path):
    stored = np.array([[-100, 0], [100, 200]], dtype=np.int16)
    p2 = write_dicom(tmp_path / "m2.dcm", stored, signed=True)
    p1 = write_dicom(tmp_path / "m1.dcm", stored, signed=True, photometric="MONOCHROME1")
    a2, a1 = _gray(read_image(p2)), _gray(read_image(p1))
    assert a2.tolist() == [[0, 85], [170, 255]]
    assert np.array_equal(a1, 255 - a2)


def test_dicom_multiframe_frames_and_bytes(tmp_path):
    frames = np.stack([np.full((4, 4), v, np.uint16) for v in (0, 100, 200)])
    frames[:, 0, 0] = 1000  # make each frame non-constant so min-max keeps the frame's own level visible
    path = write_dicom(tmp_path / "mf.dcm", frames, window=(100, 200))
    assert _gray(read_image(path))[2, 2] == 128  # middle frame by default: value 100 in window 0..200
    assert _gray(read_image(f"{path}#frame=0"))[2, 2] == 0
    assert _gray(read_image(f"{path}#frame=2"))[2, 2] == 255
    data = path.read_bytes()
    assert data[128:132] == b"DICM" and sniff_format(data) == "dicom"
    assert _gray(read_image(data, name="upload.dcm#frame=2"))[2, 2] == 255
    with pytest.raises(ImageReadError, match=r"frame 3 is out of range: valid frames are 0\.\.2"):
        read_image(f"{path}#frame=3")


def test_dicom_without_preamble_needs_a_dcm_name(tmp_path):
    path = write_dicom(tmp_path / "raw.dcm", np.array([[0, 10]], np.uint16), preamble=False)
    assert path.read_bytes()[128:132] != b"DICM"
    assert _gray(read_image(path)).tolist() == [[0, 255]]


# ----------------------------------------------------------------------------------------------------------------
# NIfTI


def _volume():
    vol = np.zeros((8, 10, 12), dtype=np.int16)
    vol[2, 3, 5] = 100
    vol[:, :, 6] = 7
    vol[0, 0, 6] = 0
    return vol


def test_nifti_slices_orientation_and_bytes(tmp_path):
    vol = _volume()
    img = nib.Nifti1Image(vol, np.eye(4))
    path = tmp_path / "vol.nii.gz"
    nib.save(img, str(path))
    # the voxel (x=2, y=3) of slice z=5, shown radiologically: anterior up, patient's right on the viewer's left
    a = _gray(read_image(f"{path}#z=5"))
    assert a.shape == (10, 8) and a[10 - 1 - 3, 8 - 1 - 2] == 255 and a.sum() == 255
    v = _gray(read_image(f"{path}#z=5", orientation="voxel"))
    assert v.shape == (8, 10) and v[2, 3] == 255
    # default: the middle slice along z (12 // 2 = 6)
    mid = _gray(read_image(path, orientation="voxel"))
    assert mid[0, 0] == 0 and mid[1, 1] == 255
    # x= and y= axes
    assert _gray(read_image(f"{path}#x=2", orientation="voxel"))[3, 5] == 255
    assert _gray(read_image(f"{path}#y=3", orientation="voxel"))[2, 5] == 255
    # uncompressed bytes and gzip bytes
    raw = img.to_bytes()
    assert sniff_format(raw) == "nifti"
    assert _gray(read_image(raw, name="v.nii#z=5", orientation="voxel"))[2, 3] == 255
    assert _gray(read_image(gzip.compress(raw), name="v.nii.gz#z=5", orientation="voxel"))[2, 3] == 255
    # a NIfTI under another file name is still found from its content
    renamed = tmp_path / "upload.bin"
    renamed.write_bytes(path.read_bytes())
    assert _gray(read_image(f"{renamed}#z=5", orientation="voxel"))[2, 3] == 255
    with pytest.raises(ImageReadError, match=r"z=12 is out of range: valid z is 0\.\.11 \(shape 8x10x12\)"):
        read_image(f"{path}#z=12")
    with pytest.raises(ImageReadError, match="cannot read the selection"):
        read_image(f"{path}#slice=3")


def test_nifti_scaling_windows_and_dimensionality(tmp_path):
    vol = np.zeros((4, 4, 3), dtype=np.int16)
    vol[..., 1] = np.arange(16).reshape(4, 4) * 100
    img = nib.Nifti1Image(vol, np.eye(4))
    img.header.set_slope_inter(1.0, -1024.0)
    path = tmp_path / "ct.nii"
    nib.save(img, str(path))
    hu = vol[..., 1] - 1024.0
    got = _gray(read_image(f"{path}#z=1", window="lung", orientation="voxel"))
    assert np.array_equal(got, apply_window(hu, -600, 1500))
    four = nib.Nifti1Image(np.stack([vol, vol + 1], -1), np.eye(4))
    nib.save(four, str(tmp_path / "t.nii"))
    read_image(f"{tmp_path / 't.nii'}#z=1,t=1")
    with pytest.raises(ImageReadError, match=r"t=2 is out of range: valid t is 0\.\.1"):
        read_image(f"{tmp_path / 't.nii'}#z=1,t=2")
    five = nib.Nifti1Image(np.zeros((2, 2, 2, 2, 2), np.int16), np.eye(4))
    nib.save(five, str(tmp_path / "five.nii"))
    with pytest.raises(ImageReadError, match="expected a 2-, 3- or 4-D NIfTI volume, found 5-D"):
        read_image(tmp_path / "five.nii")


# ----------------------------------------------------------------------------------------------------------------
# Masks


def test_masks_binarize_by_rule(tmp_path):
    m = np.zeros((6, 6), np.uint8)
    m[1:3, 1:3] = 255
    Image.fromarray(m).save(tmp_path / "m255.png")
    assert read_mask(tmp_path / "m255.png").sum() == 4 and read_mask(tmp_path / "m255.png").dtype == bool
    Image.fromarray((m > 0).astype(np.uint8)).save(tmp_path / "m01.png")
    assert read_mask(tmp_path / "m01.png").sum() == 4
    noisy = m.copy()
    noisy[5, 5] = 20  # JPEG-like ringing stays background
    Image.fromarray(noisy).save(tmp_path / "noisy.png")
    assert read_mask(tmp_path / "noisy.png").sum() == 4
    Image.fromarray(m.astype(np.uint16) * 257).save(tmp_path / "m16.png")
    assert read_mask(tmp_path / "m16.png").sum() == 4
    rgb = np.zeros((6, 6, 3), np.uint8)
    rgb[1:3, 1:3, 0] = 255
    Image.fromarray(rgb).save(tmp_path / "red.png")
    assert read_mask(tmp_path / "red.png").sum() == 4
    Image.fromarray(m).convert("1").save(tmp_path / "bw.png")
    assert read_mask((tmp_path / "bw.png").read_bytes()).sum() == 4
    seg = nib.Nifti1Image(np.pad((m > 0).astype(np.uint8)[..., None], ((0, 0), (0, 0), (0, 0))), np.eye(4))
    nib.save(seg, str(tmp_path / "seg.nii.gz"))
    assert read_mask(f"{tmp_path / 'seg.nii.gz'}#z=0").sum() == 4


# ----------------------------------------------------------------------------------------------------------------
# Errors


def test_corrupt_and_unsupported_inputs_raise_image_read_error(tmp_path):
    Image.fromarray(np.zeros((64, 64), np.uint8) + 7).save(tmp_path / "ok.png")
    png = (tmp_path / "ok.png").read_bytes()
    with pytest.raises(ImageReadError, match="corrupt or truncated PNG"):
        read_image(png[: len(png) // 2], name="half.png")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    with pytest.raises(ImageReadError, match="JPEG"):
        read_image(buf.getvalue()[:200])
    with pytest.raises(ImageReadError, match="unsupported or unrecognised format; expected PNG"):
        read_image(b"hello world, not an image")
    with pytest.raises(ImageReadError, match="empty file"):
        read_image(b"")
    with pytest.raises(ImageReadError, match="no such file"):
        read_image(tmp_path / "missing.png")
    with pytest.raises(ImageReadError, match="gzip file that is not NIfTI"):
        read_image(gzip.compress(b"x" * 600))
    dcm = write_dicom(tmp_path / "t.dcm", np.arange(64, dtype=np.uint16).reshape(8, 8)).read_bytes()
    with pytest.raises(ImageReadError, match="DICOM"):
        read_image(dcm[:-40], name="cut.dcm")
    nii = gzip.compress(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)).to_bytes())
    with pytest.raises(ImageReadError, match="NIfTI"):
        read_image(nii[: len(nii) - 30], name="cut.nii.gz")
    with pytest.raises(ImageReadError, match="needs a NIfTI or DICOM file, found png"):
        read_image(f"{tmp_path / 'ok.png'}#z=3")
    with pytest.raises(ImageReadError, match="unknown window 'lungs'"):
        read_image(tmp_path / "ok.png", window="lungs")
    assert issubclass(ImageReadError, ValueError)


def test_dicom_multivalued_window_and_missing_pixels(tmp_path):
    stored = np.array([[0, 100], [200, 300]], dtype=np.uint16)
    path = write_dicom(tmp_path / "mv.dcm", stored)
    import pydicom

    ds = pydicom.dcmread(str(path))
    ds.WindowCenter, ds.WindowWidth = ["150", "100"], ["300", "50"]  # the first pair is used
    ds.save_as(str(path))
    assert _gray(read_image(path)).tolist() == [[0, 85], [170, 255]]
    del ds.PixelData
    ds.save_as(str(path))
    with pytest.raises(ImageReadError, match="DICOM file without pixel data"):
        read_image(path)
