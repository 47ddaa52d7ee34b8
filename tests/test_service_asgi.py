"""The service in-process: the BentoML app as ASGI, through Starlette's test client (lifespan included)."""

from __future__ import annotations

import io
import os
import shutil
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from prsmed.data.synth import synthesize
from prsmed.model.bundle import save_bundle
from prsmed.zoo import build_model


def png(seed=0) -> bytes:
    arr = (np.random.default_rng(seed).random((48, 64)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, mode="L").save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    data = tmp_path_factory.mktemp("asgi")
    model = build_model("prsmed-tiny")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and "fusion_head" in name:
                p.add_(0.3)
    save_bundle(model, data / "adapters" / "shifted")
    env = {"PRSMED_SERVE_DATA_DIR": str(data), "PRSMED_SERVE_GRPC_PORT": "-1", "PRSMED_SERVE_MAX_QUEUE": "1",
           "PRSMED_SERVE_JOB_THREADS": "1", "BENTOML_HOME": str(data / "bentoml"), "BENTOML_DO_NOT_TRACK": "True"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        from starlette.testclient import TestClient

        from prsmed_service.app import PrsMed

        with TestClient(PrsMed.to_asgi()) as c:
            c.data_dir = data
            yield c
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def ask(client, image=None, question="Where is the lesion?", **fields):
    return client.post("/v1/predict", files={"image": ("a.png", image or png())}, data={"question": question, **fields})


def test_predict_and_errors(client):
    r = ask(client)
    assert r.status_code == 200 and r.json()["model"] == "prsmed-tiny"
    assert ask(client, b"nonsense").json()["error"] == "invalid_input"
    assert ask(client, adapter="../../etc").status_code == 400  # store names only, never server paths
    assert ask(client, adapter="missing").status_code == 404


def test_adapter_in_store_is_listed_loaded_and_used(client):
    listed = client.get("/v1/adapters").json()
    assert [a["name"] for a in listed] == ["shifted"] and listed[0]["resident"] is False
    loaded = client.post("/v1/adapters/shifted/load")
    assert loaded.status_code == 200 and loaded.json()["resident"] is True
    base, shifted = ask(client, png(4)).json(), ask(client, png(4), adapter="shifted").json()
    assert shifted["adapter"] == "shifted" and base["adapter"] is None
    assert (base["mask_png"], base["confidence"]) != (shifted["mask_png"], shifted["confidence"])


def test_an_adapter_trained_on_other_base_weights_is_refused_with_no_override(client, old_bundle):
    out, old, _ = old_bundle
    shutil.copytree(out, client.data_dir / "adapters" / "old-weights")
    try:
        for r in (client.post("/v1/adapters/old-weights/load"), ask(client, adapter="old-weights")):
            assert r.status_code == 422 and r.json()["error"] == "invalid_adapter"
            assert f"revision old (identity {old.identity[:12]})" in r.json()["message"]
    finally:
        shutil.rmtree(client.data_dir / "adapters" / "old-weights")


def test_jobs_validation_and_a_full_queue(client, tmp_path):
    assert client.get("/v1/jobs/000000000000").status_code == 404
    assert client.post("/v1/jobs", json={"dataset": "0123456789ab"}).status_code == 404
    root = tmp_path / "ds"
    synthesize(root, n=12, seed=3, size=64)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for p in root.rglob("*"):
            if p.is_file():
                z.write(p, p.relative_to(root).as_posix())
    ds = client.post("/v1/datasets", files={"file": ("ds.zip", buf.getvalue())})
    assert ds.status_code == 201, ds.text
    dataset = ds.json()["id"]
    bad = client.post("/v1/jobs", json={"dataset": dataset, "options": {"no_such_option": 1}})
    assert bad.status_code == 400 and "no_such_option" in bad.json()["message"]
    long_job = {"dataset": dataset, "epochs": 50, "batch_size": 1, "options": {"max_steps": 500}}
    first = client.post("/v1/jobs", json={**long_job, "name": "first"})
    second = client.post("/v1/jobs", json={**long_job, "name": "second"})
    assert first.status_code == 201 and second.status_code == 201
    full = client.post("/v1/jobs", json={**long_job, "name": "third"})
    assert full.status_code == 429
    assert int(full.headers["Retry-After"]) >= 1 and full.json()["queue_position"] >= 2
    for job in (second.json(), first.json()):
        assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 200
