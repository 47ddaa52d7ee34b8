"""The Predictor: answers and masks from a warm model, for the CLI, the service and the demo.

* One LLM prefill per question serves both the mask (the fusion head reads the prompt's hidden states) and the
  answer (decoding continues from the prefill's KV cache).
* The vision encoder's output is cached per image content (bounded LRU), so a second question on the same image
  skips the encoder. The key includes the encoder weights in use, so an adapter that retrained the encoder gets
  its own entries.
* A list of requests runs as one batch per adapter.
* Adapters swap on the warm base model: a bundle is verified and read once, kept resident (several, LRU), and
  applied by copying its tensors in; "no adapter" restores the base weights captured at start.
* One lock serialises model use, so any number of threads may call :meth:`Predictor.predict`; image decoding and
  post-processing run outside it.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from PIL import Image

from prsmed.data.readers import ImageReadError, minmax_to_uint8, read_image
from prsmed.data.zones import NONE, zone_from_text, zones_from_text
from prsmed.infer.adapters import AdapterInfo, AdapterNotFound, AdapterStore, adapter_info
from prsmed.infer.cache import LRUCache, image_key
from prsmed.infer.postprocess import MaskSummary, probability_at, summarize_mask
from prsmed.model.bundle import BundleError, BundleWeights, apply_bundle, read_bundle

MAX_QUESTION_CHARS = 2000
ImageInput = Union[str, Path, bytes, bytearray, Image.Image, np.ndarray]


class InvalidInput(ValueError):
    """A request the model cannot answer as given: says what was expected and what was found."""


@dataclass
class PredictRequest:
    image: ImageInput
    question: str
    adapter: str | None = None
    filename: str | None = None  # for bytes: the upload's name, which may carry a slice ("ct.nii.gz#z=40")


@dataclass
class PredictResult:
    answer: str
    zone: str
    zones: list[str]
    zone_from_text: str
    zones_from_text: list[str]
    consistent: bool
    mask: np.ndarray = field(repr=False)
    probability: np.ndarray = field(repr=False)
    bbox: list[int] | None
    area_fraction: float
    confidence: float
    image_size: tuple[int, int]  # (width, height)
    adapter: str | None
    cache_hit: bool
    timings_ms: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        """Everything but the arrays, JSON-ready."""
        return {
            "answer": self.answer, "zone": self.zone, "zones": self.zones, "zone_from_text": self.zone_from_text,
            "zones_from_text": self.zones_from_text, "consistent": self.consistent, "bbox": self.bbox,
            "area_fraction": self.area_fraction, "confidence": self.confidence,
            "image_size": list(self.image_size), "adapter": self.adapter, "cache_hit": self.cache_hit,
            "timings_ms": self.timings_ms,
        }


def check_question(question: Any) -> str:
    if not isinstance(question, str):
        raise InvalidInput(f"question must be text, found {type(question).__name__}")
    text = question.strip()
    if not text:
        raise InvalidInput("question is empty; ask, for example, 'Where is the lesion in this image?'")
    if len(text) > MAX_QUESTION_CHARS:
        raise InvalidInput(f"question has {len(text)} characters; at most {MAX_QUESTION_CHARS} are accepted")
    return text


def load_image(image: ImageInput, filename: str | None = None) -> Image.Image:
    """Any accepted input as 8-bit RGB; :class:`InvalidInput` with the reader's reason otherwise."""
    try:
        if isinstance(image, Image.Image):
            return image if image.mode == "RGB" else image.convert("RGB")
        if isinstance(image, np.ndarray):
            return _from_array(image)
        if isinstance(image, (bytes, bytearray, memoryview)):
            if not len(image):
                raise InvalidInput("the image is empty (0 bytes)")
            return read_image(bytes(image), name=filename)
        if isinstance(image, (str, Path)):
            return read_image(image)
    except ImageReadError as e:
        raise InvalidInput(str(e)) from e
    except OSError as e:  # a path that cannot be opened
        raise InvalidInput(f"cannot read {image}: {e}") from e
    raise InvalidInput(
        f"image must be a path, the file's bytes, a PIL image or a numpy array; found {type(image).__name__}"
    )


