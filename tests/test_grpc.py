"""The gRPC front: a real server on 127.0.0.1 and a real client channel, on prsmed-tiny without trained weights."""

from __future__ import annotations

import gzip
import io
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import FieldDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from PIL import Image

from prsmed_service import grpc_server as gs

from prsmed.infer import BundleError, Predictor
from prsmed.zoo import build_model

pytestmark = pytest.mark.timeout(120)

TOKEN = "t0ken-for-tests-only"
ZONES = {"top left", "top right", "bottom left", "bottom right", "center", "none"}
WIDTH, HEIGHT = 64, 48  # not square, so a swapped width and height shows


# fixtures ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    return Predictor(build_model("prsmed-tiny", weights=False), adapter_dir=tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="module")
def png() -> bytes:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(HEIGHT, WIDTH, 3), dtype=np.uint8)
    pixels[10:30, 8:28] = 255  # a bright blob, so the image is not pure noise
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


class Running:
    def __init__(self, server, port):
        self.server, self.port = server, port
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = gs.PrsMedStub(self.channel)

    def close(self):
        self.channel.close()
        gs.stop_grpc_server(self.server, grace=None)


def serve(predictor, **kwargs) -> Running:
    server, port = gs.build_grpc_server(predictor, port=0, **kwargs)
    server.start()
    return Running(server, port)


@pytest.fixture(scope="module")
def open_srv(predictor):
    r = serve(predictor)
    yield r
    r.close()


@pytest.fixture(scope="module")
def auth_srv(predictor):
    r = serve(predictor, token=TOKEN)
    yield r
    r.close()


@pytest.fixture(scope="module")
def public_srv(predictor):
    r = serve(predictor, token=TOKEN, public_predict=True)
    yield r
    r.close()


def request(png: bytes, **kw):
    fields = {"image": png, "question": "Where is the tumour in this image?", "filename": "scan.png", **kw}
    return gs.load_protos().PredictRequest(**fields)


def bearer(token: str = TOKEN):
    return (("authorization", f"Bearer {token}"),)


def code_of(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, timeout=30, **kwargs)
    return info.value


# the contract ------------------------------------------------------------------------------------------------------
def test_proto_keeps_the_published_names_and_numbers():
    file = gs.load_protos().file
    assert file.package == "prsmed.v1"
    T = FieldDescriptor
    expected = {
        "PredictRequest": {"image": (1, T.TYPE_BYTES), "question": (2, T.TYPE_STRING), "adapter": (3, T.TYPE_STRING),
                           "filename": (4, T.TYPE_STRING)},
        "PredictResponse": {"answer": (1, T.TYPE_STRING), "zone": (2, T.TYPE_STRING),
                            "zone_from_text": (3, T.TYPE_STRING), "consistent": (4, T.TYPE_BOOL),
                            "mask_png": (5, T.TYPE_BYTES), "area_fraction": (6, T.TYPE_FLOAT),
                            "confidence": (7, T.TYPE_FLOAT), "bbox": (8, T.TYPE_INT32)},
    }
    for message, fields in expected.items():
        desc = file.message_types_by_name[message]
        for name, (number, type_) in fields.items():
            field = desc.fields_by_name[name]
            assert (field.number, field.type) == (number, type_), f"{message}.{name}"
            assert field.is_repeated == (name == "bbox"), f"{message}.{name}"
        numbers = [f.number for f in desc.fields]
        assert len(numbers) == len(set(numbers))
    service = file.services_by_name["PrsMed"]
    assert service.full_name == gs.SERVICE_NAME
    methods = {m.name: (m.input_type.name, m.output_type.name) for m in service.methods}
    assert methods["Predict"] == ("PredictRequest", "PredictResponse")
    assert methods["ListModels"] == ("ListModelsRequest", "ListModelsResponse")


def test_proto_is_found_next_to_the_module_and_in_the_default_pool():
    assert gs.PROTO_ROOT == Path(gs.__file__).resolve().parent / "proto"
    assert (gs.PROTO_ROOT / gs.PROTO_FILE).is_file()
    assert descriptor_pool.Default().FindServiceByName(gs.SERVICE_NAME).full_name == gs.SERVICE_NAME
    assert gs.load_protos() is gs.load_protos()


