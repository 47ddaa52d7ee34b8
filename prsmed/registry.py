"""The component registry: one pluggy PluginManager, entry points loaded once and lazily.

Built-in plugins ship in this distribution and are found through the same entry-point group as third-party ones
(``prsmed.plugins``). ``PRSMED_PLUGINS=a,b`` restricts which third-party plugins load (the built-ins always load);
``PRSMED_PLUGINS=`` (empty) loads none of them.
"""

from __future__ import annotations

import difflib
import os
import threading
from dataclasses import dataclass, field, replace
from importlib import metadata
from typing import TYPE_CHECKING, Any

import pluggy

from prsmed import hookspecs
from prsmed.components import KINDS, ComponentError, ComponentSpec, Contract

if TYPE_CHECKING:
    import torch

ENTRY_POINT_GROUP = "prsmed.plugins"
BUILTIN_DISTRIBUTION = "prsmed"


@dataclass
class PluginInfo:
    name: str
    version: str
    distribution: str
    builtin: bool
    components: list[str] = field(default_factory=list)


class Registry:
    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("prsmed")
        self.pm.add_hookspecs(hookspecs)
        self._lock = threading.RLock()
        self._loaded = False
        self._components: dict[tuple[str, str], ComponentSpec] = {}
        self._plugins: dict[str, PluginInfo] = {}

    # loading -------------------------------------------------------------------------------------------------
    def _allowed(self) -> set[str] | None:
        raw = os.environ.get("PRSMED_PLUGINS")
        if raw is None:
            return None
        return {p.strip() for p in raw.split(",") if p.strip()}

    def load(self) -> None:
        with self._lock:
            if self._loaded:
                return
            allowed = self._allowed()
            for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
                dist = ep.dist.name if ep.dist is not None else "unknown"
                builtin = dist == BUILTIN_DISTRIBUTION
                if not builtin and allowed is not None and ep.name not in allowed:
                    continue
                if self.pm.has_plugin(ep.name):
                    continue
                module = ep.load()
                version = ep.dist.version if ep.dist is not None else "unknown"
                self.register_plugin(module, name=ep.name, version=version, distribution=dist, builtin=builtin)
            self._loaded = True

    def register_plugin(
        self, plugin: Any, *, name: str, version: str = "0", distribution: str = "local", builtin: bool = False
    ) -> None:
        """Register a plugin object directly (what entry points do; also handy in notebooks and tests)."""
        with self._lock:
            if name in self._plugins:
                raise ComponentError(f"a plugin named {name!r} is already registered")
            self.pm.register(plugin, name=name)
            info = PluginInfo(name=name, version=version, distribution=distribution, builtin=builtin)
            self._plugins[name] = info

            def register(spec: ComponentSpec) -> None:
                spec = replace(spec, plugin=name)
                key = (spec.kind, spec.name)
                if key in self._components:
                    other = self._components[key].plugin
                    raise ComponentError(
                        f"component {spec.id!r} is registered twice: by plugin {other!r} and by plugin {name!r}; "
                        f"uninstall one of them or restrict loading with PRSMED_PLUGINS"
                    )
                self._components[key] = spec
                info.components.append(spec.id)

            hook = getattr(plugin, "prsmed_register_components", None)
            if hook is not None:
                try:
                    hook(register=register)
                except ComponentError:
                    self.pm.unregister(name=name)
                    for cid in info.components:
                        kind, cname = cid.split("/", 1)
                        self._components.pop((kind, cname), None)
                    del self._plugins[name]
                    raise

    # queries -------------------------------------------------------------------------------------------------
    def plugins(self) -> list[PluginInfo]:
        self.load()
        return sorted(self._plugins.values(), key=lambda p: (not p.builtin, p.name))

    def list_components(self, kind: str | None = None) -> list[ComponentSpec]:
        self.load()
        if kind is not None and kind not in KINDS:
            raise ComponentError(f"unknown component kind {kind!r}; known kinds: {', '.join(KINDS)}")
        specs = [s for s in self._components.values() if kind is None or s.kind == kind]
        return sorted(specs, key=lambda s: (KINDS.index(s.kind), s.name))

    def get(self, kind: str, name: str) -> ComponentSpec:
        self.load()
        if kind not in KINDS:
            raise ComponentError(f"unknown component kind {kind!r}; known kinds: {', '.join(KINDS)}")
        spec = self._components.get((kind, name))
        if spec is None:
            known = [s.name for s in self.list_components(kind)]
            close = difflib.get_close_matches(name, known, n=len(known), cutoff=0.0)
            listing = ", ".join(close) if close else "none are installed"
            raise ComponentError(f"unknown {kind} {name!r}; known {kind} components (closest first): {listing}")
        return spec

    def contract(self, kind: str, name: str, **options: Any) -> Contract:
        spec = self.get(kind, name)
        return spec.contract(**options)

    def create(self, kind: str, name: str, **options: Any) -> torch.nn.Module:
        spec = self.get(kind, name)
        module = spec.build(**options)
        import torch

        if not isinstance(module, torch.nn.Module):
            raise ComponentError(f"{spec.id} (plugin {spec.plugin!r}) built {type(module).__name__}, not a torch.nn.Module")
        return module


_registry = Registry()


def get_registry() -> Registry:
    return _registry


def list_components(kind: str | None = None) -> list[ComponentSpec]:
    """Every installed component, or those of one kind (``vision_encoder``, ``llm``, ``fusion_head``)."""
    return _registry.list_components(kind)


def create_component(kind: str, name: str, **options: Any) -> torch.nn.Module:
    """Build a ready ``torch.nn.Module``; every built-in accepts ``checkpoint=PATH``."""
    return _registry.create(kind, name, **options)
