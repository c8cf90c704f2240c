"""Transcode executor: real PyAV encodes of small synthetic clips, plus its error contract."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from tests.support import cut_between_packets, faststart_clip
from worker.executors.transcode import (
    DEFAULT_LADDER,
    InvalidRendition,
    Rendition,
    TranscodeError,
    TranscodeInputError,
    TranscodeResult,
    estimate_output_pixels,
    make_test_clip,
    transcode,
)

pytestmark = pytest.mark.timeout(60)

# The default ladder scaled to a 640x360 input, so tests stay fast on two cores.
SMALL_LADDER = [
    Rendition("360p", None, 360, None, 800),
    Rendition("240p", None, 240, None, 400),
    Rendition("180p", None, 180, None, 250),
]
SMALL_SIZES = {"360p": (640, 360), "240p": (426, 240), "180p": (320, 180)}
CLIP_FRAMES = 48
CLIP_FPS = 24
EXTENSIONS = {"mp4": ".mp4", "mpegts": ".ts"}


@dataclass(frozen=True)
class Probe:
    width: int
    height: int
    frames: int
    average_rate: Fraction | None
    audio_codec: str | None
    audio_s: float


def probe(path: Path) -> Probe:
    """Decode a file completely (so it must be decodable) and describe it."""
    with av.open(str(path)) as container:
        video = container.streams.video[0]
        audio = container.streams.audio[0] if container.streams.audio else None
        frames = 0
        samples = 0
        for frame in container.decode(*container.streams):
            if isinstance(frame, av.VideoFrame):
                frames += 1
                assert (frame.width, frame.height) == (video.width, video.height)
            elif isinstance(frame, av.AudioFrame):
                samples += frame.samples
        return Probe(
            width=video.width,
            height=video.height,
            frames=frames,
            average_rate=video.average_rate,
            audio_codec=None if audio is None else audio.codec_context.name,
            audio_s=0.0 if audio is None else samples / audio.codec_context.sample_rate,
        )


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """640x360, 48 frames at 24 fps (2 s), with a stereo AAC tone."""
    path = tmp_path_factory.mktemp("clips") / "clip.mp4"
    return make_test_clip(path, 640, 360, CLIP_FRAMES, CLIP_FPS, audio=True)


@pytest.fixture(scope="module")
def ts_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Like ``clip`` but MPEG-TS, without audio."""
    path = tmp_path_factory.mktemp("clips") / "clip.ts"
    return make_test_clip(path, 640, 360, CLIP_FRAMES, CLIP_FPS, container="mpegts")


def assert_consistent(result: TranscodeResult) -> None:
    """Every output's accounting matches the file on disk."""
    for output in result.outputs:
        data = output.path.read_bytes()
        assert output.size_bytes == len(data) > 0
        assert output.sha256 == hashlib.sha256(data).hexdigest()
        assert output.output_pixels == output.width * output.height * output.frame_count
    assert result.total_output_pixels == sum(o.output_pixels for o in result.outputs)


@pytest.mark.parametrize("container", ["mp4", "mpegts"])
def test_ladder_outputs_have_requested_sizes_and_all_frames(
    clip: Path, tmp_path: Path, container: str
) -> None:
    result = transcode(clip, SMALL_LADDER, container, tmp_path)

    assert [o.name for o in result.outputs] == ["360p", "240p", "180p"]
    assert result.skipped == ()
    assert (result.source.width, result.source.height) == (640, 360)
    assert result.source.frame_count == CLIP_FRAMES
    assert result.source.has_audio
    for output in result.outputs:
        assert output.path == tmp_path / f"{output.name}{EXTENSIONS[container]}"
        assert output.container == container
        assert (output.width, output.height) == SMALL_SIZES[output.name]
        assert output.frame_count == CLIP_FRAMES
        assert output.fps == CLIP_FPS
        assert output.duration_s == pytest.approx(CLIP_FRAMES / CLIP_FPS)
        found = probe(output.path)
        assert (found.width, found.height) == SMALL_SIZES[output.name]
        assert found.frames == CLIP_FRAMES
    assert_consistent(result)
    assert result.total_output_pixels == CLIP_FRAMES * (640 * 360 + 426 * 240 + 320 * 180)


