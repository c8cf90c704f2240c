"""``gpumarket job``: submit jobs and read their state and results from the shell.

    export GPUMARKET_URL=http://127.0.0.1:8000 GPUMARKET_API_KEY=gmk_...
    gpumarket job submit --model all-MiniLM-L6-v2 --text "hello" --max-price 1000000000 --wait
    gpumarket job submit --video clip.mp4 --rendition 720p --rendition 360p --max-price 1000
    gpumarket job submit --model all-MiniLM-L6-v2 --texts-file lines.txt --job-per-line --wait
    gpumarket job submit --jobs-file jobs.jsonl --max-price 1000000000   # JSON Lines of jobs
    gpumarket job list --state running
    gpumarket job result JOB_ID --download out/

Every command takes ``--json`` for machine output on stdout. An error is one red line on
stderr that says what to do (with ``--json``, one JSON object), with exit code 1 (2 for a
command line that cannot work). Tables are drawn only on a terminal wide enough for every
cell whole; in a pipe or a narrow terminal each record is one line (gpumarket/output.py).
``submit`` prints why a job waits; ``--wait`` stops at once when every available worker asks
more than ``--max-price``. A ``--video`` is probed here to set ``--max-units`` when not given.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from itertools import islice
from pathlib import Path
from typing import Annotated, Any, NoReturn

import httpx
import typer
from pydantic import ValidationError
from rich.console import Console
from typer.core import TyperGroup

try:  # typer carries its own copy of click since 0.2x; before, it used click itself
    from typer._click.core import Context
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover - older typer
    from click import Context, UsageError  # type: ignore[assignment]

from gpumarket.exceptions import GpumarketAPIError, JobFailed, JobTimeout
from gpumarket.output import Column, err_console, out_console, print_fields, print_table
from gpumarket.sdk import DEFAULT_WAIT_TIMEOUT_S, Client
from protocol.jobs import (
    DEFAULT_DEADLINE_S,
    DEFAULT_LADDER,
    Container,
    Precision,
    Preference,
    Rendition,
)

URL_ENV = "GPUMARKET_URL"
API_KEY_ENV = "GPUMARKET_API_KEY"
DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_LIST_LIMIT = 20
MAX_PAGE = 200  # the API's own page limit
NOT_A_PROBLEM_CODE = "error"  # ProblemError's code for a body that is no problem document
MAX_FOREIGN_DETAIL_CHARS = 120
HOW_TO_GET_A_KEY = (
    f"pass --api-key or set {API_KEY_ENV}; the orchestrator's operator makes one with "
    "`gpumarket orchestrator create-client NAME`"
)
FIX_BY_STATUS = {
    401: HOW_TO_GET_A_KEY,
    402: "fund and authorise your payer (`gpumarket wallet deposit`, `gpumarket wallet "
    "authorise`), or lower --max-price / --max-units",
    404: "`gpumarket job list` shows your jobs",
    413: "the file is over the orchestrator's upload limit",
}
CONTAINER_SUFFIX = {Container.MP4.value: ".mp4", Container.MPEGTS.value: ".ts"}
RENDITION_FORMAT = re.compile(r"^(?P<height>[0-9]{2,4})p(?::(?P<kbps>[0-9]+))?$")
LADDER: dict[str, Rendition] = {r.name: r for r in DEFAULT_LADDER if r.name}


class _JsonUsageErrors(TyperGroup):
    """``gpumarket job``: with ``--json`` on the line, a usage error (an unknown option, a bad
    or missing value) is a JSON object on stderr like every other error of the command:
    ``{"error": message, "exit_code": 2, "usage": "gpumarket job CMD [OPTIONS]"}``."""

    def parse_args(self, ctx: Context, args: list[str]) -> list[str]:
        ctx.meta["json_errors"] = "--json" in args
        return super().parse_args(ctx, args)

    def invoke(self, ctx: Context) -> Any:
        try:
            return super().invoke(ctx)
        except UsageError as exc:
            if not ctx.meta.get("json_errors"):
                raise
            body: dict[str, Any] = {"error": exc.format_message(), "exit_code": exc.exit_code}
            if exc.ctx is not None:
                body["usage"] = " ".join(exc.ctx.get_usage().split()).removeprefix("Usage: ")
            typer.echo(json.dumps(body), err=True)
            raise typer.Exit(code=exc.exit_code) from None


job_app = typer.Typer(
    help=f"Submit jobs and follow them (orchestrator from {URL_ENV}, key from {API_KEY_ENV}).",
    no_args_is_help=True,
    cls=_JsonUsageErrors,
)

OrchestratorOpt = Annotated[
    str, typer.Option("--orchestrator", envvar=URL_ENV, help="Orchestrator URL.")
]
ApiKeyOpt = Annotated[
    str | None,
    typer.Option(
        "--api-key", envvar=API_KEY_ENV, help="Client API key (gmk_...).", show_default=False
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]
JobIdArg = Annotated[str, typer.Argument(help="The job's id, as submit printed it.")]


def _out() -> Console:
    return out_console()


_json_errors: ContextVar[bool] = ContextVar("json_errors", default=False)
"""Set by a command run with --json: its errors are then a JSON object on stderr too."""


def _fail(message: str, code: int = 1, problem: GpumarketAPIError | None = None) -> NoReturn:
    """The error on stderr and exit ``code``: one red line however narrow the terminal (soft
    wrap), or with --json one JSON object: ``{"error": message, "exit_code": code}`` plus the
    orchestrator's ``status`` and ``code`` when it answered with a problem."""
    if _json_errors.get():
        body: dict[str, Any] = {"error": message, "exit_code": code}
        if problem is not None:
            body.update(status=problem.status, code=problem.code)
        typer.echo(json.dumps(body), err=True)
    else:
        err_console().print(f"error: {message}", style="red", markup=False)
    raise typer.Exit(code=code)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def describe_problem(exc: GpumarketAPIError, url: str = DEFAULT_URL) -> str:
    """The orchestrator's error in one line, with the fix where the status implies one. An
    answer that is no problem document came from something else than an orchestrator."""
    if exc.code == NOT_A_PROBLEM_CODE:
        said = _one_line(exc.detail)[:MAX_FOREIGN_DETAIL_CHARS] or "an empty body"
        return (
            f"{url} answered HTTP {exc.status} with {said!r}, not as a gpumarket orchestrator "
            f"does; is that its address? set --orchestrator or {URL_ENV}"
        )
    fix = FIX_BY_STATUS.get(exc.status)
    if fix is None and "max_units" in exc.detail:
        fix = "set it with --max-units"
    if fix is None and exc.retryable:
        fix = "the orchestrator is busy or restarting; try again shortly"
    line = f"{_one_line(exc.detail)} ({exc.status} {exc.code})"
    return f"{line}; {fix}" if fix else line


