"""The BentoML service: ``POST /v1/predict`` is a BentoML API; the other ``/v1`` routes are a FastAPI app mounted
on the same server. Settings come from the environment (see :mod:`.config`), which ``prsmed serve`` fills.

BentoML keeps ``/readyz`` (ready once the model is loaded: the service's ``__init__`` loads it), ``/livez`` and
``/docs.json``; ``/`` (the API reference, offline) and ``/metrics`` (by route template) are this service's own.
"""

from __future__ import annotations

import base64
import json
import logging
from typing import Optional

import bentoml
from fastapi import FastAPI, File, Form, Header, UploadFile
from fastapi.responses import JSONResponse, StreamingResponse

import prsmed
from prsmed.components import ComponentError
from prsmed.hub import HubError, is_hub_ref, push as hub_push
from prsmed.infer.adapters import check_name
from prsmed.infer import AdapterNotFound, BundleError, InvalidInput, mask_png
from prsmed_sdk import rle
from prsmed_sdk.models import MASK_FORMATS, AdapterInfo, DatasetInfo, ErrorBody, HubPullRequest, HubPushRequest, \
    HubPushResult, JobInfo, JobRequest, MaskRLE, ModelInfo, PlanReport, PlanRequest, PluginInfo, PredictResponse

from .auth import load_token, token_matches
from .config import ServiceConfig
from .datasets import DatasetError, DatasetNotFound, UploadTooLarge
from .jobs import InvalidJob, JobNotFound, QueueFull
from .metrics import MetricsMiddleware, route_templates
from .pages import LandingPageMiddleware
from .middleware import (AuthMiddleware, BodyLimitMiddleware, ErrorEnvelopeMiddleware, HeaderLimitMiddleware,
                         MultipartGuardMiddleware, OpenAPIVersionMiddleware)
from .runtime import Runtime, list_models
from .upload import ImageUpload

log = logging.getLogger("prsmed.service")
CONFIG = ServiceConfig.from_env()
_runtime: Runtime | None = None


def runtime() -> Runtime:
    if _runtime is None:
        raise RuntimeError("the service is not started")
    return _runtime


def error(status: int, kind: str, message: str, **extra) -> JSONResponse:
    headers = {}
    if extra.get("retry_after_s") is not None:
        headers["Retry-After"] = str(max(1, int(round(extra["retry_after_s"]))))
    return JSONResponse(ErrorBody(error=kind, message=message, **extra).model_dump(exclude_none=True),
                        status_code=status, headers=headers)


HUB_KINDS = {404: "not_found", 401: "hub_unauthorized"}


def hub_error(e: HubError) -> JSONResponse:
    return error(e.status, HUB_KINDS.get(e.status, "hub_error"), str(e))


def resolve_adapter(rt: Runtime, adapter: str | None, hf_token: str | None) -> str | None:
    """A store name for the request's adapter: a Hub reference is pulled into the store on first use, with the
    request's own token (``X-HF-Token``) for that download only; anything else must be a plain store name, so
    clients cannot point the server at its own files."""
    if not adapter:
        return None
    if is_hub_ref(adapter):
        return rt.predictor.store.pull(adapter, token=hf_token or None, expect_model=rt.config.model)
    return check_name(adapter)


def to_response(result, model: str, mask_format: str = "png") -> PredictResponse:
    d = result.to_dict()
    d.pop("image_size", None)
    if mask_format == "rle":
        return PredictResponse(**d, image_size=list(result.image_size), model=model,
                               mask_rle=MaskRLE(**rle.encode(result.mask)))
    return PredictResponse(**d, image_size=list(result.image_size), model=model,
                           mask_png=base64.b64encode(mask_png(result.mask)).decode())


# ------------------------------------------------------------------------------------------------------------------
# The FastAPI app with every /v1 route but predict (mounted at /v1, so paths here have no prefix).

api = FastAPI(title="PRS-Med service", version="1", docs_url=None, redoc_url=None, openapi_url=None)


