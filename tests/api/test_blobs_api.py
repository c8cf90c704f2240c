"""Blob routes over HTTP: streamed uploads, limits, hashes, and who may read what."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.blobs import STORE_ID_FILE
from protocol import OutputBlob
from protocol.signing import output_sha256, sign_result
from tests.api.conftest import Api, HttpWorker, RunApi, assert_problem, bearer
from tests.support import EMBED_MODEL, offer, video_clip
from worker.executors.transcode import make_test_clip

CHUNK = 64 * 1024
LIMIT = 1024 * 1024  # the settings fixture's max_blob_bytes
VIDEO = os.urandom(3 * CHUNK + 123)
# One real rendition (the orchestrator bills the frames and sizes it finds in the file).
WIDTH, HEIGHT, FRAMES = 320, 240, 24
PIXELS = WIDTH * HEIGHT * FRAMES  # 1,843,200 output pixels
WEI_PER_PIXEL = 2


@functools.cache
def rendition_clip() -> bytes:
    """A 320x240 H.264 clip of 24 frames, as a worker's 240p rendition."""
    with tempfile.TemporaryDirectory() as tmp:
        return make_test_clip(Path(tmp) / "240p.mp4", WIDTH, HEIGHT, FRAMES, 24).read_bytes()


def rendition_blob(sha256: str, **listed: Any) -> OutputBlob:
    """The rendition as a worker lists it; ``listed`` overrides what it says of the file."""
    fields = {"width": WIDTH, "height": HEIGHT, "frames": FRAMES, **listed}
    return OutputBlob(name="240p", sha256=sha256, size=len(rendition_clip()), **fields)


async def chunks(data: bytes, size: int = CHUNK) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def stored_files(api: Api) -> list[str]:
    """Every file in the blob folder, temporary ones included (not the folder's own id)."""
    root = api.services.settings.blob_path
    return sorted(
        str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != STORE_ID_FILE
    )


def test_streamed_upload_returns_its_sha256_and_downloads_the_same_bytes(run_api: RunApi) -> None:
    async def body(api: Api) -> None:
        client = await api.new_client()
        resp = await api.http.post("/v1/blobs", content=chunks(VIDEO), headers=client)
        assert resp.status_code == 201, resp.text
        sha256 = hashlib.sha256(VIDEO).hexdigest()
        assert resp.json() == {"sha256": sha256, "size": len(VIDEO)}

        resp = await api.http.get(f"/v1/blobs/{sha256}", headers=client)
        assert resp.status_code == 200
        assert resp.content == VIDEO
        assert resp.headers["content-type"] == "application/octet-stream"
        assert resp.headers["etag"] == f'"{sha256}"'
        assert int(resp.headers["content-length"]) == len(VIDEO)

        # nothing is left behind in the temporary folder
        assert stored_files(api) == [f"{sha256[:2]}/{sha256}"]

    run_api(body)


def test_upload_with_content_length_and_declared_sha256(run_api: RunApi) -> None:
    async def body(api: Api) -> None:
        client = await api.new_client()
        sha256 = hashlib.sha256(VIDEO).hexdigest()
        resp = await api.http.post(
            "/v1/blobs", content=VIDEO, headers={**client, "X-Content-SHA256": sha256}
        )
        assert resp.status_code == 201, resp.text
        assert resp.json() == {"sha256": sha256, "size": len(VIDEO)}

        # the same bytes again are the same blob
        again = await api.http.post("/v1/blobs", content=chunks(VIDEO), headers=client)
        assert again.status_code == 201 and again.json() == resp.json()

        empty = await api.http.post("/v1/blobs", content=b"", headers=client)
        assert empty.status_code == 201
        assert empty.json() == {"sha256": hashlib.sha256(b"").hexdigest(), "size": 0}

    run_api(body)


