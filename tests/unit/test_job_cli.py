"""``gpumarket job`` driven through Typer's CliRunner against the real app in-process.

The app and its lifespan run on an event loop in a thread (an anyio blocking portal); the
CLI's synchronous Client reaches it through ``PortalTransport``, handed to the CLI as the Click
context object. A scripted worker leases and completes over the worker API on that loop.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import httpx
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from click.testing import Result
from typer.testing import CliRunner

from gpumarket.cli import app
from orchestrator.app import create_app
from orchestrator.config import Settings
from orchestrator.store import Store
from orchestrator.store.models import Job as JobRow
from orchestrator.store.models import Worker as WorkerRow
from orchestrator.wiring import build_services
from protocol.signing import output_sha256, sign_result
from tests.api.conftest import BASE_URL, Api, HttpWorker
from tests.support import EMBED_MODEL, offer
from worker.executors.transcode import make_test_clip

TEXTS = ["a cat sat on the mat", "GPUs are scarce"]
DIM = 3
CLIP_FRAMES = 6
EMBEDDINGS = {"embeddings": [[0.5, -0.25, 1.0]] * len(TEXTS)}


class PortalTransport(httpx.BaseTransport):
    """A synchronous httpx transport into an ASGI app served on a portal's event loop: what
    httpx.ASGITransport is to async clients, for the CLI's sync Client."""

    def __init__(self, transport: httpx.ASGITransport, portal: BlockingPortal) -> None:
        self._asgi = transport
        self._portal = portal

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        body = request.read()  # a streamed upload, whole: test files are small
        headers = [(k, v) for k, v in request.headers.multi_items() if k != "transfer-encoding"]

        async def send() -> httpx.Response:
            forwarded = httpx.Request(request.method, request.url, headers=headers, content=body)
            response = await self._asgi.handle_async_request(forwarded)
            content = await response.aread()
            return httpx.Response(response.status_code, headers=response.headers, content=content)

        return self._portal.call(send)


@dataclass
class Market:
    portal: BlockingPortal
    api: Api
    transport: PortalTransport
    api_key: str
    background: list[Future[None]] = field(default_factory=list)
    listeners: list[Future[object]] = field(default_factory=list)

    def invoke(self, *args: str, api_key: str | None = None, **env: str) -> Result:
        """``gpumarket job ARGS`` with the key in GPUMARKET_API_KEY (``api_key`` overrides)."""
        environ = {"GPUMARKET_API_KEY": self.api_key if api_key is None else api_key, **env}
        environ.setdefault("GPUMARKET_URL", BASE_URL)
        environ.setdefault("COLUMNS", "200")  # room for whole ids in tables
        return CliRunner().invoke(app, ["job", *args], env=environ, obj=self.transport)

    def register_worker(self) -> HttpWorker:
        offers = [offer(price=100), offer(job_type="transcode", model="h264", price=1)]
        return self.portal.call(lambda: self.api.register_worker(offers=offers))

    def listening(self, worker: HttpWorker, wait_s: float = 5.0) -> None:
        """The worker long-polls for work in the background (and gets none at its price);
        returns once the orchestrator counts it as available."""
        self.listeners.append(
            self.portal.start_task_soon(lambda: self.api.lease(worker, wait_s=wait_s))
        )
        deadline = time.monotonic() + wait_s
        while True:
            with self.api.services.store.read() as s:
                row = s.get(WorkerRow, worker.worker_id)
                if row is not None and row.available_until and row.free_slots:
                    return
            assert time.monotonic() < deadline, "the worker never started polling"
            time.sleep(0.05)

    def complete_soon(self, worker: HttpWorker, blobs: list[dict[str, Any]] | None = None) -> None:
        """In the background on the app's loop: lease (long-polling) one job and complete it
        with EMBEDDINGS, or with ``blobs`` (a transcode's renditions)."""

        async def work() -> None:
            [leased] = await self.api.lease(worker, wait_s=5.0)
            job_id, attempt = leased["job_id"], leased["attempt"]
            if blobs is None:
                resp = await self.api.complete(worker, job_id, attempt, EMBEDDINGS, len(TEXTS))
            else:
                resp = await self.api.http.post(
                    f"/v1/workers/jobs/{job_id}/complete",
                    json=_blob_completion(
                        worker, job_id, attempt, blobs, int(leased["price_wei_per_unit"])
                    ),
                    headers=worker.headers,
                )
            assert resp.status_code == 200, resp.text

        self.background.append(self.portal.start_task_soon(work))


