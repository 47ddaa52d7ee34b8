"""Hook specifications for PRS-Med plugins.

A plugin is a module (or object) with functions marked ``@hookimpl`` and exposed through an entry point in the
group ``prsmed.plugins``. The built-in components are registered through exactly this path.
"""

from __future__ import annotations

from typing import Callable

import pluggy

hookspec = pluggy.HookspecMarker("prsmed")
hookimpl = pluggy.HookimplMarker("prsmed")


@hookspec
def prsmed_register_components(register: Callable) -> None:
    """Offer components: call ``register(ComponentSpec(...))`` once for each vision encoder, LLM backbone or
    fusion head this plugin provides. Called once per process, the first time components are listed or built."""