def test_declared_sha256_mismatch_is_422_and_stores_nothing(run_api: RunApi) -> None:
    async def body(api: Api) -> None:
        client = await api.new_client()
        wrong = hashlib.sha256(b"something else").hexdigest()
        actual = hashlib.sha256(VIDEO).hexdigest()
        resp = await api.http.post(
            "/v1/blobs", content=chunks(VIDEO), headers={**client, "X-Content-SHA256": wrong}
        )
        assert_problem(resp, 422, "invalid_input", actual, f"not the {wrong} you declared")
        resp = await api.http.get(f"/v1/blobs/{actual}", headers=client)
        assert_problem(resp, 404, "not_found", actual)
        assert stored_files(api) == []

        resp = await api.http.post(
            "/v1/blobs", content=VIDEO, headers={**client, "X-Content-SHA256": wrong.upper()}
        )
        assert_problem(resp, 422, "invalid_input", "x-content-sha256", "pattern")

    run_api(body)


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_oversized_upload_is_413_and_stores_nothing(run_api: RunApi, declared: bool) -> None:
    async def body(api: Api) -> None:
        client = await api.new_client()
        data = b"x" * (LIMIT + 1)
        content: Any = data if declared else chunks(data)
        resp = await api.http.post("/v1/blobs", content=content, headers=client)
        assert ("content-length" in resp.request.headers) is declared
        problem = assert_problem(resp, 413, "payload_too_large", str(LIMIT))
        assert problem["limit_bytes"] == LIMIT
        assert stored_files(api) == []

        # exactly the limit is fine
        resp = await api.http.post("/v1/blobs", content=chunks(data[:LIMIT]), headers=client)
        assert resp.status_code == 201, resp.text
        assert resp.json()["size"] == LIMIT

    run_api(body)


def test_blob_routes_need_credentials(run_api: RunApi) -> None:
    async def body(api: Api) -> None:
        client = await api.new_client()
        sha256 = (await api.upload(client, VIDEO))["sha256"]
        for headers, says in [
            ({}, "missing credentials"),
            (bearer("gmk_unknown"), "unknown API key"),
            (bearer("gmw_unknown"), "unknown or replaced session token"),
            (api.operator, "expected a client API key"),
        ]:
            resp = await api.http.post("/v1/blobs", content=VIDEO, headers=headers)
            assert_problem(resp, 401, "unauthorized", says)
            resp = await api.http.get(f"/v1/blobs/{sha256}", headers=headers)
            assert_problem(resp, 401, "unauthorized", says)

    run_api(body)


@pytest.mark.parametrize(
    "path",
    ["ABCDEF" + "0" * 58, "abc", "g" * 64, "0" * 65],
    ids=["uppercase", "short", "not-hex", "too-long"],
)
def test_invalid_sha256_in_the_path_is_422(run_api: RunApi, path: str) -> None:
    async def body(api: Api) -> None:
        client = await api.new_client()
        resp = await api.http.get(f"/v1/blobs/{path}", headers=client)
        assert_problem(resp, 422, "invalid_input", "sha256", "[0-9a-f]{64}")

    run_api(body)


def test_a_client_reads_only_its_own_blobs(run_api: RunApi) -> None:
    async def body(api: Api) -> None:
        alice, bob = await api.new_client("alice"), await api.new_client("bob")
        sha256 = (await api.upload(bob, VIDEO))["sha256"]

        resp = await api.http.get(f"/v1/blobs/{sha256}", headers=alice)
        # the same answer as for a blob that does not exist
        assert_problem(resp, 404, "not_found", f"no blob {sha256} among the blobs you may read")
        resp = await api.http.get(f"/v1/blobs/{'0' * 64}", headers=alice)
        assert_problem(resp, 404, "not_found", "among the blobs you may read")

        # nor use it as the input of a job
        spec = {"type": "transcode", "input_blob": sha256, "max_price_wei_per_unit": "1"}
        resp = await api.http.post("/v1/jobs", json=spec, headers=alice)
        assert_problem(
            resp, 422, "invalid_input", f"input_blob {sha256} is not among your blobs", "POST"
        )

        # uploading the same bytes gives alice her own access to them
        assert (await api.upload(alice, VIDEO))["sha256"] == sha256
        resp = await api.http.get(f"/v1/blobs/{sha256}", headers=alice)
        assert resp.status_code == 200 and resp.content == VIDEO

    run_api(body)


# -- transcode jobs: leased inputs and granted outputs -----------------------------------------


