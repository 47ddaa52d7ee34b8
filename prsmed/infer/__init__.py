"""Inference: the :class:`Predictor` and what it returns. Imports no web framework, and nothing until a name is
used (so the CLI's command modules stay light)."""

from prsmed._lazy import lazy_exports

_WHERE = {
    "AdapterInfo": "adapters", "AdapterNotFound": "adapters", "AdapterStore": "adapters",
    "mask_png": "postprocess", "overlay": "postprocess",
    "MAX_QUESTION_CHARS": "predictor", "BundleError": "predictor", "InvalidInput": "predictor",
    "PredictRequest": "predictor", "PredictResult": "predictor", "Predictor": "predictor", "load_image": "predictor",
}
__all__ = sorted(_WHERE)
__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
