"""Read medical images and masks: PNG, JPEG (and other Pillow rasters), DICOM and NIfTI.

Every reader takes a path or the file's bytes (an upload); the format is found from the content (magic bytes),
never trusted from the extension. Images come back as 8-bit RGB ``PIL.Image``; masks as 2-D boolean arrays.

Choices, in one place:

* **16-bit and float rasters** (16-bit PNG, TIFF) are scaled to 8 bits by **min-max** over the image, because
  medical 16-bit PNGs usually fill only 10-12 bits and a dtype-range scaling would leave them nearly black.
  ``window="dtype"`` scales by the dtype range instead; a ``(center, width)`` window applies to the raw values.
* **Alpha** (LA, RGBA, palette with transparency) is composited over black: transparent pixels become background.
* **JPEG EXIF orientation is ignored**, because masks are drawn on the stored pixel grid.
* **DICOM**: RescaleSlope/RescaleIntercept are applied first (also from enhanced multi-frame functional groups),
  then a linear window: the file's WindowCenter/WindowWidth when present (the first pair), else min-max;
  ``window=`` may name a preset (:data:`WINDOW_PRESETS`), give ``(center, width)``, or say ``"minmax"``.
  MONOCHROME1 is inverted after windowing. Multi-frame files take ``frame=N`` (default: the middle frame).
* **NIfTI**: ``file.nii.gz#z=42`` picks slice 42 along the third voxel axis (``x=``, ``y=`` for the others,
  ``t=`` for the 4th axis of a 4-D series, default 0); the default slice is the middle one along z.
  Windowing is min-max unless ``window=`` says otherwise (values are scaled by scl_slope/scl_inter first, so CT
  presets work on HU). The slice is shown the radiological way, from the header's orientation: anterior or
  superior at the top and the patient's right on the viewer's left (sagittal slices: anterior on the left).
  ``orientation="voxel"`` returns the stored array unchanged (rows = first in-plane voxel axis).
* The window maps ``[center - width/2, center + width/2]`` linearly onto 0..255 and clips (the DICOM linear VOI
  function up to half a grey level).
"""

from __future__ import annotations

import gzip
import io
import os
import re
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image

Source = Union[str, os.PathLike, bytes, bytearray, memoryview]

# (center, width) in Hounsfield units; the usual radiology teaching values.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "brain": (40.0, 80.0),
    "subdural": (75.0, 215.0),
    "stroke": (32.0, 8.0),
    "temporal_bone": (600.0, 2800.0),
    "soft_tissue": (50.0, 400.0),
    "abdomen": (50.0, 400.0),
    "liver": (30.0, 150.0),
    "mediastinum": (50.0, 350.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
}

FORMATS = "PNG, JPEG (or another Pillow raster: BMP, TIFF, GIF, WebP), DICOM (.dcm) or NIfTI (.nii, .nii.gz)"


class ImageReadError(ValueError):
    """An image or mask could not be read: says what was expected and what was found."""


@dataclass
class _Decoded:
    values: np.ndarray  # (H, W) or (H, W, 3)
    fmt: str
    label: str
    display_ready: bool = False  # 8-bit raster: shown as stored unless a window is asked for
    file_window: tuple[float, float] | None = None
    value_range: tuple[float, float] | None = None
    invert: bool = False


# ---------------------------------------------------------------------------------------------------------------
# Sources, selection, sniffing


