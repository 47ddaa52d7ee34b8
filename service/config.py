"""The service's settings. ``prsmed serve`` passes them to the BentoML worker through environment variables,
because BentoML imports the service module in its own process."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, Field

PREFIX = "PRSMED_SERVE_"


class ServiceConfig(BaseModel):
    model: str = "prsmed-tiny"
    device: str = "cpu"
    host: str = "127.0.0.1"
    port: int = 3000
    grpc_port: int = Field(50051, description="0 picks a free port; -1 disables gRPC")
    data_dir: Path = Path(".prsmed")
    token_file: Path | None = None
    public_predict: bool = False
    # Serve on an interface other than loopback with no token (refused without it: service/launcher.py).
    allow_unauthenticated: bool = False
    threads: int = Field(16, ge=1, description="BentoML's thread pool for synchronous endpoints")
    max_batch_size: int = Field(8, ge=1)
    max_wait_ms: float = Field(0.0, ge=0)
    cache_size: int = Field(64, ge=0)
    max_resident_adapters: int = Field(4, ge=1)
    max_predict_bytes: int = Field(64 * 2**20, ge=1)
    max_dataset_bytes: int = Field(512 * 2**20, ge=1)
    max_queue: int = Field(8, ge=1)
    max_running_jobs: int = Field(1, ge=1)
    job_threads: int | None = Field(None, ge=1, description="torch threads per training job")
    shutdown_grace_s: int = Field(10, ge=1, description="on SIGTERM, how long open connections (event streams, a "
                                  "browser on /ui, slow uploads) may take before they are closed")

    def to_env(self) -> dict[str, str]:
        return {PREFIX + k.upper(): str(v) for k, v in self.model_dump().items() if v is not None}

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "ServiceConfig":
        env = os.environ if env is None else env
        values = {}
        for name in cls.model_fields:
            raw = env.get(PREFIX + name.upper())
            if raw is not None and raw != "None":
                values[name] = raw
        return cls(**values)

    @property
    def adapter_dir(self) -> Path:
        return self.data_dir / "adapters"