def transcode_result(
    worker: HttpWorker, job_id: str, blobs: list[OutputBlob], units: int = PIXELS
) -> dict[str, Any]:
    listed = [b.model_dump(mode="json") for b in blobs]
    digest = output_sha256(listed)
    return {
        "attempt": 1,
        "output_blobs": listed,
        "output_sha256": digest,
        "signature": sign_result(worker.account.key, job_id, 1, digest, units, WEI_PER_PIXEL),
        "duration_s": 4.0,
        "energy_j": 120.0,
        "energy_source": "estimate",
        "units": units,
    }


async def transcode_setup(api: Api) -> tuple[dict[str, str], HttpWorker, dict[str, Any], str]:
    """A client's transcode job leased to a transcoding worker; returns the unrelated blob too."""
    client = await api.new_client()
    worker = await api.register_worker(
        offers=[offer("h264", price=WEI_PER_PIXEL, job_type="transcode")]
    )
    video = (await api.upload(client, video_clip(1280, 720, frames=2)))["sha256"]
    unrelated = (await api.upload(client, b"the client's private notes"))["sha256"]
    # The default ladder (720p, 480p, 360p) and the 240p the tests' rendition file is.
    ladder = [{"name": f"{h}p", "height": h, "bitrate_kbps": 800} for h in (720, 480, 360, 240)]
    spec = {
        "type": "transcode",
        "input_blob": video,
        "renditions": ladder,
        "max_price_wei_per_unit": "5",
    }
    resp = await api.http.post("/v1/jobs", json=spec, headers=client)
    assert resp.status_code == 201, resp.text
    job = resp.json()
    assert job["type"] == "transcode" and job["model"] == "h264"
    assert job["input_blob"] == video
    assert [r["name"] for r in job["renditions"]] == ["720p", "480p", "360p", "240p"]
    assert job["container"] == "mp4"
    assert job["units"] is None  # priced per output pixel, known only at completion

    leased = await api.lease(worker)
    assert len(leased) == 1
    assert leased[0]["job_id"] == job["id"]
    assert leased[0]["input_blob"] == video
    assert leased[0]["container"] == "mp4"
    assert [r["height"] for r in leased[0]["renditions"]] == [720, 480, 360, 240]
    return client, worker, job, unrelated


def test_a_worker_reads_the_input_of_its_leased_job_and_nothing_else(run_api: RunApi) -> None:
    async def body(api: Api) -> None:
        client, worker, job, unrelated = await transcode_setup(api)
        video = job["input_blob"]

        resp = await api.http.get(f"/v1/blobs/{video}", headers=worker.headers)
        assert resp.status_code == 200 and resp.content == video_clip(1280, 720, frames=2)
        resp = await api.http.get(f"/v1/blobs/{unrelated}", headers=worker.headers)
        assert_problem(resp, 404, "not_found", unrelated)

        bystander = await api.register_worker(offers=[offer("h264", job_type="transcode")])
        resp = await api.http.get(f"/v1/blobs/{video}", headers=bystander.headers)
        assert_problem(resp, 404, "not_found", video)

        # once the lease is given up, the input is no longer the worker's to read
        resp = await api.http.post(
            f"/v1/workers/jobs/{job['id']}/fail",
            json={"attempt": 1, "retryable": False, "reason": "unsupported codec"},
            headers=worker.headers,
        )
        assert resp.status_code == 200, resp.text
        resp = await api.http.get(f"/v1/blobs/{video}", headers=worker.headers)
        assert_problem(resp, 404, "not_found", video)

    run_api(body)