@api.get("/models", response_model=list[ModelInfo])
def get_models():
    return list_models(CONFIG.model)


@api.get("/plugins", response_model=list[PluginInfo])
def get_plugins():
    from prsmed.registry import get_registry

    out = []
    for p in get_registry().plugins():
        by_kind: dict[str, list[str]] = {}
        for ref in p.components:  # "kind/name"
            kind, _, name = ref.partition("/")
            by_kind.setdefault(kind, []).append(name)
        out.append(PluginInfo(name=p.name, version=p.version, distribution=p.distribution, builtin=p.builtin,
                              components=by_kind))
    return out


@api.post("/plan", response_model=PlanReport)
def post_plan(req: PlanRequest):
    """The VRAM and cost planner (``prsmed plan``), with the server's own catalogue."""
    from prsmed.plan.catalogue import CatalogueError
    from prsmed.plan.estimate import PlanOptions, plan
    from prsmed.plan.simulate import SimulationError

    try:
        return plan(PlanOptions(**req.model_dump()))
    except (ComponentError, CatalogueError) as e:
        return error(400, "invalid_input", str(e))
    except SimulationError as e:
        return error(422, "cannot_plan", str(e))


@api.get("/adapters", response_model=list[AdapterInfo])
def get_adapters():
    rt = runtime()
    resident = set(rt.predictor.resident_adapters())
    return [AdapterInfo(**{k: v for k, v in a.to_dict().items() if k != "path"}, resident=a.name in resident)
            for a in rt.predictor.store.list()]


@api.post("/adapters/{name}/load", response_model=AdapterInfo)
def load_adapter(name: str):
    rt = runtime()
    try:
        info = rt.predictor.load_adapter(check_name(name))
    except BundleError as e:  # before ValueError, of which it is one
        return error(422, "invalid_adapter", str(e))
    except ValueError as e:
        return error(400, "invalid_input", str(e))
    except AdapterNotFound as e:
        return error(404, "not_found", str(e))
    return AdapterInfo(**{k: v for k, v in info.to_dict().items() if k != "path"}, resident=True)


@api.post("/adapters/pull", response_model=AdapterInfo)
def pull_adapter(req: HubPullRequest, x_hf_token: Optional[str] = Header(None)):
    """Install a Hub adapter in the store (verified: every file's hash, and the base model is the served one)."""
    rt = runtime()
    try:
        name = rt.predictor.store.pull(req.ref, token=x_hf_token or None, expect_model=rt.config.model,
                                       force=req.force)
        info = rt.predictor.load_adapter(name, reload=req.force)
    except HubError as e:
        return hub_error(e)
    except BundleError as e:  # before ValueError, of which it is one
        return error(422, "invalid_adapter", str(e))
    except ValueError as e:
        return error(400, "invalid_input", str(e))
    return AdapterInfo(**{k: v for k, v in info.to_dict().items() if k != "path"}, resident=True)


@api.post("/adapters/{name}/push", response_model=HubPushResult)
def push_adapter(name: str, req: HubPushRequest, x_hf_token: Optional[str] = Header(None)):
    """Upload a stored adapter to the Hub, with the request's token (else the server's own HF_TOKEN / login)."""
    rt = runtime()
    try:
        _, path = rt.predictor.store.resolve(check_name(name))
        out = hub_push(path, req.repo_id, private=req.private, revision=req.revision,
                       commit_message=req.commit_message, token=x_hf_token or None)
    except HubError as e:
        return hub_error(e)
    except BundleError as e:
        return error(422, "invalid_adapter", str(e))
    except ValueError as e:
        return error(400, "invalid_input", str(e))
    except AdapterNotFound as e:
        return error(404, "not_found", str(e))
    return HubPushResult(**out)


@api.post("/datasets", response_model=DatasetInfo, status_code=201)
def post_dataset(file: UploadFile = File(...), name: str = Form("")):
    rt = runtime()
    try:
        return rt.datasets.add_zip(file.file, name=name or (file.filename or ""))
    except UploadTooLarge as e:
        return error(413, "too_large", str(e))
    except DatasetError as e:
        return error(400, "invalid_input", str(e))


