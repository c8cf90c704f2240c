"""Trial: the orchestrator's blob disk fills up, then space frees, several times.

The blob folder is a small tmpfs of its own, so ENOSPC comes from the kernel, not from a mock;
mounting one needs root (CAP_SYS_ADMIN), and without it the trial is skipped with the reason
(tests/api/test_blob_disk_full.py checks the same mapping in-process, anywhere). Each round
fills the disk with a filler file, then: a client's upload must get a 507
``insufficient_storage`` problem (not a 500); a transcode job is submitted and a paced worker
runs it, but its rendition upload gets 507 too, so that attempt is lost and the job re-queued
when its lease runs out. Then the filler is deleted: the client's upload goes through, the job
succeeds on a later attempt, and its renditions download intact.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from protocol.problems import ProblemError
from tests.faults.checks import check_exactly_once
from tests.faults.conftest import TrialReport, repeat_count
from tests.faults.market import Market, transcode_spec, until
from tests.support import video_clip

pytestmark = [pytest.mark.faults, pytest.mark.slow]

DISK_BYTES = 4 * 1024 * 1024
CLIP_BYTES = 256 * 1024
RENDITION_BYTES = 512 * 1024
FILL_CHUNK_BYTES = 64 * 1024
JOB_S = 0.2


@pytest.fixture
def small_blob_disk(tmp_path: Path) -> Iterator[Path]:
    """A ``DISK_BYTES`` tmpfs at tmp_path/blobs, unmounted afterwards."""
    mount = tmp_path / "blobs"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a full-disk trial mounts a small tmpfs, which needs root (CAP_SYS_ADMIN)")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES}", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False, timeout=30)


def _fill(disk: Path) -> Path:
    """Write a filler file until the disk refuses more; returns it."""
    filler = disk / "filler"
    chunk = b"\0" * FILL_CHUNK_BYTES
    with filler.open("wb", buffering=0) as out:
        while True:
            try:
                out.write(chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                return filler


def _attempt_lost(market: Market, job_id: str) -> bool:
    """The first attempt is over without a result: the job is on its second."""
    return int(market.api.get(job_id)["attempt"]) >= 2


def _upload_refused(market: Market, clip: Path) -> ProblemError:
    try:
        market.api.upload_blob(clip)
    except ProblemError as exc:
        return exc
    raise AssertionError("an upload to a full disk was accepted")


@pytest.mark.timeout(900)
def test_full_blob_disk_then_space_frees(
    tmp_path: Path, small_blob_disk: Path, trial_report: TrialReport
) -> None:
    rounds = repeat_count("DISK_FULL_ROUNDS", 3)
    with Market(tmp_path, orchestrator_env={"GPUMARKET_BLOB_DIR": str(small_blob_disk)}) as market:
        worker = market.add_worker("worker", job_s=JOB_S, output_bytes=RENDITION_BYTES)
        market.wait_for_workers()
        uploads_refused = outputs_refused = 0
        for r in range(rounds):
            clip, later = tmp_path / f"clip{r}.bin", tmp_path / f"later{r}.bin"
            # A real video (the orchestrator probes inputs at submit), new bytes each round.
            clip.write_bytes(video_clip(640, 360, frames=2 + r))
            later.write_bytes(os.urandom(CLIP_BYTES))
            input_blob = market.api.upload_blob(clip)
            filler = _fill(small_blob_disk)

            exc = _upload_refused(market, later)
            assert (exc.status, exc.code) == (507, "insufficient_storage"), exc
            uploads_refused += 1
            job_id = market.submit(f"transcode-{r}", transcode_spec(input_blob))
            # The worker ran it, but the orchestrator could not store the rendition: that
            # attempt is lost, and the job is queued again once its lease runs out.
            until(partial(_attempt_lost, market, job_id), "the attempt to be lost")
            assert market.api.get(job_id)["state"] != "succeeded"
            outputs_refused += 1

            filler.unlink()  # space frees
            assert market.api.upload_blob(later)
            until(partial(market.job_in, job_id, "succeeded"), "the job to succeed")
        assert "507 insufficient_storage" in worker.log()
        assert market.orchestrator is not None
        served = market.orchestrator.log_path.read_text()
        assert "unhandled error" not in served and "internal_error" not in served
        counts = check_exactly_once(market)
        assert counts["jobs_succeeded"] == counts["jobs"]
        trial_report.record(
            disk_full_rounds=rounds,
            uploads_refused_507=uploads_refused,
            worker_outputs_refused=outputs_refused,
            **counts,
        )
