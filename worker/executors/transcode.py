"""Video transcoding executor: one input segment in, an H.264 rendition ladder out (PyAV).

This module knows nothing about HTTP or the orchestrator: the worker hands it a local file and
a ladder, and gets files, their sha256 and the billable pixel count back.

How a job runs
--------------
* **Decode once.** The input is demuxed and decoded exactly once. Each decoded video frame is
  scaled (one cached swscale context per rendition) and sent to every rendition's encoder, so a
  ladder of N rungs costs one decode plus N scale+encode passes. Decoder, scalers and encoders
  run with FFmpeg threading on (``threads``; ``None`` lets FFmpeg pick from the core count).
* **Frame rate.** A rendition's ``fps`` is a ceiling: the output runs at
  ``min(rendition fps, input fps)``; frames are never duplicated. Lowering the rate drops frames
  evenly by timestamp: output slot ``k`` covers ``[k - 1/4, k + 3/4) / fps`` seconds (see
  _SLOT_TOLERANCE) and keeps the first input frame that lands in it; later ones are dropped
  (24 -> 12 fps keeps every second frame, 30 -> 24 fps drops one frame in five). Slots are
  counted from the first video frame, whose output time follows the input's, so audio stays
  in sync.
* **No upscaling.** A rendition taller than the input (or, with an explicit width, wider than
  the input's display width) is skipped and listed in ``TranscodeResult.skipped``; the client is
  not billed for pixels that add no detail. If every rendition would upscale, that is an
  ``InvalidRendition``: there is nothing useful to produce.
* **Audio.** The first audio stream, if any, is decoded once, resampled once (mono stays mono,
  anything else becomes stereo; rates AAC cannot carry become 48 kHz) and encoded to AAC at
  ``DEFAULT_AUDIO_BITRATE_KBPS`` in every rendition. Inputs without audio give video-only outputs.
  Other streams (subtitles, data) are dropped.
* **Pricing.** ``output_pixels = width * height * frame_count`` per rendition; the job's price unit
  is ``TranscodeResult.total_output_pixels``, as Livepeer prices transcoding per pixel.
* **Damaged input is refused.** A frame the decoder flags as corrupt (concealed errors, a frame
  cut short) fails the job rather than being billed as output. So does a file that holds less
  video than its container declares: the frames decoded are compared with the frame count the
  index declares, and their span with the declared duration (MP4/MOV, Matroska/WebM), so an MP4
  cut short fails whether its index is at the end (it does not open) or at the front
  (``+faststart``: it opens, and would otherwise pass as a shorter video). An MPEG-TS declares
  neither: one cut cleanly between frames is simply a shorter segment.
* **Input safety.** Only the demuxers in ``ALLOWED_INPUT_FORMATS`` are let near the input and
  only the ``file`` protocol, so a playlist (HLS, concat) cannot make FFmpeg read other files or
  URLs.

Errors
------
::

    TranscodeError                     base class
     +-- TranscodeInputError           input empty, corrupt, truncated, not a video, unsupported
     |                                 format (non-retryable: the same bytes fail everywhere)
     +-- InvalidRendition (ValueError) a bad ladder: size, bitrate, fps, name, container

Failures inside the encoders or muxers (disk full, a bug) surface as ``TranscodeError``. On any
error the rendition files written so far are removed.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import TracebackType

import av
import numpy as np
from av.audio.codeccontext import AudioCodecContext
from av.audio.frame import AudioFrame
from av.audio.resampler import AudioResampler
from av.audio.stream import AudioStream
from av.container import InputContainer, OutputContainer
from av.video.codeccontext import VideoCodecContext
from av.video.frame import PictureType, VideoFrame
from av.video.reformatter import VideoReformatter
from av.video.stream import VideoStream

from protocol.jobs import ALLOWED_INPUT_FORMATS

__all__ = [
    "ALLOWED_INPUT_FORMATS",
    "CONTAINER_EXTENSIONS",
    "DEFAULT_AUDIO_BITRATE_KBPS",
    "DEFAULT_GOP_S",
    "DEFAULT_LADDER",
    "DEFAULT_PRESET",
    "DEFAULT_VIDEO_CODEC",
    "InvalidRendition",
    "PixelEstimate",
    "Rendition",
    "RenditionOutput",
    "SkippedRendition",
    "SourceInfo",
    "TranscodeError",
    "TranscodeInputError",
    "TranscodeResult",
    "estimate_output_pixels",
    "make_test_clip",
    "transcode",
]

DEFAULT_VIDEO_CODEC = "libx264"
DEFAULT_PRESET = "veryfast"
DEFAULT_GOP_S = 2.0
"""Keyframe interval in seconds; scene-cut keyframes are off so all rungs cut at the same times."""
DEFAULT_PIXEL_FORMAT = "yuv420p"
DEFAULT_SCALER = "BICUBIC"
"""swscale interpolation; FFmpeg's own default for scaling."""
DEFAULT_AUDIO_CODEC = "aac"
DEFAULT_AUDIO_BITRATE_KBPS = 128
VBV_BUFFER_S = 2.0
"""Rate-control buffer in seconds of ``bitrate_kbps``; the peak rate is capped at the target."""

