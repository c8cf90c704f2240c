"""bench.run: the one table and its JSON, on synthetic rows; a missing or failing section
becomes a row with the error; one real section as a smoke run (no assertion on its figures)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
from rich.console import Console

from bench import run
from bench.stats import percentile
from bench.table import Row

ROWS = [
    Row(
        section="a",
        name="synthetic throughput",
        value=123.456,
        unit="jobs/s",
        baseline_name="bare, sentences/s",
        baseline_value=400.0,
        ratio=123.456 / 400.0,
        goal="ratio >= 0.9",
        met=False,
        note="measured on nothing",
    ),
    Row(section="c", name="synthetic latency", value=7.25, unit="ms", goal="<= 25 ms", met=True),
    Row(section="d", name="not there", value=None, unit="", note="does not exist yet"),
]


def _text(rows: list[Row]) -> str:
    console = Console(record=True, width=200)
    console.print(run.render_table(rows, "title"))
    return console.export_text()


@pytest.mark.parametrize(
    ("value", "shown"),
    [(0.012345, "0.0123"), (4.567, "4.57"), (78.94, "78.9"), (1234.5, "1,234"), (-2.0, "-2.00")],
)
def test_numbers_keep_three_significant_figures(value: float, shown: str) -> None:
    assert run.format_number(value) == shown


def test_cells_show_value_with_unit_baseline_ratio_goal_and_verdict() -> None:
    assert run.table_cells(ROWS[0]) == (
        "a",
        "synthetic throughput",
        "123 jobs/s",
        "bare, sentences/s: 400",
        "0.309",
        "ratio >= 0.9",
        "NO",
    )
    assert run.table_cells(ROWS[1])[2:] == ("7.25 ms", "-", "-", "<= 25 ms", "yes")
    assert run.table_cells(ROWS[2])[2:] == ("-", "-", "-", "-", "-")


def test_table_has_one_line_per_row() -> None:
    text = _text(ROWS)
    for row in ROWS:
        assert row.name in text
    assert "123 jobs/s" in text and "7.25 ms" in text


def test_notes_name_their_row() -> None:
    assert run.notes(ROWS) == [
        "(a) synthetic throughput: measured on nothing",
        "(d) not there: does not exist yet",
    ]


def test_json_holds_rows_and_machine() -> None:
    machine = run.machine_facts()
    document = json.loads(json.dumps(run.report_json(ROWS, machine, quick=True, wall_s=1.23)))
    assert document["quick"] is True
    assert document["rows"] == [row.as_json() for row in ROWS]
    for key in ("cpu_model", "cpu_cores", "python", "torch", "date", "load_average"):
        assert key in document["machine"]


def test_sections_parse_in_table_order() -> None:
    assert run.parse_sections(None) == list("abcdefgh")
    assert run.parse_sections("f, a,c") == ["a", "c", "f"]
    with pytest.raises(ValueError, match="unknown section"):
        run.parse_sections("a,z")


@pytest.fixture
def fake_section(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """Section "a" points at an in-memory module whose ``measure`` the test sets."""
    module = types.ModuleType("bench_fake_section")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(run.SECTIONS, "a", (module.__name__, "fake"))
    return module


def test_a_missing_module_becomes_a_row(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(run.SECTIONS, "d", ("bench.no_such_benchmark", "missing"))
    result = run.run_section("d", quick=True)
    (row,) = result.rows
    assert row.section == "d" and row.value is None and row.met is None
    assert "bench.no_such_benchmark does not exist" in row.note
    assert result.error == row.note


def test_a_failing_section_becomes_a_row(fake_section: types.ModuleType) -> None:
    def measure(quick: bool) -> list[Row]:
        raise RuntimeError("boom")

    fake_section.measure = measure  # type: ignore[attr-defined]
    result = run.run_section("a", quick=True)
    (row,) = result.rows
    assert row.value is None and row.note == "failed: RuntimeError: boom"
    assert result.error is not None


def test_main_prints_the_table_and_writes_json(
    fake_section: types.ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: list[bool] = []

    def measure(quick: bool) -> list[Row]:
        seen.append(quick)
        return ROWS[:2]

    fake_section.measure = measure  # type: ignore[attr-defined]
    out = tmp_path / "bench.json"
    assert run.main(["--quick", "--only", "a", "--json", str(out)]) == 0
    assert seen == [True]
    printed = capsys.readouterr().out
    assert "synthetic throughput" in printed and "measured on nothing" in printed
    assert json.loads(out.read_text())["rows"] == [row.as_json() for row in ROWS[:2]]


def test_main_fails_when_a_section_fails(
    fake_section: types.ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_section.measure = lambda quick: []  # type: ignore[attr-defined]
    assert run.main(["--only", "a"]) == 1
    assert "returned no list of Rows" in capsys.readouterr().out


def test_a_row_reported_without_value_does_not_fail_the_run(
    fake_section: types.ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_section.measure = lambda quick: [ROWS[2]]  # type: ignore[attr-defined]
    assert run.main(["--only", "a"]) == 0
    assert "does not exist yet" in capsys.readouterr().out


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile([3.0, 1.0, 2.0], 100) == 3.0
    with pytest.raises(ValueError):
        percentile([], 50)


@pytest.mark.slow  # starts an orchestrator process
def test_scale_section_smoke_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    assert run.main(["--quick", "--only", "f", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {row["section"] for row in rows} == {"f"}
    assert all(row["value"] is not None and row["value"] > 0 for row in rows)
    assert "heartbeat" in capsys.readouterr().out
