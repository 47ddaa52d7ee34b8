"""The planner's memory and time estimates against measurements on this machine, as a Markdown table.

    python bench/plan_calibrate.py [--device cpu|cuda] [--steps 3]

Each configuration runs in its own child process (see prsmed.plan.measure). Memory error: (estimate - measured) /
measured. Time: the first configuration's measured step gives the machine's FLOP/s; the others are predicted from
their FLOPs at that rate.
"""

from __future__ import annotations

import argparse
import json
import platform

import torch

from prsmed.plan.calibrate import run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the raw results here")
    args = parser.parse_args()
    result = run(device=args.device, steps=args.steps)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    where = torch.cuda.get_device_name(0) if args.device == "cuda" else f"{platform.processor() or 'CPU'}"
    print(f"device: {args.device} ({where}), torch {torch.__version__}, {result['configs'][0]['threads']} threads; "
          f"achieved {result['achieved_gflops']} GFLOP/s on the first configuration\n")
    print("| configuration | estimate MiB | measured MiB | error | step s | predicted s | time error |")
    print("|---|---|---|---|---|---|---|")
    for c in result["configs"]:
        print(f"| {c['name']} | {c['estimate_mib']:.0f} | {c['measured_mib']:.0f} | {c['error_pct']:+.1f}% | "
              f"{c['step_seconds']:.2f} | {c['predicted_step_seconds']:.2f} | {c['time_error_pct']:+.1f}% |")


if __name__ == "__main__":
    main()