@api.get("/datasets", response_model=list[DatasetInfo])
def get_datasets():
    return runtime().datasets.list()


@api.get("/datasets/{dataset_id}", response_model=DatasetInfo)
def get_dataset(dataset_id: str):
    try:
        return runtime().datasets.get(dataset_id)
    except DatasetNotFound as e:
        return error(404, "not_found", str(e))


@api.post("/jobs", response_model=JobInfo, status_code=201)
def post_job(req: JobRequest):
    try:
        return runtime().jobs.submit(req)
    except QueueFull as e:
        return error(429, "busy", str(e), retry_after_s=e.retry_after_s, queue_position=e.queue_position)
    except DatasetNotFound as e:
        return error(404, "not_found", str(e))
    except (InvalidJob, ValueError) as e:
        return error(400, "invalid_input", str(e))


@api.get("/jobs", response_model=list[JobInfo])
def get_jobs():
    return runtime().jobs.list()


@api.get("/jobs/{job_id}", response_model=JobInfo)
def get_job(job_id: str):
    try:
        return runtime().jobs.get(job_id)
    except JobNotFound as e:
        return error(404, "not_found", str(e))


@api.post("/jobs/{job_id}/cancel", response_model=JobInfo)
def cancel_job(job_id: str):
    try:
        return runtime().jobs.cancel(job_id)
    except JobNotFound as e:
        return error(404, "not_found", str(e))


@api.post("/jobs/{job_id}/resume", response_model=JobInfo)
def resume_job(job_id: str):
    try:
        return runtime().jobs.resume(job_id)
    except JobNotFound as e:
        return error(404, "not_found", str(e))
    except InvalidJob as e:
        return error(409, "conflict", str(e))


@api.get("/jobs/{job_id}/events")
def job_events(job_id: str):
    jobs = runtime().jobs
    try:
        jobs.get(job_id)
    except JobNotFound as e:
        return error(404, "not_found", str(e))

    def stream():
        for event in jobs.events(job_id):
            yield f"event: {event.event}\ndata: {json.dumps(event.data, default=str)}\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ------------------------------------------------------------------------------------------------------------------
# The Gradio demo at /ui, on the same model, dataset store and job manager (no HTTP round trip to itself). A browser
# cannot send a bearer header, so with a token configured Gradio asks for a login: any user name, the token as the
# password.


def _demo_backend():
    from prsmed_demo import LocalBackend

    rt = runtime()
    return LocalBackend(rt.batcher, rt.config.model, store=rt.predictor.store, load=rt.predictor.load_adapter,
                        datasets=rt.datasets, jobs=rt.jobs)


_TOKEN = load_token(CONFIG.token_file)
ui = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)


def _mount_demo() -> None:
    """Gradio is imported and the demo mounted in the worker that serves it, not in BentoML's supervisor process,
    which imports this module only to read the service's settings (Gradio's import alone takes seconds). BentoML
    enters the mounted apps' lifespans after the service instance is created, so Gradio's startup still runs."""
    import gradio as gr

    from prsmed_demo import build_demo

    # root_path: BentoML mounts this app at /ui without telling it, and Gradio then writes file URLs (an example's
    # image) from the server root, where they 404.
    gr.mount_gradio_app(
        ui, build_demo(_demo_backend), path="", root_path="/ui",
        auth=(lambda _user, password: token_matches(password, _TOKEN)) if _TOKEN else None,
        auth_message="This server needs its API token: any user name, the token as the password.",
        footer_links=[], ssr_mode=False, max_file_size=CONFIG.max_dataset_bytes,
    )


# ------------------------------------------------------------------------------------------------------------------
# The BentoML service.


# BentoML's own traffic metrics are off: they label raw paths (service/metrics.py counts by route template).
@bentoml.service(name="prsmed", workers=1, threads=CONFIG.threads, traffic={"timeout": 600},
                 metrics={"enabled": False})
