"""`gpumarket up` refuses, before starting anything, options that would fail half-way."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from gpumarket.cli import app


def test_a_data_dir_with_state_in_it_is_refused_with_the_fix(tmp_path: Path) -> None:
    used = tmp_path / "state"
    used.mkdir()
    (used / "orchestrator.db").write_text("from an earlier chain")
    refused = CliRunner().invoke(app, ["up", "--data-dir", str(used)], env={"COLUMNS": "40"})
    assert refused.exit_code == 2
    [line] = refused.stderr.splitlines()
    assert line == (
        f"gpumarket up: --data-dir {used}: not empty (state from an earlier chain would not "
        "match the new one); give a new or empty folder"
    )


def test_one_port_for_both_is_refused() -> None:
    refused = CliRunner().invoke(app, ["up", "--port", "18999", "--chain-port", "18999"])
    assert refused.exit_code == 2
    assert "--port and --chain-port must differ" in refused.stderr
