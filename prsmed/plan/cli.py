"""``prsmed plan`` and ``prsmed plan calibrate``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console

from prsmed.tables import print_rows

plan_app = typer.Typer(help="How much GPU memory a configuration needs, which GPU to rent, what it costs.")
console = Console()
if not console.is_terminal:
    console = Console(width=150)  # a pipe or a log: keep the table's rows on one line


def _fail(message: str, code: int = 2) -> None:
    Console(stderr=True).print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(code)


@plan_app.callback(invoke_without_command=True)
def plan_command(
    ctx: typer.Context,
    model: str = typer.Option("prsmed-llava-med-7b", "--model", help="A zoo model (see `prsmed zoo list`)."),
    precision: str = typer.Option("bf16", "--precision", help="bf16, fp16, fp32 or 4bit (a 4-bit base: estimate only)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1,
                                             help="Effective batch per step (default: the paper's 8)."),
    grad_checkpointing: bool = typer.Option(False, "--grad-checkpointing", help="Recompute LLM activations."),
    image_size: Optional[int] = typer.Option(None, "--image-size", min=32, help="Vision encoder input size."),
    seq_len: int = typer.Option(80, "--seq-len", min=1, help="Text tokens per sample; image tokens are added."),
    gpu: str = typer.Option("all", "--gpu", help="One GPU of the catalogue, or all."),
    epochs: int = typer.Option(20, "--epochs", min=1),
    dataset_size: int = typer.Option(21040, "--dataset-size", min=1, help="Training rows (default: PosMed's)."),
    mfu: float = typer.Option(0.30, "--mfu", min=0.01, max=1.0, help="Assumed model FLOPs utilisation."),
    catalogue: Optional[Path] = typer.Option(None, "--catalogue", help="GPU and price catalogue (TOML)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Estimate memory, the batch each GPU fits, hours and cost, from the model's real modules (no weights)."""
    if ctx.invoked_subcommand is not None:
        return
    from pydantic import ValidationError

    from prsmed.components import ComponentError
    from prsmed.plan.catalogue import CatalogueError
    from prsmed.plan.estimate import PlanOptions, plan
    from prsmed.plan.simulate import SimulationError

    try:
        opts = PlanOptions(model=model, precision=precision, batch_size=batch_size,
                           grad_checkpointing=grad_checkpointing, image_size=image_size, seq_len=seq_len, gpu=gpu,
                           epochs=epochs, dataset_size=dataset_size, mfu=mfu,
                           catalogue=str(catalogue) if catalogue else None)
        with console.status(f"simulating a step of {model} (a minute for a 7B model, cached after)"):
            report = plan(opts)
    except ValidationError as e:
        first = e.errors()[0]
        _fail(f"--{'-'.join(str(x) for x in first['loc']).replace('_', '-')}: {first['msg']}")
    except (ComponentError, CatalogueError, SimulationError, ValueError) as e:
        _fail(str(e))
    if as_json:
        print(json.dumps(report, indent=2))
        return
    print_report(report)


def print_report(report: dict[str, Any]) -> None:
    m = report["memory_gb"]
    p = report["params"]
    seq = report["sequence"]
    console.print(
        f"[bold]{report['model']}[/bold]: {p['total'] / 1e9:.2f}B parameters, {p['trainable'] / 1e6:.1f}M trained; "
        f"sequence {seq['image_tokens']} image + {seq['text_tokens']} text tokens; image {seq['image_size']}px",
        highlight=False,
    )
    o = report["options"]
    console.print(
        f"training at batch {m['batch']}, {o['precision']}"
        f"{', gradient checkpointing' if o['grad_checkpointing'] else ''}: [bold]{m['total']} GB[/bold] = "
        f"frozen weights {m['frozen_weights']} + trained {m['trained_weights']} + AdamW {m['optimizer_states']} + "
        f"gradients {m['gradients']} + activations {m['activations']} ({m['activations_per_sample']}/sample) + "
        f"CUDA overhead {m['overhead']}; inference {m['inference']} GB",
        highlight=False,
    )
    a = report["assumptions"]
    title = (f"{o['epochs']} epochs of {o['dataset_size']} rows at effective batch {a['effective_batch']}; "
             f"MFU {a['mfu']}; prices from {Path(a['catalogue']).name} ({a['catalogue_date']})")
    rows = []
    for r in report["rows"]:
        notes = "; ".join(_short_notes(r))
        rows.append([
            r["platform"] or "-", r["gpu_label"], f"{r['vram_gb']:g}",
            ("yes, tight" if r.get("tight") else "yes") if r["fits"] else "[red]no[/red]",
            f"{r['recommended_batch']} x {r['grad_accum']}" if r["fits"] else "-", f"{r['memory_gb']:g}",
            _num(r["hours"]), _num(r["cost_usd"]), _num(r["cost_usd_spot"]), notes,
        ])
    print_rows(["platform", "GPU", "VRAM", "fits", "batch x accum", "GB", "hours", "$ on-demand", "$ spot", "notes"],
               rows, title=title, console=console)
    console.print(report["recommendation"], highlight=False)
    if report.get("train_command"):
        console.print(f"to run it: {report['train_command']}", highlight=False, markup=False)


def _short_notes(r: dict[str, Any]) -> list[str]:
    """The table's notes; the JSON keeps the full sentences ("why", "notes")."""
    out = []
    four_bit = any("4-bit base" in n for n in r["notes"])
    if not r["fits"] and not four_bit:
        out.append("too small even with a 4-bit base")
    elif four_bit:
        out.append("only with a 4-bit base, which prsmed train cannot load (estimate only)")
    elif r["needs"]:
        out.append(f"needs {r['needs']}")
    if r.get("tight"):
        out.append("under 10% memory left")
    if r["fits"] and r["usd_h"] is None:
        out.append("subscription")
    if any("session" in n for n in r["notes"]):
        out.append("resume across sessions")
    return out


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:,.2f}"


@plan_app.command("calibrate")
def calibrate_command(
    device: str = typer.Option("cpu", "--device", help="cpu, or cuda to measure on the GPU."),
    steps: int = typer.Option(3, "--steps", min=2, help="Training steps measured per configuration."),
    only: Optional[str] = typer.Option(None, "--only", help="Run only the configurations whose name contains this."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Estimate against measurement (peak memory and step time) for a set of configurations on this machine."""
    from prsmed.plan.calibrate import CPU_CONFIGS, run

    if device not in ("cpu", "cuda"):
        _fail(f"--device must be cpu or cuda; got {device!r}")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            _fail("--device cuda: no CUDA GPU is visible to PyTorch on this machine")
    configs = [c for c in CPU_CONFIGS if only is None or only in c.name]
    if not configs:
        _fail(f"--only {only!r} matches none of: {', '.join(c.name for c in CPU_CONFIGS)}")
    result = run(configs, device=device, steps=steps)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    rows = [[c["name"], f"{c['estimate_mib']:.0f}", f"{c['measured_mib']:.0f}", f"{c['error_pct']:+.1f}%",
             f"{c['step_seconds']:.2f}", f"{c['predicted_step_seconds']:.2f}", f"{c['time_error_pct']:+.1f}%"]
            for c in result["configs"]]
    print_rows(["configuration", "estimate MiB", "measured MiB", "error", "step s", "predicted s", "time error"], rows,
               title=f"{device}: estimate vs measurement (achieved {result['achieved_gflops']} GFLOP/s)",
               console=console)