def _split_source(source: Source, name: str | None) -> tuple[bytes | None, Path | None, str, str | None]:
    """(bytes or None, path or None, label for messages, selection like 'z=42' or None)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        label, sel = (name or "<bytes>"), None
        if name and "#" in name:
            label, sel = name.rsplit("#", 1)
        return bytes(source), None, label, sel
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        path = Path(text)
        # A '#' may be part of a real file name; only a path that does not exist as given carries a selection.
        if "#" in text and not path.exists():
            base, sel = text.rsplit("#", 1)
            return None, Path(base), base, sel
        return None, path, text, None
    raise ImageReadError(f"expected a file path or the file's bytes, found {type(source).__name__}")


def _parse_selection(sel: str | None, label: str) -> dict[str, int]:
    out: dict[str, int] = {}
    if not sel:
        return out
    for part in re.split(r"[,&;]", sel):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"(x|y|z|t|frame|f)\s*=\s*(-?\d+)", part.lower())
        if not m:
            raise ImageReadError(
                f"{label}: cannot read the selection {sel!r}: expected 'z=42', 'x=10', 'y=5' (NIfTI, optionally "
                f"',t=0') or 'frame=3' (multi-frame DICOM)"
            )
        key = "frame" if m.group(1) == "f" else m.group(1)
        if int(m.group(2)) < 0:
            raise ImageReadError(f"{label}: {key}={m.group(2)} is negative; indices start at 0")
        out[key] = int(m.group(2))
    if sum(k in out for k in ("x", "y", "z")) > 1:
        raise ImageReadError(f"{label}: the selection {sel!r} names more than one of x=, y=, z=; give one axis")
    return out


_NIFTI_SIZES = (348, 540)


def _looks_nifti(head: bytes) -> bool:
    if len(head) < 348:
        return False
    for order in "<>":
        size = struct.unpack(order + "i", head[:4])[0]
        if size == 348 and head[344:348] == b"n+1\x00":
            return True
        if size == 540 and head[4:8] == b"n+2\x00":
            return True
    return False


def sniff_format(head: bytes, name: str | None = None) -> str | None:
    """The format of a file from its first bytes (544 are enough): 'png', 'jpeg', 'dicom', 'nifti', 'gzip',
    'raster' (another format Pillow reads), or None."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if head[:2] == b"\x1f\x8b":
        return "gzip"
    if _looks_nifti(head):
        return "nifti"
    if head[:6] in (b"GIF87a", b"GIF89a") or head[:2] == b"BM" or head[:4] in (b"II*\x00", b"MM\x00*"):
        return "raster"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "raster"
    if name and name.lower().endswith((".dcm", ".dicom")):
        return "dicom-raw"  # DICOM without the 128-byte preamble, as some exporters write it
    return None


def _describe_head(head: bytes) -> str:
    if not head:
        return "an empty file"
    return f"{len(head)}+ bytes starting with {head[:8].hex(' ')}"


# ---------------------------------------------------------------------------------------------------------------
# Decoders


def _decode(source: Source, name: str | None, orientation: str = "radiological") -> tuple[_Decoded, dict[str, int]]:
    dec, selection = _decode_any(source, name, orientation)
    h, w = dec.values.shape[:2]
    if h == 0 or w == 0:  # a header can declare a zero-length axis (found by fuzzing a NIfTI)
        raise ImageReadError(f"{dec.label}: the image has no pixels (width {w}, height {h})")
    return dec, selection


