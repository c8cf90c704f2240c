"""The one results table every benchmark feeds: a measured figure beside a baseline measured in
the same run, their ratio, and the goal it is held to.

A benchmark module exposes ``measure(quick: bool) -> list[Row]``; ``bench.run`` calls them all,
prints one table and writes it as JSON. ``quick`` shrinks sizes for a smoke run (the unit
tests); the figures in docs/PERFORMANCE.md come from full runs.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Row:
    """One measured figure. ``ratio`` is value / baseline_value, oriented so that the goal
    reads as written (e.g. "ratio >= 0.9" for throughput, "value <= 25" for a latency in ms).
    ``met`` is None when the row has no goal or could not be measured (see ``note``)."""

    section: str  # "a" .. "f", as in the list
    name: str
    value: float | None
    unit: str
    baseline_name: str = ""
    baseline_value: float | None = None
    ratio: float | None = None
    goal: str = ""
    met: bool | None = None
    note: str = ""

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def ratio(value: float | None, baseline: float | None) -> float | None:
    if value is None or baseline is None or baseline == 0:
        return None
    return value / baseline


def section_main(
    prog: str, doc: str | None, measure: Callable[[bool], list[Row]], argv: Sequence[str] | None
) -> int:
    """``python -m bench.<section> [--quick]``: run one section, print its rows as JSON lines."""
    parser = argparse.ArgumentParser(
        prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    args = parser.parse_args(argv)
    for row in measure(args.quick):
        print(json.dumps(row.as_json()))
    return 0
