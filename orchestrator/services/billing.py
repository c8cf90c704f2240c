"""Billing: the units a result is billed for, derived by the orchestrator from what it holds.

A worker reports ``units`` with each result and signs them (protocol/signing.py), but its
figure is never taken on trust:

- **transcode**: units are output pixels, ``frames x width x height`` summed over the
  renditions. The orchestrator holds every output blob, so it probes each file (PyAV: the
  video stream's size, and its packets counted without decoding, one per frame for H.264)
  and sums. The sizes and frame counts a worker lists for its blobs must match the files.
- **generate**: units are tokens, prompt + completion, from the result's ``usage``; the
  completion count must match the token ids it holds and the job's ``max_tokens``, the prompt
  count the bound taken at submit. The prompt tokens are also reported (and signed) apart,
  as ``prompt_units``: they are billed at the prompt price, the rest at the job's price.
- **inference**: units are input items (texts or tensor rows), counted from the job's input
  (inline, or the JSON input blob the orchestrator holds), as the worker counts them.

A result whose reported units differ from the derived figure is refused (422) and counts
against the worker's reputation (see leases.complete). What the files cannot tell (a worker
that encoded more frames than the client's frame-rate ceiling allows, for instance) is what
verification's re-run on another worker compares (verification.compare).

Probing reads container headers and packets only: milliseconds per rendition, done before the
completion's transaction so the store's write lock is never held for it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Row, case

from orchestrator.exceptions import InvalidInput
from orchestrator.store.models import Job
from protocol import JobSpec, JobType, Offer, OutputBlob
from protocol.generation import generation_output_usage
from protocol.units import cost_wei

JobRow = Job | Row[Any]
"""A job, or a row of its columns read set-based (dispatch, leases): what the pricing helpers
below read of it (type, spec, max_units and the prices) either has."""
UNITS_COLUMNS = (Job.id, Job.type, Job.spec, Job.input_blob)
"""The columns of a job ``derive_units`` reads: a batch that counts units apart loads only these."""
MAX_INPUT_JSON_BYTES = 16 * 1024 * 1024
"""The largest JSON input blob counted for inference units (the worker refuses larger)."""


@dataclass(frozen=True)
class VideoProbe:
    """What one output file holds: size in pixels and the number of video frames."""

    width: int
    height: int
    frames: int

    @property
    def pixels(self) -> int:
        """Output pixels: frames x width x height (the transcode price unit)."""
        return self.frames * self.width * self.height


class NotAVideo(ValueError):
    """A file that cannot be billed as a rendition; the message says why, for a person."""


def probe_video(path: Path) -> VideoProbe:
    """Size and frame count of the first video stream in ``path``; NotAVideo if the file is
    not a video PyAV can read. Frames are counted from packets, without decoding."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise NotAVideo("it has no video stream")
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            frames = sum(1 for packet in container.demux(stream) if packet.size > 0)
    except NotAVideo:
        raise
    except Exception as exc:  # an untrusted file: whatever PyAV raises, it is not billable
        raise NotAVideo(f"it is not a readable video ({type(exc).__name__}: {exc})") from exc
    if width <= 0 or height <= 0:
        raise NotAVideo("its video stream has no frame size")
    return VideoProbe(width=width, height=height, frames=frames)


def transcode_units(blobs: list[OutputBlob], blob_path: Callable[[str], Path]) -> int:
    """Output pixels over all ``blobs``, from the files themselves; InvalidInput when a file
    is not a video or does not match the width, height or frames listed for it."""
    total = 0
    for blob in blobs:
        try:
            probe = probe_video(blob_path(blob.sha256))
        except NotAVideo as exc:
            raise InvalidInput(
                f"output blob {blob.sha256} ({blob.name}) cannot be billed: {exc}"
            ) from exc
        listed = {"width": blob.width, "height": blob.height, "frames": blob.frames}
        found = {"width": probe.width, "height": probe.height, "frames": probe.frames}
        wrong = [
            f"{k} {v} (the file has {found[k]})"
            for k, v in listed.items()
            if v not in (None, found[k])
        ]
        if wrong:
            raise InvalidInput(
                f"output blob {blob.sha256} ({blob.name}) lists {', '.join(wrong)}; "
                "describe each rendition as its file is"
            )
        total += probe.pixels
    return total


