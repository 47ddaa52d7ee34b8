"""The gRPC front of the service: ``prsmed.v1.PrsMed`` (Predict, ListModels) on the same Predictor as REST, with
gRPC health checking, server reflection and bearer-token auth.

The proto is compiled when first needed, from ``proto/prsmed/v1/prsmed.proto`` next to this module, so no generated
code is kept in the source tree. It is not imported through ``grpc.protos_and_services``: that helper maps the
file to the module ``prsmed.v1.prsmed_pb2``, whose parent ``prsmed`` is the library itself, so the import fails.
Instead ``grpc_tools.protoc`` writes a descriptor set, which is added to protobuf's default pool (where server
reflection looks) and turned into message classes.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import weakref
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import FileDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prsmed_sdk.models import ModelInfo

from prsmed.infer import AdapterNotFound, BundleError, InvalidInput, mask_png
from prsmed.infer.adapters import check_name

from .auth import bearer_ok

log = logging.getLogger(__name__)

PROTO_ROOT = Path(__file__).resolve().parent / "proto"
PROTO_FILE = "prsmed/v1/prsmed.proto"
SERVICE_NAME = "prsmed.v1.PrsMed"
PREDICT_METHOD = f"/{SERVICE_NAME}/Predict"
LIST_MODELS_METHOD = f"/{SERVICE_NAME}/ListModels"
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


# protos ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Protos:
    """The message classes of ``prsmed/v1/prsmed.proto``."""

    file: FileDescriptor
    PredictRequest: type
    PredictResponse: type
    ListModelsRequest: type
    ListModelsResponse: type
    ModelInfo: type


_protos: Protos | None = None
_protos_lock = threading.Lock()


def load_protos() -> Protos:
    """The service's message classes, compiled from the shipped ``.proto`` on first use."""
    global _protos
    with _protos_lock:
        if _protos is None:
            pool = descriptor_pool.Default()
            try:
                # Already there when another copy of this module (or a generated _pb2) got in first.
                file = pool.FindFileByName(PROTO_FILE)
            except KeyError:
                for proto in descriptor_pb2.FileDescriptorSet.FromString(_compile_descriptor_set()).file:
                    pool.Add(proto)
                file = pool.FindFileByName(PROTO_FILE)
            classes = {
                name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"prsmed.v1.{name}"))
                for name in ("PredictRequest", "PredictResponse", "ListModelsRequest", "ListModelsResponse",
                             "ModelInfo")
            }
            _protos = Protos(file=file, **classes)
        return _protos


def _compile_descriptor_set() -> bytes:
    from grpc_tools import protoc

    source = PROTO_ROOT / PROTO_FILE
    if not source.is_file():
        raise FileNotFoundError(
            f"expected the service's protocol definition at {source}, found nothing; the package was installed "
            f"without its data files (package-data must include proto/**/*)"
        )
    with tempfile.TemporaryDirectory(prefix="prsmed-proto-") as tmp:
        out = Path(tmp) / "prsmed.desc"
        rc = protoc.main(["protoc", f"--proto_path={PROTO_ROOT}", f"--descriptor_set_out={out}", PROTO_FILE])
        if rc != 0 or not out.is_file():
            raise RuntimeError(f"protoc could not compile {source} (exit status {rc}); its messages are above")
        return out.read_bytes()


class PrsMedStub:
    """A client for ``prsmed.v1.PrsMed`` on a ``grpc.Channel``: ``stub.Predict(request, metadata=...)``."""

    def __init__(self, channel: grpc.Channel) -> None:
        p = load_protos()
        self.protos = p
        self.Predict = channel.unary_unary(
            PREDICT_METHOD, request_serializer=p.PredictRequest.SerializeToString,
            response_deserializer=p.PredictResponse.FromString,
        )
        self.ListModels = channel.unary_unary(
            LIST_MODELS_METHOD, request_serializer=p.ListModelsRequest.SerializeToString,
            response_deserializer=p.ListModelsResponse.FromString,
        )