@pytest.mark.parametrize("container", ["mp4", "mpegts"])
def test_audio_is_reencoded_to_aac_for_the_whole_clip(
    clip: Path, tmp_path: Path, container: str
) -> None:
    result = transcode(clip, SMALL_LADDER[-1:], container, tmp_path)

    (output,) = result.outputs
    assert output.has_audio
    found = probe(output.path)
    assert found.audio_codec == "aac"
    # AAC works in 1024-sample frames, and MPEG-TS keeps the encoder's priming samples.
    assert found.audio_s == pytest.approx(CLIP_FRAMES / CLIP_FPS, abs=0.05)


def test_input_without_audio_gives_video_only_outputs(ts_clip: Path, tmp_path: Path) -> None:
    result = transcode(ts_clip, SMALL_LADDER, "mp4", tmp_path, threads=1)

    assert not result.source.has_audio
    for output in result.outputs:
        assert not output.has_audio
        found = probe(output.path)
        assert found.audio_codec is None
        assert found.frames == CLIP_FRAMES
    assert_consistent(result)


def test_default_ladder_on_a_720p_input(tmp_path: Path) -> None:
    source = make_test_clip(tmp_path / "in.mp4", 1280, 720, frames=6, fps=24)

    result = transcode(source, list(DEFAULT_LADDER), "mp4", tmp_path / "out")

    sizes = [(o.width, o.height) for o in result.outputs]
    assert sizes == [(1280, 720), (854, 480), (640, 360)]
    for output in result.outputs:
        found = probe(output.path)
        assert (found.width, found.height, found.frames) == (output.width, output.height, 6)
    assert result.total_output_pixels == 6 * (1280 * 720 + 854 * 480 + 640 * 360)
    assert_consistent(result)


@pytest.mark.parametrize(
    ("source_fps", "frames", "target_fps", "expected_frames"),
    [(24, 48, 12, 24), (30, 60, 15, 30), (30, 60, 24, 48)],
)
def test_lower_fps_drops_frames_evenly(
    tmp_path: Path, source_fps: int, frames: int, target_fps: int, expected_frames: int
) -> None:
    source = make_test_clip(tmp_path / "in.mp4", 320, 180, frames, source_fps)

    result = transcode(source, [Rendition("low", None, 180, target_fps, 300)], "mp4", tmp_path)

    (output,) = result.outputs
    assert abs(output.frame_count - expected_frames) <= 1
    assert output.fps == target_fps
    assert output.duration_s == pytest.approx(frames / source_fps, abs=1 / target_fps)
    found = probe(output.path)
    assert found.frames == output.frame_count
    assert found.average_rate == target_fps
    assert output.output_pixels == 320 * 180 * output.frame_count


def test_fps_above_the_source_rate_keeps_the_source_rate(clip: Path, tmp_path: Path) -> None:
    result = transcode(clip, [Rendition("fast", None, 180, 60, 300)], "mp4", tmp_path)

    (output,) = result.outputs
    assert (output.fps, output.frame_count) == (CLIP_FPS, CLIP_FRAMES)


def test_width_follows_aspect_ratio_rounded_to_even(tmp_path: Path) -> None:
    source = make_test_clip(tmp_path / "in.mp4", 400, 300, frames=4, fps=24)  # 4:3

    result = transcode(
        source,
        [Rendition("auto", None, 100, None, 200), Rendition("fixed", 160, 100, None, 200)],
        "mp4",
        tmp_path,
    )

    assert [(o.width, o.height) for o in result.outputs] == [(134, 100), (160, 100)]
    assert [(probe(o.path).width, probe(o.path).height) for o in result.outputs] == [
        (134, 100),
        (160, 100),
    ]


def test_renditions_that_would_upscale_are_skipped_not_billed(clip: Path, tmp_path: Path) -> None:
    result = transcode(clip, list(DEFAULT_LADDER), "mp4", tmp_path)

    assert [o.name for o in result.outputs] == ["360p"]
    assert [s.name for s in result.skipped] == ["720p", "480p"]
    assert all("upscale" in s.reason for s in result.skipped)
    assert result.total_output_pixels == 640 * 360 * CLIP_FRAMES
    assert sorted(p.name for p in tmp_path.iterdir()) == ["360p.mp4"]


def test_explicit_width_wider_than_the_input_is_skipped(clip: Path, tmp_path: Path) -> None:
    ladder = [Rendition("wide", 800, 360, None, 800), SMALL_LADDER[-1]]

    result = transcode(clip, ladder, "mp4", tmp_path)

    assert [s.name for s in result.skipped] == ["wide"]
    assert [o.name for o in result.outputs] == ["180p"]


