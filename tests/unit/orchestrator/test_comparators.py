"""Comparators: agreement between two workers' results, on real numbers and real video."""

from __future__ import annotations

import hashlib
from pathlib import Path

import av
import numpy as np
import pytest

from orchestrator.services.comparators import (
    COSINE_THRESHOLDS,
    PSNR_THRESHOLD_DB,
    Comparison,
    compare_renditions,
    compare_tensors,
)
from worker.executors.transcode import Rendition, make_test_clip, transcode

pytestmark = pytest.mark.timeout(120)

LADDER = [Rendition("240p", None, 240, None, 400), Rendition("180p", None, 180, None, 250)]


def _unit_rows(rng: np.random.Generator, rows: int = 4, dim: int = 384) -> np.ndarray:
    x = rng.standard_normal((rows, dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _out(rows: np.ndarray) -> dict[str, list[list[float]]]:
    return {"embeddings": rows.tolist()}


def test_the_same_embeddings_agree_exactly() -> None:
    rows = _unit_rows(np.random.default_rng(0))
    cmp = compare_tensors(_out(rows), _out(rows), "fp32")
    assert cmp.agrees and cmp.value == pytest.approx(1.0)


def test_float_noise_of_another_machine_agrees_and_a_plausible_forgery_does_not() -> None:
    rng = np.random.default_rng(1)
    rows = _unit_rows(rng)
    noisy = rows + rng.normal(0, 1e-4, rows.shape)
    assert compare_tensors(_out(rows), _out(noisy), "fp32").agrees
    forged = _unit_rows(rng)  # right shape, unit length, wrong direction
    cmp = compare_tensors(_out(rows), _out(forged), "fp32")
    assert not cmp.agrees and cmp.value is not None and cmp.value < 0.5
    assert "row" in cmp.detail


def test_the_tolerance_follows_the_precision() -> None:
    rng = np.random.default_rng(2)
    rows = _unit_rows(rng, rows=1)
    # A row at cosine ~0.97: fine for int8 against int8, not for fp32.
    drift = rows + 0.25 * _unit_rows(rng, rows=1)
    value = compare_tensors(_out(rows), _out(drift), "int8").value
    assert value is not None and COSINE_THRESHOLDS["int8"] <= value < COSINE_THRESHOLDS["fp32"]
    assert compare_tensors(_out(rows), _out(drift), "int8").agrees
    assert not compare_tensors(_out(rows), _out(drift), "fp32").agrees


@pytest.mark.parametrize(
    ("second", "says"),
    [
        ({"embeddings": [[1.0, 0.0]]}, "2 rows against 1"),
        ({"embeddings": [[1.0, 0.0], [1.0]]}, "different lengths"),
        ({"embeddings": [[1.0, 0.0], [float("nan"), 0.0]]}, "NaN"),
        ({"embeddings": [[1.0, 0.0], ["x", 0.0]]}, "not numeric"),
        ({"text": "junk"}, "no embeddings"),
        (None, "no embeddings"),
    ],
)
def test_malformed_outputs_disagree_with_a_reason(second: object, says: str) -> None:
    first = {"embeddings": [[1.0, 0.0], [0.0, 1.0]]}
    cmp = compare_tensors(first, second, "fp32")  # type: ignore[arg-type]
    assert not cmp.agrees and says in cmp.detail


def test_tensor_outputs_of_torchscript_models_compare_too() -> None:
    first = {"outputs": [[[1.0, 2.0], [3.0, 4.0]]]}
    assert compare_tensors(first, {"outputs": [[[1.0, 2.0], [3.0, 4.0001]]]}, "fp32").agrees
    assert not compare_tensors(first, {"outputs": [[[4.0, 3.0], [2.0, 1.0]]]}, "fp32").agrees


# --- transcodes ---------------------------------------------------------------------------


def _reversed(source: Path, path: Path) -> Path:
    """The same frames in reverse order: right size and length, wrong picture."""
    with av.open(str(source)) as container:
        images = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=24, options={"preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = 426, 240, "yuv420p"
        for image in reversed(images):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        out.mux(stream.encode(None))
    return path


def _blobs(out_dir: Path, files: dict[str, Path]) -> list[dict[str, object]]:
    return [
        {"name": name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "path": path}
        for name, path in files.items()
    ]


@pytest.fixture(scope="module")
def encodes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, object]]]:
    root = tmp_path_factory.mktemp("cmp")
    clip = make_test_clip(root / "clip.mp4", 426, 240, 24, 24)
    results = {}
    for label, source, threads in [
        ("honest_a", clip, 1),
        ("honest_b", clip, 2),
        ("wrong", _reversed(clip, root / "reversed.mp4"), 1),
        ("short", make_test_clip(root / "short.mp4", 426, 240, 20, 24), 1),  # frames dropped
    ]:
        out = root / label
        out.mkdir()
        done = transcode(source, LADDER, "mp4", out, threads=threads)
        results[label] = _blobs(out, {o.name: o.path for o in done.outputs})
    return results