CONTAINER_EXTENSIONS = {"mp4": "mp4", "mpegts": "ts"}
"""Output containers (FFmpeg muxer name -> file extension)."""


TRUNCATION_TOLERANCE_FRAMES = 1
"""Frames an input may decode fewer of than its index declares (edit lists, decoder delay)."""
TRUNCATION_TOLERANCE_S = 0.1
"""Seconds of video an input may lack against its declared duration, at least (2 frames more)."""
INDEXED_FORMATS = ("mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm")
"""Demuxers whose index declares a duration to trust (MPEG-TS only estimates one)."""

MIN_DIMENSION_PX = 16
MAX_DIMENSION_PX = 8192
MAX_FPS = 240.0
MAX_BITRATE_KBPS = 100_000
MAX_RATE_DENOMINATOR = 1001
"""Frame rates become fractions with at most this denominator (29.97 fps = 30000/1001)."""

_AAC_SAMPLE_RATES_HZ = frozenset(
    {7350, 8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 64000, 88200, 96000}
)
_FALLBACK_AUDIO_RATE_HZ = 48_000
_AAC_FRAME_SAMPLES = 1024
_HASH_CHUNK_BYTES = 1 << 20
_RENDITION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_SLOT_TOLERANCE = Fraction(1, 4)
"""A frame up to this fraction of an output frame early still counts for the next slot; absorbs
timestamp rounding in coarse time bases (30 fps in milliseconds) without dropping frames."""


class TranscodeError(Exception):
    """A transcode failed; see the subclasses for the non-retryable kinds."""


class TranscodeInputError(TranscodeError):
    """The input cannot be transcoded (empty, corrupt, truncated, no video, unsupported format).

    Non-retryable: the same bytes fail on every worker.
    """


class InvalidRendition(TranscodeError, ValueError):
    """A requested rendition or container is invalid (size, bitrate, fps, name, container)."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object, above: float, at_most: float) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return math.isfinite(value) and above < value <= at_most


def _check_dimension(name: str, axis: str, value: int) -> None:
    if not _is_int(value) or not MIN_DIMENSION_PX <= value <= MAX_DIMENSION_PX:
        raise InvalidRendition(
            f"rendition {name!r}: {axis} must be an integer in "
            f"{MIN_DIMENSION_PX}..{MAX_DIMENSION_PX} pixels, got {value!r}"
        )
    if value % 2:
        raise InvalidRendition(
            f"rendition {name!r}: {axis} must be even ({DEFAULT_PIXEL_FORMAT} halves the "
            f"chroma planes), got {value}"
        )


@dataclass(frozen=True)
class Rendition:
    """One rung of the ladder; validated on construction (raises InvalidRendition).

    Attributes:
        name: output file stem, e.g. "720p" (letters, digits, "_", "-", "."; 64 at most).
        width: output width in pixels (even), or None to keep the input's display aspect ratio,
            rounded to the nearest even number.
        height: output height in pixels (even).
        fps: frame-rate ceiling in frames per second, or None to keep the input's rate.
        bitrate_kbps: target video bitrate in kilobits per second (1 kbps = 1000 bit/s).
    """

    name: str
    width: int | None
    height: int
    fps: float | None
    bitrate_kbps: int

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _RENDITION_NAME.fullmatch(self.name):
            raise InvalidRendition(
                f"rendition name {self.name!r} must be 1-64 letters, digits, '_', '-' or '.' "
                "and start with a letter or digit"
            )
        _check_dimension(self.name, "height", self.height)
        if self.width is not None:
            _check_dimension(self.name, "width", self.width)
        if self.fps is not None and not _is_number(self.fps, 0.0, MAX_FPS):
            raise InvalidRendition(
                f"rendition {self.name!r}: fps must be > 0 and <= {MAX_FPS:g}, got {self.fps!r}"
            )
        if not _is_int(self.bitrate_kbps) or not 0 < self.bitrate_kbps <= MAX_BITRATE_KBPS:
            raise InvalidRendition(
                f"rendition {self.name!r}: bitrate_kbps must be an integer in "
                f"1..{MAX_BITRATE_KBPS}, got {self.bitrate_kbps!r}"
            )


DEFAULT_LADDER: tuple[Rendition, ...] = (
    Rendition("720p", None, 720, None, 3000),
    Rendition("480p", None, 480, None, 1500),
    Rendition("360p", None, 360, None, 800),
)
"""16:9 input gives 1280x720, 854x480 and 640x360 at the input's frame rate."""


