"""Verification over the API: sampled jobs re-run on other workers, tie-breaks, convictions.

Workers here are scripted over HTTP so each test decides who answers what; the real worker
daemon against a real orchestrator is in tests/integration/test_cheating_worker.py.
"""

from __future__ import annotations

import contextlib
import functools
import random
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from orchestrator.config import Settings
from orchestrator.services.comparators import COSINE_THRESHOLDS, Comparison, compare_tensors
from orchestrator.store import Store
from orchestrator.store.models import Job, Slash, Worker
from orchestrator.wiring import Services, build_services
from protocol.signing import output_sha256, sign_result
from tests.api.conftest import Api, HttpWorker, RunApi, assert_problem
from tests.conftest import FakeClock
from tests.support import offer, video_clip
from worker.executors.transcode import make_test_clip

UNPLACED_TIMEOUT_S = 60.0
RIGHT = {"embeddings": [[0.6, 0.8], [1.0, 0.0]]}
# Plausible but wrong: unit vectors, the right shape, pointing elsewhere.
WRONG = {"embeddings": [[0.8, -0.6], [0.0, 1.0]]}
# An honest run on other hardware: not bit-equal, well within the fp32 tolerance.
RIGHT_ELSEWHERE = {"embeddings": [[0.6000001, 0.7999999], [0.9999999, 0.0000001]]}


@pytest.fixture
def services(tmp_path: Path, sqlite_store: Store, clock: FakeClock) -> Services:
    settings = Settings(
        data_dir=tmp_path / "data",
        admin_token="operator-token-for-tests-0123456789abcdef",
        lease_ttl_s=30.0,
        heartbeat_interval_s=10.0,
        long_poll_max_s=5.0,
        verify_rate=1.0,  # every result is checked
        verify_timeout_s=120.0,
        verify_unplaced_timeout_s=UNPLACED_TIMEOUT_S,
    )
    return build_services(settings, store=sqlite_store, clock=clock, rng=random.Random(7))


async def _run_on(api: Api, worker: HttpWorker, output: dict[str, Any]) -> dict[str, Any]:
    """``worker`` leases the one job it is offered and completes it with ``output``."""
    leased = await api.lease(worker)
    assert len(leased) == 1, leased
    resp = await api.complete(worker, leased[0]["job_id"], leased[0]["attempt"], output)
    assert resp.status_code == 200, resp.text
    return leased[0]


def _worker_row(api: Api, worker: HttpWorker) -> Worker:
    with api.services.store.read() as s:
        row = s.get(Worker, worker.worker_id)
        assert row is not None
        s.expunge(row)
        return row


def test_an_agreeing_check_releases_and_pays_the_result(run_api: RunApi) -> None:
    async def body(api: Api) -> None:
        client = await api.new_client()
        first, second = await api.register_worker(), await api.register_worker()
        job = await api.submit(client)
        await _run_on(api, first, RIGHT)
        held = await api.job(client, job["id"])
        assert held["state"] == "verifying"
        assert held["verification"]["status"] == "pending"
        resp = await api.http.get(f"/v1/jobs/{job['id']}/result", headers=client)
        assert_problem(resp, 409, "conflict", "verifying")
        resp = await api.http.post(f"/v1/jobs/{job['id']}/cancel", headers=client)
        assert_problem(resp, 409, "conflict", "being verified")

        check = await _run_on(api, second, RIGHT_ELSEWHERE)
        assert check["job_id"] != job["id"]  # a hidden copy, not the client's job
        done = await api.job(client, job["id"])
        assert done["state"] == "succeeded"
        verification = done["verification"]
        assert verification["status"] == "passed"
        [entry] = verification["checks"]
        assert entry["worker_address"] == second.address and entry["agrees"] is True
        assert entry["metric"] == "cosine"
        assert entry["value"] > COSINE_THRESHOLDS["fp32"]
        # The client sees only its own job, never the check.
        resp = await api.http.get("/v1/jobs", headers=client)
        assert [j["id"] for j in resp.json()["jobs"]] == [job["id"]]
        resp = await api.http.get(f"/v1/jobs/{check['job_id']}", headers=client)
        assert resp.status_code == 404
        assert _worker_row(api, first).verifications_passed == 1
        assert _worker_row(api, second).verifications_passed == 1

    run_api(body)


