"""The SDK against a real ``prsmed serve``: predictions from every kind of image, typed errors, auth, retries,
fine-tuning from a local folder to a usable adapter, and the async client."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
from importlib.metadata import requires

import httpx
import numpy as np
import pytest
from PIL import Image

from prsmed.data.synth import synthesize
from prsmed_sdk import (AsyncClient, Busy, Client, InvalidInput, JobFailed, NotFound, Retry, ServerError,
                        Unauthorized)
from prsmed_sdk._common import SseParser, pack_dataset
from prsmed_sdk.models import TrainingReport
from serving import free_port, start_server
from samples import png_bytes

TOKEN = "sdk-test-token-0123456789"
FAST = Retry(attempts=2, backoff=0.01, max_wait=0.05)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = tmp_path_factory.mktemp("sdk-serve")
    (data / "token").write_text(TOKEN)
    srv = start_server(data, "--token-file", str(data / "token"))
    yield srv
    srv.stop()


@pytest.fixture()
def client(server):
    with Client(server.url, token=TOKEN, retry=FAST) as c:
        yield c


def test_predict_accepts_path_bytes_pil_and_array_alike(client, tmp_path):
    data = png_bytes(size=(96, 80))
    path = tmp_path / "scan.png"
    path.write_bytes(data)
    pil = Image.open(io.BytesIO(data))
    answers = [client.predict(x, "Where is the lesion?") for x in (path, str(path), data, pil, np.asarray(pil))]
    first = answers[0]
    assert first.answer and first.zone in {"top left", "top right", "bottom left", "bottom right", "center", "none"}
    for other in answers[1:]:  # the same pixels whichever way they travel
        assert (other.answer, other.zone, other.mask_png) == (first.answer, first.zone, first.mask_png)
    assert first.mask.shape == (80, 96) and first.mask.dtype == bool
    assert first.mask.mean() == pytest.approx(first.area_fraction, abs=1e-6)
    out = tmp_path / "overlay.png"
    first.save_overlay(out)
    drawn = np.asarray(Image.open(out))
    assert drawn.shape == (80, 96, 3)
    if first.mask.any():  # the overlay changes exactly the mask's pixels
        grey = np.asarray(pil.convert("RGB"))
        assert (drawn[first.mask] != grey[first.mask]).any(axis=-1).all()
        assert (drawn[~first.mask] == grey[~first.mask]).all()
    first.save_mask(tmp_path / "mask.png")
    assert (np.asarray(Image.open(tmp_path / "mask.png")) > 0).tolist() == first.mask.tolist()


def test_nifti_slice_by_suffix(client, tmp_path):
    import nibabel as nib

    vol = np.zeros((64, 64, 5), dtype=np.float32)
    vol[8:20, 40:56, 3] = 900.0
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "vol.nii.gz")
    a = client.predict(f"{tmp_path / 'vol.nii.gz'}#z=3", "Where is the lesion?")
    assert a.image_size and a.mask.shape == (a.image_size[1], a.image_size[0])
    with pytest.raises(InvalidInput, match="z=9"):
        client.predict(f"{tmp_path / 'vol.nii.gz'}#z=9", "Where is the lesion?")


def test_typed_errors_carry_the_servers_message(client, server, tmp_path):
    with pytest.raises(InvalidInput) as bad:
        client.predict(b"\x89PNG\r\n\x1a\n-truncated", "Where?")
    assert bad.value.status == 400 and bad.value.kind == "invalid_input" and "truncated" in bad.value.message
    with pytest.raises(NotFound, match="no-such-adapter"):
        client.predict(png_bytes(), "Where?", adapter="no-such-adapter")
    with pytest.raises(NotFound):
        client.jobs.get("0123456789ab")
    with pytest.raises(ValueError, match="empty"):
        client.predict(png_bytes(), "   ")
    with pytest.raises(TypeError, match="numpy array"):
        client.predict(12345, "Where?")
    with Client(server.url, token="wrong", retry=FAST) as intruder:
        with pytest.raises(Unauthorized) as denied:
            intruder.models()
    assert denied.value.status == 401 and TOKEN not in str(denied.value)


def test_unreachable_server_is_retried_then_reported():
    port = free_port()  # nothing listens there
    with Client(f"http://127.0.0.1:{port}", retry=FAST) as c, pytest.raises(ServerError, match="cannot reach"):
        c.models()
    assert not Client(f"http://127.0.0.1:{port}").ready()


def test_429_and_503_are_retried_honouring_retry_after(monkeypatch):
    answers = [httpx.Response(503, json={"error": "unavailable", "message": "warming up"}),
               httpx.Response(429, headers={"Retry-After": "7"}, json={"error": "busy", "message": "queue full",
                                                                       "retry_after_s": 7, "queue_position": 3}),
               httpx.Response(200, json=[])]
    calls, waits = [], []
    monkeypatch.setattr("prsmed_sdk.client.time.sleep", waits.append)

    def handler(request):
        calls.append(request)
        return answers[len(calls) - 1]

    with Client("http://test", retry=Retry(attempts=3, backoff=0.25, max_wait=10),
                transport=httpx.MockTransport(handler)) as c:
        assert c.models() == []
    assert len(calls) == 3 and waits[1] == 7.0 and 0 < waits[0] <= 0.25
    calls.clear()
    answers[:] = [answers[1]] * 3
    with Client("http://test", retry=Retry(attempts=2, max_wait=10), transport=httpx.MockTransport(handler)) as c:
        with pytest.raises(Busy) as busy:
            c.models()
    assert busy.value.retry_after_s == 7 and busy.value.queue_position == 3 and len(calls) == 3


def test_sse_parser_handles_multiline_data_comments_and_unknown_events():
    parser = SseParser()
    lines = [": keep-alive", "event: step", 'data: {"step": 1,', 'data:  "loss": 0.5}', "", "event: novel",
             "data: {}", "", "event: end", "data: {\"state\": \"succeeded\"}", ""]
    events = [e for e in map(parser.feed, lines) if e is not None]
    assert [(e.event, e.data) for e in events] == [("step", {"step": 1, "loss": 0.5}),
                                                   ("end", {"state": "succeeded"})]


def test_pack_dataset_zips_a_manifest_with_the_files_it_names(tmp_path):
    import zipfile

    (tmp_path / "elsewhere").mkdir()
    img, mask = tmp_path / "elsewhere" / "a.png", tmp_path / "m.png"
    img.write_bytes(png_bytes())
    mask.write_bytes(png_bytes(seed=1))
    manifest = tmp_path / "sub" / "train.jsonl"
    manifest.parent.mkdir()
    row = {"image": str(img), "mask": "../m.png", "question": "q", "answer": "a", "modality": "x", "split": "train"}
    manifest.write_text(json.dumps(row) + "\n")
    _, payload = pack_dataset(manifest)
    with zipfile.ZipFile(io.BytesIO(payload)) as z:
        rows = [json.loads(x) for x in z.read("manifest.jsonl").decode().splitlines()]
        assert z.read(rows[0]["image"]) == img.read_bytes() and z.read(rows[0]["mask"]) == mask.read_bytes()
        assert not any(n.startswith(("/", "..")) for n in z.namelist())
    manifest.write_text(json.dumps({**row, "mask": "gone.png"}) + "\n")
    with pytest.raises(ValueError, match="mask file not found"):
        pack_dataset(manifest)
    with pytest.raises(ValueError, match="not a dataset folder"):
        pack_dataset(tmp_path / "elsewhere")


@pytest.mark.slow
def test_finetune_from_a_local_folder_to_a_usable_adapter(client, tmp_path, capsys):
    root = tmp_path / "my_dataset"
    synthesize(root, n=16, seed=5, size=64)
    job = client.finetune(root, epochs=1, batch_size=2, lr=5e-4, name="sdk-adapter", max_steps=3, save_every=1)
    assert job.info.state in ("queued", "running") and job.info.config.get("max_steps") == 3
    info = job.wait(timeout=600, progress=True)
    assert info.state == "succeeded" and job.adapter == "sdk-adapter"
    progress = capsys.readouterr().err.strip().splitlines()
    final = [line for line in progress if line.startswith(job.id[:12])][-1]
    assert final.startswith(f"{job.id[:12]} succeeded") and "3/3" in final
    # How the run did, typed: validation before training, at the best checkpoint and at the end, and a verdict
    # that wait() also prints after the progress line.
    report = job.report
    assert isinstance(report, TrainingReport) and report == client.jobs.get(job.id).info.report
    assert report.rows > 0 and report.kept == "best" and report.verdict
    assert (report.before.step, report.best.step, report.last.step) == (0, 3, 3)
    assert report.best.answer_rows == report.rows and 0 <= report.best.zone_acc_text <= 1
    assert report.best.score is not None and report.best.dice_at_05 is not None
    last_line = max(i for i, line in enumerate(progress) if line == final)
    assert progress[last_line + 1] == f"validation: {report.verdict}"
    assert [a.name for a in client.adapters.list()] == ["sdk-adapter"]
    assert client.adapters.load("sdk-adapter").resident
    answer = client.predict(png_bytes(), "Where is the lesion?", adapter=job.adapter)
    assert answer.adapter == "sdk-adapter"
    assert any(j.id == job.id for j in client.jobs.list())
    # A job canceled before it ends raises JobFailed from wait() and can be resumed.
    again = client.finetune(client.datasets.list()[0].id, epochs=1, batch_size=2, name="sdk-canceled",
                            max_steps=400, save_every=5)
    again.cancel()
    with pytest.raises(JobFailed) as stopped:
        again.wait(timeout=300, progress=False)
    assert stopped.value.state == "canceled" and "resume" in str(stopped.value)
    assert again.resume().state in ("queued", "running")
    again.cancel()

    async def async_job():
        async with AsyncClient(client.url, token=TOKEN, retry=FAST) as ac:
            job = await ac.finetune(root, epochs=1, batch_size=2, name="sdk-async", max_steps=2)
            return await job.wait(timeout=600, progress=False), job

    info, ajob = asyncio.run(async_job())
    assert info.state == "succeeded" and ajob.adapter == "sdk-async"


def test_async_client_predicts_and_lists(server):
    async def main():
        async with AsyncClient(server.url, token=TOKEN, retry=FAST) as c:
            answers = await asyncio.gather(*(c.predict(png_bytes(seed=i), "Where is the lesion?") for i in range(4)))
            models = await c.models()
            with pytest.raises(NotFound):
                await c.predict(png_bytes(), "Where?", adapter="missing-one")
            return answers, models, await c.ready()

    answers, models, ready = asyncio.run(main())
    assert all(a.mask.shape == (80, 96) for a in answers) and ready
    assert any(m.serving for m in models)


def test_sdk_needs_neither_torch_nor_numpy():
    deps = {r.split(";")[0].split(">")[0].split("=")[0].strip() for r in requires("prsmed-sdk") or []
            if "extra ==" not in r}
    assert deps == {"httpx", "pydantic"}
    code = ("import sys, prsmed_sdk\nfrom prsmed_sdk import Client, AsyncClient\n"
            "print([m for m in ('torch', 'numpy', 'PIL') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_demo_login_takes_the_api_token(server):
    from gradio_client import Client as GradioClient

    with pytest.raises(Exception):
        GradioClient(server.url + "/ui/", verbose=False)
    with pytest.raises(Exception):
        GradioClient(server.url + "/ui/", auth=("anyone", "wrong-token"), verbose=False)
    ui = GradioClient(server.url + "/ui/", auth=("anyone", TOKEN), verbose=False)
    assert ui.predict(api_name="/list_adapters")["headers"][0] == "name"


def test_plan_through_the_service(client, server):
    report = client.plan("prsmed-tiny", gpu="h100", epochs=1, dataset_size=100)
    assert report.rows and {r.gpu for r in report.rows} == {"h100"}
    assert all(r.fits and r.recommended_batch * r.grad_accum == 8 for r in report.rows)
    assert report.memory_gb["total"] > report.memory_gb["overhead"] > 0
    assert report.params["trainable"] > 0 and report.recommendation.startswith("cheapest that fits")
    with pytest.raises(InvalidInput, match="unknown zoo model 'prsmed-nope'"):
        client.plan("prsmed-nope")
    with pytest.raises(InvalidInput, match="unknown GPU 'tpu'"):
        client.plan("prsmed-tiny", gpu="tpu")
    # The server reads only its own catalogue: a client cannot name a file on it.
    bad = httpx.post(server.url + "/v1/plan", json={"model": "prsmed-tiny", "catalogue": "/etc/passwd"},
                     headers={"Authorization": f"Bearer {TOKEN}"})
    assert bad.status_code == 422 and "catalogue" in bad.text