def _decode_any(source: Source, name: str | None, orientation: str) -> tuple[_Decoded, dict[str, int]]:
    if orientation not in ("radiological", "voxel"):
        raise ImageReadError(f"orientation must be 'radiological' or 'voxel', found {orientation!r}")
    data, path, label, sel = _split_source(source, name)
    selection = _parse_selection(sel, label)
    if path is not None:
        if not path.exists():
            raise ImageReadError(f"{label}: no such file")
        if path.is_dir():
            raise ImageReadError(f"{label}: expected an image file, found a directory")
        with open(path, "rb") as f:
            head = f.read(544)
    else:
        head = data[:544]
    fmt = sniff_format(head, name if path is None else str(path))
    if fmt == "gzip":
        try:
            if path is not None:
                with gzip.open(path, "rb") as f:
                    inner = f.read(544)
            else:
                inner = gzip.GzipFile(fileobj=io.BytesIO(data)).read(544)
        except (OSError, EOFError, zlib.error) as e:
            raise ImageReadError(f"{label}: corrupt gzip stream ({e}); expected a gzip-compressed NIfTI") from e
        if not _looks_nifti(inner):
            raise ImageReadError(f"{label}: a gzip file that is not NIfTI; expected {FORMATS}")
        fmt = "nifti-gz"
    if fmt is None:
        raise ImageReadError(f"{label}: unsupported or unrecognised format; expected {FORMATS}, found "
                             f"{_describe_head(head)}")
    if fmt in ("dicom", "dicom-raw"):
        return _decode_dicom(data, path, label, selection, force=fmt == "dicom-raw"), selection
    if fmt in ("nifti", "nifti-gz"):
        if path is not None:
            # nibabel picks its reader from the file name; a NIfTI under another name is read from its bytes
            expected = ".nii.gz" if fmt == "nifti-gz" else ".nii"
            if not path.name.lower().endswith(expected):
                data, path = path.read_bytes(), None
        return _decode_nifti(data, path, label, selection, orientation), selection
    if selection:
        raise ImageReadError(f"{label}: a slice or frame selection ({sel}) needs a NIfTI or DICOM file, found {fmt}")
    return _decode_raster(data, path, label, fmt), selection


# Larger rasters are refused from their header, before any pixel is decoded: a 30000x30000 PNG of a few kilobytes
# would otherwise take gigabytes. The limit is Pillow's own warning threshold (about 9459x9459), above any
# radiology or dermoscopy format.
MAX_PIXELS = 89_478_485


def _decode_raster(data: bytes | None, path: Path | None, label: str, fmt: str) -> _Decoded:
    try:
        with warnings.catch_warnings():  # sizes Pillow only warns about are refused below, with a clearer message
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data) if data is not None else path)
        if img.width * img.height > MAX_PIXELS:
            raise ImageReadError(
                f"{label}: {img.width}x{img.height} pixels is more than the {MAX_PIXELS:,} this reader accepts "
                f"(a decompression bomb, or an image to downscale first)"
            )
        img.load()
    except ImageReadError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageReadError(f"{label}: refused as a decompression bomb ({e})") from e
    except Exception as e:  # Pillow raises many types for damaged input; all mean "cannot decode"
        raise ImageReadError(f"{label}: corrupt or truncated {fmt.upper()} data ({type(e).__name__}: {e})") from e
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img)
        if mode.startswith("I;16"):
            rng = (0.0, 65535.0)
        elif mode == "I":  # older Pillow opens 16-bit PNGs as 32-bit "I"
            fits_16 = arr.size and arr.min() >= 0 and arr.max() <= 65535
            rng = (0.0, 65535.0) if fits_16 else (float(arr.min()), float(arr.max()))
        else:
            rng = None
        return _Decoded(arr.astype(np.float64), fmt, label, False, None, rng)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float64)
        rgb = rgba[..., :3] * (rgba[..., 3:4] / 255.0)
        gray = mode in ("LA", "La")
        arr = np.rint(rgb[..., 0] if gray else rgb).astype(np.uint8)
        return _Decoded(arr, fmt, label, True, None, (0.0, 255.0))
    if mode in ("1", "L", "P"):
        target = "L" if mode != "P" else "RGB"
        return _Decoded(np.asarray(img.convert(target)), fmt, label, True, None, (0.0, 255.0))
    return _Decoded(np.asarray(img.convert("RGB")), fmt, label, True, None, (0.0, 255.0))


def _first(value) -> float | None:
    if value is None:
        return None
    try:
        if isinstance(value, (list, tuple)) or hasattr(value, "__getitem__") and not isinstance(value, (str, bytes)):
            value = value[0]
        return float(value)
    except (TypeError, ValueError, IndexError):
        return None


