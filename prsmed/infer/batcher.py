"""Adaptive batching in front of a :class:`Predictor`, shared by the REST and gRPC fronts.

Requests wait in a queue; a single dispatcher thread takes everything waiting (up to ``max_batch_size``) as soon
as the model is free, so under light load a request runs alone at once and under heavy load batches grow by
themselves. ``max_wait_ms`` optionally holds a lone request a little longer for company, which only pays on a
GPU where a batch costs about as much as one request. BentoML's own dispatcher batches APIs that take a single
argument; ``/v1/predict`` takes an image, a question and an adapter as multipart fields, so it batches here.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future

from prsmed.infer.predictor import PredictRequest, PredictResult, Predictor, check_question, load_image


class MicroBatcher:
    def __init__(self, predictor: Predictor, *, max_batch_size: int = 8, max_wait_ms: float = 0.0) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.predictor = predictor
        self.max_batch_size = max_batch_size
        self.max_wait_s = max(0.0, max_wait_ms) / 1000
        self._queue: queue.Queue[tuple[PredictRequest, Future] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="prsmed-batcher", daemon=True)
        self._closed = False
        self.batches = 0  # how many model calls, for /metrics and the benchmark
        self.requests = 0
        self._thread.start()

    def submit(self, request: PredictRequest) -> Future:
        """Validate ``request`` now (so a bad one fails alone and fast) and queue it; the future holds its result."""
        if self._closed:
            raise RuntimeError("the batcher is closed")
        check_question(request.question)
        decoded = PredictRequest(load_image(request.image, request.filename), request.question, request.adapter)
        fut: Future = Future()
        self._queue.put((decoded, fut))
        return fut

    def predict(self, image, question: str, *, adapter: str | None = None, filename: str | None = None,
                timeout: float | None = None) -> PredictResult:
        """Like :meth:`Predictor.predict`, through the batch queue (so the REST and gRPC fronts can use either)."""
        return self.submit(PredictRequest(image, question, adapter, filename)).result(timeout)

    @property
    def model(self):
        return self.predictor.model

    @property
    def model_name(self) -> str:
        return self.predictor.model_name

    def close(self) -> None:
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _take(self) -> list[tuple[PredictRequest, Future]] | None:
        first = self._queue.get()
        if first is None:
            return None
        batch = [first]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            try:
                wait = deadline - time.monotonic()
                item = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self._queue.put(None)
                break
            batch.append(item)
        return batch

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            live = [(req, fut) for req, fut in batch if fut.set_running_or_notify_cancel()]
            if not live:
                continue
            self.batches += 1
            self.requests += len(live)
            try:
                results = self.predictor.predict_batch([req for req, _ in live])
            except Exception:
                # One bad request (say, an adapter that fails to load) must not fail the others: retry alone.
                for req, fut in live:
                    try:
                        fut.set_result(self.predictor.predict_batch([req])[0])
                    except Exception as e:  # noqa: BLE001 - handed to the caller
                        fut.set_exception(e)
                continue
            for (_, fut), res in zip(live, results):
                fut.set_result(res)
