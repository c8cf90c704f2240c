"""The orchestrator's own count of billable units agrees with the worker's honest count."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.services.billing import VideoProbe, probe_video
from worker.executors.transcode import Rendition, make_test_clip, transcode

LADDER = [
    Rendition(name="240p", height=240, width=None, fps=None, bitrate_kbps=500),
    Rendition(name="120p", height=120, width=None, fps=12, bitrate_kbps=200),
]


@pytest.mark.parametrize("container", ["mp4", "mpegts"])
def test_probed_pixels_are_the_pixels_the_worker_bills(tmp_path: Path, container: str) -> None:
    source = make_test_clip(tmp_path / "in", 320, 240, 24, 24, container=container, audio=True)
    (tmp_path / "out").mkdir()
    result = transcode(source, LADDER, container, tmp_path / "out")
    probes = [probe_video(output.path) for output in result.outputs]
    assert probes == [VideoProbe(320, 240, 24), VideoProbe(160, 120, 12)]
    assert sum(p.pixels for p in probes) == result.total_output_pixels


@pytest.mark.parametrize(
    ("content", "says"),
    [(b"not a video at all" * 100, "not a readable video"), (b"", "not a readable video")],
)
def test_what_is_not_a_video_cannot_be_probed(tmp_path: Path, content: bytes, says: str) -> None:
    path = tmp_path / "blob"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=says):
        probe_video(path)


def test_a_missing_file_cannot_be_probed(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="FileNotFoundError"):
        probe_video(tmp_path / "gone")
