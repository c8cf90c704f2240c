"""`gpumarket ... --help`: every option says its default, and nothing is eaten as markup."""

from __future__ import annotations

import re

import pytest
import typer
from typer.testing import CliRunner

from gpumarket.cli import _parse_prompt_prices, app
from orchestrator.config import Settings
from protocol import JobType
from worker.config import DEFAULT_PRICES_WEI, WorkerSettings

COMMANDS = [
    ["orchestrator", "serve"],
    ["orchestrator", "create-client"],
    ["worker", "run"],
    ["up"],
    ["chain", "up"],
    ["chain", "fund"],
    ["job", "submit"],
]


def _help(*command: str) -> str:
    shown = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    return " ".join(shown.output.split())


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_no_help_text_has_a_hole_where_markup_was_eaten(command: list[str]) -> None:
    text = _help(*command)
    assert not re.search(r"\w \.(?![\w/])", text), text  # "TCP port ." once "[env ...]" was eaten


def test_orchestrator_and_worker_options_say_their_defaults() -> None:
    serve = _help("orchestrator", "serve")
    defaults = Settings()
    assert f"(default {defaults.port}; env GPUMARKET_PORT)" in serve
    assert f"(default {defaults.host}; env GPUMARKET_HOST)" in serve
    assert f"(default {defaults.data_dir}; env GPUMARKET_DATA_DIR)" in serve

    worker = _help("worker", "run")
    settings = WorkerSettings()
    assert f"(default {settings.orchestrator_url}; env" in worker
    assert f"(default {settings.max_concurrency})" in worker
    assert f"(default {settings.key_file})" in worker
    assert f"inference={DEFAULT_PRICES_WEI['inference']} per text" in worker
    assert f"transcode={DEFAULT_PRICES_WEI['transcode']} per output pixel" in worker
    assert f"(default {settings.redeem_interval_s:g};" in worker


def test_a_prompt_price_is_offered_for_generate_models_only() -> None:
    assert "the generate price, as for a completion token)" in _help("worker", "run")
    assert _parse_prompt_prices(["5", "SmolLM2-135M-Instruct=3"]) == {
        "generate": 5,
        "SmolLM2-135M-Instruct": 3,
    }
    for bad in ("x", "m=", "=5", "m=0", "m=-1"):
        with pytest.raises(typer.Exit):
            _parse_prompt_prices([bad])
    settings = WorkerSettings(prompt_prices_wei={"generate": 5, "SmolLM2-135M-Instruct": 3})
    assert settings.prompt_price_for(JobType.GENERATE, "SmolLM2-135M-Instruct") == 3
    assert settings.prompt_price_for(JobType.GENERATE, "other") == 5
    assert settings.prompt_price_for(JobType.INFERENCE, "all-MiniLM-L6-v2") is None
    assert WorkerSettings().prompt_price_for(JobType.GENERATE, "other") is None  # = the price
