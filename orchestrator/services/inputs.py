"""Input checks before any lease: what can be found wrong with a job's input here is refused
at submit (422), so a client's bad input never reaches, or costs, a worker.

- transcode: the input blob is probed once (cached on its ``blobs`` row): not empty, a media
  file in an accepted container (the worker's list, ``protocol.ALLOWED_INPUT_FORMATS``), with a
  video stream of known size whose first picture decodes, and not truncated: the video packets
  in the file are counted (demuxing only, no decoding) against the frames and duration the
  container's index declares, so an MP4 cut short is caught whether its index is at the end
  (then it does not open) or at the front (``+faststart``: it opens and lies). Then the ladder:
  a job whose every rendition would upscale the probed picture is refused.
- inference: texts are non-empty (protocol); tensor rows must have the shape the model's
  manifest declares when the workers offering it advertise one (``Offer.input``); an
  ``input_blob`` must be JSON in the inline input's shape.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from orchestrator.store import Store
from orchestrator.store.models import Blob, Job, RefusedInput, Worker
from protocol import InferenceInput, JobSpec, JobType, Offer, Rendition
from protocol.generation import GenerationInput
from protocol.jobs import ALLOWED_INPUT_FORMATS, MAX_INPUT_JSON_BYTES
from protocol.signing import canonical_json
from protocol.workers import TensorShape

PROBE_VERSION = 1  # a cached probe of another version is made again
MISSING_BLOB = "the input blob's file is missing on the orchestrator; upload it again"
# How long an input confirmed bad is refused at submit without asking a worker again (seconds).
REFUSED_INPUT_TTL_S = 24 * 3600.0
# Packets decoded at most while looking for the first picture (a decoder may need a few).
PROBE_DECODE_PACKETS = 64
# Frames a file may hold fewer of than its index declares before it counts as truncated
# (edit lists and decoder delay can hide one).
TRUNCATION_TOLERANCE_FRAMES = 1
# Seconds of video a file may lack against the duration its index declares, at least.
TRUNCATION_TOLERANCE_S = 0.1
# Containers whose index declares a trustworthy duration (MPEG-TS estimates it from bitrate).
INDEXED_FORMATS = ("mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm")


@dataclass(frozen=True)
class MediaProbe:
    """What the orchestrator found in a transcode input. Pixels, frames, seconds."""

    error: str | None = None
    width: int = 0
    height: int = 0
    display_width: int = 0
    frames_declared: int | None = None
    frames_found: int = 0
    duration_declared_s: float | None = None
    duration_found_s: float | None = None
    version: int = PROBE_VERSION

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any] | None) -> MediaProbe | None:
        if not raw or raw.get("version") != PROBE_VERSION:
            return None
        return cls(**raw)


def input_key(job: Job) -> str:
    """What makes two of a client's jobs the same input: the client, type, model, precision,
    input blob and request (texts or tensors, ladder, container); not price, deadline or
    preference. sha256 hex. Per client: workers that wrongly confirm each other's claim can
    hold up that client's request for ``REFUSED_INPUT_TTL_S``, nobody else's."""
    return job_input_key(
        job.client_id, job.type, job.model, job.precision, job.input_blob, job.spec
    )


def job_input_key(
    client_id: str,
    job_type: str,
    model: str,
    precision: str,
    input_blob: str | None,
    spec: dict[str, Any],
) -> str:
    body = {
        "client": client_id,
        "type": str(job_type),
        "model": model,
        "precision": str(precision),
        "input_blob": input_blob,
        "spec": spec,
    }
    return hashlib.sha256(canonical_json(body)).hexdigest()


def refused_reason(s: Session, key: str, now: float) -> str | None:
    """Why this input was confirmed bad, if it was within ``REFUSED_INPUT_TTL_S``."""
    refused = s.get(RefusedInput, key)
    if refused is None or now - refused.created_at > REFUSED_INPUT_TTL_S:
        return None
    return f"this input already failed: {refused.reason}"


def _even(value: Fraction) -> int:
    return max(2, 2 * round(value / 2))


def probe_media(path: Path) -> MediaProbe:
    """Probe a transcode input the way the worker will read it; ``error`` says what is wrong."""
    if not path.is_file():
        return MediaProbe(error=MISSING_BLOB, version=0)  # version 0: never cached
    if path.stat().st_size == 0:
        return MediaProbe(error="input is empty (0 bytes); upload the video file itself")
    options = {"format_whitelist": ",".join(ALLOWED_INPUT_FORMATS), "protocol_whitelist": "file"}
    try:
        source = av.open(
            f"file:{path.resolve()}", "r", container_options=options, metadata_errors="ignore"
        )
    except av.FFmpegError as exc:
        return MediaProbe(
            error="input is not a readable media file in an accepted container (mp4/mov, "
            "mpegts, matroska/webm, avi, flv, mpeg-ps, raw h264/hevc, ivf): "
            f"{exc.strerror or type(exc).__name__}"
        )
    try:
        return _probe_open(source)
    except av.FFmpegError as exc:
        return MediaProbe(
            error=f"input is corrupt; reading it failed: {exc.strerror or type(exc).__name__}"
        )
    finally:
        source.close()


def _probe_open(source: Any) -> MediaProbe:
    if not source.streams.video:
        kinds = sorted({stream.type for stream in source.streams}) or ["none"]
        return MediaProbe(error=f"input has no video stream (streams found: {', '.join(kinds)})")
    stream = source.streams.video[0]
    context = stream.codec_context
    if context is None or context.width <= 0 or context.height <= 0:
        return MediaProbe(error="input video stream has no frame size or no decoder (corrupt?)")
    context.thread_count = 1
    sample_aspect = context.sample_aspect_ratio or Fraction(1)
    aspect = Fraction(context.width, context.height) * (sample_aspect if sample_aspect > 0 else 1)
    display_width = _even(context.height * aspect)
    frames_found, decoded, end_pts, start_pts = 0, False, None, None
    for index, packet in enumerate(source.demux(stream)):
        if not packet.size:
            continue
        frames_found += 1
        if packet.pts is not None:
            start_pts = packet.pts if start_pts is None else min(start_pts, packet.pts)
            end = packet.pts + (packet.duration or 0)
            end_pts = end if end_pts is None else max(end_pts, end)
        if not decoded and index < PROBE_DECODE_PACKETS:
            decoded = bool(packet.decode())
    if not decoded:
        for _ in context.decode(None):  # pictures the decoder held back
            decoded = True
    if not decoded:
        return MediaProbe(error="input video has no decodable picture (corrupt or truncated?)")
    declared = stream.frames or None
    declared_s = None
    if source.format.name in INDEXED_FORMATS and stream.duration and stream.time_base:
        declared_s = float(stream.duration * stream.time_base)
    found_s = None
    if end_pts is not None and start_pts is not None and stream.time_base:
        found_s = float((end_pts - start_pts) * stream.time_base)
    probe = MediaProbe(
        width=context.width,
        height=context.height,
        display_width=display_width,
        frames_declared=declared,
        frames_found=frames_found,
        duration_declared_s=declared_s,
        duration_found_s=found_s,
    )
    return _truncation(probe) or probe


def _truncation(probe: MediaProbe) -> MediaProbe | None:
    """The probe with an error if the file holds less video than its index declares."""
    short_frames = (
        probe.frames_declared is not None
        and probe.frames_found < probe.frames_declared - TRUNCATION_TOLERANCE_FRAMES
    )
    short_time = (
        probe.duration_declared_s is not None
        and probe.duration_found_s is not None
        and probe.duration_found_s < probe.duration_declared_s - TRUNCATION_TOLERANCE_S
    )
    if not (short_frames or short_time):
        return None
    declared = f"{probe.frames_declared} frames" if probe.frames_declared else "more video"
    if probe.duration_declared_s is not None:
        declared += f" ({probe.duration_declared_s:.2f} s)"
    found = f"{probe.frames_found} frames"
    if probe.duration_found_s is not None:
        found += f" ({probe.duration_found_s:.2f} s)"
    error = (
        f"input is truncated: its container declares {declared} of video but the file holds "
        f"{found}; upload the whole file"
    )
    return MediaProbe(**{**probe.to_json(), "error": error})


def ladder_problem(probe: MediaProbe, ladder: Iterable[Rendition]) -> str | None:
    """Why no rendition of ``ladder`` can be made from the probed input (all would upscale)."""
    rungs = list(ladder)
    aspect = Fraction(probe.display_width, probe.height)
    for rendition in rungs:
        width = rendition.width or _even(rendition.height * aspect)
        if rendition.height <= probe.height and width <= probe.display_width:
            return None
    asked = ", ".join(r.label for r in rungs)
    return (
        f"every requested rendition ({asked}) would upscale the "
        f"{probe.display_width}x{probe.height} input; ask for renditions at most "
        f"{probe.height} pixels high"
    )


def _row_shape(row: Any) -> list[int] | None:
    """The shape of a nested list of numbers, or None if it is ragged or not numeric."""
    if not isinstance(row, list):
        return [] if isinstance(row, int | float) and not isinstance(row, bool) else None
    if not row:
        return [0]
    shapes = [_row_shape(item) for item in row]
    first = shapes[0]
    if first is None or any(shape != first for shape in shapes):
        return None
    return [len(row), *first]


def tensor_problem(model: str, rows: list[Any], advertised: list[TensorShape]) -> str | None:
    """Why ``rows`` do not fit the model's manifest, when its workers advertise one."""
    if not advertised:
        return None
    wanted = {tuple(shape.shape) for shape in advertised}
    expected = " or ".join(str(list(shape)) for shape in sorted(wanted))
    for index, row in enumerate(rows):
        shape = _row_shape(row)
        if shape is None:
            return f"input.tensors[{index}] is ragged or not numbers; {model} takes {expected}"
        if tuple(shape) not in wanted:
            return f"input.tensors[{index}] has shape {shape}; {model} takes rows of {expected}"
    return None


