"""gpumarket.output: tables only where every cell fits whole, one record per line elsewhere;
and the demo's report through it, at 40, 80 and 200 columns."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from gpumarket import demo
from gpumarket.output import Column, print_fields, print_table, table_width

ADDRESS = "0x90F79bf6EB2c4f870365E785982E1f101E93b906"
WIDTHS = (40, 80, 200)
COLUMNS = (Column("account"), Column("before", right=True), Column("change", right=True))
ROWS = [[ADDRESS, "9999899936538932950555", "+5288918381353878"], ["payer", "1", "-1"]]


def _console(width: int, terminal: bool) -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    console = Console(file=out, width=width, force_terminal=terminal, soft_wrap=True)
    return console, out


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("terminal", [False, True])
def test_a_table_is_drawn_only_where_it_fits_else_one_line_per_row(
    width: int, terminal: bool
) -> None:
    console, out = _console(width, terminal)
    print_table(console, COLUMNS, ROWS, title="On chain")
    lines = [line for line in out.getvalue().splitlines() if line.strip()]
    drawn = terminal and table_width(COLUMNS, ROWS) <= width
    assert any("│" in line for line in lines) is drawn
    [row] = [line for line in lines if ADDRESS in line]  # the address whole, on one line
    assert "9999899936538932950555" in row
    if not drawn:
        assert lines == [
            "On chain:",
            f"account: {ADDRESS}  before: 9999899936538932950555  change: +5288918381353878",
            "account: payer  before: 1  change: -1",
        ]


@pytest.mark.parametrize("width", WIDTHS)
def test_fields_are_one_whole_line_each(width: int) -> None:
    console, out = _console(width, terminal=False)
    url = "http://127.0.0.1:58053/#token=gmo_demo_" + "ad" * 24
    print_fields(console, [("dashboard", url), ("chain RPC", "http://127.0.0.1:8545")])
    assert out.getvalue().splitlines() == [
        f"dashboard  {url}",
        "chain RPC  http://127.0.0.1:8545",
    ]


@pytest.mark.parametrize("width", WIDTHS)
def test_the_demo_money_report_never_folds_an_address(
    width: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    console, out = _console(width, terminal=False)
    monkeypatch.setattr(demo, "console", console)
    settled = {
        "pairs": [
            {
                "payer": "0x" + "3c" * 20,
                "payee": ADDRESS,
                "ledger_wei": 5,
                "voucher_wei": 5,
                "redeemed_wei": 5,
            },
        ],
        "ledger_entries": 1,
    }
    demo._report_money({ADDRESS: 10}, {ADDRESS: 15}, settled)
    text = out.getvalue()
    assert f"account: {ADDRESS}  before: 10  after: 15  change: +5" in text.splitlines()
    assert f"client -> worker {ADDRESS}: ledger 5 wei = voucher 5 = redeemed on chain 5" in text
