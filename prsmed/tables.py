"""Tables on the command line that stay whole: at any terminal width and in a pipe, no cell is cut to ``0.8…``.

A table that fits the terminal is printed as a table. Written to a pipe or a file, it is printed as wide as it
needs (one line per row, as a program or a log reads it). On a terminal too narrow for it, each row becomes a block
of ``column value`` pairs that wrap at spaces. ``--json`` stays the machine format of every command.
"""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text


def print_rows(headers: Sequence[str], rows: Sequence[Sequence[str]], *, title: str | None = None,
               console: Console | None = None) -> None:
    console = console or Console()
    table = Table(*headers, title=title)
    for row in rows:
        table.add_row(*row)
    needed = Measurement.get(console, console.options.update(width=10_000), table).maximum
    if needed <= console.width:
        console.print(table)
    elif not console.is_terminal:
        wide = Console(file=console.file, width=needed, color_system=console.color_system, no_color=console.no_color,
                       force_terminal=False)
        wide.print(table)
    else:
        if title:
            console.print(title, style="bold", highlight=False)
        for row in rows:
            line = Text()
            line.append(Text.from_markup(str(row[0]), style="bold"))
            for header, cell in zip(headers[1:], row[1:]):
                line.append("   ")
                line.append(f"{header} ", style="dim")
                line.append(Text.from_markup(str(cell)))
            console.print(line, highlight=False)
