"""Where the demo's answers come from: a server through the SDK, or a model in this process."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol


class Backend(Protocol):
    can_finetune: bool

    def describe(self) -> str: ...
    def predict(self, image, question: str, adapter: str | None) -> Any: ...
    def adapters(self) -> list[dict]: ...
    def load_adapter(self, name: str) -> dict: ...
    def start_job(self, dataset_zip: str, epochs: int, lr: float, name: str | None) -> dict: ...
    def job(self, job_id: str) -> dict: ...
    def cancel(self, job_id: str) -> dict: ...
    def pull(self, ref: str, hf_token: str | None) -> dict: ...
    def push(self, name: str, repo_id: str, private: bool, hf_token: str | None) -> dict: ...
    def plan(self, options: dict) -> dict: ...


class ClientBackend:
    """A PRS-Med server, through :class:`prsmed_sdk.Client`."""

    can_finetune = True

    def __init__(self, client) -> None:
        self.client = client

    def describe(self) -> str:
        serving = [m.name for m in self.client.models() if m.serving]
        return f"server {self.client.url}, model {serving[0] if serving else '?'}"

    def predict(self, image, question: str, adapter: str | None):
        return self.client.predict(image, question, adapter=adapter)

    def adapters(self) -> list[dict]:
        return [a.model_dump() for a in self.client.adapters.list()]

    def load_adapter(self, name: str) -> dict:
        return self.client.adapters.load(name).model_dump()

    def start_job(self, dataset_zip: str, epochs: int, lr: float, name: str | None) -> dict:
        return self.client.finetune(dataset_zip, epochs=epochs, lr=lr, name=name).info.model_dump(mode="json")

    def job(self, job_id: str) -> dict:
        return self.client.jobs.get(job_id).info.model_dump(mode="json")

    def cancel(self, job_id: str) -> dict:
        return self.client.jobs.get(job_id).cancel().model_dump(mode="json")

    def pull(self, ref: str, hf_token: str | None) -> dict:
        return self.client.adapters.pull(ref, hf_token=hf_token).model_dump()

    def push(self, name: str, repo_id: str, private: bool, hf_token: str | None) -> dict:
        return self.client.adapters.push(name, repo_id, private=private, hf_token=hf_token).model_dump()

    def plan(self, options: dict) -> dict:
        return self.client.plan(**options).model_dump()


class LocalBackend:
    """A model in this process: a :class:`~prsmed.infer.Predictor` (or the service's batcher in front of one), and,
    inside the service, its dataset store and job manager for fine-tuning."""

    def __init__(self, predictor, model_name: str, *, store=None, load=None, datasets=None, jobs=None) -> None:
        self.predictor = predictor
        self.model_name = model_name
        self.store = store if store is not None else getattr(predictor, "store", None)
        self._load = load if load is not None else getattr(predictor, "load_adapter", None)
        self.datasets = datasets
        self.jobs = jobs
        self.can_finetune = datasets is not None and jobs is not None

    def describe(self) -> str:
        return f"in-process model {self.model_name}"

    def predict(self, image, question: str, adapter: str | None):
        return self.predictor.predict(image, question, adapter=adapter)

    def adapters(self) -> list[dict]:
        if self.store is None:
            return []
        return [{k: v for k, v in a.to_dict().items() if k != "path"} for a in self.store.list()]

    def load_adapter(self, name: str) -> dict:
        from prsmed.infer.adapters import check_name

        info = self._load(check_name(name))
        return {k: v for k, v in info.to_dict().items() if k != "path"}

    def start_job(self, dataset_zip: str, epochs: int, lr: float, name: str | None) -> dict:
        from prsmed_sdk.models import JobRequest

        if not self.can_finetune:
            raise RuntimeError("fine-tuning needs a server: start `prsmed serve` and run `prsmed demo --url URL`")
        with open(dataset_zip, "rb") as f:
            dataset = self.datasets.add_zip(f, name=Path(dataset_zip).stem)
        job = self.jobs.submit(JobRequest(dataset=dataset.id, epochs=epochs, lr=lr, name=name or None))
        return job.model_dump(mode="json")

    def job(self, job_id: str) -> dict:
        return self.jobs.get(job_id).model_dump(mode="json")

    def cancel(self, job_id: str) -> dict:
        return self.jobs.cancel(job_id).model_dump(mode="json")

    def pull(self, ref: str, hf_token: str | None) -> dict:
        name = self.store.pull(ref, token=hf_token, expect_model=self.model_name)
        return self.load_adapter(name)

    def push(self, name: str, repo_id: str, private: bool, hf_token: str | None) -> dict:
        from prsmed.hub import push
        from prsmed.infer.adapters import check_name

        _, path = self.store.resolve(check_name(name))
        return push(path, repo_id, private=private, token=hf_token)

    def plan(self, options: dict) -> dict:
        from prsmed.plan.estimate import PlanOptions, plan

        return plan(PlanOptions(**options))