def _frame_attr(ds, frame: int, group: str, attrs: tuple[str, ...]) -> dict[str, float]:
    """Attributes from the enhanced multi-frame functional groups (per-frame first, then shared)."""
    out: dict[str, float] = {}
    for where in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
        seq = ds.get(where)
        if not seq:
            continue
        item = seq[frame] if where.startswith("PerFrame") and frame < len(seq) else seq[0]
        sub = item.get(group)
        if sub:
            for a in attrs:
                if a not in out and a in sub[0]:
                    v = _first(sub[0].get(a))
                    if v is not None:
                        out[a] = v
    return out


def _decode_dicom(data, path, label, selection, *, force: bool) -> _Decoded:
    try:
        import pydicom
    except ImportError as e:  # pragma: no cover - pydicom is a declared dependency
        raise ImageReadError(f"{label}: reading DICOM needs the 'pydicom' package, which is not installed") from e
    try:
        ds = pydicom.dcmread(io.BytesIO(data) if data is not None else str(path), force=force)
    except Exception as e:  # pydicom raises many types for damaged headers; all mean "not a readable DICOM"
        raise ImageReadError(f"{label}: corrupt or truncated DICOM ({type(e).__name__}: {e})") from e
    try:
        return _dicom_image(ds, label, selection)
    except ImageReadError:
        raise
    except Exception as e:  # pydicom reads elements lazily: a damaged one fails when it is first used
        raise ImageReadError(f"{label}: corrupt DICOM header ({type(e).__name__}: {e})") from e