@dataclass(frozen=True)
class RenditionOutput:
    """One encoded rendition file.

    Sizes in pixels, fps in frames per second, durations in seconds, sizes in bytes;
    ``output_pixels = width * height * frame_count`` is what the client pays for.
    """

    name: str
    path: Path
    container: str
    width: int
    height: int
    fps: float
    frame_count: int
    duration_s: float
    output_pixels: int
    sha256: str
    size_bytes: int
    has_audio: bool


@dataclass(frozen=True)
class SkippedRendition:
    """A requested rendition that was not produced, and why (e.g. it would upscale)."""

    name: str
    reason: str


@dataclass(frozen=True)
class SourceInfo:
    """The input's video: size in pixels, rate in frames per second, frames decoded."""

    width: int
    height: int
    fps: float
    frame_count: int
    has_audio: bool


@dataclass(frozen=True)
class TranscodeResult:
    """Everything a transcode produced; outputs are in the order the ladder asked for them."""

    outputs: tuple[RenditionOutput, ...]
    skipped: tuple[SkippedRendition, ...]
    source: SourceInfo

    @property
    def total_output_pixels(self) -> int:
        """Pixels encoded over all renditions (the price unit)."""
        return sum(output.output_pixels for output in self.outputs)


@dataclass(frozen=True)
class _SourceVideo:
    width: int
    height: int
    display_aspect: Fraction
    fps: Fraction


@dataclass(frozen=True)
class _Plan:
    rendition: Rendition
    width: int
    height: int
    fps: Fraction
    path: Path


@dataclass(frozen=True)
class _AudioFormat:
    rate_hz: int
    layout: str


def transcode(
    input_path: Path,
    renditions: Sequence[Rendition],
    container: str,
    out_dir: Path,
    *,
    threads: int | None = None,
) -> TranscodeResult:
    """Transcode ``input_path`` into one H.264 file per rendition under ``out_dir``.

    Files are named ``<rendition name>.<ext>`` (``ext`` from CONTAINER_EXTENSIONS) and replace
    any file of that name. ``threads`` is the FFmpeg thread count per codec (None or 0: chosen
    by FFmpeg). Renditions larger than the input are skipped (see ``TranscodeResult.skipped``).

    Raises:
        FileNotFoundError: ``input_path`` is not a regular file (a worker problem; retryable).
        InvalidRendition: bad ladder or container, or every rendition would upscale.
        TranscodeInputError: the input is empty, corrupt, truncated, has no video stream or is
            not in ALLOWED_INPUT_FORMATS.
        TranscodeError: encoding or writing an output failed.
    """
    _check_request(renditions, container, threads)
    with _open_input(Path(input_path)) as source:
        video_in = _video_stream(source)
        audio_in = _audio_stream(source)
        probe = _probe_video(video_in)
        plans, skipped = _plan_ladder(renditions, probe, container, Path(out_dir))
        _enable_threads(video_in.codec_context, threads)
        if audio_in is not None:
            _enable_threads(audio_in.codec_context, threads)
        declared = _declared(source, video_in)
        outputs, decoded = _encode_ladder(
            source, video_in, audio_in, probe, plans, container, threads, declared
        )
    info = SourceInfo(
        width=probe.width,
        height=probe.height,
        fps=float(probe.fps),
        frame_count=decoded,
        has_audio=audio_in is not None,
    )
    return TranscodeResult(outputs=tuple(outputs), skipped=tuple(skipped), source=info)


# --- request checks and planning ---------------------------------------------------------------


def _check_request(renditions: Sequence[Rendition], container: str, threads: int | None) -> None:
    if container not in CONTAINER_EXTENSIONS:
        raise InvalidRendition(
            f"unknown container {container!r}; expected one of {sorted(CONTAINER_EXTENSIONS)}"
        )
    if not renditions:
        raise InvalidRendition("no renditions requested")
    names = [rendition.name for rendition in renditions]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise InvalidRendition(f"rendition names must be unique; repeated: {duplicates}")
    if threads is not None and (not _is_int(threads) or threads < 0):
        raise ValueError(f"threads must be None or an integer >= 0, got {threads!r}")


def _as_rate(fps: float | Fraction) -> Fraction:
    return Fraction(fps).limit_denominator(MAX_RATE_DENOMINATOR)


