"""A client's bad input is refused at submit (422) and throttled (429); it never costs a worker.

Over HTTP against the real app (fake clock): uploads, submits, workers leasing and completing.
"""

from __future__ import annotations

import os
from typing import Any

from tests.api.conftest import Api, HttpWorker, RunApi, assert_problem
from tests.conftest import FakeClock
from tests.support import cut_between_packets, faststart_clip, offer, video_clip

THROTTLE_LIMIT = 20  # Settings.client_input_failure_limit's default
FLOOD = THROTTLE_LIMIT + 10


async def _reputations(api: Api) -> dict[str, float]:
    resp = await api.http.get("/v1/workers", headers=api.operator)
    assert resp.status_code == 200, resp.text
    return {w["address"]: w["reputation"] for w in resp.json()}


async def _serve_one(api: Api, worker: HttpWorker, client: dict[str, str]) -> dict[str, Any]:
    """Submit an embedding job, have ``worker`` lease and complete it; the job afterwards."""
    job = await api.submit(client)
    [leased] = await api.lease(worker)
    assert leased["job_id"] == job["id"]
    resp = await api.complete(worker, job["id"], leased["attempt"])
    assert resp.status_code == 200, resp.text
    return await api.job(client, job["id"])


def _transcode(blob: str, **extra: Any) -> dict[str, Any]:
    return {"type": "transcode", "input_blob": blob, "max_price_wei_per_unit": "1", **extra}


def test_a_flood_of_transcodes_on_junk_is_refused_and_throttled_and_no_worker_pays(
    run_api: RunApi, clock: FakeClock
) -> None:
    """The reported flood: transcode jobs on a zero-byte and a junk blob from one client."""

    async def body(api: Api) -> None:
        offers = [offer(price=100), offer("h264", price=1, job_type="transcode")]
        workers = [await api.register_worker(offers=offers) for _ in range(2)]
        regular = await api.new_client("regular")
        for worker, served in zip(workers, (3, 1), strict=True):  # a record worth keeping
            for _ in range(served):
                assert (await _serve_one(api, worker, regular))["state"] == "succeeded"
        before = await _reputations(api)
        assert sorted(before.values()) == [2 / 3, 0.8]

        flooder = await api.new_client("flooder")
        empty = (await api.upload(flooder, b""))["sha256"]
        junk = (await api.upload(flooder, os.urandom(4096)))["sha256"]
        answers = []
        for i in range(FLOOD):
            blob = (empty, junk)[i % 2]
            resp = await api.http.post("/v1/jobs", json=_transcode(blob), headers=flooder)
            answers.append(resp)

        assert [r.status_code for r in answers] == [422] * THROTTLE_LIMIT + [429] * (
            FLOOD - THROTTLE_LIMIT
        )
        assert_problem(answers[0], 422, "invalid_input", "input is empty (0 bytes)")
        assert_problem(answers[1], 422, "invalid_input", "not a readable media file")
        throttled = assert_problem(answers[-1], 429, "too_many_requests", "failed for their input")
        retry_after = int(answers[-1].headers["retry-after"])
        assert retry_after == throttled["retry_after_s"] > 0

        # No job was made, no worker leased anything, and no reputation moved.
        resp = await api.http.get("/v1/jobs", headers=flooder)
        assert resp.json()["jobs"] == []
        for worker in workers:
            assert await api.lease(worker) == []
        assert await _reputations(api) == before

        # Another client's embedding job is served at once, by either worker.
        assert (await _serve_one(api, workers[0], regular))["state"] == "succeeded"
        # The throttled client itself is only held back until Retry-After.
        resp = await api.http.post("/v1/jobs", json=_transcode(junk), headers=flooder)
        assert resp.status_code == 429
        clock.advance(retry_after)
        resp = await api.http.post("/v1/jobs", json=_transcode(junk), headers=flooder)
        assert_problem(resp, 422, "invalid_input", "not a readable media file")

    run_api(body)


