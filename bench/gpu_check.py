"""One prepared GPU check of the paper's model at its real shapes, with random weights and no download.

    python bench/gpu_check.py [--model prsmed-llava-med-7b] [--device cuda] [--batches 1,4,8] [--infer-calls 20]
                              [--out runs/gpu-check] [--oom-batch 64]
    python bench/gpu_check.py --model prsmed-tiny --device cpu --batches 1,2 --infer-calls 3   # seconds, on CPU

The model is built on the meta device (nothing allocated, nothing read) and materialised on the target device with
random weights: the frozen LLM in bf16 as the trainer keeps it, the trained parts in fp32. Token ids stand in for
text, so no tokenizer is needed. Then, within one process:

* **training steps** at each batch, without and then with gradient checkpointing: the trainer's own forward and
  loss (``prsmed.train.step.model_loss``) with AdamW; peak ``torch.cuda.max_memory_allocated`` against ``prsmed
  plan``'s estimate for the same configuration (less the CUDA context, which the allocator does not see), step
  time, samples/s and MFU (FLOPs per sample from the planner's count, over the card's peak in the catalogue);
* **prediction** at the encoder's input size (1024 px for the paper's model): our one prefill against the authors'
  two passes (a forward for the mask, then generation from scratch), and a second question on a cached image (the
  encoder skipped), p50 over ``--infer-calls`` calls after warm-up;
* **out of memory**: a batch too large for the card, which must end in the trainer's own explanation, not a
  traceback (skipped on CPU).

Writes ``OUT/gpu_check.json`` and ``OUT/gpu_check.md``. Every section records its own error instead of stopping
the rest, and ``--time-limit`` skips what would start after it, so one run always leaves a report.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

MAX_NEW_TOKENS = 32
TEXT_TOKENS = 80  # the planner's default text length per sample


def materialise(model, device, seed: int = 0) -> None:
    """Give every meta parameter real storage on ``device`` with random values (matrices ~ N(0, 0.02), vectors:
    norms at 1, biases at 0), and move the buffers (real already: rotary frequencies, index tables) there too. Tied
    parameters stay tied."""
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    made: dict[int, torch.nn.Parameter] = {}
    with torch.no_grad():
        for module_name, module in model.named_modules():
            for name, p in list(module._parameters.items()):
                if p is None:
                    continue
                if id(p) not in made:
                    t = torch.empty(p.shape, dtype=p.dtype, device=device)
                    if p.dim() >= 2:
                        t.normal_(0.0, 0.02, generator=gen)
                    elif name == "weight" or "norm" in module_name.lower():
                        t.fill_(1.0)
                    else:
                        t.zero_()
                    made[id(p)] = torch.nn.Parameter(t, requires_grad=p.requires_grad)
                module._parameters[name] = made[id(p)]
            for name, b in list(module._buffers.items()):
                if b is not None:
                    module._buffers[name] = b.to(device)


def build(name: str, device, precision: str, *, grad_checkpointing: bool):
    import torch

    from prsmed.train.device import apply_dtype_policy, enable_grad_checkpointing
    from prsmed.zoo import build_model

    from accelerate import init_empty_weights

    # Parameters on the meta device (nothing allocated), buffers real: they hold tables the modules compute.
    with init_empty_weights(include_buffers=False):
        model = build_model(name, weights=False)
    materialise(model, torch.device(device))
    apply_dtype_policy(model, precision, torch.device(device).type)
    if grad_checkpointing:
        enable_grad_checkpointing(model)
    return model


def synthetic_inputs(model, batch: int, *, train: bool, device):
    """The planner's synthetic batch, with the LLM's image tokens and pixels filled in where it has an image path."""
    import torch
    from PIL import Image

    from prsmed.plan.simulate import synthetic_batch

    b = synthetic_batch(model, batch, TEXT_TOKENS, train=train)
    ids = torch.randint(10, 1000, b.inputs.input_ids.shape)
    image_id = getattr(model.llm, "image_token_id", None)
    pixels = None
    if image_id is not None and model.llm.image_path() is not None:
        ids[:, : model.contracts["llm"].image_tokens] = image_id
        pixels = model.llm.preprocess_images([Image.new("RGB", (336, 336))] * batch).to(device)
    inputs = type(b.inputs)(input_ids=ids.to(device), attention_mask=b.inputs.attention_mask.to(device),
                            pixel_values=pixels, labels=None if b.inputs.labels is None else b.inputs.labels.to(device))
    seg = torch.randn(batch, 3, b.image_size, b.image_size, device=device)
    masks = (torch.rand(batch, b.image_size, b.image_size, device=device) > 0.7).float()
    return seg, inputs, masks, torch.zeros(batch, dtype=torch.long, device=device)


def peak_bytes(device) -> int:
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_steps(model, batch: int, *, precision: str, device, steps: int) -> dict:
    import torch

    from prsmed.train.device import autocast
    from prsmed.train.losses import LossWeights
    from prsmed.train.step import model_loss

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=1e-5, eps=1e-6, foreach=device.type == "cuda")
    seg, inputs, masks, modality = synthetic_inputs(model, batch, train=True, device=device)

    def step() -> float:
        loss = model_loss(model, seg, inputs, masks, modality, epoch=0, weights=LossWeights(),
                          autocast=autocast(precision, device.type))[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    step()  # warm-up: kernels chosen, optimizer state allocated
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    losses = [step() for _ in range(steps)]
    sync(device)
    seconds = (time.perf_counter() - t0) / steps
    return {"step_s": round(seconds, 4), "samples_per_s": round(batch / seconds, 3),
            "peak_gib": round(peak_bytes(device) / 2**30, 3), "loss_finite": all(math.isfinite(x) for x in losses)}


def planned(model_name: str, batch: int, *, precision: str, grad_checkpointing: bool) -> dict:
    from prsmed.plan.estimate import CUDA_CONTEXT_GIB, PlanOptions, plan

    report = plan(PlanOptions(model=model_name, precision=precision, batch_size=batch,
                              grad_checkpointing=grad_checkpointing, gpu="h100"))
    m = report["memory_gb"]
    return {"plan_total_gib": m["total"], "plan_allocated_gib": round(m["total"] - CUDA_CONTEXT_GIB, 3),
            "flops_per_sample": report["flops_per_sample"]["total"], "mfu_assumed": report["assumptions"]["mfu"]}


def card_peak_tflops(device, precision: str) -> float | None:
    """The dense peak of this card from the planner's catalogue, matched by name; None when it is not listed."""
    import torch

    from prsmed.plan.catalogue import load_catalogue

    if device.type != "cuda":
        return None
    gpu = catalogue_card(torch.cuda.get_device_name(device), load_catalogue().gpu)
    return gpu.tflops(precision) if gpu is not None else None


