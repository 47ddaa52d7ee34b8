"""Position zones ("clinical action zones"): from a mask, and from the words of an answer.

From a mask (the authors' rule, PRSMED.md 4.5): with the image centre at ``(W // 2, H // 2)`` and the mask's
bounding box in inclusive pixel coordinates,

* if the box contains the centre point, the zone is ``center``;
* otherwise the box centre ``((x0 + x1) // 2, (y0 + y1) // 2)`` falls in one quadrant, split at the image
  centre (a box centre exactly on a split line goes right / bottom);
* the box centre is *near the centre* when its distance to the image centre is under ``0.2 * W``; a ``center``
  zone is always near the centre.

An empty mask has the zone ``none``. The zone of the whole mask uses every foreground pixel, as the authors do.
For two-lesion descriptions the mask is also split into 8-connected components; components smaller than
``min_area`` pixels are ignored there, and each kept component gets its own zone by the same rule.

From text, :func:`zones_from_text` reads zone phrases with a small lexicon (see its docstring).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

import numpy as np

ZONES = ("top left", "top right", "bottom left", "bottom right", "center")
QUADRANTS = ZONES[:4]
NONE = "none"
NEAR_CENTER_FRACTION = 0.2


# ---------------------------------------------------------------------------------------------------------------
# Connected components


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Horizontal runs of foreground: (row, start, end exclusive), in raster order."""
    h, w = mask.shape
    padded = np.zeros((h, w + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    d = np.diff(padded, axis=1)
    rows, starts = np.nonzero(d == 1)
    _, ends = np.nonzero(d == -1)
    return rows.astype(np.int64), starts.astype(np.int64), ends.astype(np.int64)


def _run_labels(rows: np.ndarray, starts: np.ndarray, ends: np.ndarray, width: int, connectivity: int) -> np.ndarray:
    """Component id of each run (0..n-1, numbered in raster order of the component's first pixel)."""
    n = len(rows)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    # Runs of one row never touch each other, so only runs of the row above can join a run. Global keys
    # (row * stride + column) keep every row's runs sorted, which turns the search into two searchsorted calls.
    stride = width + 2
    start_keys = rows * stride + starts
    end_keys = rows * stride + ends
    above = (rows - 1) * stride
    if connectivity == 8:  # diagonal contact counts: [s, e) touches [s', e') when s <= e' and s' <= e
        lo = np.searchsorted(end_keys, above + starts, side="left")
        hi = np.searchsorted(start_keys, above + ends, side="right")
    else:
        lo = np.searchsorted(end_keys, above + starts, side="right")
        hi = np.searchsorted(start_keys, above + ends, side="left")
    counts = np.clip(hi - lo, 0, None)
    counts[rows == 0] = 0
    a = np.repeat(np.arange(n), counts)
    offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    b = np.repeat(lo, counts) + offsets
    parent = np.arange(n)
    # Hook-and-compress: each edge pulls both roots down to the smaller one, then paths are halved until flat.
    while len(a):
        pa, pb = parent[a], parent[b]
        if np.array_equal(pa, pb):
            break
        low = np.minimum(pa, pb)
        np.minimum.at(parent, pa, low)
        np.minimum.at(parent, pb, low)
        while True:
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped
    _, ids = np.unique(parent, return_inverse=True)
    return ids


def label_components(mask: np.ndarray, connectivity: int = 8) -> tuple[np.ndarray, int]:
    """Label the connected components of a 2-D mask: (int32 labels with 0 = background, count).

    Labels follow the raster order of each component's first pixel, as OpenCV's and SciPy's do.
    """
    m = _as_mask(mask)
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, found {connectivity!r}")
    rows, starts, ends = _runs(m)
    ids = _run_labels(rows, starts, ends, m.shape[1], connectivity)
    labels = np.zeros(m.shape, dtype=np.int32)
    lengths = ends - starts
    if len(lengths):
        total = int(lengths.sum())
        flat_start = rows * m.shape[1] + starts
        flat = np.repeat(flat_start, lengths) + (np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths))
        labels.reshape(-1)[flat] = np.repeat(ids + 1, lengths)
    return labels, int(ids.max() + 1) if len(ids) else 0


# ---------------------------------------------------------------------------------------------------------------
# Zones of a mask


@dataclass(frozen=True)
class Component:
    """One connected lesion: inclusive bounding box (x0, y0, x1, y1), area in pixels, centroid (x, y)."""

    bbox: tuple[int, int, int, int]
    area: int
    centroid: tuple[float, float]
    zone: str
    near_center: bool


@dataclass(frozen=True)
class ZoneInfo:
    """The zone of a whole mask (``bbox`` inclusive, ``area`` in pixels) and its kept components, in raster order."""

    zone: str
    near_center: bool
    components: list[Component] = field(default_factory=list)
    bbox: tuple[int, int, int, int] | None = None
    area: int = 0

    @property
    def lesions(self) -> list[tuple[str, bool]]:
        """What a position sentence should describe: two lesions when the mask has two or more components
        (the two largest, in raster order, as the authors take a first and a last one), else the whole mask."""
        if len(self.components) >= 2:
            largest = sorted(range(len(self.components)), key=lambda i: -self.components[i].area)[:2]
            return [(self.components[i].zone, self.components[i].near_center) for i in sorted(largest)]
        if self.zone == NONE:
            return []
        return [(self.zone, self.near_center)]

    def to_dict(self) -> dict:
        return asdict(self)


def zone_label(info: ZoneInfo) -> str:
    """A short label for counting: a zone, a quadrant with " (near)", "two lesions", or "none"."""
    if len(info.lesions) == 2:
        return "two lesions"
    near = info.near_center and info.zone not in ("center", NONE)
    return info.zone + (" (near)" if near else "")


def zone_of_box(bbox: tuple[int, int, int, int], height: int, width: int) -> tuple[str, bool]:
    """The authors' rule for one inclusive bounding box in an image of the given size: (zone, near_center)."""
    x0, y0, x1, y1 = bbox
    cx, cy = width // 2, height // 2
    if x0 <= cx <= x1 and y0 <= cy <= y1:
        return "center", True
    bx, by = (x0 + x1) // 2, (y0 + y1) // 2
    near = float(np.hypot(bx - cx, by - cy)) < NEAR_CENTER_FRACTION * width
    vertical = "top" if by < cy else "bottom"
    horizontal = "left" if bx < cx else "right"
    return f"{vertical} {horizontal}", near


def _as_mask(mask) -> np.ndarray:
    m = np.asarray(mask)
    if m.ndim == 3 and m.shape[-1] in (1, 3, 4):
        m = m[..., :3].max(axis=-1) if m.shape[-1] > 1 else m[..., 0]
    if m.ndim != 2:
        raise ValueError(f"expected a 2-D mask (H, W), found an array of shape {m.shape}")
    return m > 0 if m.dtype != bool else m


def default_min_area(height: int, width: int) -> int:
    """Components under 0.02 % of the image (at least 4 px) are specks, not lesions: 13 px at 256², 210 px at 1024²."""
    return max(4, int(0.0002 * height * width))


def find_components(mask, *, min_area: int | None = None, connectivity: int = 8) -> list[Component]:
    """Connected components of at least ``min_area`` pixels, in raster order, each with its zone.

    When every component is smaller than ``min_area`` the largest one is kept, so a non-empty mask always has one.
    """
    m = _as_mask(mask)
    h, w = m.shape
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, found {connectivity!r}")
    rows, starts, ends = _runs(m)
    if len(rows) == 0:
        return []
    ids = _run_labels(rows, starts, ends, w, connectivity)
    n = int(ids.max()) + 1
    lengths = ends - starts
    area = np.bincount(ids, weights=lengths, minlength=n).astype(np.int64)
    x0 = np.full(n, w, dtype=np.int64)
    y0 = np.full(n, h, dtype=np.int64)
    x1 = np.full(n, -1, dtype=np.int64)
    y1 = np.full(n, -1, dtype=np.int64)
    np.minimum.at(x0, ids, starts)
    np.maximum.at(x1, ids, ends - 1)
    np.minimum.at(y0, ids, rows)
    np.maximum.at(y1, ids, rows)
    sum_x = np.bincount(ids, weights=(starts + ends - 1) * lengths / 2.0, minlength=n)
    sum_y = np.bincount(ids, weights=rows * lengths, minlength=n)
    limit = default_min_area(h, w) if min_area is None else int(min_area)
    keep = [i for i in range(n) if area[i] >= limit] or [int(np.argmax(area))]
    out = []
    for i in keep:
        box = (int(x0[i]), int(y0[i]), int(x1[i]), int(y1[i]))
        zone, near = zone_of_box(box, h, w)
        out.append(Component(box, int(area[i]), (float(sum_x[i] / area[i]), float(sum_y[i] / area[i])), zone, near))
    return out


def zone_of_mask(mask, *, min_area: int | None = None, connectivity: int = 8) -> ZoneInfo:
    """The zone of a 2-D mask (any non-zero pixel is foreground) by the authors' rule, plus its components."""
    m = _as_mask(mask)
    h, w = m.shape
    ys = np.flatnonzero(m.any(axis=1))
    if len(ys) == 0:
        return ZoneInfo(NONE, False, [], None, 0)
    xs = np.flatnonzero(m.any(axis=0))
    box = (int(xs[0]), int(ys[0]), int(xs[-1]), int(ys[-1]))
    zone, near = zone_of_box(box, h, w)
    comps = find_components(m, min_area=min_area, connectivity=connectivity)
    return ZoneInfo(zone, near, comps, box, int(m.sum()))


# ---------------------------------------------------------------------------------------------------------------
# Zones in text

_TOP = {"top", "upper", "superior", "superiorly", "uppermost", "topmost", "above", "higher", "highest"}
_BOTTOM = {"bottom", "lower", "inferior", "inferiorly", "lowermost", "bottommost", "below", "lowest"}
_LEFT = {"left", "leftward", "leftwards", "leftmost", "lefthand"}
_RIGHT = {"right", "rightward", "rightwards", "rightmost", "righthand"}
_CENTER = {"center", "centre", "central", "centrally", "middle", "mid", "midpoint", "centered", "centred",
           "centermost", "centremost"}
_PARACENTRAL = {"paracentral", "pericentral"}
_NEAR = {"near", "nearer", "nearby", "close", "closer", "toward", "towards", "adjacent", "next", "approaching",
         "bordering", "beside", "off", "abutting", "neighbouring", "neighboring", "just"}
_NEGATION = {"not", "no", "never", "without", "rather", "instead", "excluding", "except", "nor"}
# Words that end one described location and start another ("one in the top left and another in the bottom right").
_SEPARATORS = {".", ";", "!", "?", "and", "another", "while", "whereas", "but", "plus", "second", "other", "then"}
_TOKEN = re.compile(r"[a-z]+|[.;,!?]")
_ABSENT = re.compile(
    r"\b(?:no|without)\s+(?:\w+\s+){0,2}?(?:tumou?rs?|lesions?|mass(?:es)?|polyps?|nodules?|abnormalit\w*|findings?)\b"
    r"|\bnot\s+(?:visible|present|seen|detected|found|identified)\b"
)


@dataclass(frozen=True)
class TextZone:
    """A zone read from text and whether the text also says it lies near the centre."""

    zone: str
    near_center: bool


def _axis(tok: str) -> tuple[str, str] | None:
    if tok in _TOP:
        return "v", "top"
    if tok in _BOTTOM:
        return "v", "bottom"
    if tok in _LEFT:
        return "h", "left"
    if tok in _RIGHT:
        return "h", "right"
    return None


def _negated(tokens: list[str], index: int) -> bool:
    for j in range(index - 1, max(-1, index - 5), -1):
        if tokens[j] == "," or _axis(tokens[j]):
            return False
        if tokens[j] in _NEGATION:
            return True
    return False


def _parse_segment(tokens: list[str]) -> dict:
    """Zones, single-axis leftovers and centre mentions of one clause."""
    zones: list[tuple[str, str]] = []
    orphans: list[tuple[str, str]] = []  # (axis, word)
    centers: list[bool] = []  # one entry per centre mention: True when it only qualifies ("near the centre")
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        ax = _axis(tok)
        if ax:
            nxt = None
            # "upper left", "left upper", "upper-left", also across one filler word ("upper and lower" is split
            # earlier, so a filler here is "upper part left" or "left, upper").
            for k in (i + 1, i + 2):
                if k < len(tokens) and _axis(tokens[k]) and _axis(tokens[k])[0] != ax[0]:
                    nxt = k
                    break
                if k < len(tokens) and _axis(tokens[k]):
                    break
            if nxt is not None:
                if not _negated(tokens, i):
                    pair = {ax[0]: ax[1], _axis(tokens[nxt])[0]: _axis(tokens[nxt])[1]}
                    zones.append((pair["v"], pair["h"]))
                i = nxt + 1
                continue
            if not _negated(tokens, i):
                orphans.append(ax)
        elif tok in _PARACENTRAL:
            centers.append(True)
        elif tok in _CENTER and not _negated(tokens, i):
            before = tokens[max(0, i - 4):i]
            qualifier = any(t in _NEAR for t in before)
            # "left of (the) centre", "above the middle": a direction measured from the centre.
            prev = [t for t in tokens[max(0, i - 3):i] if t not in ("the", "image", "s")]
            if len(prev) >= 2 and prev[-1] == "of" and _axis(prev[-2]):
                qualifier = True
            if prev and prev[-1] in ("above", "below"):
                qualifier = True
            centers.append(qualifier)
        i += 1
    return {"zones": zones, "orphans": orphans, "centers": centers}


def parse_zones(text: str) -> list[TextZone]:
    """Every zone the text names, in order of appearance (duplicates kept), each with its near-centre flag."""
    tokens = _TOKEN.findall((text or "").lower().replace("centre", "center"))
    segments: list[list[str]] = [[]]
    for tok in tokens:
        if tok in _SEPARATORS:
            segments.append([])
        else:
            segments[-1].append(tok)
    parsed = [_parse_segment(s) for s in segments if s]
    out: list[TextZone] = []
    used = set()
    for k, seg in enumerate(parsed):
        near = any(seg["centers"])
        if seg["zones"]:
            out.extend(TextZone(f"{v} {h}", bool(seg["centers"])) for v, h in seg["zones"])
            continue
        if any(not q for q in seg["centers"]):
            out.append(TextZone("center", True))
            continue
        if k in used or not seg["orphans"]:
            continue
        axis, word = seg["orphans"][0]
        other = "h" if axis == "v" else "v"
        partner = None
        nxt = parsed[k + 1] if k + 1 < len(parsed) else None
        prev_zone = out[-1].zone if out and out[-1].zone != "center" else None
        if nxt and not nxt["zones"] and any(a == other for a, _ in nxt["orphans"]) and not any(
            not q for q in nxt["centers"]
        ):
            # "slightly above and to the left of the centre": two halves of one location.
            partner = next(w for a, w in nxt["orphans"] if a == other)
            near = near or any(nxt["centers"])
            used.add(k + 1)
        elif nxt and nxt["zones"]:
            # "upper and lower left": the missing half comes from the next location.
            v, h = nxt["zones"][0]
            partner = h if other == "h" else v
        elif prev_zone:
            # "the top left and right": or from the previous one.
            v, h = prev_zone.split()
            partner = h if other == "h" else v
        if partner:
            v, h = (word, partner) if axis == "v" else (partner, word)
            out.append(TextZone(f"{v} {h}", near))
    if not out and _ABSENT.search((text or "").lower()):
        out.append(TextZone(NONE, False))
    return out


def zones_from_text(text: str) -> list[str]:
    """The distinct zones named in ``text``, in order of first appearance.

    The lexicon: top / upper / superior / above, bottom / lower / inferior / below, left, right, and
    centre / center / middle / central. The two halves of a quadrant may come in either order and with a hyphen
    ("upper-left", "left upper", "top-left quadrant"). A centre word after *near*, *close to*, *towards*, *off*
    (or "left of the centre") only qualifies a quadrant: "upper left, near the centre" is ``top left``. A centre
    word alone ("in the middle of the image") is ``center``. A quadrant next to a centre word is still the
    quadrant ("central upper left region"). Clauses split at *and*, *another*, *while*, *but*, full stops and
    semicolons, so "one in the top left and another in the bottom right" gives both; a half given once is shared
    ("upper and lower left" gives top left and bottom left). Directions just after *not*, *no*, *rather than*,
    *instead of* are skipped. When no zone is named but the text says there is no lesion, the answer is
    ``["none"]``. Half-plane answers ("on the left side") name no zone and give ``[]``.
    """
    seen: list[str] = []
    for tz in parse_zones(text):
        if tz.zone not in seen:
            seen.append(tz.zone)
    return seen


def zone_from_text(text: str) -> str | None:
    """The first zone named in ``text`` (see :func:`zones_from_text`), or None."""
    zones = zones_from_text(text)
    return zones[0] if zones else None
