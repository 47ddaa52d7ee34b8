"""The asyncio client: the same methods as :class:`~prsmed_sdk.Client`, awaited."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import AsyncIterator

import httpx

from ._common import (DEFAULT_URL, RETRY_STATUSES, Retry, Watcher, check, headers, hub_headers, image_part,
                      pack_dataset,
                      SseParser, predict_form, unreachable)
from .answer import Answer
from .client import dataset_source
from .errors import PrsMedError
from .models import (AdapterInfo, DatasetInfo, HubPullRequest, HubPushRequest, HubPushResult, JobEvent, JobInfo,
                     JobRequest, ModelInfo, PlanReport, PlanRequest, PluginInfo, TrainingReport)


class AsyncClient:
    """``async with AsyncClient(url) as client: answer = await client.predict(image, question)``."""

    def __init__(self, url: str = DEFAULT_URL, token: str | None = None, timeout: float = 120.0,
                 retry: Retry = Retry(), transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.url = url.rstrip("/")
        self.retry = retry
        self._http = httpx.AsyncClient(base_url=self.url, timeout=timeout, headers=headers(token),
                                       transport=transport)
        self.jobs = AsyncJobs(self)
        self.adapters = AsyncAdapters(self)
        self.datasets = AsyncDatasets(self)

    def __repr__(self) -> str:
        return f"AsyncClient({self.url!r})"

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, path: str, **kwargs) -> httpx.Response:
        for attempt in range(self.retry.attempts + 1):
            last = attempt == self.retry.attempts
            try:
                response = await self._http.request(method, path, **kwargs)
            except httpx.TransportError as e:
                if last or not (isinstance(e, (httpx.ConnectError, httpx.ConnectTimeout)) or method == "GET"):
                    raise unreachable(self.url, e) from e
                await asyncio.sleep(self.retry.delay(attempt))
                continue
            if response.status_code in RETRY_STATUSES and not last:
                await asyncio.sleep(self.retry.delay(attempt, response.headers.get("Retry-After")))
                continue
            return check(response)
        raise AssertionError("unreachable")

    async def predict(self, image, question: str, adapter: str | None = None, hf_token: str | None = None,
                      mask_format: str = "png") -> Answer:
        part, slice_ = image_part(image)
        form = predict_form(question, adapter, slice_, mask_format)
        response = await self._request("POST", "/v1/predict", data=form, files={"image": part},
                                       headers=hub_headers(hf_token))
        answer = Answer.model_validate(response.json())
        answer._image = image
        return answer

    async def models(self) -> list[ModelInfo]:
        return [ModelInfo.model_validate(m) for m in (await self._request("GET", "/v1/models")).json()]

    async def plan(self, model: str = "prsmed-llava-med-7b", **options) -> PlanReport:
        body = PlanRequest(model=model, **options).model_dump(exclude_none=True)
        return PlanReport.model_validate((await self._request("POST", "/v1/plan", json=body)).json())

    async def plugins(self) -> list[PluginInfo]:
        return [PluginInfo.model_validate(p) for p in (await self._request("GET", "/v1/plugins")).json()]

    async def ready(self) -> bool:
        try:
            return (await self._http.get("/readyz")).status_code == 200
        except httpx.TransportError:
            return False

    async def finetune(self, dataset: str | os.PathLike, base: str = "prsmed-tiny", epochs: int | None = None,
                       batch_size: int = 8, lr: float | None = None, name: str | None = None,
                       **options) -> "AsyncJob":
        source = dataset_source(dataset)
        dataset_id = (await self.datasets.upload(source)).id if isinstance(source, Path) else source
        request = JobRequest(dataset=dataset_id, base=base, epochs=epochs, batch_size=batch_size, lr=lr, name=name,
                             options=options)
        response = await self._request("POST", "/v1/jobs", json=request.model_dump(exclude_none=True))
        return AsyncJob(self, JobInfo.model_validate(response.json()))


class AsyncJob:
    def __init__(self, client: AsyncClient, info: JobInfo) -> None:
        self._client = client
        self.info = info

    def __repr__(self) -> str:
        return f"AsyncJob({self.id!r}, state={self.info.state!r}, step={self.info.step})"

    @property
    def id(self) -> str:
        return self.info.id

    @property
    def adapter(self) -> str | None:
        """The finished adapter's name as last seen (``await job.status()`` refreshes it)."""
        return self.info.adapter

    @property
    def report(self) -> TrainingReport | None:
        """The run's validation before / best / last and its verdict, as last seen (None until the worker ended)."""
        return self.info.report

    async def status(self) -> JobInfo:
        self.info = JobInfo.model_validate((await self._client._request("GET", f"/v1/jobs/{self.id}")).json())
        return self.info

    async def cancel(self) -> JobInfo:
        response = await self._client._request("POST", f"/v1/jobs/{self.id}/cancel")
        self.info = JobInfo.model_validate(response.json())
        return self.info

    async def resume(self) -> JobInfo:
        response = await self._client._request("POST", f"/v1/jobs/{self.id}/resume")
        self.info = JobInfo.model_validate(response.json())
        return self.info

    async def events(self, read_timeout: float | None = None) -> AsyncIterator[JobEvent]:
        timeout = httpx.Timeout(self._client._http.timeout.connect or 10.0, read=read_timeout)
        try:
            async with self._client._http.stream("GET", f"/v1/jobs/{self.id}/events", timeout=timeout) as response:
                if not response.is_success:
                    await response.aread()
                    check(response)
                parser = SseParser()
                async for line in response.aiter_lines():
                    event = parser.feed(line)
                    if event is not None:
                        yield event
        except (httpx.ConnectError, httpx.ConnectTimeout) as e:
            raise unreachable(self._client.url, e) from e

    async def wait(self, timeout: float | None = None, progress: bool = True, poll: float = 2.0) -> JobInfo:
        deadline = None if timeout is None else time.monotonic() + timeout
        watcher = Watcher(self.info.model_dump(mode="json"), progress)
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                watcher.draw(final=True)
                raise TimeoutError(f"job {self.id} still {watcher.info.get('state')} after {timeout:g} s")
            over = False
            try:
                async for event in self.events(read_timeout=min(remaining, 30.0) if remaining else 30.0):
                    if watcher.feed(event):
                        over = True
                        break
                    if deadline is not None and time.monotonic() > deadline:
                        break
            except (httpx.TransportError, PrsMedError) as e:
                if isinstance(e, PrsMedError) and e.status is not None and e.status < 500 and e.status != 429:
                    raise
                await asyncio.sleep(poll)
            if not over:
                try:
                    over = watcher.set((await self.status()).model_dump(mode="json"))
                except PrsMedError as e:
                    if e.status is not None and e.status < 500:
                        raise
                    await asyncio.sleep(poll)
            if over:
                self.info = JobInfo.model_validate(watcher.info)
                return watcher.result(JobInfo)