# the service -----------------------------------------------------------------------------------------------------
def predict_response(result: Any, model_name: str = "") -> Any:
    """A :class:`prsmed.infer.PredictResult` as a ``PredictResponse`` message."""
    p = load_protos()
    return p.PredictResponse(
        answer=result.answer,
        zone=result.zone,
        zone_from_text=result.zone_from_text,
        consistent=result.consistent,
        mask_png=mask_png(result.mask),
        area_fraction=result.area_fraction,
        confidence=result.confidence,
        bbox=list(result.bbox or []),
        timings_ms=dict(result.timings_ms),
        zones=list(result.zones),
        zones_from_text=list(result.zones_from_text),
        cache_hit=result.cache_hit,
        image_size=list(result.image_size),
        adapter=result.adapter or "",
        model=model_name,
    )


def serving_model_info(predictor: Any) -> dict:
    """The predictor's own base model, for a server given no ``list_models``."""
    from prsmed.zoo.presets import PRESETS

    spec = predictor.model.spec
    # A custom spec has no preset, hence no description; its name and fingerprint still identify it.
    preset = PRESETS.get(spec.name)
    description = preset.description if preset is not None else ""
    return {"name": spec.name, "revision": spec.revision, "description": description,
            "fingerprint": spec.fingerprint(), "serving": True}