def inference_units(job: JobRow, blob_path: Callable[[str], Path]) -> int:
    """Input items of an inference job: inline texts or tensor rows, else those in its JSON
    input blob; InvalidInput when the input blob cannot be counted."""
    inline: Any = (job.spec or {}).get("input")
    if inline is not None:
        return _item_count(inline)
    if job.input_blob is None:
        raise InvalidInput(f"job {job.id} has no input to count units from")
    path = blob_path(job.input_blob)
    try:
        if path.stat().st_size > MAX_INPUT_JSON_BYTES:
            raise InvalidInput(f"input blob {job.input_blob} is over {MAX_INPUT_JSON_BYTES} bytes")
        body = json.loads(path.read_bytes())
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"input blob {job.input_blob} cannot be counted: {exc}") from exc
    return _item_count(body)


def _item_count(body: Any) -> int:
    """Items as the worker counts them: the ``texts`` list, else the ``tensors`` list."""
    if not isinstance(body, dict):
        return 0
    items = body.get("texts") or body.get("tensors")
    return len(items) if isinstance(items, list) else 0


def generation_units(job: JobRow, output: dict[str, Any] | None) -> int:
    """Tokens a generation result bills: its prompt tokens + its completion tokens. The
    completion tokens must be the token ids it holds, no more than the job's ``max_tokens``;
    the prompt tokens at most the bound taken at submit. What a count cannot show (a prompt
    count that is off, tokens another model would not produce) is verification's to catch:
    teacher forcing on another worker recounts the prompt and checks every token."""
    usage = generation_output_usage(output)
    if usage is None or output is None:
        raise InvalidInput(
            "generation results need output.usage {prompt_tokens, completion_tokens}"
        )
    token_ids = output.get("token_ids")
    if "check" not in output:
        if not isinstance(token_ids, list) or len(token_ids) != usage.completion_tokens:
            raise InvalidInput(
                "output.usage.completion_tokens must equal the number of output.token_ids"
            )
        if not isinstance(output.get("text"), str):
            raise InvalidInput("generation results need output.text")
        max_tokens = _max_tokens(job)
        if usage.completion_tokens > max_tokens:
            raise InvalidInput(
                f"{usage.completion_tokens} completion tokens, above the job's max_tokens "
                f"{max_tokens}"
            )
    bound = prompt_token_bound(job)
    if bound is not None and usage.prompt_tokens > bound:
        raise InvalidInput(
            f"{usage.prompt_tokens} prompt tokens, above the job's bound of {bound} (one token "
            "per prompt byte, plus the chat template's)"
        )
    return usage.total_tokens


def _max_tokens(job: JobRow) -> int:
    return int(((job.spec or {}).get("input") or {}).get("max_tokens") or 0)


def prompt_token_bound(job: JobRow) -> int | None:
    """The most prompt tokens a generate job may bill: its token bound (``max_units``, set
    at submit to the prompt's bound + max_tokens) less max_tokens. None for other jobs."""
    if job.type != JobType.GENERATE or job.max_units is None:
        return None
    return max(job.max_units - _max_tokens(job), 0)


def token_bounds(job: JobRow) -> tuple[int, int]:
    """A generate job's most prompt tokens and most completion tokens (max_tokens); (0, 0)
    for other jobs."""
    return token_bounds_of(job.type, job.max_units, _max_tokens(job))


def token_bounds_of(
    job_type: str, max_units: int | None, max_tokens: int | None
) -> tuple[int, int]:
    """``token_bounds`` from a job's type, ``max_units`` and max_tokens (``MAX_TOKENS``)."""
    if job_type != JobType.GENERATE or max_units is None:
        return (0, 0)
    tokens = max_tokens or 0
    return (max(max_units - tokens, 0), tokens)


