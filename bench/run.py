"""Every benchmark in one run, as one table: ``make bench``.

    python -m bench.run [--quick] [--json OUT] [--only a,c,...]

Sections, as in issue #7 (each a module exposing ``measure(quick) -> list[bench.table.Row]``):

    a  bench.marketplace       embedding jobs through REST -> orchestrator -> worker vs bare torch
    b  bench.control_plane     no-op jobs/s on SQLite and PostgreSQL vs Celery + Redis
    c  bench.dispatch_latency  submit -> running p50 / p99 at a fixed moderate rate
    d  bench.transcode         PyAV vs the ffmpeg CLI
    e  bench.settlement_gas    gas per job, cumulative vouchers vs one escrow release per job
    f  bench.scale             orchestrator CPU and memory with 1,000 and 10,000 workers
    g  bench.replicas          1-3 orchestrator replicas on PostgreSQL: cross-replica dispatch
                               p99 and orchestrator CPU per job
    h  bench.generation        LLM tokens/s through the market vs bare transformers, batched
                               vs sequential, time to first token, verification cost

Sections run one after another, never side by side, so none measures another's load. A
section that is missing or fails becomes one row with no value and the error in its note; the
others still run, and the exit status is 1. (A row a section itself reports without a value,
say for a database that is not there, is its own finding: it does not fail the run.)
``--quick`` shrinks every size for a smoke run: its figures are not the ones to quote. The
JSON holds the rows and the machine they were measured on. What each row measures, and the
latest full table: docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.table import Row

SECTIONS: dict[str, tuple[str, str]] = {
    "a": ("bench.marketplace", "marketplace overhead"),
    "b": ("bench.control_plane", "control plane"),
    "c": ("bench.dispatch_latency", "dispatch latency"),
    "d": ("bench.transcode", "transcoding"),
    "e": ("bench.settlement_gas", "settlement gas"),
    "f": ("bench.scale", "scale"),
    "g": ("bench.replicas", "replicas"),
    "h": ("bench.generation", "generation"),
}
GIT_TIMEOUT_S = 5.0
MISSING = "-"
WIDE_OUTPUT_COLUMNS = 200


# ---- running ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SectionResult:
    """A section's rows; ``error`` when it is missing, raised, or returned no rows (then
    ``rows`` is one row with no value and the error in its note)."""

    rows: list[Row]
    error: str | None = None


def _failed(section: str, error: str) -> SectionResult:
    module, title = SECTIONS[section]
    row = Row(section=section, name=f"{title} ({module})", value=None, unit="", note=error)
    return SectionResult([row], error)


def run_section(section: str, quick: bool) -> SectionResult:
    """Import the section's module lazily and measure; never raises (see SectionResult)."""
    module_name, _ = SECTIONS[section]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            return _failed(section, f"not measured: {module_name} does not exist yet")
        return _failed(section, f"cannot import {module_name}: {exc}")
    except Exception as exc:
        return _failed(section, f"cannot import {module_name}: {exc.__class__.__name__}: {exc}")
    try:
        rows = list(module.measure(quick))
    except Exception as exc:  # one broken benchmark must not lose the others' figures
        return _failed(section, f"failed: {exc.__class__.__name__}: {exc}")
    if not rows or not all(isinstance(row, Row) for row in rows):
        return _failed(section, f"failed: {module_name}.measure returned no list of Rows")
    return SectionResult(rows)


def parse_sections(only: str | None) -> list[str]:
    """``"a,c"`` -> ``["a", "c"]`` in table order; None -> every section."""
    if only is None:
        return list(SECTIONS)
    wanted = {part.strip().lower() for part in only.split(",") if part.strip()}
    unknown = sorted(wanted - set(SECTIONS))
    if unknown or not wanted:
        raise ValueError(
            f"unknown section(s) {', '.join(unknown) or '(none given)'}; "
            f"choose from {', '.join(SECTIONS)}"
        )
    return [section for section in SECTIONS if section in wanted]


# ---- the machine ------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_mib() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except (OSError, ValueError):
        pass
    return None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    """The checked-out commit, with "+dirty" when the tree has changes (read-only git)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=GIT_TIMEOUT_S,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=GIT_TIMEOUT_S,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def machine_facts() -> dict[str, Any]:
    """What the figures were measured on. ``load_average`` is the 1/5/15-minute load when
    the run started: other work on a shared machine lowers every throughput figure."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "usable_cores": usable,
        "memory_mib": _memory_mib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "commit": _git_commit(),
    }