def test_output_blobs_of_a_completed_transcode_become_the_clients(run_api: RunApi) -> None:
    async def body(api: Api) -> None:
        client, worker, job, _ = await transcode_setup(api)
        other_client = await api.new_client("other")

        uploaded = await api.upload(worker.headers, rendition_clip())
        assert uploaded["sha256"] == hashlib.sha256(rendition_clip()).hexdigest()
        rendition = rendition_blob(uploaded["sha256"])
        resp = await api.http.get(f"/v1/blobs/{rendition.sha256}", headers=client)
        assert_problem(resp, 404, "not_found", rendition.sha256)  # not yet the client's

        resp = await api.http.post(
            f"/v1/workers/jobs/{job['id']}/complete",
            json=transcode_result(worker, job["id"], [rendition]),
            headers=worker.headers,
        )
        assert resp.status_code == 200, resp.text
        result = resp.json()
        assert result["output"] is None
        assert result["output_blobs"] == [rendition.model_dump(mode="json")]
        assert result["units"] == PIXELS
        assert result["cost_wei"] == str(PIXELS * WEI_PER_PIXEL)

        resp = await api.http.get(f"/v1/jobs/{job['id']}/result", headers=client)
        assert resp.status_code == 200 and resp.json() == result

        resp = await api.http.get(f"/v1/blobs/{rendition.sha256}", headers=client)
        assert resp.status_code == 200 and resp.content == rendition_clip()
        resp = await api.http.get(f"/v1/blobs/{rendition.sha256}", headers=other_client)
        assert_problem(resp, 404, "not_found", rendition.sha256)

    run_api(body)


def test_transcode_results_must_be_blobs_the_worker_uploaded(run_api: RunApi) -> None:
    async def body(api: Api) -> None:
        client, worker, job, unrelated = await transcode_setup(api)
        url = f"/v1/workers/jobs/{job['id']}/complete"

        # the client's private blob cannot be passed off as output to gain access to it
        foreign = OutputBlob(name="720p", sha256=unrelated, size=26)
        resp = await api.http.post(
            url, json=transcode_result(worker, job["id"], [foreign]), headers=worker.headers
        )
        assert_problem(resp, 422, "invalid_input", unrelated, "was not uploaded by you")

        digest = output_sha256({"frames": 1})
        inline = {
            **transcode_result(worker, job["id"], [foreign]),
            "output_blobs": None,
            "output": {"frames": 1},
            "output_sha256": digest,
            "signature": sign_result(worker.account.key, job["id"], 1, digest, PIXELS, 2),
        }
        resp = await api.http.post(url, json=inline, headers=worker.headers)
        assert_problem(resp, 422, "invalid_input", "transcode results are files", "output_blobs")

        assert (await api.job(client, job["id"]))["state"] == "running"

    run_api(body)


def test_a_transcode_billing_more_pixels_than_its_files_hold_is_refused(run_api: RunApi) -> None:
    """The outputs hold 320x240x24 = 1,843,200 pixels; a signed bill for 10,000,000 is
    refused (422), costs the worker reputation, and the job goes to another worker."""

    async def body(api: Api) -> None:
        client, worker, job, _ = await transcode_setup(api)
        uploaded = await api.upload(worker.headers, rendition_clip())
        rendition = rendition_blob(uploaded["sha256"])
        url = f"/v1/workers/jobs/{job['id']}/complete"
        before = _reputation(api, worker)

        overbilled = transcode_result(worker, job["id"], [rendition], units=10_000_000)
        resp = await api.http.post(url, json=overbilled, headers=worker.headers)
        problem = assert_problem(
            resp, 422, "invalid_input", "units is 10000000", f"holds {PIXELS} output pixels"
        )
        assert problem["derived_units"] == PIXELS
        assert _reputation(api, worker) < before

        seen = await api.job(client, job["id"])
        assert (seen["state"], seen["attempt"], seen["units"]) == ("queued", 2, None)
        assert "billed 10000000 units for a result holding 1843200" in seen["history"][-1]["detail"]
        # The same bill sent again finds the lease gone.
        resp = await api.http.post(url, json=overbilled, headers=worker.headers)
        assert_problem(resp, 409, "conflict", "(attempt 1) is gone")

    run_api(body)