@contextmanager
def _client(ctx: typer.Context, url: str, api_key: str | None) -> Iterator[Client]:
    """A Client for the command, with every failure turned into a one-line error. Tests (and
    programs embedding the CLI) may pass an httpx transport as the Click context object."""
    if not api_key:
        _fail(f"no API key: {HOW_TO_GET_A_KEY}", code=2)
    if not url.startswith(("http://", "https://")):
        _fail(f"--orchestrator {url!r}: give it as http://host:port (or set {URL_ENV})", code=2)
    transport = ctx.obj if isinstance(ctx.obj, httpx.BaseTransport) else None
    try:
        with Client(url, api_key, transport=transport) as client:
            yield client
    except GpumarketAPIError as exc:
        _fail(describe_problem(exc, url), problem=exc)
    except JobFailed as exc:
        job = exc.job
        reason = job.get("failure_reason") or "no reason given"
        _fail(f"job {job['id']} {job['state']}: {_one_line(reason)}")
    except JobTimeout as exc:
        _fail(f"{exc}; it carries on: follow it with `gpumarket job status ID`")
    except httpx.TimeoutException as exc:
        _fail(f"the orchestrator at {url} did not answer in time ({type(exc).__name__})")
    except httpx.TransportError as exc:
        _fail(
            f"cannot reach the orchestrator at {url}: {_one_line(str(exc)) or type(exc).__name__}"
            f"; is it running? set --orchestrator or {URL_ENV}"
        )


def _print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2))


def _energy(item: dict[str, Any]) -> str:
    energy = item.get("energy_j")
    if energy is None:
        return "-"
    estimated = " (est.)" if item.get("energy_source") == "estimate" else ""
    return f"{energy:.2f}{estimated}"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


