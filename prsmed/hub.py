"""Adapter bundles on the Hugging Face Hub: push a bundle as a model repository, pull one back verified.

A bundle is pushed as it is: its manifest lists every file's SHA-256 and its ``README.md`` is the model card
(YAML front matter for the Hub, metrics, training configuration, intended use, how to load it). Pulling downloads a
snapshot with ``huggingface_hub.snapshot_download`` (so the Hub's cache, ``HF_HUB_OFFLINE`` and ``HF_ENDPOINT``
work as everywhere else), checks every file against the manifest and the base model (architecture and weights)
against this installation's zoo, and only then copies it into the adapter store.

References: ``owner/name``, ``owner/name@revision`` or ``hf://owner/name@revision`` (a branch, tag or commit).
A reference is pulled once and kept in the store under a name derived from it (``hf--owner--name--revision``);
later uses read the stored copy without asking the Hub, so a branch is pinned to the commit it had when first
pulled. Pull again with ``prsmed pull --overwrite`` to move it, or name a commit to be explicit.

Tokens: the ``token`` argument, else ``HF_TOKEN`` or the saved login, as ``huggingface_hub`` does. A token is
passed to the Hub client and nowhere else: never stored, printed or logged.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from prsmed.fileio import fsync_tree, replace_dir
from prsmed.model.bundle import BundleError, check_base_weights, verify_bundle

SCHEME = "hf://"
SOURCE_FILE = "hub_source.json"  # where a pulled bundle came from; not part of the manifest
_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$")


class HubError(RuntimeError):
    """The Hub refused or could not serve a request; the message says which repository and why. ``status`` is
    the HTTP status a service should answer with: 404 (no such repository, revision or file), 401 (token refused),
    502 (Hub unreachable, offline and not cached, or anything else it answered)."""

    def __init__(self, message: str, status: int = 502) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class HubRef:
    repo_id: str
    revision: str | None = None

    @classmethod
    def parse(cls, text: str) -> "HubRef":
        ref = text[len(SCHEME):] if text.startswith(SCHEME) else text
        repo_id, _, revision = ref.partition("@")
        if not _REPO.match(repo_id) or ".." in repo_id:
            raise ValueError(f"{text!r} is not a Hub model reference: expected owner/name, owner/name@revision or "
                             f"{SCHEME}owner/name@revision")
        if revision and (not _REVISION.match(revision) or ".." in revision):
            raise ValueError(f"{text!r}: revision {revision!r} is not a valid branch, tag or commit")
        return cls(repo_id, revision or None)

    @property
    def store_name(self) -> str:
        """The adapter store's name for this reference: letters, digits, '.', '_' and '-' only."""
        owner, name = self.repo_id.split("/")
        return f"hf--{owner}--{name}--{(self.revision or 'main').replace('/', '_')}"[:100]

    def __str__(self) -> str:
        return f"{SCHEME}{self.repo_id}" + (f"@{self.revision}" if self.revision else "")


def is_hub_ref(name: str | os.PathLike) -> bool:
    return isinstance(name, str) and name.startswith(SCHEME)


def _hub_error(e: Exception, what: str, endpoint: str | None) -> HubError:
    """A clear message for what huggingface_hub raised; never the token."""
    from huggingface_hub import errors as hf

    where = endpoint or _default_endpoint()
    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, hf.RevisionNotFoundError):
        return HubError(f"{what}: that revision does not exist in the repository on {where}", 404)
    if isinstance(e, hf.RepositoryNotFoundError):
        return HubError(f"{what}: no such repository on {where}, or it is private and the token is missing or "
                        f"wrong (pass a token, set HF_TOKEN, or `hf auth login`)", 404)
    if isinstance(e, hf.LocalEntryNotFoundError):  # before EntryNotFoundError, of which it is one
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
            return HubError(f"{what}: not in the local Hugging Face cache, and HF_HUB_OFFLINE is set, so it cannot "
                            f"be downloaded; unset HF_HUB_OFFLINE or pull it once while online", 502)
        return HubError(f"{what}: cannot reach {where} and it is not in the local cache ({type(e).__name__})", 502)
    if isinstance(e, hf.EntryNotFoundError):
        return HubError(f"{what}: a file is missing from the repository on {where}", 404)
    if status in (401, 403):
        server = _server_message(e)
        return HubError(f"{what}: {where} refused the token (HTTP {status}{': ' + server if server else ''}); check "
                        f"HF_TOKEN or the token you passed, and that it may write to that namespace", 401)
    if isinstance(e, hf.HfHubHTTPError):
        return HubError(f"{what}: {where} answered HTTP {status}: {_server_message(e) or type(e).__name__}")
    return HubError(f"{what}: cannot reach {where} ({type(e).__name__}: {e})", 502)


