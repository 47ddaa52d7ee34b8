"""``prsmed data``: write synthetic data, check a dataset."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

data_app = typer.Typer(help="Datasets: synthetic position-reasoning data and validation.", no_args_is_help=True)


@data_app.command("synth")
def synth(
    out: Path = typer.Argument(..., help="Folder to write (data/<modality>/..., annotations/<modality>.csv)."),
    n: int = typer.Option(600, "--n-images", "--n", help="Number of images in all, shared evenly among the modalities."),
    seed: int = typer.Option(0, "--seed", help="The same seed writes the same bytes."),
    size: int = typer.Option(256, "--size", help="Image side in pixels."),
    style: str = typer.Option("standard", "--style",
                              help="'standard': the six modalities; 'unseen': a seventh look (retina_fundus); or "
                                   "one unseen look by name: retina_fundus, histology_slide, thermal_image."),
    questions: int = typer.Option(1, "--questions", help="Question rows per image (1-5)."),
    no_lesion: float = typer.Option(0.0, "--no-lesion",
                                    help="Share of images with no lesion (empty mask, an answer that says so)."),
    phrasing: str = typer.Option("standard", "--phrasing",
                                 help="How the answers word positions: standard, plain ('upper left', 'centre'), "
                                      "radiology ('left upper quadrant'), anatomical ('superior left aspect') or "
                                      "outermost ('uppermost leftmost corner')."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Write a synthetic position-reasoning dataset in the PRS-Med layout."""
    from prsmed.data.synth import synthesize

    try:
        summary = synthesize(out, n=n, seed=seed, size=size, style=style, questions_per_image=questions,
                             no_lesion_fraction=no_lesion, phrasing=phrasing)
    except ValueError as e:
        Console(stderr=True).print(f"[red]error:[/red] {e}", highlight=False)
        raise typer.Exit(2)
    if as_json:
        print(json.dumps(summary.to_dict(), indent=2))
        return
    typer.echo(f"wrote {summary.images} images, {summary.rows} rows to {out}")
    typer.echo("  by split: " + ", ".join(f"{k} {v}" for k, v in sorted(summary.by_split.items())))
    typer.echo("  by zone: " + ", ".join(f"{k} {v}" for k, v in sorted(summary.by_zone.items())))


@data_app.command("check")
def check(
    path: Path = typer.Argument(..., help="A dataset folder (PRS-Med layout or manifest.jsonl) or a .jsonl manifest."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    strict: bool = typer.Option(False, "--strict", help="Also fail on warnings."),
    quick: bool = typer.Option(False, "--quick", help="Only check that files exist; do not decode them."),
) -> None:
    """Validate a dataset; exits 1 when it has errors (or warnings, with --strict)."""
    from prsmed.data.check import check_dataset

    report = check_dataset(path, read_pixels=not quick)
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        typer.echo(report.summary())
    if not report.ok or (strict and report.warnings):
        raise typer.Exit(1)
