"""Fine-tuning jobs through a real ``prsmed serve``: upload, submit, follow the events, use the adapter; and a
server killed mid-job and restarted, after which the interrupted job resumes and finishes."""

from __future__ import annotations

import json
import signal
import time

import httpx
import pytest

from samples import dataset_zip, png_bytes
from serving import predict, start_server


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
def test_jobs_over_rest_survive_a_server_killed_mid_job(tmp_path):
    """Upload, submit, follow the events; SIGKILL to the whole server while one job trains and another waits: after
    a restart both end succeeded, their history is whole (every step reported once, the creation time and the
    attempts kept), and their adapters serve predictions."""
    data = tmp_path / "data"
    srv = start_server(data, "--grpc-port", "-1")
    up = httpx.post(srv.url + "/v1/datasets", files={"file": ("ds.zip", dataset_zip(tmp_path))}, timeout=120)
    assert up.status_code == 201, up.text
    ds = up.json()
    assert ds["rows"] > 0 and ds["id"]
    assert httpx.post(srv.url + "/v1/datasets", files={"file": ("ds.zip", b"not a zip")}, timeout=60).status_code \
        == 400
    base = {"dataset": ds["id"], "batch_size": 2, "lr": 5e-4}
    running = httpx.post(srv.url + "/v1/jobs", timeout=60, json={
        **base, "epochs": 20, "name": "resumed", "options": {"max_steps": 24, "save_every": 2}})
    assert running.status_code == 201, running.text
    running = running.json()
    waiting = httpx.post(srv.url + "/v1/jobs", timeout=60, json={
        **base, "epochs": 1, "name": "waited", "options": {"max_steps": 3, "save_every": 1}}).json()
    assert httpx.get(f"{srv.url}/v1/jobs/{waiting['id']}").json()["state"] == "queued"
    unknown = httpx.post(srv.url + "/v1/jobs", json={**base, "dataset": "nope", "name": "x"})
    assert unknown.status_code == 404
    for kind, d in events(srv.url, running["id"]):
        if kind == "step" and d["step"] >= 3:
            break
    srv.stop(signal.SIGKILL)  # the server dies without any chance to clean up; its worker is left behind
    srv = start_server(data, "--grpc-port", "-1")
    try:
        for job, total in ((running, 24), (waiting, 3)):
            final = wait_state(srv.url, job["id"], {"succeeded", "failed", "canceled"})
            assert final["state"] == "succeeded", final
            assert final["step"] == final["total_steps"] == total, final
            assert final["created_at"] == job["created_at"]
            replay = list(events(srv.url, job["id"]))
            assert [d["step"] for k, d in replay if k == "step"] == list(range(1, total + 1))
            assert replay[-1][0] == "end" and replay[-1][1]["state"] == "succeeded"
        assert httpx.get(f"{srv.url}/v1/jobs/{running['id']}").json()["attempts"] >= 2
        assert {j["id"] for j in httpx.get(srv.url + "/v1/jobs").json()} >= {running["id"], waiting["id"]}
        assert {"resumed", "waited"} <= {a["name"] for a in httpx.get(srv.url + "/v1/adapters").json()}

        r = predict(srv.url, png_bytes(), adapter="waited")
        assert r.status_code == 200 and r.json()["adapter"] == "waited"
    finally:
        srv.stop()
