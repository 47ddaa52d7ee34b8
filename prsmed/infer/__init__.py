"""Inference: the :class:`Predictor` and what it returns. Imports no web framework."""

from prsmed.infer.adapters import AdapterInfo, AdapterNotFound, AdapterStore
from prsmed.infer.postprocess import mask_png, overlay
from prsmed.infer.predictor import (
    MAX_QUESTION_CHARS,
    BundleError,
    InvalidInput,
    PredictRequest,
    PredictResult,
    Predictor,
    load_image,
)

__all__ = [
    "AdapterInfo", "AdapterNotFound", "AdapterStore", "BundleError", "InvalidInput", "MAX_QUESTION_CHARS",
    "PredictRequest", "PredictResult", "Predictor", "load_image", "mask_png", "overlay",
]
