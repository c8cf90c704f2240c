"""bench.control_plane and bench.transcode at smoke sizes: the shape of their rows, not their
size (no assertion on a time or a rate beyond being positive)."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import pytest

from bench import control_plane, transcode
from bench.table import Row

REQUIRE_PG = os.environ.get("GPUMARKET_REQUIRE_POSTGRES") == "1"


def assert_measured(row: Row) -> None:
    assert row.value is not None and math.isfinite(row.value) and row.value > 0, row
    assert row.baseline_value is not None and row.baseline_value > 0, row
    assert row.ratio == pytest.approx(row.value / row.baseline_value)
    assert row.met is not None
    assert row.goal and row.baseline_name and row.unit and row.note


# ---- b. control plane --------------------------------------------------------------------


@pytest.fixture(scope="module")
def control_plane_rows() -> list[Row]:
    pytest.importorskip(
        "celery", reason="Celery is the bench extra's baseline: pip install -e '.[bench]'"
    )
    missing = control_plane.celery_missing_reason()
    if missing is not None:
        pytest.skip(missing)
    return control_plane.measure(quick=True)


@pytest.mark.slow  # starts orchestrator and Celery worker processes
def test_control_plane_rows_sqlite(control_plane_rows: list[Row]) -> None:
    assert [row.name for row in control_plane_rows] == [
        "gpumarket no-op jobs/s (SQLite)",
        "gpumarket no-op jobs/s (PostgreSQL)",
    ]
    for row in control_plane_rows:
        assert row.section == "b"
        assert row.unit == "jobs/s"
        assert row.goal == control_plane.GOAL
        assert "Celery" in row.baseline_name
    assert_measured(control_plane_rows[0])


@pytest.mark.slow
@pytest.mark.postgres
def test_control_plane_rows_postgres(control_plane_rows: list[Row]) -> None:
    row = control_plane_rows[1]
    reason = control_plane.pg_unreachable_reason()
    if reason is not None:
        assert row.value is None and "unreachable" in row.note
        if REQUIRE_PG:
            pytest.fail(f"GPUMARKET_REQUIRE_POSTGRES=1 but PostgreSQL is unreachable: {reason}")
        pytest.skip(f"PostgreSQL is unreachable ({reason}); the row says so")
    assert_measured(row)


def test_fresh_pg_database_is_dropped() -> None:
    if control_plane.pg_unreachable_reason() is not None:
        if REQUIRE_PG:
            pytest.fail("GPUMARKET_REQUIRE_POSTGRES=1 but PostgreSQL is unreachable")
        pytest.skip("PostgreSQL is unreachable")
    import psycopg

    with control_plane.fresh_pg_database() as url:
        name = url.rsplit("/", 1)[1]
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == (name,)
    with psycopg.connect(control_plane._pg_url()) as conn:
        left = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
    assert left is None


# ---- d. transcoding ----------------------------------------------------------------------


def test_transcode_row_without_ffmpeg_says_how_to_get_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(transcode.shutil, "which", lambda _: None)
    [row] = transcode.measure(quick=True)
    assert row.section == "d"
    assert row.value is None and row.ratio is None and row.met is None
    assert "make bench" in row.note


def test_ffmpeg_args_mirror_the_worker_encoder_settings(tmp_path: Path) -> None:
    renditions = [
        transcode.Encoded("720p", 1280, 720, 24, 1, "164", ""),
        transcode.Encoded("360p", 640, 360, 24, 1, "164", ""),
    ]
    args = transcode.ffmpeg_args("ffmpeg", tmp_path / "in.mp4", renditions, tmp_path)
    graph = args[args.index("-filter_complex") + 1]
    assert graph == (
        "[0:v]split=2[s0][s1];[s0]scale=1280:720:flags=bicubic[o0];"
        "[s1]scale=640:360:flags=bicubic[o1]"
    )
    assert args.count("-i") == 1  # one decode for the whole ladder
    assert args.count("libx264") == 2
    first = args[args.index("[o0]") :]
    for option, value in [
        ("-preset", "veryfast"),
        ("-b:v", "3000k"),
        ("-maxrate", "3000k"),
        ("-bufsize", "6000k"),
        ("-g", "48"),
        ("-x264-params", "scenecut=0"),
        ("-pix_fmt", "yuv420p"),
    ]:
        assert first[first.index(option) + 1] == value
    assert args[-1] == str(tmp_path / "360p.mp4")


def test_transcode_rows_quick() -> None:
    if shutil.which("ffmpeg") is None:
        pytest.skip(transcode.FFMPEG_MISSING)
    [row] = transcode.measure(quick=True)
    assert row.section == "d"
    assert row.unit == "s"
    assert row.goal == transcode.GOAL
    assert_measured(row)
    assert "same x264 options" in row.note


def test_stake_refresh_times_the_three_refreshes() -> None:
    """bench.stake_refresh at a small size: every timing taken (the assert inside checks each
    full re-read covered every worker); no figure is asserted."""
    from bench import stake_refresh

    figures = stake_refresh.measure(20)
    assert set(figures) == {"per_worker_s", "full_reread_s", "nothing_changed_s"}
    assert all(seconds > 0 for seconds in figures.values())