def _blob_completion(
    worker: HttpWorker, job_id: str, attempt: int, blobs: list[dict[str, Any]], price: int
) -> dict[str, Any]:
    """A transcode result: renditions the worker uploaded, priced per output pixel."""
    digest = output_sha256(blobs)
    units = sum(b["width"] * b["height"] * b["frames"] for b in blobs)
    return {
        "attempt": attempt,
        "output_blobs": blobs,
        "output_sha256": digest,
        "signature": sign_result(worker.account.key, job_id, attempt, digest, units, price),
        "duration_s": 1.5,
        "energy_j": 30.0,
        "energy_source": "estimate",
        "units": units,
    }


@pytest.fixture
def market(tmp_path: Path, sqlite_store: Store) -> Iterator[Market]:
    settings = Settings(
        data_dir=tmp_path / "data",
        admin_token="operator-token-for-tests-0123456789abcdef",
        long_poll_max_s=5.0,
        max_blob_bytes=1024 * 1024,
        verify_rate=0.0,  # a result is final at once; no second worker runs here
        verify_rate_new=0.0,
    )
    services = build_services(settings, store=sqlite_store, clock=time.time, rng=random.Random(7))
    application = create_app(settings, services=services, run_sweeper=False)
    asgi = httpx.ASGITransport(app=application)
    with (
        start_blocking_portal() as portal,
        portal.wrap_async_context_manager(application.router.lifespan_context(application)),
    ):
        http = httpx.AsyncClient(transport=asgi, base_url=BASE_URL)
        api = Api(http, services)
        key = portal.call(api.new_client)["Authorization"].removeprefix("Bearer ")
        market = Market(portal, api, PortalTransport(asgi, portal), key)
        try:
            yield market
        finally:
            for poll in market.listeners:  # an idle long-poll would hold the portal's exit
                poll.cancel()
            portal.call(http.aclose)
        for task in market.background:  # a scripted worker's failed result fails its test
            if task.done() and task.exception() is not None:
                raise AssertionError("the scripted worker failed") from task.exception()


def _submit_args(*extra: str) -> list[str]:
    texts = [arg for text in TEXTS for arg in ("--text", text)]
    return ["submit", "--model", EMBED_MODEL, *texts, "--max-price", "1000", *extra]


def _json(result: Result) -> Any:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_submit_then_status_list_and_cancel(market: Market) -> None:
    job = _json(market.invoke(*_submit_args("--preference", "cost", "--json")))
    assert (job["state"], job["model"], job["preference"]) == ("queued", EMBED_MODEL, "cost")
    assert job["max_price_wei_per_unit"] == "1000"

    shown = market.invoke("status", job["id"])
    assert shown.exit_code == 0, shown.output
    for column in ("id", "type", "model", "state", "worker", "cost wei", "energy J", "duration"):
        assert column in shown.stdout
    assert job["id"] in shown.stdout and "queued" in shown.stdout

    assert [j["id"] for j in _json(market.invoke("list", "--json"))] == [job["id"]]
    assert job["id"] in market.invoke("list", "--state", "queued").stdout
    assert "no jobs in state running" in market.invoke("list", "--state", "running").stdout

    assert _json(market.invoke("cancel", job["id"], "--json"))["state"] == "cancelled"
    assert _json(market.invoke("status", job["id"], "--json"))["state"] == "cancelled"


