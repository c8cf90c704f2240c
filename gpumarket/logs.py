"""Process logging for ``gpumarket orchestrator serve`` and ``gpumarket worker run``.

Two formats: ``text`` (one human-readable line) and ``json`` (one JSON object per line, for
Loki, Elasticsearch, CloudWatch and the like). A JSON line carries ``ts`` (ISO 8601, UTC),
``level``, ``logger`` and ``message``, then every field the call passed in ``extra`` as a
top-level key, so a line about a job has ``job_id`` (and ``worker_id`` where known)::

    log.info("job %s: stopped", job_id, extra={"job_id": job_id, "worker_id": worker_id})
    {"ts": "2026-05-01T12:00:00.123Z", "level": "info", "logger": "gpumarket.worker",
     "message": "job 3f..: stopped", "job_id": "3f..", "worker_id": "9a.."}

Fields whose value is None are left out; values JSON cannot hold are written as ``str()``.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from json import dumps
from typing import Any, Literal

__all__ = ["LOG_FORMATS", "TEXT_FORMAT", "JsonFormatter", "LogFormat", "configure_logging"]

LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Attributes every LogRecord has; anything else on a record came from ``extra``. uvicorn's
# ``color_message`` (the message again, with terminal colour codes) is left out too.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", logging.INFO, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",
}
_OURS = "_gpumarket_handler"


def _utc_iso(unix_s: float) -> str:
    """``2026-05-01T12:00:00.123Z``: milliseconds, UTC."""
    return datetime.fromtimestamp(unix_s, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module docstring for its fields)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": _utc_iso(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRS and not key.startswith("_") and value is not None:
                line.setdefault(key, value)
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack_info"] = self.formatStack(record.stack_info)
        return dumps(line, default=str, ensure_ascii=False)


def configure_logging(level: str, json: bool) -> logging.Handler:
    """Log to stderr at ``level`` (debug|info|warning|error), as JSON lines when ``json``.

    Replaces the handler an earlier call installed and leaves other handlers alone, so calling
    it twice does not print every line twice. Returns the handler it installed.
    """
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if json else logging.Formatter(TEXT_FORMAT))
    setattr(handler, _OURS, True)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _OURS, False)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level.upper())
    return handler