def _dicom_image(ds, label: str, selection: dict[str, int]) -> _Decoded:
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ImageReadError(f"{label}: a DICOM file without pixel data (SOP class "
                             f"{getattr(ds, 'SOPClassUID', 'unknown')}); expected an image")
    try:
        arr = ds.pixel_array
    except Exception as e:  # missing codec plugins and short pixel data both surface here
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        ts_name = getattr(ts, "name", ts) or "unknown"
        raise ImageReadError(f"{label}: cannot decode the DICOM pixel data (transfer syntax {ts_name}): "
                             f"{type(e).__name__}: {e}") from e
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    frames = int(_first(ds.get("NumberOfFrames")) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if "z" in selection and "frame" not in selection:
        selection = {**selection, "frame": selection["z"]}
    if any(k in selection for k in ("x", "y", "t")):
        raise ImageReadError(f"{label}: DICOM takes 'frame=N' only, found {selection}")
    frame = selection.get("frame")
    if frames > 1:
        if frame is None:
            frame = frames // 2
        if frame >= frames:
            raise ImageReadError(f"{label}: frame {frame} is out of range: valid frames are 0..{frames - 1}")
        arr = arr[frame]
    else:
        if frame not in (None, 0):
            raise ImageReadError(f"{label}: frame {frame} is out of range: a single-frame DICOM has only frame 0")
        frame = 0
    expected_ndim = 3 if samples > 1 else 2
    if arr.ndim != expected_ndim:
        raise ImageReadError(f"{label}: expected a {expected_ndim}-D frame ({samples} sample(s) per pixel), found "
                             f"shape {arr.shape}")
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        rgb = apply_color_lut(arr, ds)
        if rgb.dtype != np.uint8:
            rgb = np.rint(rgb / 257.0).astype(np.uint8) if rgb.max() > 255 else rgb.astype(np.uint8)
        return _Decoded(rgb, "dicom", label, True, None, (0.0, 255.0))
    if samples > 1:  # RGB, or YBR already converted to RGB by pydicom
        if arr.dtype == np.uint8:
            return _Decoded(arr, "dicom", label, True, None, (0.0, 255.0))
        return _Decoded(arr.astype(np.float64), "dicom", label, False, None, None)
    fg = _frame_attr(ds, frame, "PixelValueTransformationSequence", ("RescaleSlope", "RescaleIntercept"))
    slope = fg.get("RescaleSlope", _first(ds.get("RescaleSlope")))
    intercept = fg.get("RescaleIntercept", _first(ds.get("RescaleIntercept")))
    slope = 1.0 if slope is None else slope
    intercept = 0.0 if intercept is None else intercept
    values = arr.astype(np.float64) * slope + intercept
    wg = _frame_attr(ds, frame, "FrameVOILUTSequence", ("WindowCenter", "WindowWidth"))
    center = wg.get("WindowCenter", _first(ds.get("WindowCenter")))
    width = wg.get("WindowWidth", _first(ds.get("WindowWidth")))
    file_window = (center, width) if center is not None and width is not None and width > 0 else None
    bits = int(ds.get("BitsStored", arr.dtype.itemsize * 8) or 16)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    value_range = tuple(sorted((lo * slope + intercept, hi * slope + intercept)))
    return _Decoded(values, "dicom", label, False, file_window, value_range, invert=photometric == "MONOCHROME1")


def _axis_order(codes: tuple[str, str]) -> tuple[int, bool, int, bool]:
    """For the two in-plane voxel axes' direction codes: (row axis, flip rows, column axis, flip columns)."""
    fam = {"L": "LR", "R": "LR", "A": "AP", "P": "AP", "S": "SI", "I": "SI"}
    families = [fam.get(c, "?") for c in codes]
    if "SI" in families:
        row = families.index("SI")
    elif "AP" in families:
        row = families.index("AP")
    else:
        row = 0
    col = 1 - row
    # Rows run towards inferior (or posterior); columns towards the patient's left (or posterior on sagittal).
    flip_row = codes[row] in ("S", "A")
    flip_col = codes[col] in ("R", "A")
    return row, flip_row, col, flip_col


def _decode_nifti(data, path, label, selection, orientation: str = "radiological") -> _Decoded:
    try:
        import nibabel as nib
    except ImportError as e:  # pragma: no cover - nibabel is a declared dependency
        raise ImageReadError(f"{label}: reading NIfTI needs the 'nibabel' package, which is not installed") from e
    try:
        if data is not None:
            raw = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
            size = struct.unpack("<i", raw[:4])[0]
            if size not in _NIFTI_SIZES:
                size = struct.unpack(">i", raw[:4])[0]
            cls = nib.Nifti2Image if size == 540 else nib.Nifti1Image
            img = cls.from_bytes(raw)
        else:
            img = nib.load(str(path))
        shape = tuple(int(s) for s in img.shape)
    except Exception as e:  # nibabel, gzip and zlib raise many types for damaged files
        raise ImageReadError(f"{label}: corrupt or truncated NIfTI ({type(e).__name__}: {e})") from e
    if len(shape) > 4 and all(s == 1 for s in shape[4:]):
        shape = shape[:4]
    if len(shape) not in (2, 3, 4):
        raise ImageReadError(f"{label}: expected a 2-, 3- or 4-D NIfTI volume, found {len(shape)}-D shape "
                             f"{'x'.join(map(str, shape))}")
    dims = "x".join(map(str, shape))
    axis_names = ("x", "y", "z")
    picked = [k for k in axis_names if k in selection]
    t = selection.get("t")
    if len(shape) < 4 and t not in (None, 0):
        raise ImageReadError(f"{label}: t={t} given but the volume is {len(shape)}-D ({dims}); only 4-D has t")
    if len(shape) == 4:
        t = 0 if t is None else t
        if t >= shape[3]:
            raise ImageReadError(f"{label}: t={t} is out of range: valid t is 0..{shape[3] - 1} (shape {dims})")
    if "frame" in selection:
        raise ImageReadError(f"{label}: NIfTI takes x=, y= or z= (and t=), found frame=")
    if len(shape) == 2:
        if picked and not (picked == ["z"] and selection["z"] == 0):
            raise ImageReadError(f"{label}: a 2-D NIfTI image ({dims}) has no slice {picked[0]}={selection[picked[0]]}"
                                 f"; only z=0")
        axis, index = 2, 0
    else:
        axis = axis_names.index(picked[0]) if picked else 2
        index = selection[picked[0]] if picked else shape[axis] // 2
        if index >= shape[axis]:
            raise ImageReadError(f"{label}: slice {axis_names[axis]}={index} is out of range: valid "
                                 f"{axis_names[axis]} is 0..{shape[axis] - 1} (shape {dims})")
    try:
        if len(shape) == 2:
            sl = np.asanyarray(img.dataobj)
            sl = sl.reshape(shape)
        else:
            key: list = [slice(None)] * len(img.shape)
            key[axis] = index
            if len(img.shape) >= 4:
                key[3] = t
                for extra in range(4, len(img.shape)):
                    key[extra] = 0
            sl = np.asanyarray(img.dataobj[tuple(key)])
    except Exception as e:
        raise ImageReadError(f"{label}: corrupt or truncated NIfTI data ({type(e).__name__}: {e})") from e
    if sl.dtype.names:  # RGB24 / RGBA32 voxels
        sl = np.stack([sl[n] for n in sl.dtype.names[:3]], axis=-1)
    if sl.ndim not in (2, 3):
        raise ImageReadError(f"{label}: expected a 2-D slice, found shape {sl.shape}")
    if orientation == "radiological":
        in_plane = [a for a in range(3) if a != axis][:2] if len(shape) > 2 else [0, 1]
        try:
            codes3 = nib.aff2axcodes(img.affine)
            codes = (codes3[in_plane[0]] or "?", codes3[in_plane[1]] or "?")
        except Exception:
            codes = ("R", "A")
        row, flip_row, _, flip_col = _axis_order(codes)
        if row == 1:
            sl = np.swapaxes(sl, 0, 1)
        if flip_row:
            sl = sl[::-1]
        if flip_col:
            sl = sl[:, ::-1]
    sl = np.ascontiguousarray(sl)
    if sl.ndim == 3 and sl.dtype == np.uint8:
        return _Decoded(sl, "nifti", label, True, None, (0.0, 255.0))
    dtype = img.get_data_dtype()
    value_range = None
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        slope, inter = img.dataobj.slope, img.dataobj.inter
        a, b = info.min * slope + inter, info.max * slope + inter
        value_range = (float(min(a, b)), float(max(a, b)))
    return _Decoded(sl.astype(np.float64), "nifti", label, False, None, value_range)


# ---------------------------------------------------------------------------------------------------------------
# Windowing and the public readers


def apply_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """Map [center - width/2, center + width/2] linearly to 0..255 (uint8), clipping outside."""
    if not width > 0:
        raise ImageReadError(f"a window width must be positive, found {width}")
    lo = center - width / 2.0
    scaled = (np.asarray(values, dtype=np.float64) - lo) / float(width)
    return np.rint(np.clip(scaled, 0.0, 1.0) * 255.0).astype(np.uint8)


def minmax_to_uint8(values: np.ndarray) -> np.ndarray:
    """Min-max scale to 0..255; a constant image becomes all zeros."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return v.astype(np.uint8)
    lo, hi = float(v.min()), float(v.max())
    if not hi > lo:
        return np.zeros(v.shape, dtype=np.uint8)
    return np.rint((v - lo) / (hi - lo) * 255.0).astype(np.uint8)


def _resolve_window(window, dec: _Decoded) -> tuple[str, tuple[float, float] | None]:
    """('as-is' | 'minmax' | 'window', (center, width))."""
    if window is None:
        if dec.display_ready:
            return "as-is", None
        if dec.file_window is not None:
            return "window", dec.file_window
        return "minmax", None
    if isinstance(window, str):
        key = window.strip().lower().replace("-", "_").replace(" ", "_")
        if key in ("minmax", "min_max", "auto"):
            return "minmax", None
        if key == "file":
            if dec.file_window is None:
                raise ImageReadError(f"{dec.label}: window='file' but the file has no WindowCenter/WindowWidth")
            return "window", dec.file_window
        if key == "dtype":
            if dec.value_range is None:
                raise ImageReadError(f"{dec.label}: window='dtype' needs integer data, found floating-point values")
            lo, hi = dec.value_range
            return "window", ((lo + hi) / 2.0, hi - lo)
        if key in WINDOW_PRESETS:
            return "window", WINDOW_PRESETS[key]
        raise ImageReadError(f"unknown window {window!r}: expected one of {', '.join(sorted(WINDOW_PRESETS))}, "
                             f"'minmax', 'file', 'dtype', or a (center, width) pair")
    try:
        center, width = (float(x) for x in window)
    except (TypeError, ValueError) as e:
        raise ImageReadError(f"a window must be a preset name or a (center, width) pair, found {window!r}") from e
    return "window", (center, width)


def read_image(source: Source, *, name: str | None = None, window=None,
               orientation: str = "radiological") -> Image.Image:
    """Read an image as 8-bit RGB.

    ``source``: a path (``scan.nii.gz#z=42`` and ``series.dcm#frame=3`` pick a slice or frame) or the file's
    bytes; with bytes, ``name`` is the upload's file name, used in messages and for its ``#...`` selection.
    ``window``: None (the default per format, see the module docs), a preset name from :data:`WINDOW_PRESETS`,
    ``"minmax"``, ``"file"``, ``"dtype"`` or ``(center, width)``. Raises :class:`ImageReadError`.
    """
    dec, _ = _decode(source, name, orientation)
    how, win = _resolve_window(window, dec)
    if how == "as-is":
        out = dec.values.astype(np.uint8, copy=False)
    elif how == "minmax":
        out = minmax_to_uint8(dec.values)
    else:
        out = apply_window(dec.values, *win)
    if dec.invert:
        out = 255 - out
    if out.ndim == 2:
        out = np.repeat(out[..., None], 3, axis=-1)
    return Image.fromarray(np.ascontiguousarray(out), mode="RGB")


def read_mask_levels(source: Source, *, name: str | None = None) -> np.ndarray:
    """A mask's stored values as a 2-D array (colour masks: the maximum over channels), without thresholding."""
    dec, _ = _decode(source, name)
    return dec.values.max(axis=-1) if dec.values.ndim == 3 else dec.values


def binarize_mask(levels: np.ndarray, value_range: tuple[float, float] = (0.0, 255.0)) -> np.ndarray:
    """Foreground of a mask's levels: ``> 0`` for label maps (max below half the range: 0/1, 0/1/2 masks),
    else ``>= half the range`` (0/255 masks, also when JPEG noise blurs the edges)."""
    lv = np.asarray(levels)
    if lv.dtype == bool:
        return lv.copy()
    if lv.size == 0:
        return np.zeros(lv.shape, dtype=bool)
    half = (value_range[0] + value_range[1] + 1) / 2.0
    if float(lv.max()) < half:
        return lv > 0
    return lv >= half


def read_mask(source: Source, *, name: str | None = None) -> np.ndarray:
    """Read a segmentation mask as a 2-D boolean array (True = lesion).

    8- and 16-bit rasters: a 0/1 (or small-label) mask is foreground where non-zero; otherwise foreground is at
    least half the dtype range (128 for 8-bit). Colour masks use the brightest channel; alpha counts as black.
    DICOM and NIfTI masks: foreground where the (rescaled) value is above 0.
    """
    return read_mask_and_levels(source, name=name)[1]


def read_mask_and_levels(source: Source, *, name: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(the mask's stored values as a 2-D array, the boolean mask :func:`read_mask` returns) from one decode."""
    dec, _ = _decode(source, name)
    values = dec.values.max(axis=-1) if dec.values.ndim == 3 else dec.values
    if dec.fmt in ("dicom", "nifti"):
        return values, np.asarray(values) > 0
    return values, binarize_mask(values, dec.value_range or (0.0, 255.0))