def test_a_wrong_result_loses_the_tie_break_is_replaced_and_its_worker_shut_out(
    run_api: RunApi,
) -> None:
    async def body(api: Api) -> None:
        client = await api.new_client()
        cheat = await api.register_worker()
        honest = [await api.register_worker(), await api.register_worker()]
        job = await api.submit(client)
        await _run_on(api, cheat, WRONG)
        await _run_on(api, honest[0], RIGHT)
        pending = await api.job(client, job["id"])
        assert pending["state"] == "verifying"
        assert pending["verification"]["checks"][0]["agrees"] is False
        assert await api.lease(cheat) == []  # the tie-break never goes to either side
        await _run_on(api, honest[1], RIGHT_ELSEWHERE)

        done = await api.job(client, job["id"])
        assert done["state"] == "succeeded"
        verification = done["verification"]
        assert verification["status"] == "replaced"
        assert verification["slashed_address"] == cheat.address
        assert done["cost_wei"] == "0"  # the client pays nothing for the cheated job
        result = (await api.http.get(f"/v1/jobs/{job['id']}/result", headers=client)).json()
        assert result["output"] == RIGHT  # the agreed result, not the cheat's
        assert result["verification"]["result_signed_for"] is not None

        with api.services.store.read() as s:
            [slash] = s.scalars(select(Slash)).all()
            assert slash.worker_address == cheat.address and slash.status == "pending"
        assert api.services.verification.send_slashes() == 1
        with api.services.store.read() as s:
            [slash] = s.scalars(select(Slash)).all()
            assert slash.status == "skipped"  # no chain here; tests/contracts slash on anvil

        row = _worker_row(api, cheat)
        assert row.verifications_failed == 1
        # Shut out: a new job goes to an honest worker or waits, never to the cheat.
        second = await api.submit(client)
        assert await api.lease(cheat) == []
        waiting = await api.job(client, second["id"])
        assert "below the floor" in (waiting["waiting_reason"] or "")

    run_api(body)


def test_a_wrong_check_loses_the_tie_break_and_the_result_stands(run_api: RunApi) -> None:
    async def body(api: Api) -> None:
        client = await api.new_client()
        first, liar, judge = (
            await api.register_worker(),
            await api.register_worker(),
            await api.register_worker(),
        )
        job = await api.submit(client)
        await _run_on(api, first, RIGHT)
        await _run_on(api, liar, WRONG)
        await _run_on(api, judge, RIGHT)
        done = await api.job(client, job["id"])
        assert done["state"] == "succeeded"
        assert done["verification"]["status"] == "upheld"
        assert done["verification"]["slashed_address"] == liar.address
        assert done["cost_wei"] == str(2 * 100)  # two texts at the offer's 100 wei
        result = (await api.http.get(f"/v1/jobs/{job['id']}/result", headers=client)).json()
        assert result["output"] == RIGHT and result["worker_address"] == first.address
        assert _worker_row(api, liar).verifications_failed == 1
        assert _worker_row(api, first).verifications_failed == 0

    run_api(body)


def test_a_check_nobody_runs_times_out_and_the_result_stands(
    run_api: RunApi, clock: FakeClock
) -> None:
    async def body(api: Api) -> None:
        client = await api.new_client()
        first = await api.register_worker()
        await api.register_worker()  # could check, but never polls
        job = await api.submit(client)
        await _run_on(api, first, RIGHT)
        assert (await api.job(client, job["id"]))["state"] == "verifying"
        clock.advance(121)
        api.services.leases.sweep(clock())
        assert api.services.verification.resolve_stalled(clock()) == 1
        done = await api.job(client, job["id"])
        assert done["state"] == "succeeded"
        assert done["verification"]["status"] == "inconclusive"
        assert "no check finished" in done["verification"]["detail"]

    run_api(body)


