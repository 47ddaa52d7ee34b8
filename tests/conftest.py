"""Fixtures shared across test modules. Plain helpers live in samples.py (inputs), small_training.py (the small
trainer model and dataset) and serving.py (a real server process); this file turns them into fixtures."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

import prsmed.zoo
from prsmed.base_weights import read_record, write_record
from prsmed.model.bundle import save_bundle
from prsmed.zoo import build_model

# The helper modules sit beside the tests (pytest puts this folder on sys.path for test modules; subprocess
# drivers insert it themselves).
sys.path.insert(0, str(Path(__file__).parent))

from samples import SHIPPED, train_stand_in, trainable  # noqa: E402
from small_training import make_dataset  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model():
    """prsmed-tiny as shipped, built once per test session, in eval mode. Shared: read it, predict with it, never
    change it; a test that trains or perturbs one takes ``copy.deepcopy(tiny_model)`` or builds its own."""
    return build_model("prsmed-tiny").eval()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """The small trainer dataset (small_training.make_dataset): four training images and one validation image."""
    return make_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def old_bundle(tmp_path_factory):
    """A bundle trained on another revision of prsmed-tiny's weights: the shipped files with one tensor moved, under
    their own record (revision "old"), as a rebuild of the weights leaves an adapter trained before it."""
    current = read_record(SHIPPED)
    assets = tmp_path_factory.mktemp("old-assets") / "prsmed-tiny"
    shutil.copytree(SHIPPED, assets)
    state = load_file(str(assets / "llm.safetensors"))
    name = sorted(state)[0]
    state[name] = state[name] + 0.01
    save_file(state, str(assets / "llm.safetensors"))
    old = write_record(assets, preset="prsmed-tiny", revision="old", trained_on=current.trained_on,
                       intended_use=current.intended_use, training_only=current.training_files)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(prsmed.zoo, "ASSETS", assets.parent)
        model = build_model("prsmed-tiny")
    assert model.base_weights == old.as_identity()
    train_stand_in(model, 3)
    out = tmp_path_factory.mktemp("bundles") / "old-adapter"
    save_bundle(model, out)
    return out, old, trainable(model)


@pytest.fixture(scope="session")
def shared_server(tmp_path_factory):
    """One real ``prsmed serve`` on prsmed-tiny (REST, gRPC, the demo at /ui; predictions up to 2 MiB) for the
    modules that only talk to a default server. Modules that need other options, or that stop or kill their server,
    start their own (serving.start_server)."""
    from serving import start_server

    srv = start_server(tmp_path_factory.mktemp("shared-serve"), env={"PRSMED_SERVE_MAX_PREDICT_BYTES": str(2 * 2**20)})
    yield srv
    srv.stop()
