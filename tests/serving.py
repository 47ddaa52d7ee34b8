"""Start ``prsmed serve`` as a real process on 127.0.0.1 for integration tests."""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    grpc_port: int
    data_dir: Path
    log: Path

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:]) if self.log.exists() else ""


def predict(url: str, image: bytes, question: str = "Where is the lesion?", **fields) -> httpx.Response:
    """POST one image and question to ``/v1/predict`` as a form, the way a browser or curl would."""
    files = {"image": ("scan.png", image, "application/octet-stream")}
    return httpx.post(url + "/v1/predict", files=files, data={"question": question, **fields}, timeout=60)


def start_server(data_dir: Path, *args: str, env: dict | None = None, timeout: float = 120) -> Server:
    """``prsmed serve`` on free ports with its state in ``data_dir``; returns once ``/readyz`` answers 200."""
    port, grpc_port = free_port(), free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    log = data_dir / f"server-{port}.log"
    cmd = [sys.executable, "-m", "prsmed.cli", "serve", "--port", str(port), "--grpc-port", str(grpc_port),
           "--data-dir", str(data_dir), *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PRSMED_PLAN_CACHE": "off", **(env or {})}
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=full_env, cwd=data_dir,
                                start_new_session=True)
    server = Server(proc, f"http://127.0.0.1:{port}", grpc_port, data_dir, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prsmed serve exited with {proc.returncode}:\n{server.log_tail()}")
        try:
            if httpx.get(server.url + "/readyz", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.stop(signal.SIGKILL)
    raise RuntimeError(f"prsmed serve was not ready after {timeout} s:\n{server.log_tail()}")


@dataclass
class Burst:
    statuses: list[int]
    latencies_s: list[float]
    wall_s: float

    def percentile_ms(self, q: int) -> float:
        return statistics.quantiles(self.latencies_s, n=100, method="inclusive")[q - 1] * 1000

    def summary(self) -> dict:
        counts = {str(s): self.statuses.count(s) for s in sorted(set(self.statuses))}
        return {"requests": len(self.statuses), "statuses": counts, "p50_ms": round(self.percentile_ms(50), 1),
                "p99_ms": round(self.percentile_ms(99), 1), "max_ms": round(max(self.latencies_s) * 1000, 1),
                "wall_s": round(self.wall_s, 2), "requests_per_s": round(len(self.statuses) / self.wall_s, 2)}


def predict_burst(url: str, images: list[bytes], *, headers: dict | None = None, timeout: float = 300,
                  question: str = "Where is the lesion in this scan?") -> Burst:
    """POST every image to ``/v1/predict`` at once, one connection each; each latency from send to answer."""
    import httpx

    async def run() -> Burst:
        limits = httpx.Limits(max_connections=len(images), max_keepalive_connections=len(images))
        async with httpx.AsyncClient(base_url=url, headers=headers or {}, timeout=timeout, limits=limits) as client:
            async def one(i: int) -> tuple[int, float]:
                t0 = time.perf_counter()
                try:
                    r = await client.post("/v1/predict", files={"image": (f"{i}.png", images[i])},
                                          data={"question": question})
                    status = r.status_code
                except httpx.HTTPError:
                    status = 0  # no answer at all: a refused or dropped connection
                return status, time.perf_counter() - t0

            t0 = time.perf_counter()
            results = await asyncio.gather(*(one(i) for i in range(len(images))))
            wall = time.perf_counter() - t0
        return Burst([s for s, _ in results], [t for _, t in results], wall)

    return asyncio.run(run())