@bentoml.asgi_app(api, path="/v1")
@bentoml.asgi_app(ui, path="/ui")
class PrsMed:
    def __init__(self) -> None:
        global _runtime
        _runtime = Runtime.start(CONFIG)
        self.rt = _runtime
        _mount_demo()

    def __is_ready__(self) -> bool:
        return self.rt is not None

    @bentoml.api(route="/v1/predict")
    def predict(self, image: ImageUpload, question: str, adapter: Optional[str] = None,
                slice: Optional[str] = None, mask_format: str = "png", *, ctx: bentoml.Context) -> PredictResponse:
        """Segmentation with reasoning: the answer, the zone of the mask and of the text, and the mask.

        ``image``: PNG, JPEG, DICOM or NIfTI; ``slice`` picks a NIfTI slice or DICOM frame ("z=42", "frame=3");
        ``adapter``: a store name or a Hub reference ``hf://owner/name@revision`` (header ``X-HF-Token`` for a
        private one); ``mask_format``: ``png`` (``mask_png``, base64) or ``rle`` (``mask_rle``, COCO run-length
        encoding as pycocotools writes it).
        """
        if mask_format not in MASK_FORMATS:
            out = error(400, "invalid_input", f"mask_format must be one of {', '.join(MASK_FORMATS)}; found "
                                              f"{mask_format!r}")
        else:
            out = self._predict(image, question, adapter, slice, ctx.request.headers.get("x-hf-token"), mask_format)
        # BentoML gives an API with a context parameter the context's status, whatever the returned response says.
        if isinstance(out, JSONResponse):
            ctx.response.status_code = out.status_code
        return out

    def _predict(self, image: ImageUpload, question: str, adapter: Optional[str], slice: Optional[str],
                 hf_token: Optional[str], mask_format: str):
        try:
            adapter = resolve_adapter(self.rt, adapter, hf_token)
            name = f"upload#{slice}" if slice else "upload"
            result = self.rt.batcher.predict(image.data, question, adapter=adapter, filename=name)
        except HubError as e:
            return hub_error(e)
        except BundleError as e:  # before ValueError, of which it is one
            return error(422, "invalid_adapter", str(e))
        except (InvalidInput, ValueError) as e:
            return error(400, "invalid_input", str(e))
        except AdapterNotFound as e:
            return error(404, "not_found", str(e))
        return to_response(result, self.rt.config.model, mask_format)

    @bentoml.on_shutdown
    def shutdown(self) -> None:
        self.rt.close()


# Starlette runs the first-added middleware outermost: metrics (which sees the status the client gets), the error
# envelope, header limits, then auth, so an unauthenticated upload is refused before its size matters or its body
# is read.
PrsMed.add_asgi_middleware(MetricsMiddleware, route_of=route_templates({"/v1": api.routes}))
PrsMed.add_asgi_middleware(LandingPageMiddleware)
PrsMed.add_asgi_middleware(ErrorEnvelopeMiddleware, hide=(str(CONFIG.data_dir.resolve()), str(CONFIG.data_dir)))
PrsMed.add_asgi_middleware(HeaderLimitMiddleware)
PrsMed.add_asgi_middleware(OpenAPIVersionMiddleware, info={
    "title": "PRS-Med service", "version": prsmed.__version__,
    "description": "Position-reasoning segmentation in medical imaging: an answer in words and a mask for a question "
                   "about a scan, adapters, and fine-tuning jobs. Research use only; not a medical device."})
PrsMed.add_asgi_middleware(AuthMiddleware, token=_TOKEN, public_predict=CONFIG.public_predict)
PrsMed.add_asgi_middleware(
    BodyLimitMiddleware,
    # The demo's uploads (images, dataset zips) go through Gradio's own upload route under /ui.
    limits={"/v1/predict": CONFIG.max_predict_bytes, "/v1/datasets": CONFIG.max_dataset_bytes,
            "/ui": CONFIG.max_dataset_bytes},
)
PrsMed.add_asgi_middleware(MultipartGuardMiddleware)