def test_texts_file_and_idempotency_key(market: Market, tmp_path: Path) -> None:
    texts = tmp_path / "texts.txt"
    texts.write_text("first\n\nsecond\nthird\n")
    args = ["submit", "--model", EMBED_MODEL, "--texts-file", str(texts), "--max-price", "2gwei"]
    first = _json(market.invoke(*args, "--idempotency-key", "batch-1", "--json"))
    again = _json(market.invoke(*args, "--idempotency-key", "batch-1", "--json"))
    assert again["id"] == first["id"]
    assert first["max_units"] == 3  # blank lines are skipped
    assert first["max_price_wei_per_unit"] == str(2 * 10**9)


def test_one_job_per_line_and_jobs_files_are_submitted_and_waited_on_in_batches(
    market: Market, tmp_path: Path
) -> None:
    worker = market.register_worker()
    lines = tmp_path / "lines.txt"
    lines.write_text("first\n\nsecond\nthird\n")
    args = ["submit", "--model", EMBED_MODEL, "--texts-file", str(lines), "--job-per-line"]
    args += ["--max-price", "1000", "--idempotency-key", "run-1"]

    async def work() -> None:  # the worker leases the three jobs and completes them
        done = 0
        while done < 3:
            for job in await market.api.lease(worker, wait_s=5.0, max_jobs=8):
                resp = await market.api.complete(
                    worker, job["job_id"], job["attempt"], {"embeddings": [[0.5]]}, 1
                )
                assert resp.status_code == 200, resp.text
                done += 1

    market.background.append(market.portal.start_task_soon(work))
    done = market.invoke(*args, "--wait", "--timeout-s", "20")
    assert done.exit_code == 0, done.output
    outcomes = done.stdout.strip().splitlines()
    assert len(outcomes) == 3
    assert all(" succeeded 1 unit(s) 100 wei by " + worker.address in o for o in outcomes)
    # The same keys again: the same three jobs, nothing new.
    again = _json(market.invoke(*args, "--json"))
    assert [i["created"] for i in again["jobs"]] == [False] * 3
    assert [i["job"]["idempotency_key"] for i in again["jobs"]] == [f"run-1-{n}" for n in (1, 2, 3)]

    jobs = tmp_path / "jobs.jsonl"
    good = {"type": "inference", "model": EMBED_MODEL, "input": {"texts": ["a"]}}
    bad = {**good, "model": "no-such-model"}
    jobs.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    refused = market.invoke("submit", "--jobs-file", str(jobs), "--max-price", "1000")
    assert refused.exit_code == 1, refused.output
    first, second = refused.stdout.strip().splitlines()
    assert first.startswith("job ") and first.endswith(" queued")
    assert second.startswith("job 2: refused (422): unknown inference model 'no-such-model'")
    jobs.write_text("{not json\n")
    broken = market.invoke("submit", "--jobs-file", str(jobs), "--max-price", "1000")
    assert broken.exit_code == 2 and "line 1 is not JSON" in broken.stderr


def test_submit_wait_prints_the_result_summary(market: Market) -> None:
    worker = market.register_worker()
    market.complete_soon(worker)
    done = market.invoke(*_submit_args("--wait", "--timeout-s", "20"))
    assert done.exit_code == 0, done.output
    assert f"{len(TEXTS)} x {DIM}" in done.stdout  # embeddings: count x dim
    assert "200" in done.stdout  # cost: 2 texts at the worker's 100 wei
    assert worker.address in done.stdout
    assert "succeeded" in done.stderr  # the state as the spinner followed it


def test_submit_wait_json_and_result(market: Market, tmp_path: Path) -> None:
    worker = market.register_worker()
    market.complete_soon(worker)
    result = _json(market.invoke(*_submit_args("--wait", "--json")))
    assert result["output"] == EMBEDDINGS and result["cost_wei"] == "200"

    again = market.invoke("result", result["job_id"])
    assert again.exit_code == 0, again.output
    assert "embeddings" in again.stdout and f"{len(TEXTS)} x {DIM}" in again.stdout

    saved = _json(market.invoke("result", result["job_id"], "--download", str(tmp_path), "--json"))
    [path] = saved["saved"]
    assert json.loads(Path(path).read_text()) == EMBEDDINGS