def test_only_upscaling_renditions_is_invalid(clip: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidRendition, match="would upscale the 640x360 input"):
        transcode(clip, list(DEFAULT_LADDER[:2]), "mp4", tmp_path)


def write_audio_only(path: Path) -> Path:
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=48_000)
        stream.codec_context.layout = "mono"
        wave = np.zeros((1, 1024), dtype=np.float32)
        for index in range(10):
            frame = av.AudioFrame.from_ndarray(wave, format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 48_000, index * 1024
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def truncated(source: Path, path: Path, keep: float | int) -> Path:
    data = source.read_bytes()
    path.write_bytes(data[: keep if isinstance(keep, int) else int(len(data) * keep)])
    return path


def overwritten(source: Path, path: Path, start: int, count: int) -> Path:
    data = bytearray(source.read_bytes())
    data[start : start + count] = np.random.default_rng(1).bytes(count)
    path.write_bytes(bytes(data))
    return path


def _written(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# case -> (build the bad file from tmp_path and the good mp4 and ts clips, expected message)
BAD_INPUTS = {
    "empty": (lambda tmp, mp4, ts: _written(tmp / "empty.mp4", b""), "empty"),
    "random_bytes": (
        lambda tmp, mp4, ts: _written(tmp / "noise", np.random.default_rng(0).bytes(64_000)),
        "not a readable media file",
    ),
    # The tty demuxer would read a *.txt file as ANSI art "video"; it is not on the allow-list.
    "text_file": (
        lambda tmp, mp4, ts: _written(tmp / "notes.txt", b"hello world\n" * 500),
        "not in an accepted video container",
    ),
    # Without the allow-list FFmpeg would open this playlist and read the clip it names.
    "hls_playlist": (
        lambda tmp, mp4, ts: _written(
            tmp / "list.m3u8",
            f"#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2,\n{mp4}\n#EXT-X-ENDLIST\n".encode(),
        ),
        "not in an accepted video container",
    ),
    "audio_only": (lambda tmp, mp4, ts: write_audio_only(tmp / "audio.mp4"), "no video stream"),
    "truncated_mp4": (lambda tmp, mp4, ts: truncated(mp4, tmp / "cut.mp4", 0.5), "not a readable"),
    "truncated_ts": (
        lambda tmp, mp4, ts: truncated(ts, tmp / "cut.ts", 20_000),
        "corrupt or truncated",
    ),
    "corrupt_mp4_header": (
        lambda tmp, mp4, ts: overwritten(mp4, tmp / "bad.mp4", 0, 64),
        "not a readable",
    ),
    "corrupt_ts_payload": (
        lambda tmp, mp4, ts: overwritten(ts, tmp / "bad.ts", 20_000, 40_000),
        "corrupt or truncated",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_raises_input_error_and_leaves_no_files(
    clip: Path, ts_clip: Path, tmp_path: Path, case: str
) -> None:
    make, message = BAD_INPUTS[case]
    bad = make(tmp_path, clip, ts_clip)
    out_dir = tmp_path / "out"

    with pytest.raises(TranscodeInputError, match=message):
        transcode(bad, SMALL_LADDER, "mp4", out_dir)

    assert not out_dir.exists() or list(out_dir.iterdir()) == []


FASTSTART_FRAMES = 250
TINY_LADDER = [Rendition("90p", None, 90, None, 150)]


def test_a_faststart_mp4_cut_short_is_refused_not_billed_as_a_shorter_video(
    tmp_path: Path,
) -> None:
    """Index at the front, file cut at ~60 % between two packets: it opens, every frame left
    decodes cleanly, and only the count and span against the index show what is missing."""
    whole = faststart_clip(frames=FASTSTART_FRAMES)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(cut_between_packets(whole, 0.6))
    with av.open(str(cut)) as source:  # the trap: PyAV alone sees a smaller, healthy clip
        assert source.streams.video[0].frames == FASTSTART_FRAMES
        decoded = sum(1 for _ in source.decode(video=0))
    assert 0 < decoded < FASTSTART_FRAMES * 0.7
    out_dir = tmp_path / "out"

    with pytest.raises(TranscodeInputError, match="truncated") as refused:
        transcode(cut, TINY_LADDER, "mp4", out_dir)

    assert f"declares {FASTSTART_FRAMES} frames (10.00 s)" in str(refused.value)
    assert f"holds only {decoded} frames" in str(refused.value)
    assert list(out_dir.iterdir()) == []  # nothing left to upload, nothing billed


def test_a_whole_faststart_mp4_transcodes_every_frame(tmp_path: Path) -> None:
    whole = tmp_path / "whole.mp4"
    whole.write_bytes(faststart_clip(frames=FASTSTART_FRAMES))

    result = transcode(whole, TINY_LADDER, "mp4", tmp_path / "out")

    assert result.source.frame_count == FASTSTART_FRAMES
    assert probe(result.outputs[0].path).frames == FASTSTART_FRAMES


@pytest.mark.parametrize("name", ["missing.mp4", "."])
def test_missing_input_file_is_a_worker_error_not_an_input_error(tmp_path: Path, name: str) -> None:
    with pytest.raises(FileNotFoundError, match="not a regular file"):
        transcode(tmp_path / name, SMALL_LADDER, "mp4", tmp_path / "out")


def test_input_error_is_not_an_invalid_rendition() -> None:
    assert issubclass(TranscodeInputError, TranscodeError)
    assert not issubclass(TranscodeInputError, ValueError)
    assert issubclass(InvalidRendition, TranscodeError)
    assert issubclass(InvalidRendition, ValueError)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"height": 0}, "height must be an integer"),
        ({"height": -360}, "height must be an integer"),
        ({"height": 361}, "height must be even"),
        ({"width": 641}, "width must be even"),
        ({"width": 0}, "width must be an integer"),
        ({"height": 100_000}, "height must be an integer"),
        ({"bitrate_kbps": 0}, "bitrate_kbps"),
        ({"bitrate_kbps": -800}, "bitrate_kbps"),
        ({"fps": 0.0}, "fps must be > 0"),
        ({"fps": float("nan")}, "fps must be > 0"),
        ({"name": "../etc"}, "rendition name"),
        ({"name": ""}, "rendition name"),
    ],
)
def test_invalid_rendition_fields(fields: dict[str, object], message: str) -> None:
    values: dict[str, object] = {
        "name": "r",
        "width": None,
        "height": 360,
        "fps": None,
        "bitrate_kbps": 800,
    }
    values.update(fields)

    with pytest.raises(InvalidRendition, match=message):
        Rendition(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("renditions", "container", "message"),
    [
        (SMALL_LADDER, "avi", "unknown container 'avi'"),
        ([], "mp4", "no renditions"),
        ([SMALL_LADDER[0], SMALL_LADDER[0]], "mp4", "unique"),
    ],
)
def test_invalid_request_is_refused_before_reading_input(
    tmp_path: Path, renditions: list[Rendition], container: str, message: str
) -> None:
    # The input does not exist: the request is checked first.
    with pytest.raises(InvalidRendition, match=message):
        transcode(tmp_path / "missing.mp4", renditions, container, tmp_path)


