"""``prsmed eval`` and ``prsmed eval-masks``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from prsmed.tables import print_rows

console = Console()

_COLUMNS = ("n", "dice@0.5", "iou@0.5", "hd95", "meanDic", "meanIoU", "zone_acc_text", "zone_acc_mask", "agreement",
            "bleu4", "rougeL")


def _fmt(value) -> str:
    if isinstance(value, int):
        return str(value)
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def _print_table(report: dict) -> None:
    rows = [[name, *(_fmt(metrics[c]) for c in _COLUMNS)] for name, metrics in report["per_modality"].items()]
    rows.append(["[bold]overall[/bold]", *(_fmt(report["overall"][c]) for c in _COLUMNS)])
    print_rows(["modality", *_COLUMNS], rows, console=console)


def _json_safe(obj):
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    return obj


def eval_command(
    model: str = typer.Option("prsmed-tiny", "--model", help="Zoo name."),
    data: Path = typer.Option(..., "--data", help="Dataset root (authors' layout) or a JSONL manifest."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="Adapter bundle directory to load first."),
    split: str = typer.Option("test", "--split", help="Which split to evaluate."),
    batch_size: int = typer.Option(8, "--batch-size", min=1),
    max_new_tokens: int = typer.Option(48, "--max-new-tokens", min=1),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Evaluate the first N rows only."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write probability maps (PNG) and answers (CSV) here."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    allow_other_base_weights: bool = typer.Option(
        False, "--allow-other-base-weights", help="Load an --adapter trained on other base weights, or written before "
        "they were recorded (its scores then say little about it)."),
) -> None:
    """Score a model on a split: the paper's mDice/mIoU, Dice/IoU at 0.5, HD95, zones and text metrics."""
    from prsmed.data.layout import load_records
    from prsmed.eval.runner import predict_records, summarize, write_outputs
    from prsmed.model.bundle import BundleError, load_bundle
    from prsmed.zoo import build_model

    records = load_records(data, split=split)
    if limit:
        records = records[:limit]
    if not records:
        Console(stderr=True).print(f"[red]error:[/red] no {split!r} rows in {data}")
        raise typer.Exit(2)
    net = build_model(model)
    if adapter is not None:
        try:
            load_bundle(adapter, net, allow_other_base_weights=allow_other_base_weights)
        except BundleError as e:
            Console(stderr=True).print(f"[red]error:[/red] {e}", highlight=False)
            raise typer.Exit(2)
    results = predict_records(net, records, batch_size=batch_size, max_new_tokens=max_new_tokens,
                              progress=not as_json)
    report = summarize(results)
    if out is not None:
        write_outputs(results, out)
        (out / "metrics.json").write_text(json.dumps(_json_safe(report), indent=2) + "\n")
    if as_json:
        print(json.dumps(_json_safe(report), indent=2))
    else:
        _print_table(report)


def eval_masks_command(
    pred_dir: Path = typer.Argument(..., help="Predicted probability maps (8-bit PNG, any size)."),
    gt_dir: Path = typer.Argument(..., help="Ground-truth masks, paired with predictions by file stem."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """The paper's segmentation protocol on two folders (meanDic, meanIoU, maxDic, maxIoU, mae)."""
    from prsmed.eval.segmentation import evaluate_mask_folders

    try:
        metrics = evaluate_mask_folders(pred_dir, gt_dir)
    except (FileNotFoundError, ValueError) as e:
        Console(stderr=True).print(f"[red]error:[/red] {e}")
        raise typer.Exit(2)
    if as_json:
        print(json.dumps(metrics, indent=2))
        return
    print_rows(list(metrics), [[_fmt(v) for v in metrics.values()]], console=console)