def _even(value: Fraction) -> int:
    return max(2, 2 * round(value / 2))


def _plan_ladder(
    renditions: Sequence[Rendition], source: _SourceVideo, container: str, out_dir: Path
) -> tuple[list[_Plan], list[SkippedRendition]]:
    plans: list[_Plan] = []
    skipped: list[SkippedRendition] = []
    display_width = _even(source.height * source.display_aspect)
    for rendition in renditions:
        width = rendition.width or _even(rendition.height * source.display_aspect)
        if rendition.height > source.height or width > display_width:
            reason = (
                f"{width}x{rendition.height} would upscale the "
                f"{display_width}x{source.height} input; upscaling is not done or billed"
            )
            skipped.append(SkippedRendition(rendition.name, reason))
            continue
        fps = source.fps if rendition.fps is None else min(source.fps, _as_rate(rendition.fps))
        path = out_dir / f"{rendition.name}.{CONTAINER_EXTENSIONS[container]}"
        plans.append(_Plan(rendition, width, rendition.height, fps, path))
    if not plans:
        raise InvalidRendition(
            f"every requested rendition would upscale the {display_width}x{source.height} input; "
            f"ask for renditions at most {source.height} pixels high"
        )
    return plans, skipped


def _reason(error: av.FFmpegError) -> str:
    """FFmpeg's message without the local file name it quotes."""
    return error.strerror or type(error).__name__


# --- input -------------------------------------------------------------------------------------


@contextmanager
def _open_input(path: Path) -> Iterator[InputContainer]:
    if not path.is_file():
        # The worker's own file handling went wrong, not the client's input: retryable.
        raise FileNotFoundError(f"input {path} does not exist or is not a regular file")
    if path.stat().st_size == 0:
        raise TranscodeInputError("input is empty (0 bytes)")
    options = {"format_whitelist": ",".join(ALLOWED_INPUT_FORMATS), "protocol_whitelist": "file"}
    try:
        source = av.open(
            f"file:{path.resolve()}", "r", container_options=options, metadata_errors="ignore"
        )
    except av.error.ArgumentError as exc:
        # With the whitelist set, EINVAL at open means the probe found a demuxer we refuse.
        raise TranscodeInputError(
            "input is not in an accepted video container "
            "(accepted: mp4/mov, mpegts, matroska/webm, avi, flv, mpeg-ps, raw h264/hevc, ivf)"
        ) from exc
    except av.FFmpegError as exc:
        raise TranscodeInputError(
            f"input is not a readable media file (corrupt, truncated or not video): {_reason(exc)}"
        ) from exc
    try:
        yield source
    finally:
        source.close()


def _video_stream(source: InputContainer) -> VideoStream:
    if not source.streams.video:
        kinds: list[str] = sorted({stream.type for stream in source.streams}) or ["none"]
        raise TranscodeInputError(f"input has no video stream (streams found: {', '.join(kinds)})")
    stream = source.streams.video[0]
    if stream.codec_context is None:
        raise TranscodeInputError(f"input video codec {stream.codec_tag!r} cannot be decoded")
    return stream


def _audio_stream(source: InputContainer) -> AudioStream | None:
    """The first audio stream we can decode; others are dropped (see the module docstring)."""
    for stream in source.streams.audio:
        if stream.codec_context is not None:
            return stream
    return None


def _probe_video(stream: VideoStream) -> _SourceVideo:
    context = stream.codec_context
    width, height = context.width, context.height
    if width <= 0 or height <= 0:
        raise TranscodeInputError("input video stream has no frame size (corrupt header?)")
    if width > MAX_DIMENSION_PX or height > MAX_DIMENSION_PX:
        raise TranscodeInputError(
            f"input video is {width}x{height}; at most {MAX_DIMENSION_PX} pixels a side is accepted"
        )
    return _SourceVideo(width, height, _display_aspect(context), _source_fps(stream))


def _display_aspect(context: VideoCodecContext) -> Fraction:
    sample_aspect = context.sample_aspect_ratio
    if not sample_aspect or sample_aspect <= 0:
        sample_aspect = Fraction(1)
    return Fraction(context.width, context.height) * sample_aspect


@dataclass(frozen=True)
class _Declared:
    """What the input's container says its video holds: frames, and seconds."""

    frames: int | None
    duration_s: float | None


def _declared(source: InputContainer, stream: VideoStream) -> _Declared:
    duration_s = None
    if source.format.name in INDEXED_FORMATS:
        if stream.duration and stream.time_base:
            duration_s = float(stream.duration * stream.time_base)
        elif source.duration and len(source.streams.audio) == 0:
            duration_s = source.duration / av.time_base  # the container's, in microseconds
    return _Declared(frames=stream.frames or None, duration_s=duration_s)


