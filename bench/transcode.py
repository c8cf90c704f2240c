"""Transcoding: the worker's PyAV ladder against the ffmpeg CLI doing the same work.

    python -m bench.transcode [--quick]

A synthetic clip (``make_test_clip``: 1280x720, 24 fps, ``CLIP_FRAMES_FULL`` frames, video
only) is transcoded into the default ladder (``protocol.jobs.DEFAULT_LADDER``: 720p at
3000 kbit/s, 480p at 1500, 360p at 800; MP4) twice over:

* **PyAV**: ``worker.executors.transcode.transcode`` exactly as the worker's transcode
  pipeline calls it (``threads=None``: FFmpeg picks its thread counts). One decode; each frame
  is scaled by swscale and fed to three libx264 encoders.
* **ffmpeg CLI** (the baseline, Debian's ``ffmpeg`` on PATH): one invocation, one decode, a
  ``split`` filter into three ``scale`` filters (the same bicubic swscale), three libx264
  encoders with the worker's options (preset, bitrate, maxrate, VBV buffer, fixed GOP with
  scene cuts off, yuv420p), MP4 with ``+faststart``; default (automatic) threading.

Each side runs ``REPEATS_FULL`` times, alternating; the figure is the best wall time of each,
seconds, process start included for the CLI. ratio = PyAV / CLI (goal <= 1.1). Before timing
counts, the outputs are checked: same renditions, sizes and frame counts on both sides, and
the same x264 option string (x264 writes its settings into the stream), so the two did the
same work; the x264 builds differ (PyAV's wheel bundles its own FFmpeg and x264).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import av

from bench.table import Row, ratio, section_main
from protocol.jobs import DEFAULT_LADDER
from worker.executors import transcode

SECTION = "d"
CLIP_WIDTH = 1280
CLIP_HEIGHT = 720
CLIP_FPS = 24
CLIP_FRAMES_FULL = 144  # 6 s
CLIP_FRAMES_QUICK = 24  # 1 s
REPEATS_FULL = 3
REPEATS_QUICK = 1
CONTAINER = "mp4"
GOAL = "ratio <= 1.1"
GOAL_RATIO = 1.1
FFMPEG_TIMEOUT_S = 600
FFMPEG_MISSING = "ffmpeg CLI not on PATH; make bench installs it (apt-get install -y ffmpeg)"
_X264_SETTINGS = re.compile(
    rb"x264 - core (\d+)[^\0]*? - H\.264/MPEG-4 AVC codec - [^\0]*?options: ([^\0]*)"
)


@dataclass(frozen=True)
class Encoded:
    """One rendition file as written: pixels, frames, bytes, and x264's settings string."""

    name: str
    width: int
    height: int
    frames: int
    size_bytes: int
    x264_core: str
    x264_options: str


@dataclass(frozen=True)
class Timings:
    """Best wall seconds of each side over the repeats, and what each produced."""

    pyav_s: float
    ffmpeg_s: float
    pyav: tuple[Encoded, ...]
    ffmpeg: tuple[Encoded, ...]


def worker_ladder() -> list[transcode.Rendition]:
    """The default ladder as the worker's transcode pipeline hands it to ``transcode``."""
    return [
        transcode.Rendition(
            name=r.name or f"{r.height}p",
            width=r.width,
            height=r.height,
            fps=r.fps,
            bitrate_kbps=r.bitrate_kbps,
        )
        for r in DEFAULT_LADDER
    ]


def ffmpeg_version(binary: str) -> str:
    """``ffmpeg -version``'s first line, e.g. "ffmpeg version 5.1.6-0+deb12u1"."""
    out = subprocess.run(
        [binary, "-version"], capture_output=True, text=True, check=True, timeout=30
    )
    words = out.stdout.split()
    return " ".join(words[:3]) if len(words) >= 3 else out.stdout.strip()


def ffmpeg_args(binary: str, clip: Path, renditions: list[Encoded], out_dir: Path) -> list[str]:
    """One ffmpeg run: decode once, split, scale and encode each rendition with the worker's
    encoder settings (``worker.executors.transcode``)."""
    n = len(renditions)
    flags = transcode.DEFAULT_SCALER.lower()
    graph = [f"[0:v]split={n}" + "".join(f"[s{i}]" for i in range(n))]
    graph += [
        f"[s{i}]scale={r.width}:{r.height}:flags={flags}[o{i}]" for i, r in enumerate(renditions)
    ]
    args = [binary, "-hide_banner", "-nostdin", "-loglevel", "error", "-y", "-i", str(clip)]
    args += ["-filter_complex", ";".join(graph)]
    kbps = {r.name: r.bitrate_kbps for r in worker_ladder()}
    gop = round(CLIP_FPS * transcode.DEFAULT_GOP_S)
    for i, rendition in enumerate(renditions):
        rate = kbps[rendition.name]
        args += ["-map", f"[o{i}]", "-c:v", transcode.DEFAULT_VIDEO_CODEC]
        args += ["-preset", transcode.DEFAULT_PRESET, "-b:v", f"{rate}k", "-maxrate", f"{rate}k"]
        args += ["-bufsize", f"{round(rate * transcode.VBV_BUFFER_S)}k", "-g", str(gop)]
        args += ["-x264-params", "scenecut=0", "-pix_fmt", transcode.DEFAULT_PIXEL_FORMAT]
        args += ["-an", "-f", CONTAINER, "-movflags", "+faststart"]
        args += [str(out_dir / f"{rendition.name}.{transcode.CONTAINER_EXTENSIONS[CONTAINER]}")]
    return args