def test_transcode_uploads_the_video_and_downloads_renditions(
    market: Market, tmp_path: Path
) -> None:
    worker = market.register_worker()
    # The orchestrator bills what the file holds: a real 640x360 clip of 10 frames.
    rendition = make_test_clip(tmp_path / "360p.mp4", 640, 360, CLIP_FRAMES, 24).read_bytes()
    uploaded = market.portal.call(market.api.upload, worker.headers, rendition)
    blob = {"name": "360p", "sha256": uploaded["sha256"], "size": len(rendition)}
    blob.update(width=640, height=360, frames=CLIP_FRAMES)
    market.complete_soon(worker, blobs=[blob])
    video = make_test_clip(tmp_path / "clip.mp4", width=640, height=360, frames=CLIP_FRAMES)

    args = ["submit", "--video", str(video), "--rendition", "360p", "--rendition", "1080p:6000"]
    done = market.invoke(*args, "--max-price", "1", "--wait", "--timeout-s", "60")
    assert done.exit_code == 0, done.output
    assert uploaded["sha256"] in done.stdout and "640x360" in done.stdout

    [job] = _json(market.invoke("list", "--json"))
    assert (job["type"], job["state"]) == ("transcode", "succeeded")
    assert job["input_blob"] == hashlib.sha256(video.read_bytes()).hexdigest()
    assert job["cost_wei"] == str(640 * 360 * CLIP_FRAMES)  # 1 wei per output pixel
    assert job["max_units"] == 640 * 360 * CLIP_FRAMES  # probed: 1080p would upscale
    assert f"--max-units {640 * 360 * CLIP_FRAMES}: {CLIP_FRAMES} frames x (640x360)" in (
        done.stderr
    )
    assert [(r["name"], r["height"], r["bitrate_kbps"]) for r in job["renditions"]] == [
        ("360p", 360, 800),  # the default ladder's bitrate
        ("1080p", 1080, 6000),
    ]

    saved = market.invoke("result", job["id"], "--download", str(tmp_path / "out"))
    assert saved.exit_code == 0, saved.output
    assert (tmp_path / "out" / f"{job['id']}-360p.mp4").read_bytes() == rendition


def test_a_bad_key_is_one_red_line_with_the_fix(market: Market) -> None:
    refused = market.invoke("list", api_key="gmk_wrong")
    assert refused.exit_code == 1
    assert refused.exception is None or isinstance(refused.exception, SystemExit)
    assert "Traceback" not in refused.output
    [line] = refused.stderr.strip().splitlines()
    assert "unknown API key" in line and "401" in line
    assert "gpumarket orchestrator create-client" in line


def test_a_missing_key_says_how_to_get_one(market: Market) -> None:
    missing = market.invoke("list", api_key="")
    assert missing.exit_code == 2
    assert "no API key" in missing.stderr
    assert "GPUMARKET_API_KEY" in missing.stderr
    assert "gpumarket orchestrator create-client" in missing.stderr


def test_an_unknown_model_names_the_ones_there_are(market: Market) -> None:
    unknown = market.invoke("submit", "--model", "gpt-17", "--text", "hi", "--max-price", "1")
    assert unknown.exit_code == 1
    assert "unknown inference model 'gpt-17'" in unknown.stderr
    assert EMBED_MODEL in unknown.stderr  # the models it could have been
    assert "Traceback" not in unknown.output


def test_an_unknown_job_points_to_the_list(market: Market) -> None:
    missing = market.invoke("status", "nope")
    assert missing.exit_code == 1
    assert "no job nope" in missing.stderr and "gpumarket job list" in missing.stderr


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["submit", "--max-price", "1"], "give --model and --text"),
        (["submit", "--model", EMBED_MODEL, "--text", "x", "--max-price", "0"], "above 0"),
        (["submit", "--model", EMBED_MODEL, "--text", "x", "--max-price", "1btc"], "unknown"),
        (["submit", "--video", "missing.mp4", "--max-price", "1"], "no such file"),
        (["submit", "--video", "v.mp4", "--rendition", "4k", "--max-price", "1"], "HEIGHTp"),
        (["submit", "--video", "v.mp4", "--rendition", "1080p", "--max-price", "1"], "bitrate"),
        (["submit", "--model", EMBED_MODEL, "--rendition", "720p", "--max-price", "1"], "--video"),
    ],
)
def test_a_command_line_that_cannot_work_exits_2(
    market: Market, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], says: str
) -> None:
    (tmp_path / "v.mp4").write_bytes(b"\0")
    monkeypatch.chdir(tmp_path)
    refused = market.invoke(*args)
    assert refused.exit_code == 2, refused.output
    assert says in refused.stderr
    assert "Traceback" not in refused.output