def _check_complete(declared: _Declared, frames: int, span_s: float, fps: Fraction) -> None:
    """Refuse an input that holds less video than its container declares (truncated):
    ``frames`` video packets read, ``span_s`` seconds decoded."""
    short_frames = (
        declared.frames is not None and frames < declared.frames - TRUNCATION_TOLERANCE_FRAMES
    )
    slack_s = max(TRUNCATION_TOLERANCE_S, float(2 / fps))
    short_time = declared.duration_s is not None and span_s < declared.duration_s - slack_s
    if not (short_frames or short_time):
        return
    said = f"{declared.frames} frames" if declared.frames else "more video"
    if declared.duration_s is not None:
        said += f" ({declared.duration_s:.2f} s)"
    raise TranscodeInputError(
        f"input is truncated: its container declares {said} but the file holds only {frames} "
        f"frames ({span_s:.2f} s decode); nothing is billed for a damaged input"
    )


def _source_fps(stream: VideoStream) -> Fraction:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate and 0 < rate <= MAX_FPS:
            return _as_rate(rate)
    raise TranscodeInputError("input video stream has no usable frame rate")


# --- output ------------------------------------------------------------------------------------


def _enable_threads(context: VideoCodecContext | AudioCodecContext, threads: int | None) -> None:
    context.thread_type = "AUTO"
    context.thread_count = threads or 0


def _gop_frames(fps: Fraction) -> int:
    return max(1, round(fps * Fraction(DEFAULT_GOP_S)))


def _video_options(plan: _Plan) -> dict[str, str]:
    kbps = plan.rendition.bitrate_kbps
    return {
        "preset": DEFAULT_PRESET,
        "maxrate": f"{kbps}k",
        "bufsize": f"{round(kbps * VBV_BUFFER_S)}k",
        # Fixed GOPs: every rung of the ladder has keyframes at the same instants.
        "x264-params": "scenecut=0",
    }


def _add_video_stream(output: OutputContainer, plan: _Plan, threads: int | None) -> VideoStream:
    stream = output.add_stream(DEFAULT_VIDEO_CODEC, rate=plan.fps, options=_video_options(plan))
    assert isinstance(stream, VideoStream)
    context = stream.codec_context
    context.width = plan.width
    context.height = plan.height
    context.pix_fmt = DEFAULT_PIXEL_FORMAT
    context.bit_rate = plan.rendition.bitrate_kbps * 1000
    context.gop_size = _gop_frames(plan.fps)
    context.time_base = 1 / plan.fps
    _enable_threads(context, threads)
    return stream


def _audio_format(stream: AudioStream) -> _AudioFormat:
    context = stream.codec_context
    rate = context.sample_rate if context.sample_rate in _AAC_SAMPLE_RATES_HZ else 0
    layout = "mono" if context.layout.nb_channels == 1 else "stereo"
    return _AudioFormat(rate or _FALLBACK_AUDIO_RATE_HZ, layout)


def _add_audio_stream(
    output: OutputContainer, audio: _AudioFormat, threads: int | None
) -> AudioStream:
    stream = output.add_stream(DEFAULT_AUDIO_CODEC, rate=audio.rate_hz)
    assert isinstance(stream, AudioStream)
    context = stream.codec_context
    context.layout = audio.layout
    context.format = "fltp"
    context.bit_rate = DEFAULT_AUDIO_BITRATE_KBPS * 1000
    context.time_base = Fraction(1, audio.rate_hz)
    _enable_threads(context, threads)
    return stream


class _FrameSlots:
    """Assigns video frames to output frame slots (timestamps) at ``fps`` frames per second."""

    def __init__(self, fps: Fraction) -> None:
        self._fps = fps
        self._anchor_s: Fraction | None = None
        self._before_first = 0
        self._last = -1

    def claim(self, at_s: Fraction) -> int | None:
        """The slot for a frame shown ``at_s`` seconds in, or None if that slot is already taken."""
        if self._anchor_s is None:
            # Counting from the first frame fixes the decimation phase, whatever the audio does.
            self._anchor_s = at_s
            self._before_first = self._last = max(0, round(at_s * self._fps)) - 1
        slot = (
            self._before_first
            + 1
            + math.floor((at_s - self._anchor_s) * self._fps + _SLOT_TOLERANCE)
        )
        if slot <= self._last:
            return None
        self._last = slot
        return slot

    @property
    def duration_s(self) -> float:
        """Seconds from the first claimed slot's start to the last one's end."""
        return float((self._last - self._before_first) / self._fps)


