"""bench.settlement_gas at small N against a real anvil: the shape of its results, not their
size (no assertion on absolute gas or on time)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.settlement_gas import Report, main, run_bench
from contracts.anvil import AnvilNotInstalled, anvil_binary

pytestmark = pytest.mark.slow  # starts anvil and node (solc)

ROW_KEYS = {
    "label",
    "workers",
    "jobs_per_worker",
    "jobs",
    "voucher_first_redeem_gas",
    "voucher_repeat_redeem_gas",
    "voucher_first_gas_per_job",
    "voucher_repeat_gas_per_job",
    "escrow_total_gas",
    "escrow_gas_per_job",
    "escrow_over_voucher_first",
    "escrow_over_voucher_repeat",
}
REPORT_KEYS = {
    "anvil_version",
    "evm_hardfork",
    "solc_version",
    "optimizer_runs",
    "fee_bps",
    "price_wei_per_job",
    "wall_s",
    "rows",
}


@pytest.fixture(scope="module")
def report() -> Report:
    try:
        anvil_binary()
    except AnvilNotInstalled as exc:
        pytest.fail(f"{exc} (make install does this)")
    return run_bench((1, 3), batch_workers=2, batch_jobs_per_worker=2)


def test_every_gas_figure_is_positive(report: Report) -> None:
    assert [row.label for row in report.rows] == ["1", "3", "2 x 2 (batch)"]
    for row in report.rows:
        assert row.voucher_first_redeem_gas > 0
        assert row.voucher_repeat_redeem_gas > 0
        assert row.escrow_total_gas > 0
        assert row.escrow_gas_per_job > 0


def test_voucher_gas_per_job_falls_as_jobs_per_redemption_grow(report: Report) -> None:
    one, three = report.rows[0], report.rows[1]
    assert three.voucher_first_gas_per_job < one.voucher_first_gas_per_job
    assert three.voucher_repeat_gas_per_job < one.voucher_repeat_gas_per_job
    assert three.escrow_over_voucher_repeat > one.escrow_over_voucher_repeat


def test_json_has_the_expected_keys(report: Report) -> None:
    document = json.loads(json.dumps(report.as_json()))
    assert set(document) == REPORT_KEYS
    assert len(document["rows"]) == len(report.rows)
    for row in document["rows"]:
        assert set(row) == ROW_KEYS
    batch = document["rows"][-1]
    assert (batch["workers"], batch["jobs_per_worker"], batch["jobs"]) == (2, 2, 4)


def test_table_has_one_line_per_row(report: Report) -> None:
    table = report.table()
    for row in report.rows:
        assert any(line.startswith(row.label) for line in table.splitlines())


def test_main_writes_json(
    report: Report,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr("bench.settlement_gas.run_bench", lambda: report)
    out = tmp_path / "gas.json"
    assert main(["--json", str(out)]) == 0
    assert json.loads(out.read_text()) == json.loads(json.dumps(report.as_json()))
    assert "escrow gas/job" in capsys.readouterr().out
