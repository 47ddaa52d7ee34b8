"""The synchronous client: ``Client(url, token).predict(image, question)`` and ``.finetune(dataset)``."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Iterator

import httpx

from ._common import (DEFAULT_URL, RETRY_STATUSES, Retry, Watcher, check, headers, hub_headers, image_part,
                      pack_dataset,
                      SseParser, predict_form, unreachable)
from .answer import Answer
from .errors import PrsMedError
from .models import (AdapterInfo, DatasetInfo, HubPullRequest, HubPushRequest, HubPushResult, JobEvent, JobInfo,
                     JobRequest, ModelInfo, PlanReport, PlanRequest, PluginInfo, TrainingReport)

DATASET_ID = re.compile(r"^[0-9a-f]{12}$")


class Client:
    """A PRS-Med server. ``token`` defaults to ``$PRSMED_API_TOKEN``; ``timeout`` is per request (seconds);
    ``retry`` says how connection failures, 429 and 503 are retried."""

    def __init__(self, url: str = DEFAULT_URL, token: str | None = None, timeout: float = 120.0,
                 retry: Retry = Retry(), transport: httpx.BaseTransport | None = None) -> None:
        self.url = url.rstrip("/")
        self.retry = retry
        self._http = httpx.Client(base_url=self.url, timeout=timeout, headers=headers(token), transport=transport)
        self.jobs = Jobs(self)
        self.adapters = Adapters(self)
        self.datasets = Datasets(self)

    def __repr__(self) -> str:
        return f"Client({self.url!r})"

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kwargs) -> httpx.Response:
        for attempt in range(self.retry.attempts + 1):
            last = attempt == self.retry.attempts
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError as e:
                # A refused connection never reached the server; anything later may have, so only GETs repeat.
                if last or not (isinstance(e, (httpx.ConnectError, httpx.ConnectTimeout)) or method == "GET"):
                    raise unreachable(self.url, e) from e
                time.sleep(self.retry.delay(attempt))
                continue
            if response.status_code in RETRY_STATUSES and not last:
                time.sleep(self.retry.delay(attempt, response.headers.get("Retry-After")))
                continue
            return check(response)
        raise AssertionError("unreachable")

    # -- inference -------------------------------------------------------------------------------------------------

    def predict(self, image, question: str, adapter: str | None = None, hf_token: str | None = None,
                mask_format: str = "png") -> Answer:
        """Ask where the lesion is. ``image``: a path (``scan.nii.gz#z=42`` picks a slice), bytes, a PIL image or a
        numpy array. ``adapter``: a name in the server's store or a Hub reference ``hf://owner/name@revision``
        (``hf_token`` for a private one: sent for that download only). ``mask_format``: "png" (the default) or
        "rle" (COCO run-length encoding, smaller for large images); ``Answer.mask`` decodes either. Returns an
        :class:`Answer` (``answer``, ``zone``, ``consistent``, ``mask``, ...)."""
        part, slice_ = image_part(image)
        form = predict_form(question, adapter, slice_, mask_format)
        response = self._request("POST", "/v1/predict", data=form, files={"image": part},
                                 headers=hub_headers(hf_token))
        answer = Answer.model_validate(response.json())
        answer._image = image
        return answer

    def models(self) -> list[ModelInfo]:
        return [ModelInfo.model_validate(m) for m in self._request("GET", "/v1/models").json()]

    def plugins(self) -> list[PluginInfo]:
        return [PluginInfo.model_validate(p) for p in self._request("GET", "/v1/plugins").json()]

    def plan(self, model: str = "prsmed-llava-med-7b", **options) -> PlanReport:
        """GPU memory, the batch each GPU fits, hours and cost for a training configuration (``prsmed plan``'s
        options: precision, batch_size, grad_checkpointing, image_size, seq_len, gpu, epochs, dataset_size, mfu).
        The first plan of a large model simulates its step on the server, which can take a minute."""
        body = PlanRequest(model=model, **options).model_dump(exclude_none=True)
        return PlanReport.model_validate(self._request("POST", "/v1/plan", json=body).json())

    def ready(self) -> bool:
        """Whether the server answers and has its model loaded (no retries)."""
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server at {self.url} was not ready within {timeout:g} s")
            time.sleep(0.5)

    # -- fine-tuning -----------------------------------------------------------------------------------------------

    def finetune(self, dataset: str | os.PathLike, base: str = "prsmed-tiny", epochs: int | None = None,
                 batch_size: int = 8, lr: float | None = None, name: str | None = None, **options) -> "Job":
        """Start a LoRA fine-tuning job. ``dataset`` is a local folder (authors' layout or with manifest.jsonl), a
        JSONL manifest, a zip, or the id of a dataset already on the server. ``epochs`` and ``lr`` left as None take
        the base model's fine-tuning defaults (``prsmed zoo show BASE``). ``options`` are more `prsmed train`
        options (``max_steps=``, ``save_every=``, ...). Returns the :class:`Job` at once; ``job.wait()`` follows it."""
        source = dataset_source(dataset)
        dataset_id = self.datasets.upload(source).id if isinstance(source, Path) else source
        request = JobRequest(dataset=dataset_id, base=base, epochs=epochs, batch_size=batch_size, lr=lr, name=name,
                             options=options)
        response = self._request("POST", "/v1/jobs", json=request.model_dump(exclude_none=True))
        return Job(self, JobInfo.model_validate(response.json()))


def dataset_source(dataset: str | os.PathLike) -> Path | str:
    """A local dataset to upload (a Path), or the id of one on the server (a str)."""
    path = Path(dataset)
    if path.exists():
        return path
    if isinstance(dataset, str) and DATASET_ID.match(dataset):
        return dataset
    raise PrsMedError(f"dataset {str(dataset)!r} is neither a local folder, manifest or zip, nor a dataset id "
                      f"(12 hex digits, from client.datasets.list())", kind="invalid_input")


class Job:
    """A fine-tuning job on the server. ``info`` is its last known state; :meth:`status` refreshes it."""

    def __init__(self, client: Client, info: JobInfo) -> None:
        self._client = client
        self.info = info

    def __repr__(self) -> str:
        return f"Job({self.id!r}, state={self.info.state!r}, step={self.info.step})"

    @property
    def id(self) -> str:
        return self.info.id

    @property
    def adapter(self) -> str | None:
        """The finished adapter's name (usable as ``predict(..., adapter=...)``), or None until it succeeded."""
        if self.info.adapter is None and self.info.state not in ("succeeded", "failed", "canceled"):
            self.status()
        return self.info.adapter

    @property
    def report(self) -> TrainingReport | None:
        """How the run did on its validation rows before training, at its best checkpoint and at its last
        evaluation, with a verdict; None until the job's worker has ended (as last seen: :meth:`status` refreshes)."""
        return self.info.report

    def status(self) -> JobInfo:
        self.info = JobInfo.model_validate(self._client._request("GET", f"/v1/jobs/{self.id}").json())
        return self.info

    def cancel(self) -> JobInfo:
        """Stop the job; it writes a checkpoint first, so :meth:`resume` continues it."""
        self.info = JobInfo.model_validate(self._client._request("POST", f"/v1/jobs/{self.id}/cancel").json())
        return self.info

    def resume(self) -> JobInfo:
        self.info = JobInfo.model_validate(self._client._request("POST", f"/v1/jobs/{self.id}/resume").json())
        return self.info

    def events(self, read_timeout: float | None = None) -> Iterator[JobEvent]:
        """The job's server-sent events as they come: ``state``, ``step``, ``metrics``, and ``end`` last."""
        timeout = httpx.Timeout(self._client._http.timeout.connect or 10.0, read=read_timeout)
        try:
            with self._client._http.stream("GET", f"/v1/jobs/{self.id}/events", timeout=timeout) as response:
                if not response.is_success:
                    response.read()
                    check(response)
                parser = SseParser()
                for line in response.iter_lines():
                    event = parser.feed(line)
                    if event is not None:
                        yield event
        except (httpx.ConnectError, httpx.ConnectTimeout) as e:
            raise unreachable(self._client.url, e) from e

    def wait(self, timeout: float | None = None, progress: bool = True, poll: float = 2.0) -> JobInfo:
        """Follow the job until it ends; returns its final JobInfo once it succeeded. A failed, canceled or
        preempted job raises :class:`~prsmed_sdk.errors.JobFailed`; ``timeout`` (seconds) raises TimeoutError and
        leaves the job running. A dropped event stream (say, the server restarting) is picked up again."""
        deadline = None if timeout is None else time.monotonic() + timeout
        watcher = Watcher(self.info.model_dump(mode="json"), progress)
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                watcher.draw(final=True)
                raise TimeoutError(f"job {self.id} still {watcher.info.get('state')} after {timeout:g} s")
            over = False
            try:
                for event in self.events(read_timeout=min(remaining, 30.0) if remaining else 30.0):
                    if watcher.feed(event):
                        over = True
                        break
                    if deadline is not None and time.monotonic() > deadline:
                        break
            except (httpx.TransportError, PrsMedError) as e:
                if isinstance(e, PrsMedError) and e.status is not None and e.status < 500 and e.status != 429:
                    raise
                time.sleep(poll)
            if not over:
                try:
                    over = watcher.set(self.status().model_dump(mode="json"))
                except PrsMedError as e:
                    if e.status is not None and e.status < 500:
                        raise
                    time.sleep(poll)
            if over:
                self.info = JobInfo.model_validate(watcher.info)
                return watcher.result(JobInfo)


class Jobs:
    def __init__(self, client: Client) -> None:
        self._client = client

    def list(self) -> list[Job]:
        return [Job(self._client, JobInfo.model_validate(j)) for j in self._client._request("GET", "/v1/jobs").json()]

    def get(self, job_id: str) -> Job:
        return Job(self._client, JobInfo.model_validate(self._client._request("GET", f"/v1/jobs/{job_id}").json()))


class Adapters:
    def __init__(self, client: Client) -> None:
        self._client = client

    def list(self) -> list[AdapterInfo]:
        return [AdapterInfo.model_validate(a) for a in self._client._request("GET", "/v1/adapters").json()]

    def load(self, name: str) -> AdapterInfo:
        """Read an adapter into the server's memory ahead of its first request (verifies it, too)."""
        return AdapterInfo.model_validate(self._client._request("POST", f"/v1/adapters/{name}/load").json())

    def pull(self, ref: str, force: bool = False, hf_token: str | None = None) -> AdapterInfo:
        """Install a Hub adapter (``owner/name@revision``) in the server's store, verified; its ``name`` is what
        ``predict(adapter=...)`` takes. ``hf_token`` (for a private repository) is used for that download only."""
        body = HubPullRequest(ref=ref, force=force).model_dump()
        response = self._client._request("POST", "/v1/adapters/pull", json=body, headers=hub_headers(hf_token))
        return AdapterInfo.model_validate(response.json())

    def push(self, name: str, repo_id: str, private: bool = False, revision: str | None = None,
             commit_message: str | None = None, hf_token: str | None = None) -> HubPushResult:
        """Upload an adapter from the server's store to the Hub (``hf_token``, else the server's own login)."""
        body = HubPushRequest(repo_id=repo_id, private=private, revision=revision,
                              commit_message=commit_message).model_dump(exclude_none=True)
        response = self._client._request("POST", f"/v1/adapters/{name}/push", json=body,
                                         headers=hub_headers(hf_token))
        return HubPushResult.model_validate(response.json())


class Datasets:
    def __init__(self, client: Client) -> None:
        self._client = client

    def upload(self, source: str | os.PathLike, name: str | None = None) -> DatasetInfo:
        """Zip (if needed) and upload a local dataset; the server validates it and answers with its id."""
        default, payload = pack_dataset(source)
        response = self._client._request("POST", "/v1/datasets", data={"name": name or default},
                                         files={"file": (f"{name or default}.zip", payload, "application/zip")})
        return DatasetInfo.model_validate(response.json())

    def list(self) -> list[DatasetInfo]:
        return [DatasetInfo.model_validate(d) for d in self._client._request("GET", "/v1/datasets").json()]

    def get(self, dataset_id: str) -> DatasetInfo:
        return DatasetInfo.model_validate(self._client._request("GET", f"/v1/datasets/{dataset_id}").json())