class _RenditionWriter:
    """Scales, retimes and encodes frames for one rendition, into one output file."""

    def __init__(
        self, plan: _Plan, container: str, audio: _AudioFormat | None, threads: int | None
    ) -> None:
        self.plan = plan
        self.frame_count = 0
        self._slots = _FrameSlots(plan.fps)
        self._threads = threads or 0
        self._scaler = VideoReformatter()
        options = {"movflags": "+faststart"} if container == "mp4" else {}
        plan.path.parent.mkdir(parents=True, exist_ok=True)
        self._output = av.open(str(plan.path), "w", format=container, container_options=options)
        try:
            self._video = _add_video_stream(self._output, plan, threads)
            self._audio = None if audio is None else _add_audio_stream(self._output, audio, threads)
        except BaseException:
            self._output.close()
            raise

    def __enter__(self) -> _RenditionWriter:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self._output.close()
        except av.FFmpegError:
            if error is None:
                raise
            # Already failing: the partial file is deleted anyway; keep the first error.

    @property
    def duration_s(self) -> float:
        """Seconds from the first frame's start to the last frame's end."""
        return self._slots.duration_s

    def write_video(self, frame: VideoFrame, at_s: Fraction) -> None:
        """Encode ``frame`` (shown ``at_s`` seconds after the start) unless its slot is taken."""
        slot = self._slots.claim(at_s)
        if slot is None:
            return  # frame-rate reduction: this output slot already has a frame
        scaled = self._scaler.reformat(
            frame,
            self.plan.width,
            self.plan.height,
            DEFAULT_PIXEL_FORMAT,
            interpolation=DEFAULT_SCALER,
            threads=self._threads,
        )
        scaled.pts = slot
        scaled.time_base = 1 / self.plan.fps
        # The decoder's picture types must not force keyframes into our fixed GOP.
        scaled.pict_type = PictureType.NONE
        self._output.mux(self._video.encode(scaled))
        self.frame_count += 1

    def write_audio(self, frame: AudioFrame) -> None:
        """Encode an audio frame already in this rendition's AAC sample format."""
        if self._audio is not None:
            self._output.mux(self._audio.encode(frame))

    def flush(self) -> None:
        """Drain the encoders; the file is complete once the writer is closed."""
        self._output.mux(self._video.encode(None))
        if self._audio is not None:
            self._output.mux(self._audio.encode(None))


class _Timeline:
    """Maps decoded frames to seconds since the input's first frame (any stream)."""

    def __init__(self, streams: Sequence[VideoStream | AudioStream]) -> None:
        starts = [
            stream.start_time * stream.time_base
            for stream in streams
            if stream.start_time is not None and stream.time_base is not None
        ]
        self._origin: Fraction | None = min(starts) if starts else None

    def seconds(self, frame: VideoFrame | AudioFrame, fallback: Fraction) -> Fraction:
        """Seconds since the origin; ``fallback`` (seconds) for frames without a timestamp."""
        if frame.pts is None or frame.time_base is None:
            at = fallback
        else:
            at = frame.pts * frame.time_base
        if self._origin is None:
            self._origin = at
        return at - self._origin


class _AudioPipe:
    """Resamples decoded audio once, into frames every rendition's AAC encoder accepts."""

    def __init__(self, audio: _AudioFormat) -> None:
        self._audio = audio
        self._resampler = AudioResampler(
            format="fltp", layout=audio.layout, rate=audio.rate_hz, frame_size=_AAC_FRAME_SAMPLES
        )
        self._next_pts: int | None = None

    def push(self, frame: AudioFrame | None, at_s: Fraction) -> list[AudioFrame]:
        """Resample ``frame`` (None flushes); output timestamps count samples from ``at_s``."""
        if self._next_pts is None:
            self._next_pts = max(0, round(at_s * self._audio.rate_hz))
        resampled = self._resampler.resample(frame)
        for out in resampled:
            # Counting samples keeps audio gapless and in step with the first frame's time.
            out.pts = self._next_pts
            out.time_base = Fraction(1, self._audio.rate_hz)
            self._next_pts += out.samples
        return resampled


@dataclass
class _PacketCount:
    """Video packets with data read from the input: frames present, whether or not an edit
    list has the decoder skip some (so it compares with the index's declared frame count)."""

    video: int = 0


def _decoded_frames(
    source: InputContainer,
    streams: Sequence[VideoStream | AudioStream],
    packets: _PacketCount,
) -> Iterator[VideoFrame | AudioFrame]:
    try:
        for packet in source.demux(*streams):
            if packet.size and packet.stream.type == "video":
                packets.video += 1
            for frame in packet.decode():
                if isinstance(frame, VideoFrame | AudioFrame):
                    yield _undamaged(frame)
    except av.FFmpegError as exc:
        raise TranscodeInputError(
            f"input is corrupt or truncated; decoding failed: {_reason(exc)}"
        ) from exc