JOB_COLUMNS = (
    Column("id"),
    Column("type"),
    Column("model"),
    Column("state"),
    Column("worker"),
    Column("cost wei", right=True),
    Column("energy J", right=True),
    Column("duration", right=True),
)


def job_row(job: dict[str, Any]) -> list[str]:
    """A job's cells under JOB_COLUMNS; ids and addresses whole."""
    return [
        job["id"],
        job["type"],
        job["model"],
        job["state"],
        job.get("worker_address") or "-",
        job.get("cost_wei") or "-",
        _energy(job),
        _seconds(job.get("duration_s")),
    ]


def print_jobs(jobs: list[dict[str, Any]]) -> None:
    """A table on a wide terminal, else one job per line (see gpumarket.output)."""
    print_table(_out(), JOB_COLUMNS, [job_row(job) for job in jobs])


def _shape(value: Any) -> str:
    """``2 x 384`` for a nested list, the value itself for a scalar."""
    dims = []
    while isinstance(value, list):
        dims.append(len(value))
        value = value[0] if value else None
    return " x ".join(str(d) for d in dims) if dims else json.dumps(value)


RENDITION_COLUMNS = (
    Column("name"),
    Column("size"),
    Column("frames", right=True),
    Column("bytes", right=True),
    Column("sha256"),
)


def _print_result(result: dict[str, Any]) -> None:
    console = _out()
    fields = [
        ("job", result["job_id"]),
        ("worker", result["worker_address"]),
        ("units", str(result["units"])),
        ("cost wei", result["cost_wei"]),
        ("duration", _seconds(result["duration_s"])),
        ("energy J", _energy(result)),
        ("output sha256", result["output_sha256"]),
    ]
    fields += [(key, _shape(value)) for key, value in (result.get("output") or {}).items()]
    print_fields(console, fields)
    rows = []
    for blob in result.get("output_blobs") or []:
        size = f"{blob.get('width')}x{blob.get('height')}" if blob.get("height") else "-"
        frames = blob.get("frames")
        rows.append(
            [
                blob["name"],
                size,
                "-" if frames is None else str(frames),
                str(blob["size"]),
                blob["sha256"],
            ]
        )
    if rows:
        print_table(console, RENDITION_COLUMNS, rows, title="renditions")


def _read_texts(texts: list[str], texts_file: Path | None) -> list[str]:
    found = list(texts)
    if texts_file is not None:
        try:
            raw = sys.stdin.read() if str(texts_file) == "-" else texts_file.read_text()
        except OSError as exc:
            _fail(f"--texts-file: cannot read {texts_file}: {exc.strerror}", code=2)
        found.extend(line for line in raw.splitlines() if line.strip())
    return found


def parse_rendition(text: str) -> dict[str, Any]:
    """``720p`` (a rung of the default ladder) or ``HEIGHTp:KBPS`` (e.g. ``1080p:6000``)."""
    match = RENDITION_FORMAT.match(text.strip())
    if match is None:
        raise typer.BadParameter(
            f"{text!r}: use a ladder name ({', '.join(LADDER)}) or HEIGHTp:KBPS, e.g. 1080p:6000",
            param_hint="--rendition",
        )
    name = f"{match['height']}p"
    if match["kbps"] is not None:
        bitrate = int(match["kbps"])
    elif name in LADDER:
        bitrate = LADDER[name].bitrate_kbps
    else:
        raise typer.BadParameter(
            f"{name} is not in the default ladder; give its bitrate, e.g. {name}:6000",
            param_hint="--rendition",
        )
    try:
        rendition = Rendition(name=name, height=int(match["height"]), bitrate_kbps=bitrate)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise typer.BadParameter(f"{text!r}: {problems}", param_hint="--rendition") from exc
    return rendition.model_dump(mode="json", exclude_none=True)


def _transcode_max_units(video: Path, ladder: list[dict[str, Any]], quiet: bool) -> int:
    """The output pixels a transcode of ``video`` into ``ladder`` (empty: the default ladder)
    can encode at most, from probing the file here; said on stderr unless ``quiet``."""
    from worker.executors import transcode

    rungs = [Rendition.model_validate(r) for r in ladder] or list(DEFAULT_LADDER)
    try:
        estimate = transcode.estimate_output_pixels(
            video,
            [
                transcode.Rendition(
                    r.name or f"{r.height}p", r.width, r.height, r.fps, r.bitrate_kbps
                )
                for r in rungs
            ],
        )
    except (transcode.TranscodeError, OSError) as exc:
        _fail(f"--video {video}: {_one_line(str(exc))}", code=2)
    sizes = " + ".join(f"{w}x{h}" for w, h in estimate.sizes)
    if not quiet:
        err_console().print(
            f"--max-units {estimate.output_pixels}: {estimate.frames} frames x ({sizes}) output "
            "pixels at most; give --max-units to set another cap",
            markup=False,
        )
    return estimate.output_pixels


