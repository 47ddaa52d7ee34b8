"""What ``client.predict`` returns: the server's answer plus the mask as an array and an overlay picture."""

from __future__ import annotations

import base64
import io
import os
from typing import Any

from pydantic import PrivateAttr

from . import _png, rle
from .models import PredictResponse


def _need(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"this needs {module.split('.')[0]}: pip install 'prsmed-sdk[images]'") from e


class Answer(PredictResponse):
    """The server's :class:`PredictResponse` (``answer``, ``zone``, ``consistent``, ``bbox``, ``timings_ms``, ...)
    with the mask decoded on demand."""

    _image: Any = PrivateAttr(default=None)
    _mask: Any = PrivateAttr(default=None)

    @property
    def mask_bytes(self) -> bytes:
        """The mask as an 8-bit greyscale PNG (0 and 255) at the input image's size: as the server sent it, or
        drawn from the run-length encoding (mask_format="rle"; needs numpy)."""
        if self.mask_png is not None:
            return base64.b64decode(self.mask_png)
        return _png.encode(self.mask)  # a bool array is written as 0 and 255

    @property
    def mask(self):
        """The mask as a boolean numpy array of shape (height, width) (needs numpy), from either format."""
        if self._mask is None:
            _need("numpy")
            if self.mask_rle is not None:
                self._mask = rle.decode(self.mask_rle.model_dump())
            elif self.mask_png is not None:
                pixels = _png.decode(self.mask_bytes)
                self._mask = (pixels if pixels.ndim == 2 else pixels[..., 0]) > 127
            else:
                raise ValueError("the answer carries no mask (neither mask_png nor mask_rle)")
        return self._mask

    def save_mask(self, path: str | os.PathLike) -> None:
        """Write the mask as a PNG."""
        with open(path, "wb") as f:
            f.write(self.mask_bytes)

    def overlay(self, image=None, *, color=(255, 64, 32), alpha: float = 0.45):
        """The image with the mask tinted over it and outlined, as a PIL image (needs numpy and Pillow).

        ``image`` defaults to the one that was sent, when the client could keep it (a path or bytes of a PNG or
        JPEG, a PIL image, an array); for DICOM or NIfTI pass the slice you want to see as an array."""
        np = _need("numpy")
        pil = _need("PIL.Image")
        source = self._image if image is None else image
        if source is None:
            raise ValueError("no image to draw on: pass image=...")
        try:
            base = _to_pil(source, pil, np).convert("RGB")
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot draw the overlay on the sent image ({e}); pass image= as an array or a PIL "
                             f"image (DICOM and NIfTI are not decoded by the SDK)") from e
        mask = self.mask
        if base.size != (mask.shape[1], mask.shape[0]):
            raise ValueError(f"the mask is {mask.shape[1]}x{mask.shape[0]} but the image is "
                             f"{base.size[0]}x{base.size[1]}")
        rgb = np.asarray(base, dtype=np.float32)
        tint = np.asarray(color, dtype=np.float32)
        out = rgb.copy()
        out[mask] = (1 - alpha) * rgb[mask] + alpha * tint
        edge = mask & ~_eroded(mask, np)
        out[edge] = tint
        return pil.fromarray(out.round().clip(0, 255).astype(np.uint8), mode="RGB")

    def save_overlay(self, path: str | os.PathLike, image=None, **style) -> None:
        """Write :meth:`overlay` to ``path`` (the format follows the suffix: .png, .jpg, ...)."""
        self.overlay(image, **style).save(path)


def _eroded(mask, np):
    padded = np.pad(mask, 1, constant_values=False)
    out = mask.copy()
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        out &= padded[dy : dy + mask.shape[0], dx : dx + mask.shape[1]]
    return out


def _to_pil(source, pil, np):
    if isinstance(source, (str, os.PathLike)):
        return pil.open(os.fspath(source).split("#", 1)[0])
    if isinstance(source, (bytes, bytearray, memoryview)):
        return pil.open(io.BytesIO(bytes(source)))
    if hasattr(source, "convert") and hasattr(source, "size"):
        return source
    a = np.asarray(source)
    if a.dtype != np.uint8:
        a = a.astype(np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = ((a - lo) / (hi - lo) * 255 if hi > lo else a * 0).astype(np.uint8)
    return pil.fromarray(a[..., 0] if a.ndim == 3 and a.shape[2] == 1 else a)
