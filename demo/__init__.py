"""The Gradio demo: ask where the lesion is, fine-tune on a dataset zip, manage adapters.

Mounted by the service at ``/ui``; ``prsmed demo`` runs it alone, against a server (``--url``, through the SDK)
or in-process on a local Predictor.
"""

from .app import build_demo
from .backends import ClientBackend, LocalBackend

__all__ = ["ClientBackend", "LocalBackend", "build_demo"]
