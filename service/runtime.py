"""Everything the service holds while it runs: the Predictor (behind the batcher), the dataset store, the job
manager and the gRPC server. Built once per server process; the REST routes and the gRPC front share it."""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass

from prsmed.infer import Predictor
from prsmed.infer.batcher import MicroBatcher

from .auth import load_token
from .config import ServiceConfig
from .datasets import DatasetStore
from .jobs import JobManager

log = logging.getLogger("prsmed.service")


def list_models(serving: str) -> list[dict]:
    from prsmed.zoo.presets import PRESETS

    return [
        {"name": p.name, "revision": p.spec.revision, "description": p.description,
         "fingerprint": p.spec.fingerprint(), "tags": list(p.tags), "serving": p.name == serving}
        for p in PRESETS.values()
    ]


def _exit_with_parent(rt: "Runtime") -> None:
    """BentoML runs the service in a worker process under its own supervisor. If the supervisor is killed outright
    (SIGKILL, OOM killer) the worker would live on, holding the ports and running jobs; instead it stops its jobs
    (they checkpoint and resume when a server starts again) and exits."""
    parent = os.getppid()
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            log.warning("the server's supervisor (pid %d) is gone; stopping jobs and exiting", parent)
            try:
                rt.close()
            finally:
                os._exit(1)


@dataclass
class Runtime:
    config: ServiceConfig
    token: str | None
    predictor: Predictor
    batcher: MicroBatcher
    datasets: DatasetStore
    jobs: JobManager
    grpc_server: object | None = None
    grpc_port: int | None = None

    @classmethod
    def start(cls, config: ServiceConfig) -> "Runtime":
        data = config.data_dir
        for sub in ("adapters", "datasets"):
            (data / sub).mkdir(parents=True, exist_ok=True)
        token = load_token(config.token_file)
        predictor = Predictor(config.model, device=config.device, adapter_dir=config.adapter_dir,
                              max_resident_adapters=config.max_resident_adapters, cache_size=config.cache_size)
        batcher = MicroBatcher(predictor, max_batch_size=config.max_batch_size, max_wait_ms=config.max_wait_ms)
        datasets = DatasetStore(data / "datasets", max_upload_bytes=config.max_dataset_bytes)
        # A training job gets half the cores unless told otherwise: with all of them it starves predictions, and
        # on a busy machine its own steps slow down several-fold from oversubscription.
        threads = config.job_threads or max(1, (os.cpu_count() or 2) // 2)
        jobs = JobManager(data, datasets=datasets, adapter_dir=config.adapter_dir, max_queue=config.max_queue,
                          max_running=config.max_running_jobs, worker_threads=threads)
        rt = cls(config, token, predictor, batcher, datasets, jobs)
        jobs.start()
        threading.Thread(target=_exit_with_parent, args=(rt,), name="prsmed-parent-watch", daemon=True).start()
        if config.grpc_port >= 0:
            from .grpc_server import build_grpc_server

            server, port = build_grpc_server(
                batcher,  # gRPC requests join REST's batches
                host=config.host, port=config.grpc_port, token=token,
                public_predict=config.public_predict, list_models=lambda: list_models(config.model),
                max_message_bytes=config.max_predict_bytes,
            )
            server.start()
            rt.grpc_server, rt.grpc_port = server, port
            log.info("gRPC listening on %s:%d", config.host, port)
        return rt

    def close(self) -> None:
        if self.grpc_server is not None:
            from .grpc_server import stop_grpc_server

            stop_grpc_server(self.grpc_server, grace=2)
        self.jobs.stop()
        self.batcher.close()