class _PrsMedService:
    def __init__(self, predictor: Any, list_models: Callable[[], list[dict]] | None) -> None:
        self.predictor = predictor
        self.list_models = list_models or (lambda: [serving_model_info(predictor)])

    def Predict(self, request, context):
        adapter = request.adapter or None
        if adapter is not None:
            # A network client names adapters in the server's store, never paths on the server's disk.
            try:
                check_name(adapter)
            except ValueError as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        try:
            result = self.predictor.predict(request.image, request.question, adapter=adapter,
                                            filename=request.filename or None)
            return predict_response(result, getattr(self.predictor, "model_name", ""))
        except InvalidInput as e:
            error = (grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except AdapterNotFound as e:
            error = (grpc.StatusCode.NOT_FOUND, str(e))
        except BundleError as e:
            error = (grpc.StatusCode.FAILED_PRECONDITION, str(e))
        except Exception:
            log.exception("Predict failed (image of %d bytes, adapter %r)", len(request.image), adapter)
            error = (grpc.StatusCode.INTERNAL, "the prediction failed on the server; its log has the details")
        context.abort(*error)

    def ListModels(self, request, context):
        p = load_protos()
        try:
            # The wire contract's model checks what the callback returned, as REST's /v1/models does.
            models = [ModelInfo.model_validate(m) for m in self.list_models()]
        except Exception:
            log.exception("ListModels failed")
            context.abort(grpc.StatusCode.INTERNAL, "listing the models failed on the server; its log has the details")
        return p.ListModelsResponse(models=[
            p.ModelInfo(name=m.name, revision=m.revision, description=m.description, fingerprint=m.fingerprint,
                        serving=m.serving, tags=m.tags)
            for m in models
        ])

    def handler(self) -> grpc.GenericRpcHandler:
        p = load_protos()
        return grpc.method_handlers_generic_handler(SERVICE_NAME, {
            "Predict": grpc.unary_unary_rpc_method_handler(
                self.Predict, request_deserializer=p.PredictRequest.FromString,
                response_serializer=p.PredictResponse.SerializeToString,
            ),
            "ListModels": grpc.unary_unary_rpc_method_handler(
                self.ListModels, request_deserializer=p.ListModelsRequest.FromString,
                response_serializer=p.ListModelsResponse.SerializeToString,
            ),
        })


# auth ------------------------------------------------------------------------------------------------------------
class BearerAuthInterceptor(grpc.ServerInterceptor):
    """Every ``prsmed.v1.PrsMed`` call needs metadata ``authorization: Bearer <token>``, except the methods in
    ``open_methods``. Health and reflection stay open so probes and tooling work without the secret."""

    def __init__(self, token: str, open_methods: frozenset[str] = frozenset()) -> None:
        self._token = token
        self._open = open_methods
        self._deny = grpc.unary_unary_rpc_method_handler(self._unauthenticated)

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if not method.startswith(f"/{SERVICE_NAME}/") or method in self._open:
            return continuation(handler_call_details)
        authorization = next(
            (v for k, v in (handler_call_details.invocation_metadata or ()) if k.lower() == "authorization"), None
        )
        if isinstance(authorization, str) and bearer_ok(authorization, self._token):
            return continuation(handler_call_details)
        return self._deny

    @staticmethod
    def _unauthenticated(request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED,
                      "expected metadata 'authorization: Bearer <token>' with the server's token; it was missing "
                      "or did not match")

    def __repr__(self) -> str:  # the token must not reach a log through a repr
        return f"BearerAuthInterceptor(open_methods={sorted(self._open)})"


# the server ------------------------------------------------------------------------------------------------------
_health: weakref.WeakKeyDictionary[grpc.Server, health.HealthServicer] = weakref.WeakKeyDictionary()


def build_grpc_server(
    predictor: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 50051,
    token: str | None = None,
    public_predict: bool = False,
    list_models: Callable[[], list[dict]] | None = None,
    max_workers: int = 4,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    max_concurrent_rpcs: int | None = None,
    credentials: grpc.ServerCredentials | None = None,
) -> tuple[grpc.Server, int]:
    """A gRPC server for ``predictor`` (a :class:`prsmed.infer.Predictor`, which is thread-safe) and the port it
    bound (``port=0`` picks a free one). The caller starts it (``server.start()``), so more services can be added
    first. It reports SERVING to health checks; :func:`stop_grpc_server` turns that to NOT_SERVING before it
    stops.

    ``token`` protects every PrsMed method (``public_predict=True`` leaves Predict open); ``list_models`` returns
    ModelInfo dicts for ListModels (default: the predictor's own model). Messages over ``max_message_bytes`` are
    refused with RESOURCE_EXHAUSTED, as are calls beyond ``max_concurrent_rpcs``. ``credentials`` serves TLS.
    """
    if token is not None and not token.strip():
        raise ValueError("token is empty, which would accept any caller; pass None for an open API")
    if max_workers < 1:
        raise ValueError(f"max_workers must be at least 1, found {max_workers}")
    if max_message_bytes < 1024:
        raise ValueError(f"max_message_bytes must be at least 1024, found {max_message_bytes}")
    load_protos()  # fail here, not on the first call, if the proto is missing or broken

    interceptors = []
    if token is not None:
        open_methods = frozenset({PREDICT_METHOD}) if public_predict else frozenset()
        interceptors.append(BearerAuthInterceptor(token, open_methods))
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="prsmed-grpc"),
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            # Without this a second server on a busy port would share it silently instead of failing.
            ("grpc.so_reuseport", 0),
        ],
        maximum_concurrent_rpcs=max_concurrent_rpcs,
    )
    server.add_generic_rpc_handlers((_PrsMedService(predictor, list_models).handler(),))

    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)

    address = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
    try:
        bound = (server.add_secure_port(address, credentials) if credentials is not None
                 else server.add_insecure_port(address))
    except RuntimeError as e:
        raise OSError(f"could not listen on {address} for gRPC: {e}") from e
    if not bound:
        raise OSError(f"could not listen on {address} for gRPC (is the port in use?)")

    _health[server] = health_servicer
    set_serving(server, True)
    log.debug("gRPC %s bound to %s:%d (auth %s)", SERVICE_NAME, host, bound,
             "off" if token is None else ("on, Predict open" if public_predict else "on"))
    return server, bound


def set_serving(server: grpc.Server, serving: bool = True) -> None:
    """What health checks report for the server as a whole ("") and for ``prsmed.v1.PrsMed``."""
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    servicer = _health.get(server)
    if servicer is None:
        raise ValueError("this server was not made by build_grpc_server, so it has no health service to set")
    for service in ("", SERVICE_NAME):
        servicer.set(service, status)


def stop_grpc_server(server: grpc.Server, grace: float | None = 5.0) -> None:
    """NOT_SERVING to health checks, then stop taking calls and let running ones finish within ``grace`` s."""
    servicer = _health.get(server)
    if servicer is not None:
        servicer.enter_graceful_shutdown()
    server.stop(grace).wait()


__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "LIST_MODELS_METHOD",
    "PREDICT_METHOD",
    "PROTO_FILE",
    "PROTO_ROOT",
    "SERVICE_NAME",
    "BearerAuthInterceptor",
    "Protos",
    "PrsMedStub",
    "build_grpc_server",
    "load_protos",
    "predict_response",
    "serving_model_info",
    "set_serving",
    "stop_grpc_server",
]
