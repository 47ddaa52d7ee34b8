"""Fine-tuning jobs through a real ``prsmed serve``: upload, submit, follow the events, use the adapter; and a
server killed mid-job and restarted, after which the interrupted job resumes and finishes."""

from __future__ import annotations

import io
import json
import signal
import time
import zipfile

import httpx
import pytest

from prsmed.data.synth import synthesize
from serving import start_server


def dataset_zip(tmp_path, n=16) -> bytes:
    root = tmp_path / "ds"
    synthesize(root, n=n, seed=5, size=64)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for path in root.rglob("*"):
            if path.is_file():
                z.write(path, path.relative_to(root).as_posix())
    return buf.getvalue()


def events(url: str, job_id: str, timeout: float = 600):
    """(event, data) pairs from the job's server-sent events, until the stream ends."""
    with httpx.stream("GET", f"{url}/v1/jobs/{job_id}/events", timeout=timeout) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                yield name, json.loads(line[6:])


def wait_state(url, job_id, states, timeout=600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = httpx.get(f"{url}/v1/jobs/{job_id}").json()
        if job["state"] in states:
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} still {job['state']} after {timeout} s")


@pytest.mark.slow
def test_job_lifecycle_over_rest(tmp_path):
    srv = start_server(tmp_path / "data", "--grpc-port", "-1")
    try:
        up = httpx.post(srv.url + "/v1/datasets", files={"file": ("ds.zip", dataset_zip(tmp_path))}, timeout=120)
        assert up.status_code == 201, up.text
        ds = up.json()
        assert ds["rows"] > 0 and ds["id"]
        bad = httpx.post(srv.url + "/v1/datasets", files={"file": ("ds.zip", b"not a zip")}, timeout=60)
        assert bad.status_code == 400
        req = {"dataset": ds["id"], "epochs": 1, "batch_size": 2, "lr": 5e-4, "name": "my-adapter",
               "options": {"max_steps": 3, "save_every": 1}}
        created = httpx.post(srv.url + "/v1/jobs", json=req, timeout=60)
        assert created.status_code == 201, created.text
        job = created.json()
        seen = list(events(srv.url, job["id"]))
        kinds = [k for k, _ in seen]
        assert "step" in kinds and kinds[-1] == "end"
        steps = [d["step"] for k, d in seen if k == "step"]
        assert steps == sorted(steps) and steps[-1] == 3
        final = seen[-1][1]
        assert final["state"] == "succeeded", final
        assert [a["name"] for a in httpx.get(srv.url + "/v1/adapters").json()] == ["my-adapter"]
        assert any(j["id"] == job["id"] for j in httpx.get(srv.url + "/v1/jobs").json())
        from test_service import png_bytes, predict

        r = predict(srv.url, png_bytes(), adapter="my-adapter")
        assert r.status_code == 200 and r.json()["adapter"] == "my-adapter"
        unknown = httpx.post(srv.url + "/v1/jobs", json={**req, "dataset": "nope", "name": "x"})
        assert unknown.status_code == 404
    finally:
        srv.stop()


@pytest.mark.slow
def test_server_killed_mid_job_resumes_it_after_restart(tmp_path):
    data = tmp_path / "data"
    srv = start_server(data, "--grpc-port", "-1")
    ds = httpx.post(srv.url + "/v1/datasets", files={"file": ("ds.zip", dataset_zip(tmp_path))}, timeout=120).json()
    req = {"dataset": ds["id"], "epochs": 1, "batch_size": 2, "lr": 5e-4, "name": "resumed",
           "options": {"max_steps": 80, "save_every": 2}}
    req["epochs"] = 20
    job = httpx.post(srv.url + "/v1/jobs", json=req, timeout=60).json()
    for kind, d in events(srv.url, job["id"]):
        if kind == "step" and d["step"] >= 3:
            break
    srv.stop(signal.SIGKILL)  # the server dies without any chance to clean up
    srv = start_server(data, "--grpc-port", "-1")
    try:
        final = wait_state(srv.url, job["id"], {"succeeded", "failed", "canceled"})
        assert final["state"] == "succeeded", final
        assert final["step"] == final["total_steps"] == 80 and final["attempts"] >= 2, final
        assert "resumed" in [a["name"] for a in httpx.get(srv.url + "/v1/adapters").json()]
    finally:
        srv.stop()
