"""Where adapter bundles are found by name: a store directory (``<root>/<name>/``) and explicit paths."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from prsmed.model.bundle import MANIFEST, BundleError, read_manifest

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class AdapterNotFound(LookupError):
    """An adapter name or path that names no bundle."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def check_name(name: str) -> str:
    if not NAME.match(name or "") or ".." in name:
        raise ValueError(
            f"adapter name {name!r} is not valid: use 1-100 letters, digits, '.', '_' or '-', starting with a letter "
            f"or digit"
        )
    return name


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    path: Path
    base_model: str
    base_revision: str
    created_at: str
    metrics: dict
    parts: list[str]
    lora: bool

    def to_dict(self) -> dict:
        return {
            "name": self.name, "path": str(self.path), "base_model": self.base_model,
            "base_revision": self.base_revision, "created_at": self.created_at, "metrics": self.metrics,
            "parts": self.parts, "lora": self.lora,
        }


def adapter_info(name: str, path: Path) -> AdapterInfo:
    m = read_manifest(path)
    return AdapterInfo(name, path, m.base.name, m.base.revision, m.created_at, m.metrics, list(m.parts),
                       m.lora is not None)


class AdapterStore:
    """Bundles under ``root`` by directory name, plus any bundle directory given by path."""

    def __init__(self, root: str | Path | None = None, *, hub_endpoint: str | None = None,
                 allow_other_base_weights: bool = False) -> None:
        self.root = Path(root) if root is not None else None
        self.hub_endpoint = hub_endpoint  # None: huggingface_hub's own (HF_ENDPOINT, else the Hub)
        # Install Hub adapters trained on other base weights (with a warning); the service never sets it.
        self.allow_other_base_weights = allow_other_base_weights
        self._extra: dict[str, Path] = {}

    def register(self, name: str, path: str | Path) -> None:
        self._extra[check_name(name)] = Path(path)

    def names(self) -> list[str]:
        found = set(self._extra)
        if self.root is not None and self.root.is_dir():
            found |= {p.parent.name for p in self.root.glob(f"*/{MANIFEST}")}
        return sorted(found)

    def pull(self, ref: str, *, token: str | None = None, expect_model: str | None = None,
             force: bool = False) -> str:
        """Install a Hub reference (``hf://owner/name@revision``) in the store on first use and return its store
        name; later calls find it there without asking the Hub (the revision stays pinned to what was pulled).
        ``token`` is used for this download only. Raises :class:`~prsmed.hub.HubError` or ``BundleError``."""
        from prsmed.hub import HubRef, pull

        hub_ref = HubRef.parse(ref)
        name = hub_ref.store_name
        if not force and (name in self._extra or (self.root is not None and (self.root / name / MANIFEST).is_file())):
            return name
        if self.root is None:  # a store without a directory keeps Hub pulls in the user's cache
            from prsmed.zoo.presets import weights_home

            path = pull(hub_ref, weights_home().parent / "adapters" / name, token=token, expect_model=expect_model,
                        force=force, endpoint=self.hub_endpoint,
                        allow_other_base_weights=self.allow_other_base_weights)
            self._extra[name] = path
            return name
        pull(hub_ref, self.root / name, token=token, expect_model=expect_model, force=force,
             endpoint=self.hub_endpoint, allow_other_base_weights=self.allow_other_base_weights)
        return name

    def resolve(self, ref: str | Path) -> tuple[str, Path]:
        """(name, bundle directory) for a store name, a bundle path, or a Hub reference (``hf://owner/name@rev``,
        pulled on first use with the ambient token); :class:`AdapterNotFound` otherwise."""
        text = str(ref)
        if text.startswith("hf://"):
            name = self.pull(text)
            return name, self._extra.get(name) or self.root / name
        if text in self._extra:
            return text, self._extra[text]
        if NAME.match(text) and self.root is not None and (self.root / text / MANIFEST).is_file():
            return text, self.root / text
        path = Path(text).expanduser()
        if (path / MANIFEST).is_file():
            return path.resolve().name, path.resolve()
        known = self.names()
        raise AdapterNotFound(
            f"unknown adapter {text!r}: no bundle of that name"
            + (f" in {self.root}" if self.root is not None else "")
            + " and no bundle directory at that path; known adapters: "
            + (", ".join(known) if known else "none")
        )

    def list(self) -> list[AdapterInfo]:
        out = []
        for name in self.names():
            try:
                out.append(adapter_info(*self.resolve(name)))
            except (BundleError, AdapterNotFound):
                continue  # a half-written or foreign directory is not listed; loading it says why
        return out