# Predict -----------------------------------------------------------------------------------------------------------
def test_predict_round_trip(open_srv, png, predictor):
    res = open_srv.stub.Predict(request(png), timeout=60)
    assert isinstance(res.answer, str)
    assert res.zone in ZONES and res.zone_from_text in ZONES
    assert set(res.zones) <= ZONES and set(res.zones_from_text) <= ZONES
    assert 0.0 <= res.area_fraction <= 1.0 and 0.0 <= res.confidence <= 1.0
    assert list(res.image_size) == [WIDTH, HEIGHT]
    assert res.model == predictor.model_name == "prsmed-tiny"
    assert res.adapter == ""
    assert "total" in res.timings_ms
    mask = np.asarray(Image.open(io.BytesIO(res.mask_png)))
    assert mask.shape == (HEIGHT, WIDTH)
    assert set(np.unique(mask)) <= {0, 255}
    if mask.any():
        x0, y0, x1, y1 = res.bbox
        ys, xs = np.nonzero(mask)
        assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max(), ys.max())
        assert res.area_fraction == pytest.approx((mask > 0).mean(), abs=1e-6)
    else:
        assert list(res.bbox) == [] and res.zone == "none"
    # Same image again: the encoder output comes from the cache, and the answer is the same.
    again = open_srv.stub.Predict(request(png, question="Where is the tumour in this image?"), timeout=60)
    assert again.cache_hit and again.mask_png == res.mask_png


def test_predict_reads_a_nifti_slice_named_in_filename(open_srv):
    nib = pytest.importorskip("nibabel")
    volume = np.zeros((WIDTH, HEIGHT, 3), dtype=np.int16)
    volume[5:20, 5:20, 1] = 400
    raw = nib.Nifti1Image(volume, np.eye(4)).to_bytes()
    res = open_srv.stub.Predict(request(gzip.compress(raw), filename="ct.nii.gz#z=1"), timeout=60)
    assert len(res.image_size) == 2 and Image.open(io.BytesIO(res.mask_png)).size == tuple(res.image_size)


def test_concurrent_predicts_all_answer(open_srv, png):
    with futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda q: open_srv.stub.Predict(request(png, question=q), timeout=60),
                                [f"Where is lesion {i}?" for i in range(4)]))
    assert all(len(r.mask_png) > 0 for r in results)