def _compare(first: list[dict[str, object]], second: list[dict[str, object]]) -> Comparison:
    paths = {str(b["sha256"]): b["path"] for b in [*first, *second]}
    a, b = ([{k: v for k, v in x.items() if k != "path"} for x in side] for side in (first, second))
    return compare_renditions(a, b, paths.__getitem__)


def test_two_honest_encodes_agree_by_psnr(encodes: dict[str, list[dict[str, object]]]) -> None:
    cmp = _compare(encodes["honest_a"], encodes["honest_b"])
    assert cmp.agrees, cmp.detail
    assert cmp.metric == "psnr_db" and cmp.value is not None and cmp.value >= PSNR_THRESHOLD_DB


def test_a_wrong_picture_of_the_right_shape_disagrees(
    encodes: dict[str, list[dict[str, object]]],
) -> None:
    cmp = _compare(encodes["honest_a"], encodes["wrong"])
    assert not cmp.agrees, cmp.detail
    assert cmp.value is not None and cmp.value < PSNR_THRESHOLD_DB


def test_missing_or_undecodable_renditions_disagree(
    encodes: dict[str, list[dict[str, object]]], tmp_path: Path
) -> None:
    honest = encodes["honest_a"]
    cmp = _compare(honest, honest[:1])
    assert not cmp.agrees and "renditions" in cmp.detail
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00" * 4096)
    broken = [dict(honest[0], sha256="f" * 64, path=junk), honest[1]]
    cmp = _compare(honest, broken)
    assert not cmp.agrees and "240p" in cmp.detail


def test_dropped_frames_disagree_even_when_the_first_frames_match(
    encodes: dict[str, list[dict[str, object]]],
) -> None:
    cmp = _compare(encodes["honest_a"], encodes["short"])
    assert not cmp.agrees and "24 frames against 20" in cmp.detail


@pytest.mark.slow
def test_honest_720p_ladders_with_different_encoder_threads_agree(tmp_path: Path) -> None:
    """The case a pixel-wise PSNR rule gets wrong: two honest encodes of a noisy 720p clip at
    ladder bitrates differ in fine detail (about 29 dB pixel by pixel) but not in picture."""
    from protocol.jobs import DEFAULT_LADDER

    clip = make_test_clip(tmp_path / "clip.mp4", 1280, 720, 24, 24)
    ladder = [
        Rendition(r.name or "", r.width, r.height, r.fps, r.bitrate_kbps) for r in DEFAULT_LADDER
    ]
    sides = []
    for threads in (1, 2):
        out = tmp_path / f"t{threads}"
        out.mkdir()
        done = transcode(clip, ladder, "mp4", out, threads=threads)
        sides.append(_blobs(out, {o.name: o.path for o in done.outputs}))
    cmp = _compare(sides[0], sides[1])
    assert cmp.agrees, cmp.detail