def test_a_lone_worker_is_not_held_up_by_sampling(run_api: RunApi) -> None:
    async def body(api: Api) -> None:
        client = await api.new_client()
        only = await api.register_worker()
        job = await api.submit(client)
        await _run_on(api, only, RIGHT)
        done = await api.job(client, job["id"])
        assert done["state"] == "succeeded" and done["verification"] is None

    run_api(body)


def test_a_checks_comparisons_are_made_before_its_transaction(
    run_api: RunApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Comparing (seconds, for video) happens ahead of the completing transaction: inside it,
    the comparison is found already made."""

    async def body(api: Api) -> None:
        client = await api.new_client()
        first, second = await api.register_worker(), await api.register_worker()
        job = await api.submit(client)
        await _run_on(api, first, RIGHT)

        store = api.services.store
        real_transaction = store.transaction
        depth = 0
        compared_in: list[str] = []

        @contextlib.contextmanager
        def watched() -> Iterator[object]:
            nonlocal depth
            depth += 1
            try:
                with real_transaction() as session:
                    yield session
            finally:
                depth -= 1

        def counted(a: Any, b: Any, precision: str) -> Comparison:
            compared_in.append("transaction" if depth else "outside")
            return compare_tensors(a, b, precision)

        monkeypatch.setattr(store, "transaction", watched)
        monkeypatch.setattr("orchestrator.services.verification.compare_tensors", counted)
        await _run_on(api, second, RIGHT_ELSEWHERE)
        done = await api.job(client, job["id"])
        assert done["verification"]["status"] == "passed"
        assert compared_in == ["outside"]  # once, before; found made inside

    run_api(body)


# --- billed units ------------------------------------------------------------------------------

TRANSCODE_PRICE = 1  # wei per output pixel


@functools.cache
def _rendition(frames: int) -> bytes:
    """A 160x120 H.264 rendition of ``frames`` frames (12 at the client's 12 fps ceiling for
    a 1 s, 24 fps input; 24 from a worker that ignores the ceiling to bill twice the pixels)."""
    with tempfile.TemporaryDirectory() as tmp:
        return make_test_clip(Path(tmp) / "120p.mp4", 160, 120, frames, frames).read_bytes()


async def _transcode_on(api: Api, worker: HttpWorker, frames: int) -> dict[str, Any]:
    """``worker`` leases the one transcode it is offered and completes it, honestly signed and
    listed, with a rendition of ``frames`` frames: what its files hold is what it bills."""
    [leased] = await api.lease(worker)
    sha256 = (await api.upload(worker.headers, _rendition(frames)))["sha256"]
    blobs = [{"name": "120p", "sha256": sha256, "size": len(_rendition(frames))}]
    blobs[0].update(width=160, height=120, frames=frames)
    units, digest = 160 * 120 * frames, output_sha256(blobs)
    job_id, attempt = leased["job_id"], leased["attempt"]
    body = {
        "attempt": attempt,
        "output_blobs": blobs,
        "output_sha256": digest,
        "signature": sign_result(
            worker.account.key, job_id, attempt, digest, units, int(leased["price_wei_per_unit"])
        ),
        "duration_s": 1.0,
        "energy_j": 1.0,
        "energy_source": "estimate",
        "units": units,
    }
    resp = await api.http.post(
        f"/v1/workers/jobs/{job_id}/complete", json=body, headers=worker.headers
    )
    assert resp.status_code == 200, resp.text
    return leased


def test_a_worker_billing_frames_the_client_did_not_ask_for_is_convicted(
    run_api: RunApi,
) -> None:
    """Its files hold what it bills, so completion takes the bill; the check on another worker
    holds half the pixels, the tie-break agrees with the check, and the overbiller is
    convicted like any cheat: the client gets the honest result and pays nothing."""

    async def body(api: Api) -> None:
        client = await api.new_client()
        transcoder = [offer("h264", price=TRANSCODE_PRICE, job_type="transcode")]
        cheat = await api.register_worker(offers=transcoder)
        honest = [await api.register_worker(offers=transcoder) for _ in range(2)]
        video = (await api.upload(client, video_clip(320, 240, frames=3)))["sha256"]
        ladder = [{"name": "120p", "height": 120, "fps": 12, "bitrate_kbps": 200}]
        spec = {"type": "transcode", "input_blob": video, "renditions": ladder}
        resp = await api.http.post(
            "/v1/jobs", json={**spec, "max_price_wei_per_unit": "1"}, headers=client
        )
        assert resp.status_code == 201, resp.text
        job = resp.json()

        await _transcode_on(api, cheat, 24)
        await _transcode_on(api, honest[0], 12)
        pending = await api.job(client, job["id"])
        [first] = pending["verification"]["checks"]
        assert first["agrees"] is False
        assert "billed units differ" in first["detail"]
        assert "460800" in first["detail"] and "230400" in first["detail"]
        await _transcode_on(api, honest[1], 12)

        done = await api.job(client, job["id"])
        verification = done["verification"]
        assert (verification["status"], verification["slashed_address"]) == (
            "replaced",
            cheat.address,
        )
        assert done["cost_wei"] == "0"
        result = (await api.http.get(f"/v1/jobs/{job['id']}/result", headers=client)).json()
        assert result["output_blobs"][0]["frames"] == 12
        # What the adopted result's worker signed, so anyone can check it.
        assert verification["result_signed_units"] == 160 * 120 * 12
        assert verification["result_signed_price_wei_per_unit"] == str(TRANSCODE_PRICE)
        with api.services.store.read() as s:
            [slash] = s.scalars(select(Slash)).all()
            assert slash.worker_address == cheat.address
        assert _worker_row(api, cheat).verifications_failed == 1


def test_a_check_no_worker_takes_is_withdrawn_and_the_job_released_saying_why(
    run_api: RunApi, clock: FakeClock
) -> None:
    async def body(api: Api) -> None:
        client = await api.new_client()
        first = await api.register_worker()
        await api.register_worker()  # could check, but never polls
        job = await api.submit(client)
        await _run_on(api, first, RIGHT)
        assert await api.lease(first) == []  # polls again: the check is not for it
        assert api.services.verification.resolve_stalled(clock()) == 0
        held = await api.job(client, job["id"])
        assert held["state"] == "verifying"
        detail = held["verification"]["detail"]
        assert "waits (no available worker can take it: 1 already failed or lost" in detail
        assert f"within {UNPLACED_TIMEOUT_S:g} s" in detail

        clock.advance(UNPLACED_TIMEOUT_S + 1)  # before the check's own deadline
        api.services.leases.sweep(clock())
        assert api.services.verification.resolve_stalled(clock()) == 1
        done = await api.job(client, job["id"])
        assert done["state"] == "succeeded"
        assert done["cost_wei"] == str(2 * 100)  # released paid
        assert done["verification"]["status"] == "inconclusive"
        released = done["verification"]["detail"]
        assert f"no worker could re-run it within {UNPLACED_TIMEOUT_S:g} s" in released
        assert "already failed or lost" in released
        with api.services.store.read() as s:
            [check] = s.scalars(select(Job).where(Job.kind == "check")).all()
            assert check.state == "cancelled"
        assert await api.lease(first) == []  # nothing left to run

    run_api(body)


def test_no_check_is_sampled_when_every_other_worker_asks_more(run_api: RunApi) -> None:
    async def body(api: Api) -> None:
        client = await api.new_client()
        first = await api.register_worker()
        await api.register_worker(offers=[offer(price=10**6)])  # above the job's max price
        job = await api.submit(client)
        await _run_on(api, first, RIGHT)
        done = await api.job(client, job["id"])
        assert done["state"] == "succeeded" and done["verification"] is None

    run_api(body)
