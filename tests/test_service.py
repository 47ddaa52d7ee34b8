"""``prsmed serve`` as a real process on 127.0.0.1, talked to with httpx, BentoML's own client and gRPC."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import httpx
import numpy as np
import pytest
from PIL import Image

from samples import png_bytes
from serving import predict

ZONES = {"top left", "top right", "bottom left", "bottom right", "center", "none"}


def bomb_png(w=30000, h=30000) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def server(shared_server):
    return shared_server  # conftest.py: its limit on a prediction's size is 2 MiB, which these tests rely on


def test_predict_over_rest(server):
    image = png_bytes()
    r = predict(server.url, image)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["zone"] in ZONES and body["zone_from_text"] in ZONES
    assert isinstance(body["answer"], str) and body["answer"]
    assert body["consistent"] == (sorted(body["zones"]) == sorted(body["zones_from_text"]))
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["mask_png"]))))
    assert mask.shape == (80, 96) and set(np.unique(mask)) <= {0, 255}
    assert body["area_fraction"] == pytest.approx((mask > 0).mean(), abs=1e-6)
    if body["bbox"] is not None:
        x0, y0, x1, y1 = body["bbox"]
        assert 0 <= x0 <= x1 < 96 and 0 <= y0 <= y1 < 80
    assert 0.0 <= body["confidence"] <= 1.0 and body["timings_ms"]["total"] > 0
    assert body["model"] == "prsmed-tiny"
    # The same picture again: the vision encoder's output comes from the cache.
    again = predict(server.url, image, "Which side is it on?").json()
    assert again["cache_hit"] is True and again["timings_ms"]["encoder"] == 0.0


def test_bentoml_client(server, tmp_path):
    import bentoml

    path = tmp_path / "scan.png"
    path.write_bytes(png_bytes(seed=3))
    with bentoml.SyncHTTPClient(server.url) as client:
        out = client.predict(image=path, question="Where is the lesion?")
    assert out["zone"] in ZONES and out["answer"]


@pytest.mark.parametrize(
    "image, question, fields, status, words",
    [
        (b"this is not an image at all", "Where?", {}, 400, "unrecognised format"),
        (png_bytes()[:200], "Where?", {}, 400, "truncated"),
        (bomb_png(), "Where?", {}, 400, "decompression bomb"),
        (png_bytes(), "   ", {}, 400, "question is empty"),
        (png_bytes(), "x" * 2001, {}, 400, "at most 2000"),
        (png_bytes(), "Where?", {"adapter": "no-such-adapter"}, 404, "unknown adapter"),
        (b"\x89PNG" + b"\0" * (3 * 2**20), "Where?", {}, 413, "limit"),
    ],
    ids=["not-an-image", "truncated-png", "decompression-bomb", "empty-question", "long-question",
         "unknown-adapter", "oversized"],
)
def test_bad_input_is_refused_and_server_keeps_serving(server, image, question, fields, status, words):
    r = predict(server.url, image, question, **fields)
    assert r.status_code == status, r.text
    assert words in r.json()["message"]
    assert predict(server.url, png_bytes(seed=5)).status_code == 200


def test_listing_routes_and_bentoml_routes(server):
    models = httpx.get(server.url + "/v1/models").json()
    assert {m["name"] for m in models} >= {"prsmed-tiny", "prsmed-llava-med-7b"}
    assert [m["name"] for m in models if m["serving"]] == ["prsmed-tiny"]
    plugins = httpx.get(server.url + "/v1/plugins").json()
    assert any("tinysam" in p["components"].get("vision_encoder", []) for p in plugins)
    # The shared server's store holds what other modules' tests fine-tuned (the demo's job), nothing else.
    listed = {a["name"] for a in httpx.get(server.url + "/v1/adapters").json()}
    assert listed <= {"ui-adapter"}
    r = httpx.post(server.url + "/v1/adapters/nothing-here/load")
    assert r.status_code == 404 and "unknown adapter" in r.json()["message"]
    assert httpx.get(server.url + "/livez").status_code == 200
    assert httpx.get(server.url + "/readyz").status_code == 200
    assert "prsmed_http_requests_total" in httpx.get(server.url + "/metrics").text
    assert "/v1/predict" in httpx.get(server.url + "/docs.json").json()["paths"]


def test_grpc_through_prsmed_serve(server):
    import grpc

    from prsmed_service.grpc_server import PrsMedStub, load_protos

    protos = load_protos()
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        stub = PrsMedStub(channel)
        out = stub.Predict(protos.PredictRequest(image=png_bytes(), question="Where is the lesion?"), timeout=60)
        assert out.zone in ZONES and out.answer
        assert Image.open(io.BytesIO(out.mask_png)).size == (96, 80)
        with pytest.raises(grpc.RpcError) as err:
            stub.Predict(protos.PredictRequest(image=b"garbage", question="Where?"), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_serve_hands_its_options_to_the_service_process(tmp_path, monkeypatch):
    """`prsmed serve` replaces itself with BentoML's server; what it hands over decides the token check and
    --public-predict (the token itself stays in its file). A real server with a token is attacked route by route in
    test_service_hostile.py."""
    from typer.testing import CliRunner

    from prsmed.cli import app
    from prsmed_service import launcher
    from prsmed_service.config import ServiceConfig

    handed = {}

    def execve(path, argv, env):
        handed.update(argv=argv, env=env)
        raise SystemExit(0)

    monkeypatch.setattr(launcher.os, "execve", execve)
    token = tmp_path / "token"
    token.write_text("s3cret-token-value\n")
    res = CliRunner().invoke(app, ["serve", "--public-predict", "--token-file", str(token), "--max-queue", "3",
                                   "--data-dir", str(tmp_path / "data"), "--port", "3111"])
    assert res.exit_code == 0, res.output
    argv, env = handed["argv"], handed["env"]
    assert argv[1:5] == ["-m", "bentoml", "serve", "prsmed_service.app:PrsMed"] and "3111" in argv
    assert argv[argv.index("--timeout-graceful-shutdown") + 1] == "10"  # open connections may not hold SIGTERM up
    config = ServiceConfig.from_env(env)
    assert config.public_predict and config.max_queue == 3 and config.token_file == token.resolve()
    assert not any("s3cret-token-value" in v for v in env.values())
    res = CliRunner().invoke(app, ["serve", "--token-file", str(tmp_path / "missing")])
    assert res.exit_code != 0 and "does not exist" in " ".join(res.output.split())
    monkeypatch.setenv("PRSMED_SERVE_SHUTDOWN_GRACE_S", "soon")
    res = CliRunner().invoke(app, ["serve", "--data-dir", str(tmp_path / "data")])
    assert res.exit_code == 2 and "shutdown_grace_s" in " ".join(res.output.split()), res.output


@pytest.mark.parametrize("method, path, kwargs, status", [
    ("POST", "/v1/predict", {"data": {"question": "Where?"}}, {400, 422}),  # no image field
    ("POST", "/v1/predict", {"files": {"image": ("x.png", b"not an image")}}, {400, 422}),  # no question
    ("GET", "/v1/no-such-route", {}, {404}),
    ("DELETE", "/v1/predict", {}, {404, 405}),
    ("POST", "/v1/adapters/ghost/load", {}, {404}),
])
def test_every_refusal_is_one_envelope_and_names_no_server_folder(server, method, path, kwargs, status):
    r = httpx.request(method, server.url + path, timeout=60, **kwargs)
    assert r.status_code in status, r.text
    body = r.json()
    assert set(body) >= {"error", "message"} and isinstance(body["message"], str) and body["message"], body
    assert "pydantic" not in r.text and "Traceback" not in r.text
    for folder in (str(server.data_dir.resolve()), str(server.data_dir)):
        assert folder not in r.text, r.text
    if path == "/v1/predict" and "data" in kwargs:
        assert "image" in body["message"]


def test_the_openapi_document_and_the_start_up_log_are_this_projects(server):
    import prsmed

    info = httpx.get(server.url + "/docs.json", timeout=30).json()["info"]
    assert info["title"] == "PRS-Med service" and info["version"] == prsmed.__version__
    log = server.log.read_text()
    for line in ("REST  http://", "/docs.json", "gRPC  ", "demo  http://", "/ui", "authentication: OFF"):
        assert line in log, log[:2000]


def test_serving_beyond_loopback_without_a_token_is_refused(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from prsmed.cli import app

    monkeypatch.delenv("PRSMED_API_TOKEN", raising=False)
    result = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0", "--data-dir", str(tmp_path / "d")])
    assert result.exit_code == 2 and "refusing to serve on 0.0.0.0 without a token" in result.output
    assert "--allow-unauthenticated" in result.output and not (tmp_path / "d").exists()


def _request_series(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("prsmed_http_requests_total{")]


def test_metrics_are_labelled_by_route_template_and_do_not_grow_with_ids(server):
    import uuid

    with httpx.Client(base_url=server.url, timeout=30) as c:
        for i in range(40):  # job ids, dataset ids, asset names and unknown paths a long-lived server meets
            c.get(f"/v1/jobs/{uuid.uuid4().hex}")
            c.get(f"/v1/jobs/{uuid.uuid4().hex}/events")
            c.get(f"/v1/datasets/{uuid.uuid4().hex}")
            c.get(f"/ui/assets/index-{uuid.uuid4().hex[:8]}.js")
            c.get(f"/no/such/{uuid.uuid4().hex}")
        before = _request_series(c.get("/metrics").text)
        for i in range(40):
            c.get(f"/v1/jobs/{uuid.uuid4().hex}")
            c.get(f"/ui/assets/index-{uuid.uuid4().hex[:8]}.js")
        after = _request_series(c.get("/metrics").text)
        text = c.get("/metrics").text
    routes = {line.split('route="', 1)[1].split('"', 1)[0] for line in after}
    assert {"/v1/jobs/{job_id}", "/v1/jobs/{job_id}/events", "/v1/datasets/{dataset_id}", "/ui/{path}",
            "unmatched"} <= routes
    assert len(after) == len(before) < 60, after  # 80 more requests with fresh ids: no new series
    assert 'route="/v1/jobs/{job_id}",status="404"' in text
    assert "endpoint=" not in text  # BentoML's raw-path series are off


def test_the_landing_page_is_this_projects_and_needs_no_network(server):
    import re

    r = httpx.get(server.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    assert "PRS-Med service" in page and "googletagmanager" not in page
    refs = re.findall(r"""(?:src|href)=["']([^"']+)["']""", page)
    assert refs and not [u for u in refs if re.match(r"(https?:)?//", u)], refs
    for ref in refs:  # every file the page loads is this server's own
        assert httpx.get(server.url + "/" + ref.removeprefix("./")).status_code == 200, ref


def test_masks_as_coco_run_length_encoding(server):
    from prsmed_sdk import Client

    image = png_bytes()
    with Client(server.url) as c:
        as_png = c.predict(image, "Where is the lesion?")
        as_rle = c.predict(image, "Where is the lesion?", mask_format="rle")
    assert as_rle.mask_png is None and as_rle.mask_rle.size == [80, 96]
    assert as_png.mask_rle is None
    assert as_rle.mask.shape == (80, 96) and (as_rle.mask == as_png.mask).all() and as_png.mask.any()
    assert as_rle.answer == as_png.answer
    r = predict(server.url, image, mask_format="bitmap")
    assert r.status_code == 400 and r.json()["error"] == "invalid_input" and "png, rle" in r.json()["message"]
