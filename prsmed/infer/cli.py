"""``prsmed predict``: one question about one image, from the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console


def predict_command(
    image: str = typer.Argument(..., help="PNG, JPEG, DICOM or NIfTI (pick a slice with 'scan.nii.gz#z=42')."),
    question: str = typer.Option(..., "--question", "-q", help="What to ask about the image."),
    model: str = typer.Option("prsmed-tiny", "--model", help="Zoo preset."),
    adapter: Optional[str] = typer.Option(None, "--adapter", help="Adapter: a name in --adapter-dir, a bundle "
                                          "directory, or hf://owner/name@revision (pulled and verified once)."),
    adapter_dir: Path = typer.Option(Path(".prsmed/adapters"), "--adapter-dir", help="The adapter store."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the mask here (PNG, 0/255, the image's size)."),
    overlay_path: Optional[Path] = typer.Option(None, "--overlay", help="Write the image with the mask drawn over."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, ..."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    allow_other_base_weights: bool = typer.Option(
        False, "--allow-other-base-weights", help="Use an adapter trained on other base weights, or written before "
        "they were recorded (its masks and answers may be wrong)."),
) -> None:
    """Answer a question about an image: the position in words and the lesion's mask."""
    problem = _unreadable(image)
    if problem:  # before torch and the model load: a typo answers at once
        typer.echo(f"error: {problem}", err=True)
        raise typer.Exit(2)
    from prsmed.components import ComponentError
    from prsmed.hub import HubError
    from prsmed.infer import AdapterNotFound, BundleError, InvalidInput, Predictor, load_image, mask_png, overlay
    from prsmed.zoo import WeightsMissing

    err = Console(stderr=True)
    try:
        predictor = Predictor(model, device=device, adapter_dir=adapter_dir,
                              allow_other_base_weights=allow_other_base_weights)
        result = predictor.predict(image, question, adapter=adapter)
    except (InvalidInput, AdapterNotFound, BundleError, HubError, WeightsMissing, ComponentError, KeyError) as e:
        err.print(f"[red]error:[/red] {e}", highlight=False)
        raise typer.Exit(2)
    if out is not None:
        out.write_bytes(mask_png(result.mask))
    if overlay_path is not None:
        overlay(load_image(image), result.mask).save(overlay_path)
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
        return
    console = Console()
    console.print(result.answer, highlight=False, soft_wrap=True)
    # The sets `consistent` compares (docs/service.md), so two lesions show as two zones on each side.
    agree = "agrees" if result.consistent else "does NOT agree"
    named = ", ".join(result.zones_from_text) or "none named"
    console.print(
        f"mask zones: {', '.join(result.zones)} · answer's zones: {named} ({agree}) · area "
        f"{result.area_fraction:.1%} · bbox {result.bbox} · confidence {result.confidence:.2f} · "
        f"{result.timings_ms['total']:.0f} ms",
        highlight=False, soft_wrap=True,  # one line in a pipe or a log, however long
    )


def _unreadable(image: str) -> str | None:
    """Why ``image`` (a path, with an optional ``#z=N`` slice) cannot be an input, found from its first bytes; None
    when it may be one (the readers decide the rest)."""
    from prsmed.data.readers import sniff_format

    path = Path(image.split("#", 1)[0])
    if not path.exists():
        return f"image {path}: no such file"
    if not path.is_file():
        return f"image {path}: not a file"
    try:
        with open(path, "rb") as f:
            head = f.read(544)
    except OSError as e:
        return f"image {path}: cannot be read ({e.strerror or e})"
    if not head:
        return f"image {path}: the file is empty"
    if sniff_format(head, path.name) is None:
        return (f"image {path}: not an image this command reads (expected PNG, JPEG, another Pillow format, DICOM "
                f"or NIfTI; the first bytes are {head[:8]!r})")
    return None