@pytest.mark.parametrize(("container", "fps_cap"), [("mp4", None), ("mpegts", 12.0)])
def test_the_estimate_before_the_job_bounds_what_it_bills(
    tmp_path: Path, container: str, fps_cap: float | None
) -> None:
    """The pixels a client authorises (max_units) from probing the input: exactly what the
    transcode bills at the input's rate, an upper bound when a rendition lowers the rate."""
    clip = make_test_clip(
        tmp_path / f"in{EXTENSIONS[container]}",
        640,
        360,
        frames=12,
        fps=CLIP_FPS,
        container=container,
    )
    ladder = [Rendition("360p", None, 360, fps_cap, 800), Rendition("240p", None, 240, None, 400)]
    ladder.append(Rendition("720p", None, 720, None, 3000))  # would upscale: left out
    estimate = estimate_output_pixels(clip, ladder)
    assert estimate.frames == 12
    assert estimate.sizes == ((640, 360), (426, 240))
    billed = transcode(clip, ladder, "mp4", tmp_path / "out").total_output_pixels
    if fps_cap is None:
        assert estimate.output_pixels == billed
    else:
        assert billed < estimate.output_pixels


def test_the_estimate_refuses_what_transcode_refuses(tmp_path: Path) -> None:
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\0" * 1000)
    with pytest.raises(TranscodeInputError):
        estimate_output_pixels(junk, SMALL_LADDER)