def prompt_bytes(generation: GenerationInput) -> int:
    """UTF-8 bytes of a generation's own text (the prompt, or every message's content): the
    text a chat template wraps never has fewer."""
    if generation.prompt is not None:
        return len(generation.prompt.encode())
    return sum(len(m.content.encode()) for m in generation.messages or [])


def context_problem(model: str, size: int, offers: list[Offer]) -> str | None:
    """Why a prompt of ``size`` UTF-8 bytes cannot fit ``model`` on any worker offering it,
    or None when it may. Sound, not tight: one token stands for at most ``max_token_bytes``
    bytes, so the prompt is at least ``ceil(size / max_token_bytes)`` tokens, and a worker
    needs room for one more token in its ``context_tokens``. Said only when every offer of the
    model gives both figures and none has room."""
    if not offers:
        return None
    floors = []
    for offer in offers:
        if offer.context_tokens is None or offer.max_token_bytes is None:
            return None  # a worker that does not say: it may fit there
        least = -(-size // offer.max_token_bytes)
        if least < offer.context_tokens:
            return None
        floors.append((offer.context_tokens, offer.max_token_bytes, least))
    context, token_bytes, least = max(floors)
    return (
        f"the prompt is {size} bytes, so at least {least} tokens for {model} (a token is at "
        f"most {token_bytes} bytes): more than its context of {context} tokens (prompt + "
        "completion) holds on any worker offering it; shorten the prompt"
    )


class InputChecks:
    """The checks above, over the store (offers, blob probe cache) and the blob files."""

    def __init__(self, store: Store, blob_path: Callable[[str], Path]) -> None:
        self._store = store
        self._blob_path = blob_path

    def problem(self, spec: JobSpec) -> str | None:
        """What is wrong with the job's input, in words a client can act on; None if nothing
        that can be seen before running it. The caller has checked the blob is the client's."""
        if spec.type is JobType.TRANSCODE:
            assert spec.input_blob is not None
            probe = self.probe(spec.input_blob)
            return probe.error or ladder_problem(probe, spec.ladder)
        if spec.generation is not None:
            assert spec.model is not None
            offers = [o for o in self._live_offers() if o.model == spec.model]
            generates = [o for o in offers if o.job_type is JobType.GENERATE]
            return context_problem(spec.model, prompt_bytes(spec.generation), generates)
        rows: list[Any] | None = spec.input.tensors if spec.input is not None else None
        if spec.input_blob is not None:
            body, error = self._json_input(spec.input_blob)
            if error is not None:
                return error
            assert body is not None
            rows = body.tensors
        if rows is None:
            return None
        assert spec.model is not None
        return tensor_problem(spec.model, rows, self._advertised_inputs(spec))

    def probe(self, sha256: str) -> MediaProbe:
        """The blob's media probe, made once and kept on its row."""
        with self._store.read() as s:
            blob = s.get(Blob, sha256)
            cached = MediaProbe.from_json(blob.probe) if blob is not None else None
        if cached is not None:
            return cached
        probe = probe_media(self._blob_path(sha256))
        with self._store.transaction() as s:
            row = s.get(Blob, sha256)
            if row is not None:
                row.probe = probe.to_json()
        return probe

    def _json_input(self, sha256: str) -> tuple[InferenceInput | None, str | None]:
        path = self._blob_path(sha256)
        if not path.is_file():
            return None, MISSING_BLOB
        if path.stat().st_size > MAX_INPUT_JSON_BYTES:
            return None, f"input_blob is over {MAX_INPUT_JSON_BYTES} bytes of JSON"
        try:
            return InferenceInput.model_validate(json.loads(path.read_bytes())), None
        except (ValueError, UnicodeDecodeError) as exc:
            first = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else str(exc)
            return None, (
                f'input_blob must be JSON like {{"texts": [...]}} or {{"tensors": [...]}}: {first}'
            )

    def _live_offers(self) -> list[Offer]:
        """Every offer of a worker not deregistered."""
        with self._store.read() as s:
            every = s.scalars(select(Worker.offers).where(Worker.status != "deregistered"))
            return [Offer.model_validate(raw) for worker in every for raw in worker]

    def _advertised_inputs(self, spec: JobSpec) -> list[TensorShape]:
        offers = self._live_offers()
        return [
            o.input
            for o in offers
            if o.input is not None and o.job_type is JobType.INFERENCE and o.model == spec.model
        ]
