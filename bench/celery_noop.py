"""The Celery side of ``bench.control_plane``: one no-op task on a Redis broker and backend.

The benchmark starts the worker as a child process::

    python -m celery -A bench.celery_noop worker --pool prefork --concurrency 2 -Q QUEUE

Celery is an optional extra (``pip install -e '.[bench]'``); nothing else imports this module.
The broker, the result backend and the queue come from the environment, so each run uses a
queue of its own on a shared Redis.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

REDIS_URL_ENV = "GPUMARKET_BENCH_REDIS_URL"
QUEUE_ENV = "GPUMARKET_BENCH_CELERY_QUEUE"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_QUEUE = "gpumarket-bench"
RESULT_TTL_S = 3600
NOOP_TASK = "gpumarket_bench.noop"

redis_url = os.environ.get(REDIS_URL_ENV, DEFAULT_REDIS_URL)
app = Celery("gpumarket_bench", broker=redis_url, backend=redis_url)
app.conf.update(
    task_default_queue=os.environ.get(QUEUE_ENV, DEFAULT_QUEUE),
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_expires=RESULT_TTL_S,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task(name=NOOP_TASK)
def noop(texts: list[str]) -> dict[str, Any]:
    """The same no-op as the gpumarket side: one zero "embedding" per text, no model run."""
    return {"embeddings": [[0.0] for _ in texts]}
