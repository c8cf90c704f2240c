"""Comparators: do two workers' results for the same job agree?

Neither inference nor encoding is bit-exact across machines (kernels, thread counts, fp16
accumulation order, encoder builds), so agreement is a similarity above a threshold:

- embeddings and other tensor outputs: the lowest cosine similarity over the rows, with a
  tolerance set by the precision (an honest int8 run drifts more than an fp32 one);
- transcodes: each rendition decoded from both results; same frame count and size, then the
  PSNR (dB) of the luma plane averaged over 8x8 blocks, frame by frame. Two lossy encodes of
  one source differ in fine detail (encoder decisions vary with threads and builds: a noisy
  720p test clip at ladder bitrates gave 29 dB pixel-wise between two honest encodes), while
  the block means keep the picture: the same pair gave 36.5 dB, and the same frames in the
  wrong order 13 dB.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path
from typing import Any

import numpy as np

# Lowest acceptable cosine similarity per precision. fp32 runs of MiniLM agree past 0.99999
# whatever the batch. Dynamic int8 quantizes activations per batch, so one text embedded beside
# different batch-mates on two honest workers was measured as low as 0.877 (tests/unit/worker/
# test_inference.py); int8 needs that much room. Forged or random rows land near 0.
COSINE_THRESHOLDS: dict[str, float] = {"fp32": 0.999, "fp16": 0.99, "bf16": 0.98, "int8": 0.8}
PSNR_THRESHOLD_DB = 25.0
PSNR_BLOCK = 8  # pixels: PSNR is taken over the means of BLOCK x BLOCK luma blocks
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


def _luma_frames(path: Path) -> Iterator[np.ndarray[Any, Any]]:
    import av

    with av.open(str(path)) as container:
        for frame in container.decode(container.streams.video[0]):
            yield frame.to_ndarray(format="gray")


def block_means(luma: np.ndarray[Any, Any], block: int = PSNR_BLOCK) -> np.ndarray[Any, Any]:
    """Mean of each ``block`` x ``block`` tile (edges that do not fill a tile are dropped)."""
    h, w = luma.shape[0] // block * block, luma.shape[1] // block * block
    if h == 0 or w == 0:
        return luma.astype(np.float64)
    tiles = luma[:h, :w].astype(np.float64).reshape(h // block, block, w // block, block)
    return tiles.mean(axis=(1, 3))


def psnr_db(first: np.ndarray[Any, Any], second: np.ndarray[Any, Any]) -> float:
    diff = first.astype(np.float64) - second.astype(np.float64)
    mse = float(np.mean(diff * diff))
    if mse == 0:
        return IDENTICAL_PSNR_DB
    return min(IDENTICAL_PSNR_DB, 10 * math.log10(255.0**2 / mse))


def compare_videos(first: Path, second: Path, *, max_frames: int = MAX_FRAMES_COMPARED) -> float:
    """Mean block-luma PSNR (dB) over the first ``max_frames`` frames, decoding each file once;
    raises ValueError when the two differ in frame size or frame count."""
    values: list[float] = []
    counts = [0, 0]
    for a, b in zip_longest(_luma_frames(first), _luma_frames(second)):
        counts[0] += a is not None
        counts[1] += b is not None
        if a is None or b is None or len(values) >= max_frames:
            continue  # past the sample (or one file ended): only counting now
        if a.shape != b.shape:
            raise ValueError(f"frame size {a.shape[::-1]} against {b.shape[::-1]}")
        values.append(psnr_db(block_means(a), block_means(b)))
    if counts[0] != counts[1]:
        raise ValueError(f"{counts[0]} frames against {counts[1]}")
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


TEACHER_FORCING_METRIC = "tokens_confirmed"
"""Generation checks: the share of claimed tokens the checker's model confirmed (1.0 agrees)."""


def _generation_claim(output: dict[str, Any]) -> tuple[str, str, int] | None:
    """(text, finish reason, prompt tokens) of a generation result; None if not one."""
    usage = output.get("usage") or {}
    if not isinstance(output.get("text"), str):
        return None
    return (
        str(output["text"]),
        str(output.get("finish_reason")),
        int(usage.get("prompt_tokens", -1)),
    )


def compare_generations(first: dict[str, Any] | None, second: dict[str, Any] | None) -> Comparison:
    """A generation result against a teacher-forcing check of it (or two checks of the same
    claim). The claim agrees with a check when every claimed token was confirmed (argmax, or
    inside the top-p set), the claimed text is what the tokens decode to, the finish reason is
    what the tokens show (no truncation) and the prompt counts agree."""
    threshold = 1.0

    def differ(detail: str, value: float | None = None) -> Comparison:
        return Comparison(False, TEACHER_FORCING_METRIC, value, threshold, detail)

    if not isinstance(first, dict) or not isinstance(second, dict):
        return differ("a result has no output")
    checks = [o["check"] for o in (first, second) if isinstance(o.get("check"), dict)]
    claims = [o for o in (first, second) if "check" not in o]
    if len(checks) == 2:  # two checks of one claim: agree when their verdicts do
        verdicts = [
            (c.get("mismatches") == 0, c.get("text"), c.get("finish_reason")) for c in checks
        ]
        if verdicts[0] == verdicts[1]:
            return Comparison(True, TEACHER_FORCING_METRIC, None, threshold, "the checks agree")
        return differ("the two checks disagree")
    if len(checks) != 1 or len(claims) != 1:
        return differ("generation results are compared with a teacher-forcing check")
    check, claim = checks[0], _generation_claim(claims[0])
    if claim is None:
        return differ("the result holds no text")
    text, finish, prompt_tokens = claim
    checked = int(check.get("checked") or 0)
    mismatches = int(check.get("mismatches") or 0)
    value = 1.0 - mismatches / checked if checked else 1.0
    if mismatches:
        return differ(
            f"{mismatches} of {checked} tokens are not what the model would produce "
            f"(first at token {check.get('first_mismatch')})",
            value,
        )
    if check.get("text") != text:
        return differ("the text is not what its tokens decode to", value)
    if check.get("finish_reason") != finish:
        return differ(
            f"the result says it finished by {finish!r}, its tokens show "
            f"{check.get('finish_reason')!r}",
            value,
        )
    if check.get("prompt_tokens") != prompt_tokens:
        return differ(
            f"the prompt is {check.get('prompt_tokens')} tokens, the result billed {prompt_tokens}",
            value,
        )
    return Comparison(True, TEACHER_FORCING_METRIC, value, threshold, "every token confirmed")