def test_an_unreachable_orchestrator_is_one_line() -> None:
    closed = CliRunner().invoke(
        app,
        ["job", "list", "--orchestrator", "http://127.0.0.1:9", "--api-key", "gmk_x"],
        env={"COLUMNS": "200"},
    )
    assert closed.exit_code == 1
    [line] = closed.stderr.strip().splitlines()
    assert "cannot reach the orchestrator at http://127.0.0.1:9" in line
    assert "GPUMARKET_URL" in line


# -- output at any width: ids, addresses and hashes whole, one record per line when narrow ------

WIDTHS = ("40", "80", "200")


def _lines_with(text: str, token: str) -> list[str]:
    return [line for line in text.splitlines() if token in line]


@pytest.mark.parametrize("columns", WIDTHS)
def test_job_list_in_a_pipe_is_one_whole_record_per_line(market: Market, columns: str) -> None:
    worker = market.register_worker()
    market.complete_soon(worker)
    done = _json(market.invoke(*_submit_args("--wait", "--json")))
    queued = _json(market.invoke(*_submit_args("--json")))

    listed = market.invoke("list", COLUMNS=columns)
    assert listed.exit_code == 0, listed.output
    lines = listed.stdout.splitlines()
    assert len(lines) == 2, listed.stdout  # one line per job, whatever the width
    [first] = _lines_with(listed.stdout, queued["id"])
    [second] = _lines_with(listed.stdout, done["job_id"])
    assert "state: queued" in first and f"model: {EMBED_MODEL}" in first
    assert f"worker: {worker.address}" in second and "cost wei: 200" in second

    shown = market.invoke("status", done["job_id"], COLUMNS=columns)
    assert _lines_with(shown.stdout, done["job_id"]) and _lines_with(shown.stdout, worker.address)
    result = market.invoke("result", done["job_id"], COLUMNS=columns)
    for whole in (done["job_id"], worker.address, done["output_sha256"]):
        assert _lines_with(result.stdout, whole), (whole, result.stdout)


@pytest.mark.parametrize(("columns", "drawn"), [("40", False), ("80", False), ("200", True)])
def test_job_list_on_a_terminal_is_a_table_only_when_every_cell_fits(
    market: Market, columns: str, drawn: bool
) -> None:
    worker = market.register_worker()
    market.complete_soon(worker)
    done = _json(market.invoke(*_submit_args("--wait", "--json")))

    listed = market.invoke("list", COLUMNS=columns, TTY_COMPATIBLE="1")
    assert listed.exit_code == 0, listed.output
    assert ("│" in listed.stdout) is drawn, listed.stdout
    assert _lines_with(listed.stdout, done["job_id"]), listed.stdout
    assert _lines_with(listed.stdout, worker.address), listed.stdout
    if drawn:  # a drawn table fits the terminal; records are long lines the terminal wraps
        assert max(len(click.unstyle(line)) for line in listed.stdout.splitlines()) <= 200