# ---- output -----------------------------------------------------------------------------------


def format_number(value: float) -> str:
    """Three significant figures at most, thousands separated: 0.0123, 4.56, 78.9, 1,234."""
    size = abs(value)
    if size >= 100:
        return f"{value:,.0f}"
    if size >= 10:
        return f"{value:.1f}"
    if size >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def format_value(value: float | None, unit: str) -> str:
    if value is None:
        return MISSING
    return f"{format_number(value)} {unit}".strip()


def format_baseline(row: Row) -> str:
    if row.baseline_value is None:
        return row.baseline_name or MISSING
    number = format_number(row.baseline_value)
    return f"{row.baseline_name}: {number}" if row.baseline_name else number


def format_met(met: bool | None) -> str:
    return MISSING if met is None else ("yes" if met else "NO")


def table_cells(row: Row) -> tuple[str, ...]:
    """One table line: section, figure, value, baseline, ratio, goal, met."""
    return (
        row.section,
        row.name,
        format_value(row.value, row.unit),
        format_baseline(row),
        MISSING if row.ratio is None else format_number(row.ratio),
        row.goal or MISSING,
        format_met(row.met),
    )


HEADERS = ("", "figure", "value", "baseline", "ratio", "goal", "met")


def render_table(rows: Sequence[Row], title: str) -> Table:
    table = Table(title=title, title_justify="left", show_lines=False)
    for header in HEADERS:
        if header in ("value", "ratio"):
            table.add_column(header, justify="right", overflow="fold")
        else:
            table.add_column(header, overflow="fold")
    for row in rows:
        table.add_row(*table_cells(row))
    return table


def notes(rows: Sequence[Row]) -> list[str]:
    return [f"({row.section}) {row.name}: {row.note}" for row in rows if row.note]


def report_json(
    rows: Sequence[Row],
    machine: dict[str, Any],
    *,
    quick: bool,
    wall_s: float,
    sections: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """The run as JSON: the machine, each section's time and the load average when it
    started (other work on the machine), and the rows."""
    return {
        "machine": machine,
        "quick": quick,
        "wall_s": round(wall_s, 1),
        "sections": list(sections),
        "rows": [row.as_json() for row in rows],
    }


def _title(machine: dict[str, Any], quick: bool) -> str:
    size = "QUICK (smoke sizes, not for quoting)" if quick else "full"
    return (
        f"gpumarket benchmarks, {size} run, {machine['date']}: {machine['cpu_model']}, "
        f"{machine['usable_cores']} cores, Python {machine['python']}, torch {machine['torch']}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the results here")
    parser.add_argument("--only", metavar="a,c,...", help="run only these sections")
    args = parser.parse_args(argv)
    try:
        sections = parse_sections(args.only)
    except ValueError as exc:
        parser.error(str(exc))
    console = Console()
    if not console.is_terminal:  # a log or a pipe: wide enough that rows stay on one line
        console = Console(width=WIDE_OUTPUT_COLUMNS)
    progress = Console(stderr=True)
    machine = machine_facts()
    started = time.monotonic()
    rows: list[Row] = []
    failed: list[str] = []
    timings: list[dict[str, Any]] = []
    for section in sections:
        module_name, title = SECTIONS[section]
        progress.print(f"[bold]({section}) {title}[/bold]: {module_name} ...", highlight=False)
        began = time.monotonic()
        load = [round(x, 2) for x in os.getloadavg()]
        found = run_section(section, args.quick)
        rows += found.rows
        if found.error is not None:
            failed.append(section)
        section_s = round(time.monotonic() - began, 1)
        timings.append({"section": section, "wall_s": section_s, "load_average_at_start": load})
        progress.print(f"({section}) done in {section_s:.0f} s", highlight=False)
    wall_s = time.monotonic() - started
    console.print(render_table(rows, _title(machine, args.quick)))
    for line in notes(rows):
        console.print(line, highlight=False, markup=False)
    if args.json is not None:
        document = report_json(rows, machine, quick=args.quick, wall_s=wall_s, sections=timings)
        args.json.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        console.print(f"wrote {args.json}", highlight=False)
    if failed:
        console.print(f"sections that failed: {', '.join(failed)}", highlight=False)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