MAX_TOKENS = case(
    (Job.type == JobType.GENERATE.value, Job.spec["input"]["max_tokens"].as_integer()),
    else_=None,
).label("max_tokens")
"""A generate job's max_tokens, read in SQL (NULL for other jobs): a dispatch round reads it
of every queued job it looks at, without decoding their specs (an inference job's holds all
its texts)."""


def agreed_prompt_price(job: JobRow, offer: Offer) -> int | None:
    """What a job matched to ``offer`` pays per prompt token: generate jobs only."""
    return offer.prompt_price if job.type == JobType.GENERATE else None


def prompt_units(job: JobRow, output: dict[str, Any] | None) -> int:
    """The units of a result billed at the prompt price: a generate result's prompt tokens
    (``output.usage.prompt_tokens``), 0 for other jobs."""
    if job.type != JobType.GENERATE:
        return 0
    usage = generation_output_usage(output)
    return usage.prompt_tokens if usage is not None else 0


def check_prompt_units(job: JobRow, reported: int, output: dict[str, Any] | None) -> None:
    """InvalidInput unless ``reported`` (the result's signed ``prompt_units``) is what its
    output holds."""
    held = prompt_units(job, output)
    if reported != held:
        what = "output.usage.prompt_tokens" if job.type == JobType.GENERATE else "none"
        raise InvalidInput(
            f"prompt_units is {reported}, but the result holds {held} prompt tokens ({what}); "
            f"report and sign prompt_units={held}"
        )


def signed_prompt_price(job: JobRow) -> int:
    """The prompt price a result of ``job`` signs (wei per prompt token): the agreed one for
    generate jobs (their price when none was agreed apart), 0 for other jobs."""
    if job.type != JobType.GENERATE:
        return 0
    return job.prompt_price_wei_per_unit or job.price_wei_per_unit or 0


def job_cost_wei(job: JobRow, units: int, prompt: int) -> int:
    """What a result of ``units`` units, ``prompt`` of them prompt tokens, costs at the
    job's agreed prices (wei, exact)."""
    assert job.price_wei_per_unit is not None
    return cost_wei(units, job.price_wei_per_unit, prompt, signed_prompt_price(job))


def cost_bound_wei(job: Job) -> int:
    """The most ``job`` can cost (wei): fixed at submit; for a job from before it was kept,
    max_units (else units) at the max price."""
    if job.max_cost_wei is not None:
        return job.max_cost_wei
    return job.max_price_wei_per_unit * (job.max_units or job.units or 0)


def derive_units(
    job: JobRow,
    output_blobs: list[OutputBlob] | None,
    blob_path: Callable[[str], Path],
    output: dict[str, Any] | None = None,
) -> int:
    """The units this result is billed for, as the orchestrator counts them (see above)."""
    if job.type == JobType.GENERATE:
        return generation_units(job, output)
    if job.type == JobType.TRANSCODE:
        if not output_blobs:
            raise InvalidInput("transcode results are files: send output_blobs")
        return transcode_units(output_blobs, blob_path)
    return inference_units(job, blob_path)


def units_mismatch(reported: int, derived: int, job: Job) -> str:
    """The 422 detail for a result that reports other units than those derived."""
    what = "output pixels (frames x width x height of the output blobs)"
    if job.type == JobType.GENERATE:
        what = "tokens (output.usage: prompt + completion)"
    elif job.type != JobType.TRANSCODE:
        what = "input items"
    return (
        f"units is {reported}, but the result holds {derived} {what}; "
        f"report and sign units={derived}"
    )


def bound_terms(spec: JobSpec) -> str:
    """How ``spec.cost_bound_wei()`` is reached, in words (for a refusal a client can act on)."""
    if spec.generation is None:
        return f"{spec.max_units} units at up to {spec.max_price_wei_per_unit} wei"
    prompt = spec.generation.prompt_token_bound()
    return (
        f"up to {prompt} prompt tokens at {spec.prompt_price_cap} wei + max_tokens "
        f"{spec.generation.max_tokens} at {spec.max_price_wei_per_unit} wei; lower max_tokens, "
        "the max prices or the prompt to need less"
    )
