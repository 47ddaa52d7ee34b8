"""Training-step throughput and peak memory: our single LLM pass against the authors' two passes.

The authors' step runs the LLM twice: once for the hidden states the fusion head reads, once more for the LM loss.
Ours runs it once and takes both from the same pass. Everything else (model, batch, losses, optimizer) is the same.
Each variant runs in its own process so peak memory is its own (CPU: peak resident set size of the process; GPU:
``torch.cuda.max_memory_allocated``).

    python bench/train_step.py [--model prsmed-tiny] [--batch-size 8] [--steps 20] [--warmup 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def run_variant(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch
    from PIL import Image

    from prsmed.train.losses import structure_loss
    from prsmed.zoo import build_model

    torch.manual_seed(0)
    device = torch.device(args.device)
    model = build_model(args.model, weights=False).to(device)
    model.train()
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)) for _ in range(args.batch_size)]
    questions = ["where is the lesion in this lung CT scan?"] * args.batch_size
    answers = ["the lesion is in the top left of the image, near the center."] * args.batch_size
    seg, inputs = model.encode(images, questions, answers)
    seg, inputs = seg.to(device), inputs.to(device)
    size = model.contracts["vision_encoder"].input_size
    target = (torch.rand(args.batch_size, 1, size, size, device=device) > 0.7).float()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        if args.variant == "ours":
            out = model(seg, inputs)
            mask_logits, lm_loss = out.mask_logits, out.lm_loss
        else:  # the authors' pattern: hidden states from one pass, the LM loss from a second
            first = model.llm(inputs)
            mask_logits = model.fusion_head(model.vision_encoder(seg), first.hidden_states, prompt_mask=None)
            lm_loss = model.llm(inputs).loss
        loss = structure_loss(mask_logits, target).total + lm_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"variant": args.variant, "samples_per_s": args.batch_size * args.steps / seconds, "peak_mib": peak}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="prsmed-tiny")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variant", choices=["ours", "authors"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return 0
    rows = {}
    for variant in ("ours", "authors"):
        cmd = [sys.executable, __file__, "--variant", variant, "--model", args.model, "--batch-size",
               str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows[variant] = json.loads(out.strip().splitlines()[-1])
    for r in rows.values():
        print(f"{r['variant']:8s} {r['samples_per_s']:8.2f} samples/s   peak {r['peak_mib']:9.1f} MiB")
    speed = rows["ours"]["samples_per_s"] / rows["authors"]["samples_per_s"]
    mem = rows["ours"]["peak_mib"] / rows["authors"]["peak_mib"]
    print(f"ours / authors: {speed:.2f}x samples/s, {mem:.2f}x peak memory "
          f"({args.model}, batch {args.batch_size}, {args.steps} steps, {args.device})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