def test_a_truncated_faststart_mp4_is_refused_at_submit(run_api: RunApi) -> None:
    async def body(api: Api) -> None:
        await api.register_worker(offers=[offer("h264", price=1, job_type="transcode")])
        client = await api.new_client()
        whole = faststart_clip()
        cut = (await api.upload(client, cut_between_packets(whole, 0.6)))["sha256"]
        ladder = [{"height": 90, "bitrate_kbps": 150}]

        resp = await api.http.post(
            "/v1/jobs", json=_transcode(cut, renditions=ladder), headers=client
        )

        assert_problem(
            resp, 422, "invalid_input", "truncated", "declares 250 frames (10.00 s)", "whole file"
        )
        intact = (await api.upload(client, whole))["sha256"]
        resp = await api.http.post(
            "/v1/jobs", json=_transcode(intact, renditions=ladder), headers=client
        )
        assert resp.status_code == 201, resp.text

    run_api(body)


def test_a_ladder_that_would_only_upscale_is_refused_and_a_partial_one_lists_what_it_skips(
    run_api: RunApi,
) -> None:
    async def body(api: Api) -> None:
        worker = await api.register_worker(offers=[offer("h264", price=1, job_type="transcode")])
        client = await api.new_client()
        clip = (await api.upload(client, video_clip(640, 360, frames=2)))["sha256"]
        too_big = [{"height": 720, "bitrate_kbps": 3000}, {"height": 1080, "bitrate_kbps": 6000}]

        resp = await api.http.post(
            "/v1/jobs", json=_transcode(clip, renditions=too_big), headers=client
        )
        assert_problem(resp, 422, "invalid_input", "720p, 1080p", "640x360", "at most 360")

        ladder = [
            {"name": "sd", "height": 360, "bitrate_kbps": 800},
            {"height": 1080, "bitrate_kbps": 6000},
            {"height": 240, "bitrate_kbps": 400},
        ]
        resp = await api.http.post(
            "/v1/jobs", json=_transcode(clip, renditions=ladder), headers=client
        )
        assert resp.status_code == 201, resp.text
        job_id = resp.json()["id"]
        [leased] = await api.lease(worker)
        sd = (await api.upload(worker.headers, RENDITION))["sha256"]
        blobs = [{"name": "sd", "sha256": sd, "size": len(RENDITION), "width": 640, "height": 360}]
        skipped = [{"name": "1080p", "reason": "1920x1080 would upscale the 640x360 input"}]
        req = _blob_result(worker, job_id, leased["attempt"], blobs, skipped)
        resp = await api.http.post(
            f"/v1/workers/jobs/{job_id}/complete", json=req, headers=worker.headers
        )
        assert resp.status_code == 200, resp.text

        result = (await api.http.get(f"/v1/jobs/{job_id}/result", headers=client)).json()
        assert [b["name"] for b in result["output_blobs"]] == ["sd"]
        assert result["skipped_renditions"] == [
            *skipped,
            {"name": "240p", "reason": "the worker did not produce it and gave no reason"},
        ]

    run_api(body)


# A worker's 640x360 rendition of the 2-frame clips below: what the orchestrator bills.
RENDITION = video_clip(640, 360, frames=2)
RENDITION_PIXELS = 640 * 360 * 2


def _blob_result(
    worker: HttpWorker,
    job_id: str,
    attempt: int,
    blobs: list[dict[str, Any]],
    skipped: list[dict[str, str]],
) -> dict[str, Any]:
    from protocol import OutputBlob
    from protocol.signing import output_sha256, sign_result

    listed = [OutputBlob.model_validate(b).model_dump(mode="json") for b in blobs]
    digest = output_sha256(listed)
    return {
        "attempt": attempt,
        "output_blobs": listed,
        "output_sha256": digest,
        "signature": sign_result(worker.account.key, job_id, attempt, digest, RENDITION_PIXELS, 1),
        "duration_s": 1.0,
        "energy_j": 1.0,
        "energy_source": "estimate",
        "units": RENDITION_PIXELS,
        "skipped_renditions": skipped,
    }