def _from_array(arr: np.ndarray) -> Image.Image:
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4))):
        raise InvalidInput(f"a numpy image must be (H, W), (H, W, 3) or (H, W, 4); found shape {arr.shape}")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise InvalidInput(f"a numpy image must not be empty; found shape {arr.shape}")
    if arr.ndim == 3 and arr.shape[-1] == 4:
        arr = arr[..., :3]
    if arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.number) and arr.dtype != bool:
            raise InvalidInput(f"a numpy image must hold numbers; found dtype {arr.dtype}")
        arr = minmax_to_uint8(arr.astype(np.float64))
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    return Image.fromarray(np.ascontiguousarray(arr), mode="RGB")


class Predictor:
    """Answers and masks from one warm model. ``model`` is a zoo name or a built :class:`PRSMedModel`."""

    def __init__(
        self,
        model: Any = "prsmed-tiny",
        *,
        device: str | torch.device = "cpu",
        adapter_dir: str | Path | None = None,
        max_resident_adapters: int = 4,
        cache_size: int = 64,
        max_new_tokens: int = 64,
        threshold: float = 0.5,
        allow_other_base_weights: bool = False,
    ) -> None:
        if isinstance(model, str):
            from prsmed.zoo import build_model

            model = build_model(model)
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.model_name = model.spec.name
        # Whether adapters trained on other base weights (or before they were recorded) load, with a warning; the
        # service leaves it off, so a client can never put such an adapter on the shared model.
        self.allow_other_base_weights = allow_other_base_weights
        self.store = AdapterStore(adapter_dir, allow_other_base_weights=allow_other_base_weights)
        self.max_resident = max(1, max_resident_adapters)
        self.max_new_tokens = max_new_tokens
        self.threshold = threshold
        self._base = BundleWeights.capture(self.model)  # what "no adapter" restores
        self._resident: OrderedDict[str, BundleWeights] = OrderedDict()
        self._info: dict[str, AdapterInfo] = {}
        self._active: str | None = None
        self._lock = threading.RLock()
        self.cache = LRUCache(cache_size)

    # adapters --------------------------------------------------------------------------------------------------
    def load_adapter(self, ref: str | Path, *, reload: bool = False) -> AdapterInfo:
        """Verify and read a bundle (a store name or a path) into memory; the model is not changed until a request
        names it. Raises :class:`AdapterNotFound` or :class:`BundleError` (tampered, or for another base model or
        other base weights)."""
        name, path = self.store.resolve(ref)
        with self._lock:
            if name in self._resident and not reload:
                self._resident.move_to_end(name)
                return self._info[name]
            weights = read_bundle(path, self.model, allow_other_base_weights=self.allow_other_base_weights)
            if name == self._active:
                self._active = "\0stale"  # force a fresh copy on next use
            self._resident[name] = weights
            self._info[name] = adapter_info(name, path)
            self._resident.move_to_end(name)
            self.cache.drop(lambda key: key[0] == name)
            while len(self._resident) > self.max_resident:
                evicted, _ = self._resident.popitem(last=False)
                self._info.pop(evicted, None)
                self.cache.drop(lambda key, n=evicted: key[0] == n)
                if evicted == self._active:
                    self._active = "\0stale"
            return self._info[name]

    def resident_adapters(self) -> list[str]:
        with self._lock:
            return list(self._resident)

    def _activate(self, name: str | None) -> None:
        if name == self._active:
            return
        if name is None:
            apply_bundle(self._base, self.model)
        else:
            # Parts the bundle does not carry go back to the base weights first.
            apply_bundle(self._base, self.model)
            apply_bundle(self._resident[name], self.model)
        self._active = name

    def _cache_owner(self, name: str | None) -> str:
        """Entries of adapters that did not retrain the encoder are shared with the base model's."""
        if name is not None and "vision_encoder" in self._resident[name].parts:
            return name
        return "\0base"

    # prediction ------------------------------------------------------------------------------------------------
    def predict(self, image: ImageInput, question: str, *, adapter: str | None = None,
                filename: str | None = None) -> PredictResult:
        return self.predict_batch([PredictRequest(image, question, adapter, filename)])[0]

    def predict_batch(self, requests: Sequence[PredictRequest]) -> list[PredictResult]:
        """Every request answered; requests for the same adapter run as one batch. Raises on the first invalid
        request, before the model runs (the service validates each request on its own first)."""
        prepared = []
        for req in requests:
            t0 = time.perf_counter()
            question = check_question(req.question)
            image = load_image(req.image, req.filename)
            prepared.append((req, question, image, (time.perf_counter() - t0) * 1000))
        refs = {req.adapter or None for req in requests}
        names = {ref: (None if ref is None else self.load_adapter(ref).name) for ref in refs}
        results: list[PredictResult | None] = [None] * len(requests)
        for ref in refs:
            idx = [i for i, (req, *_) in enumerate(prepared) if (req.adapter or None) == ref]
            for i, res in zip(idx, self._run([prepared[i] for i in idx], ref, names[ref])):
                results[i] = res
        return results  # type: ignore[return-value]

    @torch.no_grad()
    def _run(self, batch: list, ref: str | None, name: str | None) -> list[PredictResult]:
        images = [image for _, _, image, _ in batch]
        keys = [image_key(im) for im in images]
        with self._lock:
            if name is not None and name not in self._resident:
                self.load_adapter(ref)  # evicted by another thread's load since predict_batch read it
            self._activate(name)
            owner = self._cache_owner(name)
            t0 = time.perf_counter()
            seg, inputs = self.model.encode(images, [q for _, q, _, _ in batch], padding_side="left")
            cached = [self.cache.get((owner, k)) for k in keys]
            missing = [i for i, z in enumerate(cached) if z is None]
            t1 = time.perf_counter()
            if missing:
                fresh = self.model.vision_encoder(seg[missing].to(self.device))
                for j, i in enumerate(missing):
                    cached[i] = fresh[j : j + 1]
                    self.cache.put((owner, keys[i]), cached[i])
            z_img = torch.cat(cached)
            t2 = time.perf_counter()
            pred = self.model.predict(seg, inputs.to(self.device), image_embeddings=z_img,
                                      max_new_tokens=self.max_new_tokens)
            logits = pred.mask_logits.float().cpu()
            t3 = time.perf_counter()
        out = []
        for (req, _, image, decode_ms), answer, logit, i in zip(batch, pred.answers, logits, range(len(batch))):
            t4 = time.perf_counter()
            summary = summarize_mask(probability_at(logit, image.height, image.width), self.threshold)
            out.append(self._result(answer.strip(), summary, image, name, i not in missing, {
                "decode": decode_ms,
                "preprocess": (t1 - t0) * 1000,
                "encoder": (t2 - t1) * 1000 if i in missing else 0.0,
                "llm_and_mask": (t3 - t2) * 1000,
                "postprocess": (time.perf_counter() - t4) * 1000,
            }))
        return out

    @staticmethod
    def _result(answer: str, s: MaskSummary, image: Image.Image, adapter: str | None, hit: bool,
                timings: dict[str, float]) -> PredictResult:
        # An answer that names no zone and does not say there is no lesion ("top......") has no zones: it agrees
        # with no mask, an empty one included.
        text_zones = sorted(set(zones_from_text(answer)))
        timings = {k: round(v, 2) for k, v in timings.items()}
        timings["total"] = round(sum(timings.values()), 2)
        return PredictResult(
            answer=answer, zone=s.zone, zones=s.zones, zone_from_text=zone_from_text(answer) or NONE,
            zones_from_text=text_zones, consistent=bool(text_zones) and text_zones == s.zones, mask=s.mask,
            probability=s.probability, bbox=s.bbox, area_fraction=s.area_fraction, confidence=s.confidence,
            image_size=(image.width, image.height), adapter=adapter, cache_hit=hit, timings_ms=timings,
        )


__all__ = [
    "AdapterNotFound", "BundleError", "InvalidInput", "MAX_QUESTION_CHARS", "PredictRequest", "PredictResult",
    "Predictor", "check_question", "load_image",
]
