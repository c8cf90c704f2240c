"""The fault-injection suite (``make faults``): repeat counts from the environment, and the
summary of every trial, printed at the end and written to test-output/faults.json."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

REPORT_PATH = Path(__file__).resolve().parents[2] / "test-output" / "faults.json"
_TRIALS: dict[str, dict[str, Any]] = {}
_STARTED = time.monotonic()


def repeat_count(name: str, default: int) -> int:
    """``GPUMARKET_FAULTS_<NAME>``, else ``default`` (the issue's minimum)."""
    raw = os.environ.get(f"GPUMARKET_FAULTS_{name}", "")
    try:
        value = int(raw) if raw else default
    except ValueError:
        raise pytest.UsageError(f"GPUMARKET_FAULTS_{name}={raw!r} is not a whole number") from None
    if value < 1:
        raise pytest.UsageError(f"GPUMARKET_FAULTS_{name} must be at least 1")
    return value


class TrialReport:
    """What one trial injected and found; recorded once the trial's checks have passed."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.counts: dict[str, Any] = {}
        self._started = time.monotonic()

    def record(self, **counts: Any) -> None:
        self.counts.update(counts)
        _TRIALS[self.name] = {
            "duration_s": round(time.monotonic() - self._started, 1),
            **self.counts,
        }


@pytest.fixture
def trial_report(request: pytest.FixtureRequest) -> TrialReport:
    return TrialReport(request.node.name)


def pytest_sessionfinish(session: pytest.Session) -> None:
    if not _TRIALS:
        return
    summary = {
        "trials": _TRIALS,
        "passed": session.testsfailed == 0,
        "duration_s": round(time.monotonic() - _STARTED, 1),
    }
    REPORT_PATH.parent.mkdir(parents=True, exist_ok=True)
    REPORT_PATH.write_text(json.dumps(summary, indent=2) + "\n")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _TRIALS:
        return
    terminalreporter.section("fault trials")
    for name, counts in _TRIALS.items():
        figures = ", ".join(f"{k}={v}" for k, v in counts.items())
        terminalreporter.write_line(f"{name}: {figures}")
    terminalreporter.write_line(f"summary written to {REPORT_PATH}")