@pytest.mark.parametrize("columns", WIDTHS)
def test_renditions_are_one_whole_line_each_at_any_width(
    market: Market, tmp_path: Path, columns: str
) -> None:
    worker = market.register_worker()
    rendition = make_test_clip(tmp_path / "360p.mp4", 640, 360, CLIP_FRAMES, 24).read_bytes()
    uploaded = market.portal.call(market.api.upload, worker.headers, rendition)
    blob = {"name": "360p", "sha256": uploaded["sha256"], "size": len(rendition)}
    blob.update(width=640, height=360, frames=CLIP_FRAMES)
    market.complete_soon(worker, blobs=[blob])
    video = make_test_clip(tmp_path / "clip.mp4", width=640, height=360, frames=CLIP_FRAMES)

    args = ["submit", "--video", str(video), "--rendition", "360p", "--max-price", "1", "--wait"]
    args += ["--timeout-s", "60"]  # not the default hour if the scripted worker's result fails
    done = market.invoke(*args, COLUMNS=columns)
    assert done.exit_code == 0, done.output
    [line] = _lines_with(done.stdout, uploaded["sha256"])
    assert "name: 360p" in line and "size: 640x360" in line and f"frames: {CLIP_FRAMES}" in line


# -- a job no worker will take at its price ------------------------------------------------------


def test_submit_says_why_no_worker_takes_the_job(market: Market) -> None:
    worker = market.register_worker()  # asks 100 wei per text
    market.listening(worker)
    submitted = market.invoke(*_submit_args()[:-2], "--max-price", "50")
    assert submitted.exit_code == 0, submitted.output
    [line] = submitted.stdout.splitlines()
    assert re.fullmatch(
        r"job \S+ queued: no available worker can take it: 1 asks 100 wei/unit, above the "
        r"job's 50",
        line,
    ), line


@pytest.mark.parametrize("as_json", [False, True])
def test_wait_stops_at_once_with_the_price_that_would_be_taken(
    market: Market, as_json: bool
) -> None:
    worker = market.register_worker()
    market.listening(worker)
    args = [*_submit_args()[:-2], "--max-price", "50", "--wait", "--timeout-s", "300"]
    # Stopped by the price, not after the 300 s timeout (whose message says "still queued").
    waited = market.invoke(*args, *(["--json"] if as_json else []), COLUMNS="40")
    assert waited.exit_code == 1, waited.output
    message = waited.stderr.strip().splitlines()[-1]
    assert "1 asks 100 wei/unit, above the job's 50" in message
    assert "--max-price 100" in message
    cancel = re.search(r"`gpumarket job (cancel \S+)`", message)
    assert cancel, message
    assert _json(market.invoke(*cancel[1].split(), "--json"))["state"] == "cancelled"


def test_a_job_held_back_by_anything_but_price_is_waited_for() -> None:
    from gpumarket.job_cli import lowest_ask_above_max

    busy = {"state": "queued", "waiting_reason": "no available worker can take it: 1 busy"}
    mixed = "no available worker can take it: 1 asks 9 wei/unit, above the job's 5; 1 busy"
    priced = "no available worker can take it: 2 asks 9 wei/unit, above the job's 5; 1 asks 7 "
    priced += "wei/unit, above the job's 5"
    assert lowest_ask_above_max(busy) is None
    assert lowest_ask_above_max({"state": "queued", "waiting_reason": mixed}) is None
    assert lowest_ask_above_max({"state": "queued", "waiting_reason": priced}) == 7
    assert lowest_ask_above_max({"state": "assigned", "waiting_reason": priced}) is None


def test_a_video_that_is_not_one_is_refused_before_upload(market: Market, tmp_path: Path) -> None:
    junk = tmp_path / "clip.mp4"
    junk.write_bytes(os.urandom(4096))
    refused = market.invoke("submit", "--video", str(junk), "--max-price", "1")
    assert refused.exit_code == 2, refused.output
    [line] = refused.stderr.splitlines()
    assert line.startswith(f"error: --video {junk}: input is not")
    assert _json(market.invoke("list", "--json")) == []


# -- errors: JSON with --json, and a server that is no orchestrator ------------------------------


