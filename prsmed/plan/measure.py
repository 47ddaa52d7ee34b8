"""Measure a configuration's real training step: peak memory and time, in a child process of its own.

On a GPU the peak is ``torch.cuda.max_memory_allocated``: what the caching allocator handed out, the quantity
:func:`prsmed.plan.simulate.simulate` predicts. On a CPU it is the child's peak resident *anonymous* memory
(``RssAnon``, sampled every millisecond) minus what it held once Python, PyTorch, the plugins and the model's
modules were imported, i.e. what the model, the optimizer and the step added. Anonymous memory is where tensors
live; the resident set as a whole (``ru_maxrss``, also reported) adds the library code pages a step touches
(about 30 MiB here) and any the kernel evicted and read back. A fresh process per configuration keeps one measurement's high-water mark out of the
next.

The step is the trainer's (forward, loss, backward, clip, AdamW) on the same synthetic batch the simulation uses,
with random weights: memory and time do not depend on the weights' values.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

from prsmed.model.spec import ModelSpec


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _anon_bytes() -> int:
    """Resident anonymous memory (where tensors live); file-backed pages of code are left out, so the kernel
    evicting and re-reading a library cannot look like growth."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return _rss_bytes()


class _AnonPeak:
    """Samples resident anonymous memory every millisecond in a thread and keeps the maximum."""

    def __init__(self) -> None:
        import threading

        self.peak = _anon_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _anon_bytes())

    def start(self) -> _AnonPeak:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _anon_bytes())


def _measure_here(spec_json: str, batch: int, text_len: int, precision: str, grad_checkpointing: bool,
                  steps: int, device: str) -> dict[str, Any]:
    import gc
    import resource

    import torch

    from prsmed.plan.simulate import autocast_for, forward_loss, synthetic_batch
    from prsmed.registry import get_registry
    from prsmed.train.device import apply_dtype_policy, enable_grad_checkpointing
    from prsmed.zoo import build_model

    get_registry()
    spec = ModelSpec.model_validate_json(spec_json)
    # Building the model imports its modules' code (transformers, PEFT) lazily: build it once and drop it, so that
    # code is in the baseline and the measurement holds what the model and the step allocate.
    _ = build_model(spec, weights=False, device="meta")
    del _
    gc.collect()
    torch.manual_seed(0)
    cuda = device == "cuda"
    baseline = _rss_bytes()
    anon_baseline = _anon_bytes()
    sampler = _AnonPeak().start() if not cuda else None
    model = build_model(spec, weights=False)
    if grad_checkpointing:
        enable_grad_checkpointing(model)
    apply_dtype_policy(model, precision, device)
    model.to(device)
    model.train()
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=1e-4, weight_decay=1e-5, eps=1e-6)
    batch_data = synthetic_batch(model, batch, text_len, train=True)
    if cuda:
        batch_data.pixels, batch_data.masks = batch_data.pixels.cuda(), batch_data.masks.cuda()
        batch_data.modality, batch_data.inputs = batch_data.modality.cuda(), batch_data.inputs.to("cuda")
        torch.cuda.reset_peak_memory_stats()
    autocast = autocast_for(precision, "cuda" if cuda else "cpu")
    times = []
    for _ in range(steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = forward_loss(model, batch_data, autocast)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    out = {"baseline_bytes": baseline, "step_seconds": times, "device": device, "threads": torch.get_num_threads()}
    if cuda:
        out["peak_bytes"] = int(torch.cuda.max_memory_allocated())
    else:
        sampler.stop()
        out["peak_bytes"] = sampler.peak - anon_baseline
        out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    return out


def measure(spec: ModelSpec, *, batch: int, text_len: int, precision: str = "fp32", grad_checkpointing: bool = False,
            steps: int = 3, device: str = "cpu", timeout: float = 1800) -> dict[str, Any]:
    """Run ``steps`` training steps of ``spec`` in a fresh Python process; returns peak bytes and step times."""
    args = [spec.model_dump_json(), batch, text_len, precision, grad_checkpointing, steps, device]
    code = ("import json, sys; from prsmed.plan.measure import _measure_here; "
            "print('PRSMED-MEASURE ' + json.dumps(_measure_here(*json.loads(sys.argv[1]))))")
    # glibc keeps freed memory for reuse, so a process's peak RSS drifts above the peak of what it holds (a few
    # hundred MB over a few steps here). Serving every allocation over 64 KiB from its own mapping, returned on
    # free, makes the peak RSS the peak of live tensors: the quantity the simulation and max_memory_allocated
    # describe.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True, check=False,
                          timeout=timeout, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("PRSMED-MEASURE "):
            return json.loads(line.split(" ", 1)[1])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    raise RuntimeError(f"the measuring process exited with status {proc.returncode}: " + " | ".join(tail))