def test_bad_image_bytes_are_invalid_argument(open_srv):
    err = code_of(open_srv.stub.Predict, request(b"this is not an image"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details()
    err = code_of(open_srv.stub.Predict, request(b""))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "empty" in err.details()


def test_empty_question_is_invalid_argument(open_srv, png):
    err = code_of(open_srv.stub.Predict, request(png, question="   "))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "question" in err.details()


def test_unknown_adapter_is_not_found_and_a_path_is_refused(open_srv, png):
    err = code_of(open_srv.stub.Predict, request(png, adapter="no-such-adapter"))
    assert err.code() == grpc.StatusCode.NOT_FOUND and "no-such-adapter" in err.details()
    err = code_of(open_srv.stub.Predict, request(png, adapter="../../etc"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "adapter name" in err.details()


def test_errors_from_the_predictor_map_to_status_codes():
    class Failing:
        model_name = "fake"

        def __init__(self, error):
            self.error = error

        def predict(self, *args, **kwargs):
            raise self.error

    for error, code in [(BundleError("bundle was made for another base model"), grpc.StatusCode.FAILED_PRECONDITION),
                        (RuntimeError("secret internals"), grpc.StatusCode.INTERNAL)]:
        r = serve(Failing(error), list_models=list)
        try:
            err = code_of(r.stub.Predict, request(b"png"))
            assert err.code() == code
            assert "secret internals" not in err.details()
        finally:
            r.close()


def test_messages_over_the_limit_are_resource_exhausted(predictor):
    r = serve(predictor, max_message_bytes=4096)
    try:
        err = code_of(r.stub.Predict, request(b"\0" * 8192))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        r.close()


# ListModels ----------------------------------------------------------------------------------------------------------
def test_list_models_defaults_to_the_serving_model(open_srv, predictor):
    models = open_srv.stub.ListModels(gs.load_protos().ListModelsRequest(), timeout=30).models
    assert [(m.name, m.serving) for m in models] == [("prsmed-tiny", True)]
    assert models[0].fingerprint == predictor.model.spec.fingerprint() and models[0].revision


def test_list_models_uses_the_callback(predictor):
    listed = [{"name": "a", "revision": "1", "description": "A", "fingerprint": "f1", "tags": ["x"], "serving": True},
              {"name": "b", "revision": "2", "description": "B", "fingerprint": "f2", "extra": "ignored"}]
    r = serve(predictor, list_models=lambda: listed)
    try:
        models = r.stub.ListModels(gs.load_protos().ListModelsRequest(), timeout=30).models
        assert [(m.name, m.revision, m.fingerprint, list(m.tags), m.serving) for m in models] == [
            ("a", "1", "f1", ["x"], True), ("b", "2", "f2", [], False)]
    finally:
        r.close()


# health and reflection -------------------------------------------------------------------------------------------
def test_health_reports_serving_and_not_serving(predictor):
    r = serve(predictor, token=TOKEN)
    try:
        check = health_pb2_grpc.HealthStub(r.channel).Check
        for service in ("", gs.SERVICE_NAME):  # open without the token
            assert check(health_pb2.HealthCheckRequest(service=service), timeout=10).status == \
                health_pb2.HealthCheckResponse.SERVING
        gs.set_serving(r.server, False)
        assert check(health_pb2.HealthCheckRequest(service=gs.SERVICE_NAME), timeout=10).status == \
            health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        r.close()
    with grpc.insecure_channel(f"127.0.0.1:{r.port}") as channel:  # stopped: nothing answers any more
        err = code_of(health_pb2_grpc.HealthStub(channel).Check, health_pb2.HealthCheckRequest())
    assert err.code() == grpc.StatusCode.UNAVAILABLE


def test_reflection_lists_and_describes_the_service(auth_srv):
    db = ProtoReflectionDescriptorDatabase(auth_srv.channel)  # open without the token
    services = set(db.get_services())
    assert {gs.SERVICE_NAME, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= services
    pool = descriptor_pool.DescriptorPool(db)
    request_type = pool.FindMessageTypeByName("prsmed.v1.PredictRequest")
    assert request_type.fields_by_name["image"].number == 1
    assert [m.name for m in pool.FindServiceByName(gs.SERVICE_NAME).methods] == ["Predict", "ListModels"]


# auth ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("metadata", [None, bearer("wrong-token"), (("authorization", f"Basic {TOKEN}"),),
                                      (("authorization", TOKEN),)])
def test_missing_or_wrong_token_is_unauthenticated(auth_srv, png, metadata):
    p = gs.load_protos()
    calls = {"Predict": (auth_srv.stub.Predict, request(png)),
             "ListModels": (auth_srv.stub.ListModels, p.ListModelsRequest())}
    # every method the service publishes is tried, so a new one cannot be left unguarded by this test
    assert set(calls) == {m.name for m in p.file.services_by_name["PrsMed"].methods}
    # and one it does not publish: refused for the missing token before anything else is said about it
    raw = auth_srv.channel.unary_unary(f"/{gs.SERVICE_NAME}/NoSuchMethod", request_serializer=lambda b: b,
                                       response_deserializer=lambda b: b)
    calls["NoSuchMethod"] = (raw, b"")
    for name, (call, req) in calls.items():
        err = code_of(call, req, metadata=metadata)
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED, name
        assert TOKEN not in err.details()


def test_right_token_is_let_in(auth_srv, png):
    assert auth_srv.stub.Predict(request(png), metadata=bearer(), timeout=60).mask_png
    assert auth_srv.stub.ListModels(gs.load_protos().ListModelsRequest(), metadata=bearer(), timeout=30).models


def test_public_predict_leaves_only_predict_open(public_srv, png):
    assert public_srv.stub.Predict(request(png), timeout=60).mask_png
    req = gs.load_protos().ListModelsRequest()
    assert code_of(public_srv.stub.ListModels, req).code() == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(public_srv.stub.ListModels, req, metadata=bearer("nope")).code() == grpc.StatusCode.UNAUTHENTICATED
    assert public_srv.stub.ListModels(req, metadata=bearer(), timeout=30).models


def test_interceptor_repr_hides_the_token():
    assert TOKEN not in repr(gs.BearerAuthInterceptor(TOKEN))


# building ----------------------------------------------------------------------------------------------------------
def test_build_refuses_an_empty_token_and_a_busy_port(open_srv, predictor):
    with pytest.raises(ValueError, match="token is empty"):
        gs.build_grpc_server(predictor, port=0, token="  ")
    with pytest.raises(OSError, match=str(open_srv.port)):
        gs.build_grpc_server(predictor, port=open_srv.port)
