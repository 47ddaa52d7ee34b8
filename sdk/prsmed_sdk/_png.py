"""Just enough PNG to send a numpy array and read back the server's masks without Pillow.

Writes 8- or 16-bit greyscale, RGB and RGBA; reads 8-bit non-interlaced greyscale, grey+alpha, RGB and RGBA (what
the server sends: its masks are 8-bit greyscale). Anything else is read with Pillow when it is installed.
"""

from __future__ import annotations

import struct
import zlib

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode(array) -> bytes:
    """A PNG of a 2-D (greyscale) or H x W x 1/3/4 array of bool, uint8 or uint16."""
    import numpy as np

    a = np.asarray(array)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise ValueError(f"expected an image array of shape (H, W), (H, W, 3) or (H, W, 4); found {a.shape}")
    if a.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"expected a uint8, uint16 or bool image array; found {a.dtype} (scale it to uint8 first)")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"the image array is empty: shape {a.shape}")
    height, width = a.shape[:2]
    color = 0 if a.ndim == 2 else (2 if a.shape[2] == 3 else 6)
    depth = 16 if a.dtype == np.uint16 else 8
    rows = np.ascontiguousarray(a.astype(">u2") if depth == 16 else a).reshape(height, -1)
    raw = np.concatenate([np.zeros((height, 1), np.uint8), rows.view(np.uint8).reshape(height, -1)], axis=1)
    header = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    return (_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw.tobytes(), 6))
            + _chunk(b"IEND", b""))


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else (b if pb <= pc else c)


def decode(data: bytes):
    """The PNG's pixels as a uint8 array (H x W, or H x W x C)."""
    import numpy as np

    if not data.startswith(_SIGNATURE):
        raise ValueError("not a PNG (the signature is missing)")
    pos, idat, header = 8, [], None
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
    if header is None:
        raise ValueError("PNG without an IHDR chunk")
    width, height, depth, color, _, _, interlace = header
    if depth != 8 or color not in _CHANNELS or interlace:
        return _decode_with_pillow(data, f"{depth}-bit colour type {color}, interlace {interlace}")
    channels = _CHANNELS[color]
    stride = width * channels
    raw = zlib.decompress(b"".join(idat))
    if len(raw) != height * (stride + 1):
        raise ValueError(f"PNG data is {len(raw)} bytes; a {width}x{height} image needs {height * (stride + 1)}")
    out = bytearray(height * stride)
    prev = bytearray(stride)
    for y in range(height):
        ftype = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        if ftype == 1:
            for i in range(channels, stride):
                line[i] = (line[i] + line[i - channels]) & 0xFF
        elif ftype == 2:
            line = bytearray((x + p) & 0xFF for x, p in zip(line, prev))
        elif ftype == 3:
            for i in range(stride):
                left = line[i - channels] if i >= channels else 0
                line[i] = (line[i] + ((left + prev[i]) >> 1)) & 0xFF
        elif ftype == 4:
            for i in range(stride):
                left = line[i - channels] if i >= channels else 0
                upleft = prev[i - channels] if i >= channels else 0
                line[i] = (line[i] + _paeth(left, prev[i], upleft)) & 0xFF
        elif ftype != 0:
            raise ValueError(f"PNG row {y} has unknown filter type {ftype}")
        out[y * stride : (y + 1) * stride] = line
        prev = line
    arr = np.frombuffer(bytes(out), dtype=np.uint8)
    return arr.reshape(height, width) if channels == 1 else arr.reshape(height, width, channels)


def _decode_with_pillow(data: bytes, what: str):
    import io

    import numpy as np

    try:
        from PIL import Image
    except ImportError as e:
        raise ValueError(f"this PNG is {what}; reading it needs Pillow (pip install 'prsmed-sdk[images]')") from e
    return np.asarray(Image.open(io.BytesIO(data)))