def test_json_errors_are_one_json_object_on_stderr(market: Market) -> None:
    missing = market.invoke("status", "nope", "--json")
    assert missing.exit_code == 1
    assert missing.stdout == ""
    error = json.loads(missing.stderr)
    assert error["status"] == 404 and error["exit_code"] == 1
    assert "no job nope" in error["error"] and "gpumarket job list" in error["error"]

    usage = market.invoke("submit", "--max-price", "1", "--json")
    assert usage.exit_code == 2
    assert json.loads(usage.stderr)["error"].startswith("give --model and --text")


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (
            ["submit", "--max-price", "nope", "--text", "hi"],
            "Invalid value for --max-price: 'nope'",
        ),
        (["submit", "--bogus"], "No such option: --bogus"),
        (["status"], "Missing argument 'job_id'"),
    ],
)
def test_usage_errors_with_json_are_json_too(args: list[str], said: str) -> None:
    """Click's own errors (parsing, before the command runs) follow --json like the rest."""
    env = {"GPUMARKET_API_KEY": "gmk_x", "GPUMARKET_URL": BASE_URL, "COLUMNS": "40"}
    as_json = CliRunner().invoke(app, ["job", *args, "--json"], env=env, prog_name="gpumarket")
    assert as_json.exit_code == 2 and as_json.stdout == ""
    error = json.loads(as_json.stderr)
    assert error["exit_code"] == 2 and said in error["error"], error
    assert error["usage"].startswith(f"gpumarket job {args[0]} [OPTIONS]")

    plain = CliRunner().invoke(app, ["job", *args], env=env)
    assert plain.exit_code == 2 and said.split(":")[0] in " ".join(plain.stderr.split())
    with pytest.raises(json.JSONDecodeError):
        json.loads(plain.stderr)


def _answering(status: int, body: bytes, *args: str) -> Result:
    """``gpumarket job ARGS`` against a server that answers every request with ``body``."""
    transport = httpx.MockTransport(lambda request: httpx.Response(status, content=body))
    env = {"GPUMARKET_API_KEY": "gmk_x", "GPUMARKET_URL": BASE_URL, "COLUMNS": "80"}
    return CliRunner().invoke(app, ["job", *args], env=env, obj=transport)


@pytest.mark.parametrize("body", [b"", b'{"detail": "Not Found"}', b"<html>nginx</html>"])
def test_a_server_that_is_no_orchestrator_is_named_as_such(body: bytes) -> None:
    wrong = _answering(404, body, "list")
    assert wrong.exit_code == 1
    [line] = wrong.stderr.splitlines()
    assert f"{BASE_URL} answered HTTP 404 with " in line
    assert "not as a gpumarket orchestrator does" in line and "GPUMARKET_URL" in line
    assert "error:  (" not in line


def test_a_missing_max_units_names_the_option() -> None:
    problem = b'{"code": "invalid_input", "detail": "transcode jobs here need max_units, ..."}'
    refused = _answering(422, problem, "list")
    assert refused.exit_code == 1
    assert "set it with --max-units" in refused.stderr


def test_submit_says_when_no_worker_is_free_or_none_offers_the_model(market: Market) -> None:
    alone = market.invoke(*_submit_args())
    assert alone.exit_code == 0, alone.output
    assert alone.stdout.strip().endswith(
        f"queued: no worker that offers inference/{EMBED_MODEL} is connected"
    )

    other = market.portal.call(
        lambda: market.api.register_worker(offers=[offer(job_type="transcode", model="h264")])
    )
    market.listening(other)
    elsewhere = market.invoke(*_submit_args("--json"))
    assert json.loads(elsewhere.stdout)["waiting_reason"] == (
        f"none of the 1 free worker(s) offers inference/{EMBED_MODEL}"
    )


def test_status_says_how_verification_went(market: Market) -> None:
    worker = market.register_worker()
    market.complete_soon(worker)
    done = _json(market.invoke(*_submit_args("--wait", "--json")))
    released = "no worker could re-run it within 120 s (1 busy); released unchecked"
    with market.api.services.store.transaction() as s:
        row = s.get(JobRow, done["job_id"])
        assert row is not None
        row.verification = {"status": "inconclusive", "checks": [], "detail": released}
    shown = market.invoke("status", done["job_id"], COLUMNS="40")
    assert f"verification  inconclusive: {released}" in shown.stdout.splitlines()