def catalogue_card(device_name: str, gpus):
    """The catalogue entry for a CUDA device name, or None: an entry's name (``sky``, dashes dropped) must equal
    whole consecutive words of the device name ("NVIDIA GeForce RTX 4090" is RTX4090; "NVIDIA L40S" is not L4),
    and the longest such entry wins ("NVIDIA A100 80GB PCIe" is A100-80GB, not A100)."""
    import re

    words = [w for w in re.split(r"[\s\-_]+", device_name.lower()) if w]
    runs = {"".join(words[i:j]) for i in range(len(words)) for j in range(i + 1, len(words) + 1)}
    matches = [g for g in gpus if g.sky and g.sky.lower().replace("-", "") in runs]
    return max(matches, key=lambda g: len(g.sky), default=None)


def prediction(model, *, device, calls: int, precision: str) -> dict:
    import torch

    from prsmed.train.device import autocast

    model.eval()
    seg, inputs, _, _ = synthetic_inputs(model, 1, train=False, device=device)

    @torch.no_grad()
    def ours(cached=None):
        with autocast(precision, device.type):
            model.predict(seg, inputs, image_embeddings=cached, max_new_tokens=MAX_NEW_TOKENS)

    @torch.no_grad()
    def theirs():
        with autocast(precision, device.type):
            z = model.vision_encoder(seg)
            out = model.llm(inputs)  # pass 1: hidden states for the mask
            model.fusion_head(z, out.hidden_states)
            model.llm.generate_from(model.llm(inputs, use_cache=True), max_new_tokens=MAX_NEW_TOKENS)  # pass 2

    with torch.no_grad(), autocast(precision, device.type):
        cached = model.vision_encoder(seg)

    def p50(fn) -> float:
        fn()
        fn()
        times = []
        for _ in range(calls):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times.append((time.perf_counter() - t0) * 1000)
        return round(statistics.median(times), 2)

    one, two = p50(ours), p50(theirs)
    again = p50(lambda: ours(cached))
    return {"image_size": int(seg.shape[-1]), "max_new_tokens": MAX_NEW_TOKENS, "calls": calls,
            "one_prefill_p50_ms": one, "two_passes_p50_ms": two, "speedup": round(two / one, 3),
            "cached_image_p50_ms": again}


def out_of_memory(model, batch: int, *, precision: str, device) -> dict:
    import torch

    from prsmed.train.lifecycle import is_out_of_memory, out_of_memory_reason

    try:
        train_steps(model, batch, precision=precision, device=device, steps=1)
    except Exception as e:  # noqa: BLE001 - whatever it is, the trainer's classification is what is checked
        if not is_out_of_memory(e):
            raise
        torch.cuda.empty_cache()
        return {"batch": batch, "ran_out": True, "message": out_of_memory_reason(e, 0, device)}
    return {"batch": batch, "ran_out": False, "message": "fitted: raise --oom-batch to reach the card's limit"}