class AsyncJobs:
    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def list(self) -> list[AsyncJob]:
        response = await self._client._request("GET", "/v1/jobs")
        return [AsyncJob(self._client, JobInfo.model_validate(j)) for j in response.json()]

    async def get(self, job_id: str) -> AsyncJob:
        response = await self._client._request("GET", f"/v1/jobs/{job_id}")
        return AsyncJob(self._client, JobInfo.model_validate(response.json()))


class AsyncAdapters:
    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def list(self) -> list[AdapterInfo]:
        return [AdapterInfo.model_validate(a) for a in (await self._client._request("GET", "/v1/adapters")).json()]

    async def load(self, name: str) -> AdapterInfo:
        return AdapterInfo.model_validate((await self._client._request("POST", f"/v1/adapters/{name}/load")).json())

    async def pull(self, ref: str, force: bool = False, hf_token: str | None = None) -> AdapterInfo:
        body = HubPullRequest(ref=ref, force=force).model_dump()
        response = await self._client._request("POST", "/v1/adapters/pull", json=body, headers=hub_headers(hf_token))
        return AdapterInfo.model_validate(response.json())

    async def push(self, name: str, repo_id: str, private: bool = False, revision: str | None = None,
                   commit_message: str | None = None, hf_token: str | None = None) -> HubPushResult:
        body = HubPushRequest(repo_id=repo_id, private=private, revision=revision,
                              commit_message=commit_message).model_dump(exclude_none=True)
        response = await self._client._request("POST", f"/v1/adapters/{name}/push", json=body,
                                                headers=hub_headers(hf_token))
        return HubPushResult.model_validate(response.json())


class AsyncDatasets:
    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def upload(self, source: str | os.PathLike, name: str | None = None) -> DatasetInfo:
        default, payload = pack_dataset(source)  # zipping is local file work; small next to the upload
        response = await self._client._request("POST", "/v1/datasets", data={"name": name or default},
                                                files={"file": (f"{name or default}.zip", payload, "application/zip")})
        return DatasetInfo.model_validate(response.json())

    async def list(self) -> list[DatasetInfo]:
        return [DatasetInfo.model_validate(d) for d in (await self._client._request("GET", "/v1/datasets")).json()]

    async def get(self, dataset_id: str) -> DatasetInfo:
        response = await self._client._request("GET", f"/v1/datasets/{dataset_id}")
        return DatasetInfo.model_validate(response.json())