def _undamaged(frame: VideoFrame | AudioFrame) -> VideoFrame | AudioFrame:
    if frame.is_corrupt:
        kind = "video" if isinstance(frame, VideoFrame) else "audio"
        at = "?" if frame.time is None else f"{frame.time:.3f}"
        raise TranscodeInputError(f"input is corrupt or truncated: damaged {kind} frame at {at} s")
    return frame


def _pump(
    source: InputContainer,
    video_in: VideoStream,
    audio_in: AudioStream | None,
    probe: _SourceVideo,
    writers: Sequence[_RenditionWriter],
    audio: _AudioPipe | None,
) -> tuple[int, float, int]:
    """Decode the input once, feeding every writer; returns the video frames decoded, the
    seconds they span (first frame's start to the last one's end) and the video packets read."""
    streams: list[VideoStream | AudioStream] = (
        [video_in] if audio_in is None else [video_in, audio_in]
    )
    timeline = _Timeline(streams)
    video_frames = 0
    audio_at = Fraction(0)
    first_s: Fraction | None = None
    last_s = Fraction(0)
    packets = _PacketCount()
    for frame in _decoded_frames(source, streams, packets):
        if isinstance(frame, VideoFrame):
            at_s = timeline.seconds(frame, fallback=video_frames / probe.fps)
            first_s = at_s if first_s is None else min(first_s, at_s)
            last_s = max(last_s, at_s)
            video_frames += 1
            for writer in writers:
                writer.write_video(frame, at_s)
        elif audio is not None:
            audio_at = timeline.seconds(frame, fallback=audio_at)
            _write_audio(writers, audio.push(frame, audio_at))
    if audio is not None:
        _write_audio(writers, audio.push(None, audio_at))
    span_s = 0.0 if first_s is None else float(last_s - first_s + 1 / probe.fps)
    return video_frames, span_s, packets.video


def _write_audio(writers: Sequence[_RenditionWriter], frames: list[AudioFrame]) -> None:
    for frame in frames:
        for writer in writers:
            writer.write_audio(frame)


def _encode_ladder(
    source: InputContainer,
    video_in: VideoStream,
    audio_in: AudioStream | None,
    probe: _SourceVideo,
    plans: Sequence[_Plan],
    container: str,
    threads: int | None,
    declared: _Declared,
) -> tuple[list[RenditionOutput], int]:
    audio = None if audio_in is None else _audio_format(audio_in)
    try:
        with ExitStack() as stack:
            writers = [
                stack.enter_context(_RenditionWriter(plan, container, audio, threads))
                for plan in plans
            ]
            pipe = None if audio is None else _AudioPipe(audio)
            decoded, span_s, packets = _pump(source, video_in, audio_in, probe, writers, pipe)
            if decoded == 0:
                raise TranscodeInputError("input has no decodable video frames (truncated?)")
            _check_complete(declared, packets, span_s, probe.fps)
            for writer in writers:
                writer.flush()
    except av.FFmpegError as exc:
        _remove(plans)
        raise TranscodeError(f"encoding failed: {_reason(exc)}") from exc
    except BaseException:
        _remove(plans)
        raise
    return [_describe(writer, container, audio is not None) for writer in writers], decoded


