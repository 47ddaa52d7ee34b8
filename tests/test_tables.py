"""CLI tables stay whole: no cell cut to ``0.8…`` at 80 columns on a terminal, or in a pipe."""

from __future__ import annotations

import io

from rich.console import Console

from prsmed.tables import print_rows

HEADERS = ["modality", "n", "dice@0.5", "iou@0.5", "hd95", "meanDic", "meanIoU", "zone_acc_text", "zone_acc_mask",
           "agreement", "bleu4", "rougeL"]
ROWS = [["brain_tumors_ct_scan", "50", *(f"0.{i}712" for i in range(1, 11))], ["overall", "300", *["0.8765"] * 10]]


def _print(**console_options) -> str:
    out = io.StringIO()
    print_rows(HEADERS, ROWS, console=Console(file=out, **console_options))
    return out.getvalue()


def test_a_pipe_gets_whole_lines():
    text = _print(width=80, force_terminal=False)
    assert "…" not in text
    lines = [line for line in text.splitlines() if "brain_tumors_ct_scan" in line]
    assert len(lines) == 1 and all(f"0.{i}712" in lines[0] for i in range(1, 11))


def test_a_narrow_terminal_gets_one_block_per_row():
    text = _print(width=80, force_terminal=True, color_system=None)
    assert "…" not in text and all(len(line) <= 80 for line in text.splitlines())
    assert "zone_acc_text 0.6712" in " ".join(text.split())  # each value beside its column's name
    assert "rougeL 0.8765" in " ".join(text.split())


def test_a_table_that_fits_is_a_table():
    out = io.StringIO()
    print_rows(["a", "b"], [["1", "2"]], console=Console(file=out, width=80, force_terminal=True, color_system=None))
    assert "┃" in out.getvalue() or "│" in out.getvalue()

