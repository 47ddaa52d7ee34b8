"""Prediction latency and throughput: in-process vs REST vs gRPC, the encoder cache, one prefill vs two passes,
and concurrent clients with and without batching.

    python bench/predict.py [--model prsmed-tiny] [--n 30] [--json OUT]

Starts two real servers (``prsmed serve``: one with batching, one with ``max_batch_size=1``) on free ports, with
as many torch threads as this process. In-process, REST and gRPC take turns on each image, so the ratios (medians of
per-image ratios) compare the paths under the same machine state; the server's own ``timings_ms.total`` splits a
REST call into the model's time inside the server and the HTTP overhead around it. REST is timed over one
kept-open connection (as the SDK and any HTTP client library call it), and over a new client per call for the
record. Figures are machine-dependent; quote the ratios, measured in one run.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from serving import start_server  # noqa: E402


def scans(n: int, size: int = 256) -> list[bytes]:
    out = []
    for seed in range(n):
        rng = np.random.default_rng(seed)
        arr = (rng.random((size, size)) * 60).astype(np.uint8)
        y, x = rng.integers(20, size - 60, 2)
        arr[y : y + 40, x : x + 36] = 210
        buf = io.BytesIO()
        Image.fromarray(arr, mode="L").save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def percentiles(ms: list[float]) -> dict[str, float]:
    ms = sorted(ms)
    return {"p50_ms": round(statistics.median(ms), 1), "p95_ms": round(ms[min(len(ms) - 1, int(0.95 * len(ms)))], 1),
            "n": len(ms)}


def timed(fn, items) -> list[float]:
    out = []
    for item in items:
        t = time.perf_counter()
        fn(item)
        out.append((time.perf_counter() - t) * 1000)
    return out


def one_vs_two_passes(model, images: list[Image.Image], question: str) -> dict:
    """Our single prefill against the authors' pattern: a forward for the mask, then generate() from scratch."""
    model.eval()

    @torch.no_grad()
    def ours(im):
        seg, inputs = model.encode([im], [question], padding_side="left")
        model.predict(seg, inputs, max_new_tokens=32)

    @torch.no_grad()
    def theirs(im):
        seg, inputs = model.encode([im], [question], padding_side="left")
        z = model.vision_encoder(seg)
        out = model.llm(inputs)  # pass 1: hidden states for the mask
        model.fusion_head(z, out.hidden_states)
        model.llm.generate_from(model.llm(inputs, use_cache=True), max_new_tokens=32)  # pass 2: the answer

    ours(images[0]), theirs(images[0])  # warm-up
    a, b = timed(ours, images), timed(theirs, images)
    return {"one_prefill": percentiles(a), "two_passes": percentiles(b),
            "speedup_p50": round(statistics.median(b) / statistics.median(a), 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="prsmed-tiny")
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    import grpc
    import httpx

    from prsmed.infer import Predictor
    from prsmed_service.grpc_server import PrsMedStub, load_protos

    question = "Where is the lesion in this image?"
    data = scans(args.n)
    pils = [Image.open(io.BytesIO(d)).convert("RGB") for d in data]
    results: dict = {"model": args.model, "n": args.n, "threads": torch.get_num_threads()}

    predictor = Predictor(args.model, cache_size=0)
    predictor.predict(data[0], question)
    cached = Predictor(predictor.model, cache_size=256)
    first = timed(lambda d: cached.predict(d, question), data)
    second = timed(lambda d: cached.predict(d, "Which side is it on?"), data)
    results["cache"] = {"first_question": percentiles(first), "second_question": percentiles(second),
                        "speedup_p50": round(statistics.median(first) / statistics.median(second), 2)}
    results["prefill"] = one_vs_two_passes(predictor.model, pils, question)

    with tempfile.TemporaryDirectory() as tmp:
        # The servers get the torch threads the in-process figures had (the test harness gives its servers one).
        env = {"PRSMED_SERVE_CACHE_SIZE": "0", "OMP_NUM_THREADS": str(torch.get_num_threads())}
        batching = start_server(Path(tmp) / "batching", env=env)
        single = start_server(Path(tmp) / "single", env={**env, "PRSMED_SERVE_MAX_BATCH_SIZE": "1"}, )
        try:
            def rest(url):
                def call(d):
                    r = httpx.post(url + "/v1/predict", files={"image": ("s.png", d)}, data={"question": question},
                                   timeout=120)
                    r.raise_for_status()
                return call

            # The three paths take turns on each image (the order rotating), so that a machine that speeds up or
            # slows down over the run moves all three alike; the ratios are medians of per-image ratios. REST keeps
            # one connection open, as the SDK and any HTTP client library do. The server's own ``timings_ms.total``
            # splits a REST call into the model's time inside the server and what HTTP costs around it.
            protos = load_protos()
            with httpx.Client(base_url=batching.url, timeout=120) as session, \
                    grpc.insecure_channel(f"127.0.0.1:{batching.grpc_port}") as channel:
                stub = PrsMedStub(channel)

                def kept(d, fields=None):
                    r = session.post("/v1/predict", files={"image": ("s.png", d)},
                                     data={"question": question, **(fields or {})})
                    r.raise_for_status()
                    return r.json()["timings_ms"]["total"]

                paths = {"in_process": lambda d: predictor.predict(d, question), "rest": kept,
                         "grpc": lambda d: stub.Predict(protos.PredictRequest(image=d, question=question),
                                                        timeout=120)}
                for fn in paths.values():
                    fn(data[0])
                times: dict[str, list[float]] = {k: [] for k in paths}
                inside: list[float] = []
                for i, d in enumerate(data):
                    names = list(paths)
                    for name in names[i % 3:] + names[: i % 3]:
                        t = time.perf_counter()
                        out = paths[name](d)
                        times[name].append((time.perf_counter() - t) * 1000)
                        if name == "rest":
                            inside.append(out)
                for name, ms in times.items():
                    results[name] = percentiles(ms)
                results["rest_server_model"] = percentiles(inside)
                for name in ("rest", "grpc"):
                    ratios = [a / b for a, b in zip(times[name], times["in_process"])]
                    results[f"{name}_over_in_process_p50"] = round(statistics.median(ratios), 2)
                results["rest_http_overhead_p50_ms"] = round(
                    statistics.median(a - b for a, b in zip(times["rest"], inside)), 1)
                results["rest_rle"] = percentiles(timed(lambda d: kept(d, {"mask_format": "rle"}), data))
            results["rest_new_client_per_call"] = percentiles(timed(rest(batching.url), data))
            from prsmed_sdk import Client

            with Client(batching.url) as sdk:
                sdk.predict(data[0], question)
                results["sdk"] = percentiles(timed(lambda d: sdk.predict(d, question), data))
            results["concurrency"] = {}
            for label, srv in (("batching", batching), ("no_batching", single)):
                for clients in (1, 4, 16):
                    work = [data[i % len(data)] for i in range(max(args.n, clients * 3))]
                    t = time.perf_counter()
                    with ThreadPoolExecutor(clients) as pool:
                        list(pool.map(rest(srv.url), work))
                    dt = time.perf_counter() - t
                    results["concurrency"][f"{label}_{clients}"] = {"requests_per_s": round(len(work) / dt, 2),
                                                                    "requests": len(work)}
        finally:
            batching.stop()
            single.stop()
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