def _remove(plans: Sequence[_Plan]) -> None:
    for plan in plans:
        plan.path.unlink(missing_ok=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _describe(writer: _RenditionWriter, container: str, has_audio: bool) -> RenditionOutput:
    plan = writer.plan
    return RenditionOutput(
        name=plan.rendition.name,
        path=plan.path,
        container=container,
        width=plan.width,
        height=plan.height,
        fps=float(plan.fps),
        frame_count=writer.frame_count,
        duration_s=writer.duration_s,
        output_pixels=plan.width * plan.height * writer.frame_count,
        sha256=_sha256(plan.path),
        size_bytes=plan.path.stat().st_size,
        has_audio=has_audio,
    )


# --- fixtures and demo -------------------------------------------------------------------------


def make_test_clip(
    path: Path,
    width: int = 1280,
    height: int = 720,
    frames: int = 48,
    fps: float = 24,
    container: str = "mp4",
    *,
    audio: bool = False,
) -> Path:
    """Write a synthetic H.264 clip for tests and the demo; returns ``path``.

    A scrolling colour gradient over moving noise (so encoders have real work), ``width`` x
    ``height`` pixels, ``frames`` frames at ``fps`` frames per second; with ``audio``, a 440 Hz
    stereo AAC tone at 48 kHz for the same duration. ``container`` is "mp4" or "mpegts".
    """
    _check_clip_args(width, height, frames, fps, container)
    rate = _as_rate(fps)
    with av.open(str(path), "w", format=container) as output:
        video = output.add_stream("libx264", rate=rate, options={"preset": "ultrafast"})
        video.width, video.height, video.pix_fmt = width, height, DEFAULT_PIXEL_FORMAT
        tone = _add_audio_stream(output, _AudioFormat(48_000, "stereo"), None) if audio else None
        for index, image in enumerate(_pattern_frames(width, height, frames)):
            frame = VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = index, 1 / rate
            output.mux(video.encode(frame))
        output.mux(video.encode(None))
        if tone is not None:
            _write_tone(output, tone, seconds=frames / rate)
    return path


def _check_clip_args(width: int, height: int, frames: int, fps: float, container: str) -> None:
    if width < 2 or height < 2 or width % 2 or height % 2:
        raise ValueError(f"clip size must be even and >= 2 pixels, got {width}x{height}")
    if frames < 1 or not _is_number(fps, 0.0, MAX_FPS):
        raise ValueError(f"need frames >= 1 and 0 < fps <= {MAX_FPS:g}, got {frames}, {fps}")
    if container not in CONTAINER_EXTENSIONS:
        raise ValueError(f"container must be one of {sorted(CONTAINER_EXTENSIONS)}")


def _pattern_frames(width: int, height: int, frames: int) -> Iterator[np.ndarray]:
    rows, cols = np.mgrid[0:height, 0:width].astype(np.int32)
    noise = np.random.default_rng(0).integers(0, 64, size=(height, width), dtype=np.int32)
    box = max(2, min(width, height) // 4)
    for t in range(frames):
        moved = np.roll(noise, shift=(2 * t, 5 * t), axis=(0, 1))
        image = np.stack(
            [(cols + 4 * t) & 255, (rows + 3 * t) & 255, ((rows + cols) // 2 + 8 * t) & 255],
            axis=-1,
        )
        image = (image * 3 // 4) + moved[..., None]
        x, y = (9 * t) % max(1, width - box), (5 * t) % max(1, height - box)
        image[y : y + box, x : x + box] = 255
        yield image.astype(np.uint8)


def _write_tone(output: OutputContainer, stream: AudioStream, seconds: Fraction) -> None:
    rate = stream.codec_context.sample_rate
    total = int(seconds * rate)
    for start in range(0, total, _AAC_FRAME_SAMPLES):
        count = min(_AAC_FRAME_SAMPLES, total - start)
        times = np.arange(start, start + count) / rate
        wave = (0.2 * np.sin(2 * np.pi * 440.0 * times)).astype(np.float32)
        frame = AudioFrame.from_ndarray(np.stack([wave, wave]), format="fltp", layout="stereo")
        frame.sample_rate, frame.pts, frame.time_base = rate, start, Fraction(1, rate)
        output.mux(stream.encode(frame))
    output.mux(stream.encode(None))


# --- the price unit before the job runs -----------------------------------------------------------


@dataclass(frozen=True)
class PixelEstimate:
    """What a transcode of an input will encode, found before it runs (by a client setting
    ``max_units``): ``frames`` video frames in, ``sizes`` (width, height) per rendition kept."""

    frames: int
    sizes: tuple[tuple[int, int], ...]

    @property
    def output_pixels(self) -> int:
        """An upper bound on ``TranscodeResult.total_output_pixels``: no rendition encodes more
        frames than the input has (a lower frame rate only drops frames)."""
        return self.frames * sum(width * height for width, height in self.sizes)


def estimate_output_pixels(input_path: Path, renditions: Sequence[Rendition]) -> PixelEstimate:
    """Probe ``input_path`` (its packets are read, not decoded) and plan ``renditions`` as
    ``transcode`` would: sizes from the display aspect, renditions that would upscale left out.

    Raises the errors ``transcode`` raises for a bad input or ladder.
    """
    _check_request(renditions, "mp4", None)
    with _open_input(Path(input_path)) as source:
        stream = _video_stream(source)
        probe = _probe_video(stream)
        plans, _ = _plan_ladder(renditions, probe, "mp4", Path("."))
        try:
            frames = sum(1 for packet in source.demux(stream) if packet.size)
        except av.FFmpegError as exc:
            raise TranscodeInputError(f"input cannot be read to its end: {_reason(exc)}") from exc
    return PixelEstimate(frames, tuple((plan.width, plan.height) for plan in plans))
