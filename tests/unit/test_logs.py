"""Structured logging: JSON lines with the job's id as a field, and the text format."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from gpumarket.logs import JsonFormatter, configure_logging

JOB_ID = "3f2a9c0d4b5e4f6a8b7c9d0e1f2a3b4c"
WORKER_ID = "9a8b7c6d5e4f40312a1b0c9d8e7f6a5b"


@pytest.fixture
def root_logging() -> Iterator[logging.Logger]:
    """The root logger, its handlers and level put back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield root
    for handler in root.handlers:
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)


def json_lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line]


def test_json_lines_carry_job_and_worker_ids_as_fields(
    root_logging: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("info", json=True)
    log = logging.getLogger("gpumarket.worker")
    before = datetime.now().timestamp()
    log.warning(
        "job %s: final failure: %s",
        JOB_ID,
        "bad input",
        extra={"job_id": JOB_ID, "attempt": 2, "worker_id": WORKER_ID},
    )
    log.debug("below the level: not written", extra={"job_id": JOB_ID})
    log.info("registered", extra={"worker_id": None, "path": Path("/tmp/x")})

    first, second = json_lines(capsys.readouterr().err)
    assert first == {
        "ts": first["ts"],
        "level": "warning",
        "logger": "gpumarket.worker",
        "message": f"job {JOB_ID}: final failure: bad input",
        "job_id": JOB_ID,
        "attempt": 2,
        "worker_id": WORKER_ID,
    }
    assert isinstance(first["ts"], str) and first["ts"].endswith("Z")
    when = datetime.fromisoformat(first["ts"]).timestamp()
    assert before - 0.002 <= when <= datetime.now().timestamp()
    # None fields are left out; what JSON cannot hold is written as text
    assert second == {
        "ts": second["ts"],
        "level": "info",
        "logger": "gpumarket.worker",
        "message": "registered",
        "path": "/tmp/x",
    }


def test_json_lines_carry_the_traceback(
    root_logging: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("debug", json=True)
    try:
        raise RuntimeError("CUDA error: an illegal memory access")
    except RuntimeError:
        logging.getLogger("gpumarket.worker").exception(
            "job %s: failed", JOB_ID, extra={"job_id": JOB_ID}
        )
    (line,) = json_lines(capsys.readouterr().err)
    assert line["level"] == "error" and line["job_id"] == JOB_ID
    assert isinstance(line["exc_info"], str)
    assert "Traceback" in line["exc_info"] and "illegal memory access" in line["exc_info"]


def test_configuring_again_replaces_the_handler_and_text_is_one_plain_line(
    root_logging: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    others = list(root_logging.handlers)  # pytest's own: left alone
    configure_logging("info", json=True)
    handler = configure_logging("warning", json=False)
    assert [h for h in root_logging.handlers if h not in others] == [handler]
    assert root_logging.level == logging.WARNING

    log = logging.getLogger("gpumarket.orchestrator")
    log.info("not shown at warning")
    log.warning("job %s: lease expired", JOB_ID, extra={"job_id": JOB_ID})
    (line,) = capsys.readouterr().err.splitlines()
    assert line.endswith(f" WARNING gpumarket.orchestrator: job {JOB_ID}: lease expired")
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)


def test_formatter_keeps_reserved_fields_from_being_overwritten() -> None:
    record = logging.LogRecord("gpumarket.x", logging.INFO, __file__, 1, "hello %s", ("you",), None)
    record.job_id = JOB_ID
    record.level = "spoofed"  # an extra that collides with one of ours loses
    record.color_message = "hello \x1b[36m%s\x1b[0m"  # uvicorn's: the message in colour
    line = json.loads(JsonFormatter().format(record))
    assert line["level"] == "info" and line["message"] == "hello you"
    assert line["job_id"] == JOB_ID
    assert "color_message" not in line