@pytest.mark.parametrize(
    ("listed", "says"),
    [
        ({"frames": 30}, "frames 30 (the file has 24)"),
        ({"width": 640, "height": 480}, "width 640 (the file has 320), height 480"),
    ],
)
def test_output_blobs_must_be_listed_as_their_files_are(
    run_api: RunApi, listed: dict[str, int], says: str
) -> None:
    async def body(api: Api) -> None:
        client, worker, job, _ = await transcode_setup(api)
        uploaded = await api.upload(worker.headers, rendition_clip())
        rendition = rendition_blob(uploaded["sha256"], **listed)
        claimed = rendition.width * rendition.height * rendition.frames  # type: ignore[operator]
        resp = await api.http.post(
            f"/v1/workers/jobs/{job['id']}/complete",
            json=transcode_result(worker, job["id"], [rendition], units=claimed),
            headers=worker.headers,
        )
        assert_problem(resp, 422, "invalid_input", uploaded["sha256"], says)
        assert (await api.job(client, job["id"]))["state"] == "running"  # the lease stands

    run_api(body)


def test_an_output_blob_that_is_not_a_video_cannot_be_billed(run_api: RunApi) -> None:
    async def body(api: Api) -> None:
        client, worker, job, _ = await transcode_setup(api)
        uploaded = await api.upload(worker.headers, os.urandom(CHUNK))
        rendition = rendition_blob(uploaded["sha256"])
        resp = await api.http.post(
            f"/v1/workers/jobs/{job['id']}/complete",
            json=transcode_result(worker, job["id"], [rendition]),
            headers=worker.headers,
        )
        assert_problem(resp, 422, "invalid_input", uploaded["sha256"], "cannot be billed")
        assert (await api.job(client, job["id"]))["state"] == "running"

    run_api(body)


def _reputation(api: Api, worker: HttpWorker) -> float:
    [view] = [w for w in api.services.workers.list(api.services.now()) if w.id == worker.worker_id]
    return view.reputation


@pytest.mark.parametrize("reported", [3, 5])
def test_inference_from_an_input_blob_is_billed_per_item_in_the_blob(
    run_api: RunApi, reported: int
) -> None:
    """The orchestrator counts the texts in the JSON blob it holds, as the worker does."""

    async def body(api: Api) -> None:
        client = await api.new_client()
        worker = await api.register_worker()
        texts = {"texts": ["one", "two", "three"]}
        sha256 = (await api.upload(client, json.dumps(texts).encode()))["sha256"]
        spec = {"type": "inference", "model": EMBED_MODEL, "input_blob": sha256}
        resp = await api.http.post(
            "/v1/jobs", json={**spec, "max_price_wei_per_unit": "1000"}, headers=client
        )
        assert resp.status_code == 201, resp.text
        [leased] = await api.lease(worker)
        output = {"embeddings": [[0.5, -0.25]] * 3}
        resp = await api.complete(worker, leased["job_id"], 1, output, units=reported)
        if reported == 3:
            assert resp.status_code == 200, resp.text
            assert resp.json()["cost_wei"] == str(3 * int(leased["price_wei_per_unit"]))
        else:
            assert_problem(resp, 422, "invalid_input", "units is 5", "holds 3 input items")

    run_api(body)


def test_a_transcode_over_the_clients_max_units_is_refused_without_blame(run_api: RunApi) -> None:
    async def body(api: Api) -> None:
        client = await api.new_client()
        worker = await api.register_worker(
            offers=[offer("h264", price=WEI_PER_PIXEL, job_type="transcode")]
        )
        video = (await api.upload(client, video_clip(1280, 720, frames=2)))["sha256"]
        ladder = [{"height": 240, "bitrate_kbps": 800}]
        spec = {
            "type": "transcode",
            "input_blob": video,
            "renditions": ladder,
            "max_units": PIXELS - 1,
        }
        resp = await api.http.post(
            "/v1/jobs", json={**spec, "max_price_wei_per_unit": "5"}, headers=client
        )
        assert resp.status_code == 201, resp.text
        [leased] = await api.lease(worker)
        uploaded = await api.upload(worker.headers, rendition_clip())
        resp = await api.http.post(
            f"/v1/workers/jobs/{leased['job_id']}/complete",
            json=transcode_result(worker, leased["job_id"], [rendition_blob(uploaded["sha256"])]),
            headers=worker.headers,
        )
        assert_problem(resp, 422, "invalid_input", f"above the {PIXELS - 1} the client authorised")
        assert (await api.job(client, leased["job_id"]))["state"] == "running"
        assert _reputation(api, worker) == 0.5  # an honest bill: not held against the worker

    run_api(body)