def describe(path: Path) -> Encoded:
    """Size, frame count and x264 settings of an encoded file (read back with PyAV)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        frames = sum(1 for _ in container.demux(stream) if _.size)
    settings = _X264_SETTINGS.search(path.read_bytes())
    if settings is None:
        raise RuntimeError(f"{path} carries no x264 settings string")
    return Encoded(
        name=path.stem,
        width=width,
        height=height,
        frames=frames,
        size_bytes=path.stat().st_size,
        x264_core=settings.group(1).decode(),
        x264_options=settings.group(2).decode(errors="replace"),
    )


def _outputs(out_dir: Path) -> tuple[Encoded, ...]:
    names = [r.name for r in worker_ladder()]
    ext = transcode.CONTAINER_EXTENSIONS[CONTAINER]
    return tuple(describe(out_dir / f"{name}.{ext}") for name in names)


def _time_pyav(clip: Path, out_dir: Path) -> float:
    shutil.rmtree(out_dir, ignore_errors=True)
    started = time.perf_counter()
    transcode.transcode(clip, worker_ladder(), CONTAINER, out_dir, threads=None)
    return time.perf_counter() - started


def _time_ffmpeg(args: list[str], out_dir: Path) -> float:
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    started = time.perf_counter()
    subprocess.run(args, check=True, timeout=FFMPEG_TIMEOUT_S)
    return time.perf_counter() - started


def _check_same_work(pyav: tuple[Encoded, ...], cli: tuple[Encoded, ...]) -> None:
    for mine, theirs in zip(pyav, cli, strict=True):
        shape = (mine.name, mine.width, mine.height, mine.frames)
        if shape != (theirs.name, theirs.width, theirs.height, theirs.frames):
            raise RuntimeError(f"outputs differ: PyAV {mine} vs ffmpeg {theirs}")
        if mine.x264_options != theirs.x264_options:
            raise RuntimeError(
                f"{mine.name}: x264 settings differ:\nPyAV:   {mine.x264_options}\n"
                f"ffmpeg: {theirs.x264_options}"
            )


def run_bench(binary: str, frames: int, repeats: int) -> Timings:
    """Best-of-``repeats`` wall seconds of the PyAV path and the ffmpeg CLI on one clip."""
    with tempfile.TemporaryDirectory(prefix="gpumarket-bench-transcode-") as tmp:
        root = Path(tmp)
        clip = transcode.make_test_clip(
            root / "clip.mp4", CLIP_WIDTH, CLIP_HEIGHT, frames=frames, fps=CLIP_FPS
        )
        pyav_dir, cli_dir = root / "pyav", root / "ffmpeg"
        pyav_s = [_time_pyav(clip, pyav_dir)]
        pyav = _outputs(pyav_dir)
        args = ffmpeg_args(binary, clip, list(pyav), cli_dir)
        ffmpeg_s = [_time_ffmpeg(args, cli_dir)]
        cli = _outputs(cli_dir)
        _check_same_work(pyav, cli)
        for _ in range(repeats - 1):
            pyav_s.append(_time_pyav(clip, pyav_dir))
            ffmpeg_s.append(_time_ffmpeg(args, cli_dir))
    return Timings(pyav_s=min(pyav_s), ffmpeg_s=min(ffmpeg_s), pyav=pyav, ffmpeg=cli)


def measure(quick: bool) -> list[Row]:
    """One row: seconds for the default ladder through PyAV, beside the ffmpeg CLI's."""
    frames = CLIP_FRAMES_QUICK if quick else CLIP_FRAMES_FULL
    repeats = REPEATS_QUICK if quick else REPEATS_FULL
    name = "PyAV ladder transcode, worker path (s)"
    binary = shutil.which("ffmpeg")
    if binary is None:
        return [Row(SECTION, name, None, "s", "ffmpeg CLI", goal=GOAL, note=FFMPEG_MISSING)]
    version = ffmpeg_version(binary)
    timings = run_bench(binary, frames, repeats)
    r = ratio(timings.pyav_s, timings.ffmpeg_s)
    ladder = ", ".join(
        f"{e.name} {e.width}x{e.height} {e.frames} frames "
        f"({e.size_bytes // 1000} kB PyAV, {f.size_bytes // 1000} kB ffmpeg)"
        for e, f in zip(timings.pyav, timings.ffmpeg, strict=True)
    )
    note = (
        f"{CLIP_WIDTH}x{CLIP_HEIGHT} {CLIP_FPS} fps {frames}-frame synthetic clip, no audio; "
        f"best of {repeats}; {ladder}; libx264 preset {transcode.DEFAULT_PRESET}, same x264 "
        f"options on both (x264 core {timings.pyav[0].x264_core} in PyAV "
        f"{av.__version__}, core {timings.ffmpeg[0].x264_core} in the CLI); "
        "automatic threads on both"
    )
    return [
        Row(
            section=SECTION,
            name=name,
            value=timings.pyav_s,
            unit="s",
            baseline_name=f"{version} CLI: one decode, split, 3 x scale + libx264 (s)",
            baseline_value=timings.ffmpeg_s,
            ratio=r,
            goal=GOAL,
            met=None if r is None else r <= GOAL_RATIO,
            note=note,
        )
    ]


def main(argv: Sequence[str] | None = None) -> int:
    return section_main("python -m bench.transcode", __doc__, measure, argv)


if __name__ == "__main__":
    sys.exit(main())
