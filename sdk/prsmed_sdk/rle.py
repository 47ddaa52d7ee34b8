"""COCO run-length encoding of a binary mask: the ``{"size": [h, w], "counts": str}`` form that pycocotools'
``mask.decode``, the COCO format and SAM's tools read.

The runs go down the columns (column-major order), alternate background and mask, and start with background (a
first run of 0 when the top-left pixel is in the mask). ``counts`` is the compact string form: each run, less the
run two before it from the third on, written as little-endian groups of five bits, one character per group
(value + 48), the sixth bit of a character set while more groups follow, the fifth bit of the last group its sign.

Pure Python and numpy, so the SDK decodes masks without pycocotools.
"""

from __future__ import annotations

from typing import Any


def runs(mask: Any) -> list[int]:
    """The run lengths of a boolean (h, w) array in column-major order, starting with a background run."""
    import numpy as np

    flat = np.asarray(mask, dtype=bool).flatten(order="F")
    if flat.size == 0:
        return []
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate(([0], changes, [flat.size]))
    lengths = np.diff(bounds).tolist()
    return ([0] + lengths) if flat[0] else lengths


def encode_counts(counts: list[int]) -> str:
    out = []
    for i, value in enumerate(counts):
        x = value - counts[i - 2] if i > 2 else value
        while True:
            group = x & 0x1F
            x >>= 5  # arithmetic shift: a negative difference ends in -1
            more = x != -1 if group & 0x10 else x != 0
            out.append(chr(48 + (group | (0x20 if more else 0))))
            if not more:
                break
    return "".join(out)


def decode_counts(text: str) -> list[int]:
    counts: list[int] = []
    pos = 0
    while pos < len(text):
        x, shift = 0, 0
        while True:
            if pos >= len(text):
                raise ValueError("the RLE counts string ends inside a number")
            c = ord(text[pos]) - 48
            pos += 1
            if not 0 <= c < 64:
                raise ValueError(f"the RLE counts string holds {chr(c + 48)!r}, not a counts character")
            x |= (c & 0x1F) << shift
            shift += 5
            if not c & 0x20:
                if c & 0x10:
                    x -= 1 << shift  # sign-extend
                break
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def encode(mask: Any) -> dict:
    """``{"size": [h, w], "counts": str}`` for a boolean (h, w) array."""
    import numpy as np

    arr = np.asarray(mask, dtype=bool)
    if arr.ndim != 2:
        raise ValueError(f"a mask to encode must be 2-D (height, width), found shape {arr.shape}")
    return {"size": [int(arr.shape[0]), int(arr.shape[1])], "counts": encode_counts(runs(arr))}


def decode(rle: dict) -> Any:
    """The boolean (h, w) array of ``{"size": [h, w], "counts": str or list of ints}``."""
    import numpy as np

    try:
        h, w = (int(v) for v in rle["size"])
        counts = rle["counts"]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"expected {{'size': [h, w], 'counts': ...}}, found {rle!r:.200}") from e
    counts = decode_counts(counts) if isinstance(counts, str) else [int(c) for c in counts]
    if any(c < 0 for c in counts) or sum(counts) != h * w:
        raise ValueError(f"the RLE runs cover {sum(counts)} pixels with negative runs {any(c < 0 for c in counts)}; "
                         f"a {h}x{w} mask has {h * w}")
    values = np.zeros(len(counts), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, counts)
    return flat.reshape((h, w), order="F")