def test_a_result_naming_a_rendition_the_job_did_not_ask_for_is_refused(run_api: RunApi) -> None:
    async def body(api: Api) -> None:
        worker = await api.register_worker(offers=[offer("h264", price=1, job_type="transcode")])
        client = await api.new_client()
        clip = (await api.upload(client, video_clip(640, 360, frames=2)))["sha256"]
        ladder = [{"height": 360, "bitrate_kbps": 800}]
        resp = await api.http.post(
            "/v1/jobs", json=_transcode(clip, renditions=ladder), headers=client
        )
        job_id = resp.json()["id"]
        [leased] = await api.lease(worker)
        made = (await api.upload(worker.headers, RENDITION))["sha256"]
        blobs = [{"name": "360p", "sha256": made, "size": len(RENDITION)}]
        skipped = [{"name": "4k", "reason": "made up"}]
        req = _blob_result(worker, job_id, leased["attempt"], blobs, skipped)

        resp = await api.http.post(
            f"/v1/workers/jobs/{job_id}/complete", json=req, headers=worker.headers
        )

        assert_problem(resp, 422, "invalid_input", "did not ask for (4k)", "asked for 360p")

    run_api(body)


def test_tensor_rows_must_fit_the_shape_the_models_workers_advertise(run_api: RunApi) -> None:
    async def body(api: Api) -> None:
        shape = {"dtype": "float32", "shape": [2]}
        await api.register_worker(offers=[offer("doubler", price=1, input=shape)])
        client = await api.new_client()
        base = {"type": "inference", "model": "doubler", "max_price_wei_per_unit": "5"}

        wrong = {**base, "input": {"tensors": [[1.0, 2.0], [1.0, 2.0, 3.0]]}}
        resp = await api.http.post("/v1/jobs", json=wrong, headers=client)
        assert_problem(resp, 422, "invalid_input", "input.tensors[1] has shape [3]", "[2]")
        ragged = {**base, "input": {"tensors": [[[1.0], [1.0, 2.0]]]}}
        resp = await api.http.post("/v1/jobs", json=ragged, headers=client)
        assert_problem(resp, 422, "invalid_input", "input.tensors[0] is ragged")
        right = {**base, "input": {"tensors": [[1.0, 2.0], [3, 4]]}}
        resp = await api.http.post("/v1/jobs", json=right, headers=client)
        assert resp.status_code == 201, resp.text

    run_api(body)


def test_empty_texts_and_a_non_json_input_blob_are_refused_at_submit(run_api: RunApi) -> None:
    async def body(api: Api) -> None:
        await api.register_worker()
        client = await api.new_client()
        resp = await api.http.post(
            "/v1/jobs",
            json={
                "type": "inference",
                "model": "all-MiniLM-L6-v2",
                "input": {"texts": ["fine", "  "]},
                "max_price_wei_per_unit": "5",
            },
            headers=client,
        )
        assert_problem(resp, 422, "invalid_input", "input.texts[1] is empty")

        notes = (await api.upload(client, b"plain words, not JSON"))["sha256"]
        resp = await api.http.post(
            "/v1/jobs",
            json={
                "type": "inference",
                "model": "all-MiniLM-L6-v2",
                "input_blob": notes,
                "max_price_wei_per_unit": "5",
            },
            headers=client,
        )
        assert_problem(resp, 422, "invalid_input", "input_blob must be JSON like")

    run_api(body)


def test_an_input_fault_claim_that_is_retryable_is_refused(run_api: RunApi) -> None:
    async def body(api: Api) -> None:
        worker = await api.register_worker()
        client = await api.new_client()
        job = await api.submit(client)
        await api.lease(worker)

        resp = await api.http.post(
            f"/v1/workers/jobs/{job['id']}/fail",
            json={"attempt": 1, "retryable": True, "reason": "bad", "fault": "input"},
            headers=worker.headers,
        )

        assert_problem(resp, 422, "invalid_input", "not retryable")

    run_api(body)


def test_a_failed_jobs_fault_is_on_the_job_and_in_the_result_refusal(run_api: RunApi) -> None:
    async def body(api: Api) -> None:
        worker = await api.register_worker()
        client = await api.new_client()
        job = await api.submit(client)
        await api.lease(worker)
        resp = await api.http.post(
            f"/v1/workers/jobs/{job['id']}/fail",
            json={"attempt": 1, "retryable": False, "reason": "CUDA error: device lost"},
            headers=worker.headers,
        )
        assert resp.status_code == 200, resp.text

        assert (await api.job(client, job["id"]))["fault"] == "worker"
        resp = await api.http.get(f"/v1/jobs/{job['id']}/result", headers=client)
        body_ = assert_problem(resp, 409, "conflict", "device lost", "fault: worker")
        assert body_["fault"] == "worker"

    run_api(body)