def _server_message(e: Exception) -> str:
    response = getattr(e, "response", None)
    try:
        body = response.json() if response is not None else None
    except ValueError:
        body = None
    return str(body.get("error") or "")[:200] if isinstance(body, dict) else ""


def _default_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def push(bundle_dir: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
         commit_message: str | None = None, token: str | None = None, endpoint: str | None = None) -> dict:
    """Upload a verified bundle as a Hub model repository (created if needed; ``revision`` is a branch, created
    from main if needed). Returns ``{"repo_id", "revision", "commit", "url"}``."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    ref = HubRef.parse(repo_id)
    manifest = verify_bundle(bundle_dir)  # a tampered or half-written bundle is never published
    api = HfApi(endpoint=endpoint, token=token)
    what = f"push to {ref.repo_id}"
    try:
        api.create_repo(ref.repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and revision != "main":
            api.create_branch(ref.repo_id, branch=revision, exist_ok=True, repo_type="model")
        info = api.upload_folder(
            folder_path=str(bundle_dir), repo_id=ref.repo_id, repo_type="model", revision=revision,
            commit_message=commit_message or f"PRS-Med adapter for {manifest.base.name} (revision "
                                             f"{manifest.base.revision})",
            ignore_patterns=[SOURCE_FILE, ".*"],
        )
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise _hub_error(e, what, endpoint) from e
    return {"repo_id": ref.repo_id, "revision": revision or "main", "commit": info.oid, "url": info.commit_url}


def check_base(manifest, expect_model: str | None = None, *, allow_other_base_weights: bool = False) -> None:
    """The bundle's base model must be one this installation knows, built the same way (same fingerprint), and its
    adapter trained on the weights this installation has (when they are on this machine: the 7B presets' weights
    may not be, and loading checks them again)."""
    from prsmed.zoo import PRESETS, base_weights, resolve_spec

    base = manifest.base
    if expect_model is not None and base.name != expect_model:
        raise BundleError(f"the adapter was made for {base.name!r} (revision {base.revision}), not {expect_model!r}")
    if base.name not in PRESETS:
        raise BundleError(f"the adapter was made for {base.name!r}, which this prsmed does not know "
                          f"(known: {', '.join(sorted(PRESETS))})")
    local = resolve_spec(base.name, weights=False)
    if local.fingerprint() != base.fingerprint:
        raise BundleError(f"the adapter was made for {base.name!r} revision {base.revision} (fingerprint "
                          f"{base.fingerprint}) but this prsmed's {base.name!r} is revision {local.revision} "
                          f"(fingerprint {local.fingerprint()}); it would not load")
    check_base_weights(base.weights, base_weights(base.name), what="the adapter", base=base.name,
                       allow=allow_other_base_weights)


def pull(ref: str | HubRef, dest: str | Path, *, token: str | None = None, endpoint: str | None = None,
         expect_model: str | None = None, force: bool = False, cache_dir: str | Path | None = None,
         allow_other_base_weights: bool = False) -> Path:
    """Download ``ref`` and install it at ``dest`` once verified: every file's SHA-256 against the manifest and the
    base model against the local zoo (:func:`check_base`). ``dest`` appears whole or not at all. An existing
    ``dest`` is kept unless ``force``. ``allow_other_base_weights`` installs an adapter trained on other base
    weights (or written before they were recorded) with a warning instead of refusing it."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    ref = ref if isinstance(ref, HubRef) else HubRef.parse(ref)
    dest = Path(dest)
    if dest.exists() and not force:
        return dest
    what = f"pull {ref}"
    try:
        snapshot = Path(snapshot_download(ref.repo_id, revision=ref.revision, repo_type="model", token=token,
                                          endpoint=endpoint, cache_dir=cache_dir))
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise _hub_error(e, what, endpoint) from e
    try:
        manifest = verify_bundle(snapshot)
        check_base(manifest, expect_model, allow_other_base_weights=allow_other_base_weights)
    except BundleError as e:
        raise BundleError(f"{what}: refused: {e}") from e
    commit = snapshot.name  # snapshot_download's folder is named after the commit it resolved
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        shutil.copytree(snapshot, tmp, symlinks=False)
        (tmp / SOURCE_FILE).write_text(json.dumps({"repo_id": ref.repo_id, "revision": ref.revision or "main",
                                                   "commit": commit, "endpoint": endpoint or _default_endpoint()},
                                                  indent=2) + "\n")
        verify_bundle(tmp)  # what was copied is what was checked
        fsync_tree(tmp)
        replace_dir(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
