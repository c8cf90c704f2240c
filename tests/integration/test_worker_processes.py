"""Real processes end to end: an orchestrator and two workers over loopback HTTP, running
real MiniLM inference and real PyAV transcodes; then the worker daemon's drain on SIGTERM and
its survival of an orchestrator restart (with paced stand-in executors: the daemon is under
test there, not the model)."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterator
from pathlib import Path

import av
import pytest

from gpumarket import Client
from tests.integration.conftest import OrchestratorProcess, WorkerProcess, wait_for_workers
from tests.support import EMBED_MODEL
from worker.executors.transcode import make_test_clip

pytestmark = pytest.mark.slow

JOB_TIMEOUT_S = 120.0
PACED_JOB_S = 0.5


def _embed_job(text: str, **extra: object) -> dict[str, object]:
    return {
        "type": "inference",
        "model": EMBED_MODEL,
        "input": {"texts": [text]},
        "max_price_wei_per_unit": "1000000000",
        **extra,
    }


def _two_workers(
    tmp_path: Path, orchestrator: OrchestratorProcess, job_s: float | None
) -> Iterator[tuple[OrchestratorProcess, list[WorkerProcess]]]:
    """Two ``gpumarket worker run`` processes with 2 slots each: the real executors, or with
    ``job_s`` the paced stand-ins (the same daemon, no model load)."""
    workers = [
        WorkerProcess(tmp_path / f"w{i}", orchestrator.url, "--max-concurrency", "2")
        for i in range(2)
    ]
    if job_s is not None:
        workers = [w.paced(job_s) for w in workers]
    for w in workers:
        w.start()
    try:
        wait_for_workers(orchestrator, 2)
        yield orchestrator, workers
    finally:
        for w in workers:
            w.stop()


@pytest.fixture
def stack(
    tmp_path: Path, orchestrator_process: OrchestratorProcess
) -> Iterator[tuple[OrchestratorProcess, list[WorkerProcess]]]:
    """Real workers: MiniLM and PyAV."""
    yield from _two_workers(tmp_path, orchestrator_process, None)


@pytest.fixture
def paced_stack(
    tmp_path: Path, orchestrator_process: OrchestratorProcess
) -> Iterator[tuple[OrchestratorProcess, list[WorkerProcess]]]:
    """Workers whose jobs take PACED_JOB_S each: what is under test is the daemon (drain,
    reconnection), not the model."""
    yield from _two_workers(tmp_path, orchestrator_process, PACED_JOB_S)


def test_two_workers_run_inference_and_transcode(stack, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    proc, _workers = stack
    with Client(proc.url, proc.new_client_key()) as client:
        texts = ["a cat sits on the mat", "a kitten rests on a rug", "stock markets fell today"]
        ids = [client.submit(_embed_job(t))["id"] for t in texts for _ in range(3)]
        clip = make_test_clip(tmp_path / "clip.mp4", width=640, height=360, frames=24)
        blob = client.upload_blob(clip)
        ladder = [
            {"name": "360p", "height": 360, "bitrate_kbps": 800},
            {"name": "240p", "height": 240, "bitrate_kbps": 400, "fps": 12},
        ]
        transcode = client.submit(
            {
                "type": "transcode",
                "input_blob": blob,
                "renditions": ladder,
                "container": "mpegts",
                "max_price_wei_per_unit": "1000",
            }
        )
        results = [client.wait(job_id, JOB_TIMEOUT_S) for job_id in ids]
        vectors = [r["output"]["embeddings"][0] for r in results]
        for v in vectors:
            assert len(v) == 384
            assert math.isclose(sum(x * x for x in v), 1.0, rel_tol=1e-4)

        def cos(a: list[float], b: list[float]) -> float:
            return sum(x * y for x, y in zip(a, b, strict=True))

        # Same text on any worker: the same embedding. Similar texts are closer than unrelated.
        assert cos(vectors[0], vectors[1]) > 0.9999 and cos(vectors[0], vectors[2]) > 0.9999
        assert cos(vectors[0], vectors[3]) > cos(vectors[0], vectors[6]) + 0.2
        assert len({r["worker_address"] for r in results}) == 2  # both workers got work

        result = client.wait(transcode["id"], JOB_TIMEOUT_S)
        outputs = {b["name"]: b for b in result["output_blobs"]}
        assert set(outputs) == {"360p", "240p"}
        pixels = 0
        for name, height, frames in (("360p", 360, 24), ("240p", 240, 12)):
            path = client.download_blob(outputs[name]["sha256"], tmp_path / f"{name}.ts")
            with av.open(str(path)) as container:
                decoded = list(container.decode(video=0))
            assert len(decoded) == frames
            assert decoded[0].height == height
            pixels += decoded[0].width * decoded[0].height * len(decoded)
        assert result["units"] == pixels
        assert result["cost_wei"] == str(1000 * pixels)  # the workers ask 1000 wei per pixel


def test_sigterm_drains_then_deregisters(
    paced_stack: tuple[OrchestratorProcess, list[WorkerProcess]],
) -> None:
    proc, workers = paced_stack
    with Client(proc.url, proc.new_client_key()) as client:
        # Enough work that both workers are busy when the signal lands.
        ids = [client.submit(_embed_job(f"sentence {i} " * 40))["id"] for i in range(12)]
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while not any(client.get(i)["state"] == "running" for i in ids):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        workers[0].terminate()
        assert workers[0].wait(60) == 0
        log = workers[0].log()
        assert "deregistered" in log
        # The operator's view of it, into a file: models loaded, a line per job, a summary.
        assert "models loaded in " in log
        done = re.findall(r"job \S+: done, 1 unit\(s\) in ", log)
        summary = re.search(r"worker (0x[0-9a-fA-F]{40}) stopped: (\d+) job\(s\) done", log)
        assert summary and int(summary[2]) == len(done) > 0, log
        assert re.search(rf"worker {summary[1]}: \d+ done, 0 failed, running \d+/\d+", log)
        for job_id in ids:  # nothing lost: the other worker finishes whatever remained
            assert client.wait(job_id, JOB_TIMEOUT_S)["units"] == 1
    with proc.operator() as http:
        listed = http.get("/v1/workers", params={"include_deregistered": True}).json()
    assert sorted(w["status"] for w in listed)[0] == "deregistered"


def test_workers_survive_an_orchestrator_restart(
    paced_stack: tuple[OrchestratorProcess, list[WorkerProcess]],
) -> None:
    proc, workers = paced_stack
    key = proc.new_client_key()
    with Client(proc.url, key) as client:
        assert client.wait(client.submit(_embed_job("before"))["id"], JOB_TIMEOUT_S)
    proc.kill()
    time.sleep(1.5)  # the workers see connection errors and back off
    proc.start()
    with Client(proc.url, key) as client:
        ids = [client.submit(_embed_job(f"after {i}"))["id"] for i in range(4)]
        for job_id in ids:
            assert client.wait(job_id, JOB_TIMEOUT_S)["units"] == 1
    assert all(w.proc is not None and w.proc.poll() is None for w in workers)
