"""Comparators: do two workers' results for the same job agree?

Neither inference nor encoding is bit-exact across machines (kernels, thread counts, fp16
accumulation order, encoder builds), so agreement is a similarity above a threshold:

- embeddings and other tensor outputs: the lowest cosine similarity over the rows, with a
  tolerance set by the precision (an honest int8 run drifts more than an fp32 one);
- transcodes: each rendition decoded from both results and compared frame by frame (PSNR of
  the luma plane, in dB). Two honest H.264 encodes of one source at one bitrate land far above
  the threshold; a wrong clip, a shifted or dropped frame, or junk lands far below it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# Lowest acceptable cosine similarity per precision. fp32 runs of MiniLM agree past 0.99999
# whatever the batch. Dynamic int8 quantizes activations per batch, so one text embedded beside
# different batch-mates on two honest workers was measured as low as 0.877 (tests/unit/worker/
# test_inference.py); int8 needs that much room. Forged or random rows land near 0.
COSINE_THRESHOLDS: dict[str, float] = {"fp32": 0.999, "fp16": 0.99, "bf16": 0.98, "int8": 0.8}
PSNR_THRESHOLD_DB = 30.0
# Frames compared per rendition, spread over the clip (decoding every frame of a long segment
# twice would make verification cost more than the job).
MAX_FRAMES_COMPARED = 60
IDENTICAL_PSNR_DB = 100.0


@dataclass(frozen=True)
class Comparison:
    agrees: bool
    metric: str
    value: float | None
    threshold: float
    detail: str


def _rows(output: dict[str, Any] | None) -> list[list[float]] | None:
    if not isinstance(output, dict):
        return None
    for key in ("embeddings", "outputs"):
        rows = output.get(key)
        if isinstance(rows, list):
            return [_flatten(row) for row in rows]
    return None


def _flatten(value: Any) -> list[float]:
    if isinstance(value, list):
        return [x for item in value for x in _flatten(item)]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"not a number: {value!r}")
    return [float(value)]


def compare_tensors(
    first: dict[str, Any] | None, second: dict[str, Any] | None, precision: str
) -> Comparison:
    """Lowest row-wise cosine similarity between two inference outputs."""
    threshold = COSINE_THRESHOLDS.get(precision, COSINE_THRESHOLDS["int8"])

    def differ(detail: str) -> Comparison:
        return Comparison(False, "cosine", None, threshold, detail)

    try:
        a, b = _rows(first), _rows(second)
    except ValueError as exc:
        return differ(f"output is not numeric: {exc}")
    if a is None or b is None:
        return differ("an output has no embeddings/outputs rows")
    if len(a) != len(b):
        return differ(f"{len(a)} rows against {len(b)}")
    if not a:
        return Comparison(True, "cosine", 1.0, threshold, "both outputs are empty")
    if any(len(x) != len(y) for x, y in zip(a, b, strict=True)):
        return differ("rows of different lengths")
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        return differ("an output holds NaN or infinity")
    norms = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)
    dots = np.einsum("ij,ij->i", x, y)
    # Two zero rows agree; one zero row against a non-zero one does not.
    both_zero = norms == 0
    cosines = np.where(both_zero, np.where(dots == 0, 1.0, 0.0), dots / np.where(norms, norms, 1))
    worst = float(cosines.min())
    row = int(cosines.argmin())
    return Comparison(
        worst >= threshold,
        "cosine",
        worst,
        threshold,
        f"lowest cosine {worst:.6f} (row {row} of {len(a)}), threshold {threshold}",
    )


def _luma_frames(path: Path, limit: int) -> Iterator[np.ndarray[Any, Any]]:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        for frame in container.decode(stream):
            yield frame.to_ndarray(format="gray").astype(np.float64)
            limit -= 1
            if limit <= 0:
                return


def frame_count(path: Path) -> int:
    import av

    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(container.streams.video[0]))


def psnr_db(first: np.ndarray[Any, Any], second: np.ndarray[Any, Any]) -> float:
    mse = float(np.mean((first - second) ** 2))
    if mse == 0:
        return IDENTICAL_PSNR_DB
    return min(IDENTICAL_PSNR_DB, 10 * math.log10(255.0**2 / mse))


def compare_videos(first: Path, second: Path, *, max_frames: int = MAX_FRAMES_COMPARED) -> float:
    """Mean luma PSNR (dB) over the first ``max_frames`` frames; raises ValueError when the
    two do not have the same frame size or frame count."""
    count_a, count_b = frame_count(first), frame_count(second)
    if count_a != count_b:
        raise ValueError(f"{count_a} frames against {count_b}")
    values = []
    for a, b in zip(_luma_frames(first, max_frames), _luma_frames(second, max_frames), strict=True):
        if a.shape != b.shape:
            raise ValueError(f"frame size {a.shape[::-1]} against {b.shape[::-1]}")
        values.append(psnr_db(a, b))
    if not values:
        raise ValueError("no decodable frame")
    return float(np.mean(values))


def compare_renditions(
    first: list[dict[str, Any]] | None,
    second: list[dict[str, Any]] | None,
    path_of: Any,
) -> Comparison:
    """Compare two transcode results rendition by rendition (matched by name); ``path_of``
    maps a blob's sha256 to its file. The value is the lowest rendition PSNR."""

    def differ(detail: str, value: float | None = None) -> Comparison:
        return Comparison(False, "psnr_db", value, PSNR_THRESHOLD_DB, detail)

    if not first or not second:
        return differ("a result has no renditions")
    by_name = {b["name"]: b for b in second}
    if sorted(by_name) != sorted(b["name"] for b in first):
        return differ(f"renditions {sorted(b['name'] for b in first)} against {sorted(by_name)}")
    worst: float | None = None
    worst_name = ""
    for blob in first:
        other = by_name[blob["name"]]
        if blob["sha256"] == other["sha256"]:
            value = IDENTICAL_PSNR_DB
        else:
            try:
                value = compare_videos(path_of(blob["sha256"]), path_of(other["sha256"]))
            except Exception as exc:  # undecodable output is a disagreement, not a crash
                return differ(f"rendition {blob['name']}: {type(exc).__name__}: {exc}")
        if worst is None or value < worst:
            worst, worst_name = value, blob["name"]
    assert worst is not None
    return Comparison(
        worst >= PSNR_THRESHOLD_DB,
        "psnr_db",
        worst,
        PSNR_THRESHOLD_DB,
        f"lowest PSNR {worst:.1f} dB (rendition {worst_name}), threshold {PSNR_THRESHOLD_DB} dB",
    )