def _parse_price(text: str) -> int:
    from gpumarket.wallet import parse_amount_wei

    try:
        price = parse_amount_wei(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--max-price") from exc
    if price <= 0:
        raise typer.BadParameter("must be above 0 wei", param_hint="--max-price")
    return price


@job_app.command("submit")
def submit(
    ctx: typer.Context,
    max_price: Annotated[
        str,
        typer.Option(
            help="Most you pay per unit (a text for inference, an output pixel for transcode): "
            "wei, or with a unit: 2gwei.",
        ),
    ],
    model: Annotated[
        str | None,
        typer.Option(help="Model, e.g. all-MiniLM-L6-v2 (inference), SmolLM2-135M-Instruct."),
    ] = None,
    prompt: Annotated[
        str | None,
        typer.Option(help="Generate text from this prompt with --model (priced per token)."),
    ] = None,
    max_tokens: Annotated[
        int, typer.Option(help="With --prompt: most tokens to generate.", min=1, max=4096)
    ] = 128,
    temperature: Annotated[
        float, typer.Option(help="With --prompt: 0 is greedy; higher samples.", min=0, max=2)
    ] = 0.0,
    stream: Annotated[
        bool, typer.Option("--stream", help="With --prompt: print tokens as they come.")
    ] = False,
    text: Annotated[
        list[str] | None, typer.Option("--text", help="A text to embed (repeatable).")
    ] = None,
    texts_file: Annotated[
        Path | None, typer.Option(help="Texts to embed, one per line ('-': stdin).")
    ] = None,
    precision: Annotated[Precision, typer.Option(help="Inference precision.")] = Precision.FP32,
    video: Annotated[
        Path | None,
        typer.Option(help="Transcode this video: it is uploaded first.", dir_okay=False),
    ] = None,
    rendition: Annotated[
        list[str] | None,
        typer.Option(help="Output rendition: 720p, 480p, 360p or HEIGHTp:KBPS (repeatable)."),
    ] = None,
    container: Annotated[Container, typer.Option(help="Transcode output.")] = Container.MP4,
    max_units: Annotated[
        int | None,
        typer.Option(
            help="Most units you pay for (default: the number of texts; for a --video, its "
            "frames x the ladder's output pixels, probed here).",
            min=1,
        ),
    ] = None,
    preference: Annotated[
        Preference, typer.Option(help="What matters most in picking a worker.")
    ] = Preference.BALANCED,
    deadline_s: Annotated[
        float | None,
        typer.Option(
            help="Give up after this many seconds (default 1 h, or less where the orchestrator "
            "takes payment: at most half the payer's withdrawal delay; submit says which).",
        ),
    ] = None,
    idempotency_key: Annotated[
        str | None,
        typer.Option(
            help="Resubmitting with the same key returns the same job (with several jobs, "
            "job N gets KEY-N)."
        ),
    ] = None,
    job_per_line: Annotated[
        bool,
        typer.Option(
            "--job-per-line",
            help="With --texts-file: one job per line, submitted in batches.",
        ),
    ] = False,
    jobs_file: Annotated[
        Path | None,
        typer.Option(
            help="Jobs as JSON Lines, one job spec per line ('-': stdin), submitted in "
            "batches; --max-price and --preference fill what a line leaves out.",
        ),
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Follow the job until it is final.")] = False,
    timeout_s: Annotated[
        float, typer.Option(help="With --wait: stop waiting after this many seconds.")
    ] = DEFAULT_WAIT_TIMEOUT_S,
    orchestrator: OrchestratorOpt = DEFAULT_URL,
    api_key: ApiKeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Submit an inference job (--model with --text/--texts-file) or a transcode (--video)."""
    _json_errors.set(as_json)
    spec: dict[str, Any] = {
        "max_price_wei_per_unit": str(_parse_price(max_price)),
        "preference": preference.value,
    }
    texts = _read_texts(text or [], texts_file)
    if jobs_file is not None or job_per_line:
        if video is not None or (jobs_file is not None and (texts or model is not None)):
            _fail("--jobs-file holds whole jobs: leave out --video, --model and --text", 2)
        if job_per_line and (model is None or texts_file is None):
            _fail("--job-per-line needs --model and --texts-file", code=2)
        specs = (
            _read_jobs(jobs_file, spec)
            if jobs_file is not None
            else [
                {**spec, "type": "inference", "model": model, "precision": precision.value}
                | {"input": {"texts": [line]}}
                for line in texts
            ]
        )
        for field_, value in (("max_units", max_units), ("deadline_s", deadline_s)):
            if value is not None:
                for one in specs:
                    one.setdefault(field_, value)
        if idempotency_key is not None:
            for i, one in enumerate(specs, start=1):
                one.setdefault("idempotency_key", f"{idempotency_key}-{i}")
        with _client(ctx, orchestrator, api_key) as client:
            _submit_many(client, specs, wait=wait, timeout_s=timeout_s, as_json=as_json)
        return
    if video is not None:
        if texts or model is not None or precision is not Precision.FP32:
            _fail("--video makes a transcode job: leave out --model, --text and --precision", 2)
        ladder = [parse_rendition(r) for r in rendition or []]
        spec.update(type="transcode", container=container.value)
        if ladder:
            spec["renditions"] = ladder
        if not video.is_file():
            _fail(f"--video {video}: no such file", code=2)
    elif prompt is not None:
        if texts or rendition or model is None:
            _fail("--prompt makes a generate job: give --model, leave out --text", code=2)
        spec.update(type="generate", model=model, precision=precision.value)
        spec["generation"] = {
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": temperature,
        }
    else:
        if rendition:
            _fail("--rendition applies to transcode jobs: give the --video too", code=2)
        if model is None or not texts:
            _fail("give --model and --text (or --texts-file) for inference, or --video", code=2)
        spec.update(type="inference", model=model, precision=precision.value)
        spec["input"] = {"texts": texts}
    if video is not None and max_units is None:
        max_units = _transcode_max_units(video, ladder, quiet=as_json)
    if max_units is not None:
        spec["max_units"] = max_units
    if deadline_s is not None:
        spec["deadline_s"] = deadline_s
    with _client(ctx, orchestrator, api_key) as client:
        if video is not None:
            spec["input_blob"] = client.upload_blob(video)
        job = client.submit(spec, idempotency_key)
        if not as_json:
            _say_a_shortened_deadline(job, deadline_s)
        if stream and prompt is not None:
            _print_stream(client, job["id"])
            wait = True
        if not wait:
            if as_json:
                _print_json(job)
            else:
                _out().print(_job_line(job), markup=False)
            return
        try:
            result = _follow(client, job, timeout_s, quiet=as_json)
        except PricedOut as exc:
            _fail(str(exc))
        except JobTimeout as exc:
            _fail(f"{exc}; it carries on: follow it with `gpumarket job status {job['id']}`")
    if as_json:
        _print_json(result)
    else:
        _print_result(result)


def _print_stream(client: Client, job_id: str) -> None:
    """A generate job's text on stdout as its worker produces it (then the result follows)."""

    try:
        for piece in client.stream(job_id):
            sys.stdout.write(piece)
            sys.stdout.flush()
    except JobFailed:
        pass  # the result's wait below says how it ended
    sys.stdout.write("\n")


def _read_jobs(path: Path, defaults: dict[str, Any]) -> list[dict[str, Any]]:
    """Job specs from JSON Lines (blank lines skipped); ``defaults`` fill missing fields."""
    try:
        raw = sys.stdin.read() if str(path) == "-" else path.read_text()
    except OSError as exc:
        _fail(f"--jobs-file: cannot read {path}: {exc.strerror}", code=2)
    specs = []
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            one = json.loads(line)
        except ValueError as exc:
            _fail(f"--jobs-file {path} line {number} is not JSON: {exc}", code=2)
        if not isinstance(one, dict):
            _fail(f"--jobs-file {path} line {number}: a job is a JSON object", code=2)
        specs.append({**defaults, **one})
    if not specs:
        _fail(f"--jobs-file {path} holds no jobs", code=2)
    return specs


def _submit_many(
    client: Client, specs: list[dict[str, Any]], *, wait: bool, timeout_s: float, as_json: bool
) -> None:
    """Submit in batches; print one line per job (its id and state, or why it was refused),
    and with ``wait`` each one's outcome. Exit 1 when any job was refused or did not succeed."""
    items = client.submit_many(specs)
    refused = [i for i, item in enumerate(items, start=1) if item["error"] is not None]
    ids = [item["job"]["id"] for item in items if item["job"] is not None]
    outcomes = client.wait_many(ids, timeout_s) if wait and ids else []
    if as_json:
        _print_json({"jobs": items, "results": outcomes} if wait else {"jobs": items})
    else:
        out = _out()
        for number, item in enumerate(items, start=1):
            if item["error"] is not None:
                err = item["error"]
                out.print(f"job {number}: refused ({err['status']}): {err['detail']}", markup=False)
            elif not wait:
                out.print(_job_line(item["job"]), markup=False)
        for outcome in outcomes:
            out.print(_outcome_line(outcome), markup=False)
    failed = [o for o in outcomes if o["state"] != "succeeded"]
    if refused or failed:
        raise typer.Exit(code=1)


def _outcome_line(outcome: dict[str, Any]) -> str:
    """A result: ``job ID succeeded UNITS unit(s) COST wei``; else the final job's state."""
    if outcome["state"] == "succeeded":
        return (
            f"job {outcome['job_id']} succeeded {outcome['units']} unit(s) "
            f"{outcome['cost_wei']} wei by {outcome['worker_address']}"
        )
    why = f": {_one_line(outcome['failure_reason'])}" if outcome.get("failure_reason") else ""
    return f"job {outcome['id']} {outcome['state']}{why}"


def _say_a_shortened_deadline(job: dict[str, Any], asked_s: float | None) -> None:
    """On stderr, when the orchestrator gave the job less time than the default deadline."""
    from datetime import datetime

    given_s = (
        datetime.fromisoformat(job["deadline_at"]) - datetime.fromisoformat(job["created_at"])
    ).total_seconds()
    if asked_s is None and given_s < DEFAULT_DEADLINE_S - 1:
        err_console().print(
            f"job {job['id']}: deadline in {given_s:g} s, not the default {DEFAULT_DEADLINE_S:g} "
            "s: this orchestrator's limit for paid jobs",
            markup=False,
        )


def _job_line(view: dict[str, Any]) -> str:
    """``job ID STATE``, and why it waits when no worker can take it."""
    why = view.get("waiting_reason")
    return f"job {view['id']} {view['state']}" + (f": {_one_line(why)}" if why else "")


class PricedOut(Exception):
    """Every available worker asks more than the job's max price: waiting would not help."""


PRICE_EXCLUSION = re.compile(
    r"^[0-9]+ asks (?P<ask>[0-9]+) wei/unit, above the job's (?P<max>[0-9]+)$"
)
NO_WORKER_CAN_TAKE_IT = "no available worker can take it: "


def lowest_ask_above_max(view: dict[str, Any]) -> int | None:
    """The cheapest price (wei/unit) available workers ask, when the job is queued only
    because each asks more than its max price; None when anything else holds it back."""
    why = view.get("waiting_reason") or ""
    if view.get("state") != "queued" or not why.startswith(NO_WORKER_CAN_TAKE_IT):
        return None
    asks = []
    for part in why.removeprefix(NO_WORKER_CAN_TAKE_IT).split("; "):
        match = PRICE_EXCLUSION.match(part)
        if match is None:
            return None
        asks.append(int(match["ask"]))
    return min(asks) if asks else None


def _stop_if_priced_out(view: dict[str, Any]) -> None:
    ask = lowest_ask_above_max(view)
    if ask is not None:
        raise PricedOut(
            f"job {view['id']} waits: {_one_line(view['waiting_reason'])}; the cheapest worker "
            f"would take it at --max-price {ask} (wei/unit). It stays queued until a worker "
            f"takes it or its deadline: `gpumarket job cancel {view['id']}` withdraws it"
        )


def _follow(client: Client, job: dict[str, Any], timeout_s: float, quiet: bool) -> dict[str, Any]:
    """``wait`` with a spinner showing the job's state on stderr (nothing with ``quiet``).
    Raises PricedOut at once when every available worker asks more than the job allows."""
    _stop_if_priced_out(job)
    if quiet:
        return client.wait(job["id"], timeout_s, on_progress=_stop_if_priced_out)
    console = err_console()
    seen: list[str] = []

    with console.status(_job_line(job)) as status:

        def show(view: dict[str, Any]) -> None:
            status.update(_job_line(view))
            if not seen or seen[-1] != view["state"]:
                seen.append(view["state"])
                console.print(_job_line(view), markup=False)
            _stop_if_priced_out(view)

        return client.wait(job["id"], timeout_s, on_progress=show)


@job_app.command("status")
def status(
    ctx: typer.Context,
    job_id: JobIdArg,
    orchestrator: OrchestratorOpt = DEFAULT_URL,
    api_key: ApiKeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """One job: its state, worker, cost, energy and duration."""
    _json_errors.set(as_json)
    with _client(ctx, orchestrator, api_key) as client:
        job = client.get(job_id)
    if as_json:
        _print_json(job)
        return
    fields = list(zip((c.name for c in JOB_COLUMNS), job_row(job), strict=True))
    for key in ("waiting_reason", "failure_reason"):
        if job.get(key):
            fields.append((key.replace("_", " "), _one_line(job[key])))
    verification = job.get("verification")
    if verification:
        said = _one_line(verification.get("detail") or "")
        fields.append(("verification", f"{verification['status']}" + (f": {said}" if said else "")))
    print_fields(_out(), fields)


@job_app.command("list")
def list_jobs(
    ctx: typer.Context,
    state: Annotated[
        str | None, typer.Option(help="Only jobs in this state, e.g. running, failed.")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="Show at most this many.")] = DEFAULT_LIST_LIMIT,
    orchestrator: OrchestratorOpt = DEFAULT_URL,
    api_key: ApiKeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Your jobs, newest first."""
    _json_errors.set(as_json)
    with _client(ctx, orchestrator, api_key) as client:
        jobs = list(islice(client.list(state=state, limit=min(limit, MAX_PAGE)), limit))
    if as_json:
        _print_json(jobs)
    elif jobs:
        print_jobs(jobs)
    else:
        _out().print("no jobs" + (f" in state {state}" if state else ""))


@job_app.command("result")
def result(
    ctx: typer.Context,
    job_id: JobIdArg,
    download: Annotated[
        Path | None,
        typer.Option(
            help="Save the outputs in this folder: renditions as video files, inline output "
            "as JOB_ID.json.",
            file_okay=False,
        ),
    ] = None,
    orchestrator: OrchestratorOpt = DEFAULT_URL,
    api_key: ApiKeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The signed result of a succeeded job: outputs, cost, duration and energy."""
    _json_errors.set(as_json)
    saved: list[Path] = []
    with _client(ctx, orchestrator, api_key) as client:
        found = client.result(job_id)
        if download is not None:
            saved = _download(client, found, download)
    if as_json:
        _print_json(found if download is None else {**found, "saved": [str(p) for p in saved]})
        return
    _print_result(found)
    for path in saved:
        _out().print(f"saved {path}", markup=False, soft_wrap=True)


def _download(client: Client, found: dict[str, Any], folder: Path) -> list[Path]:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _fail(f"--download: cannot make {folder}: {exc.strerror}", code=2)
    job_id = found["job_id"]
    blobs = found.get("output_blobs") or []
    if not blobs:
        path = folder / f"{job_id}.json"
        path.write_text(json.dumps(found.get("output"), indent=2) + "\n")
        return [path]
    suffix = CONTAINER_SUFFIX.get(client.get(job_id).get("container") or "", ".mp4")
    return [
        client.download_blob(blob["sha256"], folder / f"{job_id}-{blob['name']}{suffix}")
        for blob in blobs
    ]


@job_app.command("cancel")
def cancel(
    ctx: typer.Context,
    job_id: JobIdArg,
    orchestrator: OrchestratorOpt = DEFAULT_URL,
    api_key: ApiKeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Cancel a job that has not finished; a running worker stops at its next heartbeat."""
    _json_errors.set(as_json)
    with _client(ctx, orchestrator, api_key) as client:
        job = client.cancel(job_id)
    if as_json:
        _print_json(job)
    else:
        _out().print(f"job {job['id']} {job['state']}", soft_wrap=True)