def markdown(report: dict) -> str:
    lines = [f"# GPU check: {report['model']} on {report['device_name']}", "",
             f"{report['precision']}, {TEXT_TOKENS} text tokens per sample, random weights; "
             f"torch {report['torch']}, {report['when']}", "",
             "| batch | grad ckpt | step s | samples/s | peak GiB | plan GiB (allocated) | peak/plan | MFU |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["train"]:
        if "error" in r:
            lines.append(f"| {r['batch']} | {r['grad_checkpointing']} | error: {r['error']} | | | | | |")
            continue
        lines.append(f"| {r['batch']} | {r['grad_checkpointing']} | {r['step_s']} | {r['samples_per_s']} | "
                     f"{r['peak_gib']} | {r['plan_allocated_gib']} | {r.get('peak_over_plan', '-')} | "
                     f"{r.get('mfu', '-')} |")
    p = report.get("predict") or {}
    if "one_prefill_p50_ms" in p:
        lines += ["", f"Prediction at {p['image_size']} px, {p['max_new_tokens']} new tokens, p50 of {p['calls']}: "
                  f"one prefill {p['one_prefill_p50_ms']} ms, the authors' two passes {p['two_passes_p50_ms']} ms "
                  f"({p['speedup']}x); a second question on a cached image {p['cached_image_p50_ms']} ms."]
    elif p:
        lines += ["", f"Prediction: error: {p.get('error')}"]
    o = report.get("oom")
    if o:
        lines += ["", f"Out of memory at batch {o.get('batch')}: {o.get('message') or o.get('error')}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="prsmed-llava-med-7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--batches", default="1,4,8")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--infer-calls", type=int, default=20)
    parser.add_argument("--oom-batch", type=int, default=64)
    parser.add_argument("--time-limit", type=float, default=420, help="seconds; later sections are skipped")
    parser.add_argument("--out", type=Path, default=Path("runs/gpu-check"))
    args = parser.parse_args(argv)

    import torch

    started = time.monotonic()
    device = torch.device(args.device)
    precision = "fp32" if device.type == "cpu" and args.precision != "fp32" else args.precision
    report: dict = {"model": args.model, "device": str(device), "precision": precision, "torch": torch.__version__,
                    "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
                    or "cpu", "when": time.strftime("%Y-%m-%d"), "train": [], "skipped": []}
    peak_tflops = card_peak_tflops(device, precision)
    model = None
    for checkpointing in (False, True):
        if model is None or checkpointing:
            model = build(args.model, device, precision, grad_checkpointing=checkpointing)
        for batch in (int(b) for b in args.batches.split(",")):
            row: dict = {"batch": batch, "grad_checkpointing": checkpointing}
            if time.monotonic() - started > args.time_limit:
                report["skipped"].append(f"train batch {batch} ckpt {checkpointing}: past --time-limit")
                continue
            try:
                row.update(planned(args.model, batch, precision="bf16" if precision == "fp32" else precision,
                                   grad_checkpointing=checkpointing))
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                row.update(train_steps(model, batch, precision=precision, device=device, steps=args.steps))
                if device.type == "cuda":  # on CPU the peak is the whole process's resident memory
                    row["peak_over_plan"] = round(row["peak_gib"] / row["plan_allocated_gib"], 3)
                if peak_tflops:
                    row["mfu"] = round(row["flops_per_sample"] * row["samples_per_s"] / (peak_tflops * 1e12), 3)
            except Exception as e:  # noqa: BLE001 - recorded, and the next configuration still runs
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            report["train"].append(row)
            print(json.dumps(row), flush=True)
    if time.monotonic() - started <= args.time_limit:
        try:
            report["predict"] = prediction(model, device=device, calls=args.infer_calls, precision=precision)
        except Exception as e:  # noqa: BLE001
            report["predict"] = {"error": f"{type(e).__name__}: {e}"}
    else:
        report["skipped"].append("prediction: past --time-limit")
    if device.type == "cuda" and time.monotonic() - started <= args.time_limit:
        model = build(args.model, device, precision, grad_checkpointing=False)
        try:
            report["oom"] = out_of_memory(model, args.oom_batch, precision=precision, device=device)
        except Exception as e:  # noqa: BLE001
            report["oom"] = {"batch": args.oom_batch, "error": f"not the trainer's out-of-memory path: {e}"}
    elif device.type != "cuda":
        report["skipped"].append("out of memory: CPU")
    report["seconds"] = round(time.monotonic() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
