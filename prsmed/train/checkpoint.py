"""Resumable training checkpoints, written atomically and verified on load.

A checkpoint is one directory ``RUN/checkpoints/step-00000120/``::

    trained.safetensors   trained parameters and the buffers of trained components (fp32)
    optimizer.pt          optimizer state dict         (read back with torch.load(weights_only=True))
    scheduler.pt          LR scheduler state dict
    scaler.pt             fp16 GradScaler state (only with --precision fp16)
    rng.safetensors       torch CPU/CUDA and numpy RNG states, per process
    state.json            step, data position, python RNG states, early-stopping and budget counters, config
    manifest.json         format version, step, SHA-256 of every file above (written last)

It is written into a temporary sibling directory, every file and the directory are fsync'ed, and only then renamed
into place, so a crash or a full disk never leaves a half-written ``step-*`` directory behind: the previous one stays
the latest. Loading checks every hash; a truncated or corrupted checkpoint is set aside (renamed ``*.corrupt``) and
the newest good one is used instead, with a warning. Nothing is unpickled: tensors are safetensors, state dicts go
through ``torch.load(weights_only=True)``, everything else is JSON.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prsmed.fileio import fsync_dir, fsync_file, replace_dir, sha256_file
from prsmed.weights import CheckpointError, read_state_dict, write_state_dict

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
REQUIRED = ("trained.safetensors", "optimizer.pt", "scheduler.pt", "rng.safetensors", "state.json")
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, permissions...); the previous good one is intact."""


@dataclass
class Checkpoint:
    """What a training checkpoint holds, in memory."""

    trained: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng_tensors: dict[str, torch.Tensor]
    state: dict[str, Any]  # JSON-serialisable
    scaler: dict[str, Any] | None = None
    path: Path | None = field(default=None, compare=False)

    @property
    def step(self) -> int:
        return int(self.state["step"])


# --- RNG state as tensors + JSON --------------------------------------------------------------------------------

