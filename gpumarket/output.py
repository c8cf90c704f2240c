"""Output people read: consoles and tables that never cut or fold an id, URL or command.

Every line the CLI prints goes through a console made here. ``soft_wrap`` means Rich never
inserts a line break of its own: a long line stays one line (the terminal may wrap it on
screen, a pipe or a file gets it whole), so a pasted command or a grepped id is intact.

A table is drawn as a table only on a terminal wide enough for every cell whole. Narrower, or
into a pipe or file, each row becomes one line of ``name: value`` fields, so nothing is cut
and a script can read it::

    id: 3f2a...  type: inference  model: all-MiniLM-L6-v2  state: succeeded
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

__all__ = ["Column", "FIELD_SEPARATOR", "err_console", "out_console", "print_fields", "print_table"]

FIELD_SEPARATOR = "  "
# A Rich table with the default box draws "│ " before, " " after each cell and one "│" at the end.
TABLE_BORDER_PER_COLUMN = 3
TABLE_BORDER_END = 1


def out_console() -> Console:
    """stdout: no hard wraps, no guessed highlighting."""
    return Console(highlight=False, soft_wrap=True)


def err_console() -> Console:
    """stderr: no hard wraps, no guessed highlighting."""
    return Console(stderr=True, highlight=False, soft_wrap=True)


@dataclass(frozen=True)
class Column:
    name: str
    right: bool = False  # numbers: right-aligned in a drawn table


def table_width(columns: Sequence[Column], rows: Sequence[Sequence[str]]) -> int:
    """Characters a boxed table needs to show every header and cell whole."""
    widths = [len(c.name) for c in columns]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    return sum(widths) + TABLE_BORDER_PER_COLUMN * len(columns) + TABLE_BORDER_END


def record_line(columns: Sequence[Column], row: Sequence[str]) -> str:
    """One row as ``name: value`` fields on one line."""
    return FIELD_SEPARATOR.join(f"{c.name}: {v}" for c, v in zip(columns, row, strict=True))


def print_table(
    console: Console,
    columns: Sequence[Column],
    rows: Sequence[Sequence[str]],
    title: str | None = None,
) -> None:
    """A table on a terminal wide enough for every cell whole; else one line per row."""
    fits = console.is_terminal and table_width(columns, rows) <= console.width
    if fits:
        table = Table(title=title)
        for column in columns:
            table.add_column(column.name, no_wrap=True, justify="right" if column.right else "left")
        for row in rows:
            table.add_row(*row)
        console.print(table, soft_wrap=False)  # it fits: nothing is cut
        return
    if title:
        console.print(f"{title}:", markup=False, highlight=False)
    for row in rows:
        console.print(record_line(columns, row), markup=False, highlight=False)


def print_fields(console: Console, fields: Sequence[tuple[str, str]]) -> None:
    """One ``name  value`` line per field, names padded to one width; values never cut."""
    if not fields:
        return
    pad = max(len(name) for name, _ in fields)
    for name, value in fields:
        console.print(f"{name.ljust(pad)}  {value}", markup=False, highlight=False)
