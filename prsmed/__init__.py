"""PRS-Med: position-reasoning segmentation in medical imaging, as a plugin-based model zoo."""

from prsmed.components import ComponentError, ComponentSpec
from prsmed.hookspecs import hookimpl
from prsmed.registry import create_component, list_components

__version__ = "0.1.0"

__all__ = ["ComponentError", "ComponentSpec", "create_component", "hookimpl", "list_components", "__version__"]