def capture_rng() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This process's RNG states: tensors (torch CPU/CUDA, numpy keys) and JSON (the rest of numpy, python)."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, internal, gauss_next = random.getstate()
    meta = {
        "numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
    }
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"].to(torch.uint8))
    cuda = sorted((k for k in tensors if k.startswith("cuda_")), key=lambda k: int(k.split("_")[1]))
    if cuda and torch.cuda.is_available():
        states = [tensors[k].to(torch.uint8) for k in cuda]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
        else:
            log.warning("checkpoint holds %d CUDA RNG states but %d devices are visible; CUDA RNG not restored",
                        len(states), torch.cuda.device_count())
    n = meta["numpy"]
    np.random.set_state(
        (n["kind"], tensors["numpy_keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = meta["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))


# --- writing ----------------------------------------------------------------------------------------------------
# Every file goes through these three functions, so a failing disk surfaces in one place.

def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    write_state_dict(tensors, path, metadata={"format": f"prsmed-train/{FORMAT_VERSION}"})


def save_torch(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)


def save_json(obj: Any, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def _describe_os_error(e: OSError) -> str:
    name = errno.errorcode.get(e.errno, "") if e.errno is not None else ""
    text = e.strerror or str(e)
    return f"{text} ({name})" if name else text


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


class CheckpointManager:
    """Writes, lists, verifies, loads and prunes the checkpoints under ``root`` (``RUN/checkpoints``)."""

    def __init__(self, root: str | Path, *, keep_last: int = 3) -> None:
        self.root = Path(root)
        self.keep_last = keep_last
        self.best: str | None = None  # directory name of the best checkpoint; never pruned

    # listing -------------------------------------------------------------------------------------------------
    def checkpoints(self) -> list[Path]:
        """Complete checkpoint directories, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and p.is_dir():
                found.append((int(m.group(1)), p))
        return [p for _, p in sorted(found)]

    # writing -------------------------------------------------------------------------------------------------
    def save(self, ckpt: Checkpoint, *, is_best: bool = False) -> Path:
        """Write ``ckpt`` atomically as ``step-<step>``; replaces an existing one of the same step."""
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / step_dir_name(ckpt.step)
        tmp = self.root / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir()
            self._write(tmp, ckpt, best_name=final.name if is_best else self.best)
            self._commit(tmp, final)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            previous = [p for p in self.checkpoints() if p != final]
            kept = f"the last good checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
            raise CheckpointWriteError(
                f"could not write checkpoint for step {ckpt.step} under {self.root}: {_describe_os_error(e)}; "
                f"{kept}. Free space (or fix permissions) and rerun with --resume."
            ) from e
        if is_best:
            self.best = final.name
        self.prune()
        return final

    def _write(self, tmp: Path, ckpt: Checkpoint, *, best_name: str | None) -> None:
        save_tensors(ckpt.trained, tmp / "trained.safetensors")
        save_torch(ckpt.optimizer, tmp / "optimizer.pt")
        save_torch(ckpt.scheduler, tmp / "scheduler.pt")
        if ckpt.scaler is not None:
            save_torch(ckpt.scaler, tmp / "scaler.pt")
        save_tensors(ckpt.rng_tensors, tmp / "rng.safetensors")
        save_json({**ckpt.state, "best_checkpoint": best_name}, tmp / "state.json")
        files = {}
        for p in sorted(tmp.iterdir()):
            fsync_file(p)
            files[p.name] = sha256_file(p)
        save_json({"format_version": FORMAT_VERSION, "step": ckpt.step, "files": files}, tmp / MANIFEST)
        fsync_file(tmp / MANIFEST)
        fsync_dir(tmp)

    def _commit(self, tmp: Path, final: Path) -> None:
        replace_dir(tmp, final, stale_prefix=f".old-{final.name}-")
        fsync_dir(self.root)

    def prune(self) -> None:
        """Keep the newest ``keep_last`` checkpoints and the best one; remove leftovers of interrupted writes."""
        ckpts = self.checkpoints()
        keep = {p.name for p in ckpts[-self.keep_last:]}
        if self.best:
            keep.add(self.best)
        for p in ckpts:
            if p.name not in keep:
                shutil.rmtree(p, ignore_errors=True)
        for p in self.root.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)
        for p in self.root.glob(".old-*"):
            shutil.rmtree(p, ignore_errors=True)

    # reading -------------------------------------------------------------------------------------------------
    @staticmethod
    def verify(path: str | Path) -> dict[str, Any]:
        """Return the manifest of a complete, untampered checkpoint, or raise :class:`CheckpointError`."""
        path = Path(path)
        mpath = path / MANIFEST
        if not mpath.is_file():
            raise CheckpointError(f"{path}: {MANIFEST} is missing (the write never finished)")
        try:
            manifest = json.loads(mpath.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{mpath} is not valid JSON ({e})") from e
        if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
            found = manifest.get("format_version") if isinstance(manifest, dict) else type(manifest).__name__
            raise CheckpointError(f"{mpath}: format_version {found!r}, expected {FORMAT_VERSION}")
        files = manifest.get("files") or {}
        problems = [f"{name}: missing from the manifest" for name in REQUIRED if name not in files]
        for name, expected in files.items():
            f = path / name
            if "/" in name or name.startswith("."):
                problems.append(f"{name}: not a plain file name")
            elif not f.is_file():
                problems.append(f"{name}: listed but missing")
            elif (found := sha256_file(f)) != expected:
                problems.append(f"{name}: SHA-256 {found[:12]}… but the manifest says {expected[:12]}…")
        if problems:
            raise CheckpointError(f"{path} is corrupt or incomplete: " + "; ".join(problems))
        return manifest

    def latest_valid(self) -> Path | None:
        """The newest checkpoint that passes :meth:`verify`. Newer broken ones are renamed ``*.corrupt`` with a
        warning, so later saves and pruning never mistake them for good ones."""
        for path in reversed(self.checkpoints()):
            try:
                self.verify(path)
                return path
            except CheckpointError as e:
                aside = path.with_name(f"{path.name}.corrupt-{uuid.uuid4().hex[:6]}")
                log.warning("%s; setting it aside as %s and falling back to the previous checkpoint", e, aside.name)
                try:
                    os.replace(path, aside)
                except OSError:
                    pass
        return None

    def load(self, path: str | Path) -> Checkpoint:
        """Verify and read one checkpoint (tensors on CPU)."""
        path = Path(path)
        manifest = self.verify(path)
        try:
            state = json.loads((path / "state.json").read_text())
            trained = read_state_dict(path / "trained.safetensors")
            rng = read_state_dict(path / "rng.safetensors")
            optimizer = _load_torch(path / "optimizer.pt")
            scheduler = _load_torch(path / "scheduler.pt")
            scaler = _load_torch(path / "scaler.pt") if "scaler.pt" in manifest["files"] else None
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path} could not be read: {e}") from e
        if int(state.get("step", -1)) != int(manifest["step"]):
            raise CheckpointError(f"{path}: state.json says step {state.get('step')} but the manifest {manifest['step']}")
        self.best = state.get("best_checkpoint")
        return Checkpoint(trained=trained, optimizer=optimizer, scheduler=scheduler, rng_tensors=rng, state=state,
                          scaler=scaler, path=path)


def _load_torch(path: Path) -> Any:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refusals, truncation, bad zip: all mean "not a checkpoint we trust"
        raise CheckpointError(f"{path} could not be loaded with weights_only=True: {e}") from e
