"""Matching rules as pure functions: hard constraints, preferences, sharing, reputation, perf.

Candidates and needs are built directly; nothing here touches a store or a clock.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace
from typing import Any

import pytest

from orchestrator.services.matching import (
    DEFAULT_UNITS_PER_S,
    GPU_SPEEDUP_PRIOR,
    Candidate,
    JobNeeds,
    choose,
    exclusion_reason,
    find_offer,
    offer_key,
    units_per_s,
)
from protocol import JobType, Offer, Precision, Preference

MODEL = "all-MiniLM-L6-v2"
SEEDS = range(20)  # choose() must give the same answer whatever the random draw


def _offer(
    price: int = 100,
    *,
    job_type: str = "inference",
    model: str = MODEL,
    precision: str = "fp32",
    units_per_s: float | None = None,
    energy_j_per_unit: float | None = None,
) -> Offer:
    return Offer.model_validate(
        {
            "job_type": job_type,
            "model": model if job_type == "inference" else "h264",
            "precision": precision,
            "price_wei_per_unit": price,
            "units_per_s": units_per_s,
            "energy_j_per_unit": energy_j_per_unit,
        }
    )


def _candidate(worker_id: str, *offers: Offer, **fields: Any) -> Candidate:
    return Candidate(worker_id=worker_id, offers=list(offers) or [_offer()], **fields)


def _needs(**fields: Any) -> JobNeeds:
    base: dict[str, Any] = {
        "type": JobType.INFERENCE,
        "model": MODEL,
        "precision": Precision.FP32,
        "max_price_wei_per_unit": 1_000,
    }
    return JobNeeds(**{**base, **fields})


def _picks(needs: JobNeeds, candidates: list[Candidate]) -> set[str | None]:
    """Every worker ``choose`` picks over several seeds (None when it picks nobody)."""
    picked: set[str | None] = set()
    for seed in SEEDS:
        choice = choose(needs, candidates, random.Random(seed))
        picked.add(None if choice is None else choice.worker_id)
    return picked


# --- hard constraints ----------------------------------------------------------------------

# (case, needs overrides, the excluded worker's fields, the eligible worker's fields, reason)
HARD_CONSTRAINTS: list[tuple[str, dict[str, Any], dict[str, Any], dict[str, Any], str]] = [
    (
        "job type",
        {"type": JobType.TRANSCODE, "model": "h264"},
        {"offers": [_offer(10)]},
        {"offers": [_offer(100, job_type="transcode")]},
        "does not offer transcode/h264/fp32",
    ),
    (
        # Same model name, other job type: only the type tells them apart.
        "job type, same model name",
        {"type": JobType.TRANSCODE, "model": "h264"},
        {"offers": [Offer(job_type=JobType.INFERENCE, model="h264", price_wei_per_unit=10)]},
        {"offers": [_offer(100, job_type="transcode")]},
        "does not offer transcode/h264/fp32",
    ),
    (
        "model",
        {},
        {"offers": [_offer(10, model="other-model")]},
        {"offers": [_offer(100)]},
        f"does not offer inference/{MODEL}/fp32",
    ),
    (
        "precision",
        {"precision": Precision.FP16},
        {"offers": [_offer(10, precision="fp32"), _offer(10, precision="int8")]},
        {"offers": [_offer(100, precision="fp16")]},
        f"does not offer inference/{MODEL}/fp16",
    ),
    (
        "vram",
        {"min_vram_mb": 16_000},
        {"offers": [_offer(10)], "vram_mb": 8_000, "has_gpu": True},
        {"offers": [_offer(100)], "vram_mb": 16_000, "has_gpu": True},
        "has 8000 MiB VRAM, job needs 16000",
    ),
    (
        "price",
        {"max_price_wei_per_unit": 150},
        {"offers": [_offer(151)]},
        {"offers": [_offer(150)]},  # exactly the client's max is allowed
        "asks 151 wei/unit, above the job's 150",
    ),
    (
        "free slot",
        {},
        {"offers": [_offer(10)], "free_slots": 0},
        {"offers": [_offer(100)], "free_slots": 1},
        "no free slot",
    ),
    (
        "excluded",
        {"excluded": frozenset({"bad"})},
        {"offers": [_offer(10)]},
        {"offers": [_offer(100)]},
        "already failed or lost this job",
    ),
    (
        # 1000 units at a measured 50/s take 20 s; only 10 s are left. The fast one needs 2 s.
        "deadline",
        {"units": 1_000, "time_left_s": 10.0},
        {"offers": [_offer(10)], "perf": {f"inference:{MODEL}:fp32": {"units_per_s": 50.0}}},
        {"offers": [_offer(100)], "perf": {f"inference:{MODEL}:fp32": {"units_per_s": 500.0}}},
        "cannot finish before the deadline",
    ),
]


@pytest.mark.parametrize(
    ("needs_fields", "bad_fields", "good_fields", "reason"),
    [pytest.param(*case[1:], id=case[0]) for case in HARD_CONSTRAINTS],
)
def test_each_hard_constraint_excludes_the_worker(
    needs_fields: dict[str, Any],
    bad_fields: dict[str, Any],
    good_fields: dict[str, Any],
    reason: str,
) -> None:
    needs = _needs(**needs_fields)
    # The excluded worker is otherwise the better deal (cheaper), so only the rule keeps it out.
    bad = Candidate(worker_id="bad", **bad_fields)
    good = Candidate(worker_id="good", **good_fields)

    assert exclusion_reason(needs, bad) == reason
    assert exclusion_reason(needs, good) is None
    assert _picks(needs, [bad, good]) == {"good"}
    assert _picks(needs, [good, bad]) == {"good"}
    alone = choose(needs, [bad], random.Random(0))
    if needs.excluded:
        # Exclusion is a preference: with no one else available, the job is retried there.
        assert alone is not None and alone.worker_id == "bad"
        assert choose(replace(needs, retry_excluded=False), [bad], random.Random(0)) is None
    else:
        assert alone is None


def test_without_the_constraint_the_cheaper_worker_would_win() -> None:
    # The control for the table above: with no constraint in play, price decides.
    needs = _needs()
    assert _picks(needs, [_candidate("bad", _offer(10)), _candidate("good", _offer(100))]) == {
        "bad"
    }


def test_transcode_offers_match_whatever_the_precision_field() -> None:
    needs = _needs(type=JobType.TRANSCODE, model="h264")
    worker = _candidate("w", _offer(5, job_type="transcode"))
    offer = find_offer(needs, worker)
    assert offer is not None and offer.price_wei_per_unit == 5
    assert exclusion_reason(needs, worker) is None


def test_no_candidates_means_no_choice() -> None:
    assert choose(_needs(), [], random.Random(0)) is None


def test_choice_carries_the_workers_own_offer() -> None:
    worker = _candidate("w", _offer(10, model="other-model"), _offer(42))
    choice = choose(_needs(max_price_wei_per_unit=1_000), [worker], random.Random(0))
    assert choice is not None
    assert choice.worker_id == "w"
    assert choice.offer.price_wei_per_unit == 42  # the matching offer, not the client's max


# --- preferences ---------------------------------------------------------------------------


def _market() -> list[Candidate]:
    """Four workers, each best at something: price, speed, carbon, or decent at all three."""
    return [
        _candidate(
            "cheap-slow",
            _offer(10, units_per_s=10, energy_j_per_unit=5),
            carbon_intensity_g_per_kwh=500,
        ),
        _candidate(
            "fast-pricey",
            _offer(100, units_per_s=1_000, energy_j_per_unit=5),
            carbon_intensity_g_per_kwh=500,
        ),
        _candidate(
            "low-carbon",
            _offer(60, units_per_s=50, energy_j_per_unit=1),
            carbon_intensity_g_per_kwh=50,
        ),
        _candidate(
            "all-rounder",
            _offer(15, units_per_s=600, energy_j_per_unit=2),
            carbon_intensity_g_per_kwh=200,
        ),
    ]


@pytest.mark.parametrize(
    ("preference", "expected"),
    [
        (Preference.COST, "cheap-slow"),
        (Preference.SPEED, "fast-pricey"),
        (Preference.GREEN, "low-carbon"),
        (Preference.BALANCED, "all-rounder"),
    ],
)
def test_preference_sets_the_choice_on_one_market(preference: Preference, expected: str) -> None:
    assert _picks(_needs(preference=preference, units=100), _market()) == {expected}


def test_green_without_energy_figures_falls_back_to_the_other_terms() -> None:
    # No energy known anywhere: carbon cannot decide, so the cheaper, faster worker wins.
    needs = _needs(preference=Preference.GREEN, units=100)
    better = _candidate("better", _offer(10, units_per_s=100), carbon_intensity_g_per_kwh=10)
    worse = _candidate("worse", _offer(100, units_per_s=10), carbon_intensity_g_per_kwh=10)
    assert _picks(needs, [worse, better]) == {"better"}


def test_idle_worker_is_preferred_over_a_busy_identical_one() -> None:
    needs = _needs(units=100)
    busy = _candidate("busy", _offer(), running=3, max_concurrency=4)
    idle = _candidate("idle", _offer(), running=0, max_concurrency=4)
    assert _picks(needs, [busy, idle]) == {"idle"}


# --- sharing among near-equal workers ------------------------------------------------------


def test_near_equal_workers_share_the_work_and_a_worse_one_gets_none() -> None:
    needs = _needs(units=10)
    twin_a = _candidate("twin-a", _offer(100, units_per_s=100))
    twin_b = _candidate("twin-b", _offer(100, units_per_s=100))
    worse = _candidate("worse", _offer(500, units_per_s=100))
    rng = random.Random(1234)
    rounds = 1_000

    counts: Counter[str] = Counter()
    for _ in range(rounds):
        choice = choose(needs, [twin_a, worse, twin_b], rng)
        assert choice is not None
        counts[choice.worker_id] += 1

    assert counts["twin-a"] > 0.35 * rounds
    assert counts["twin-b"] > 0.35 * rounds
    assert counts["worse"] == 0


def test_a_clear_winner_is_not_diluted_by_randomness() -> None:
    # Slightly worse by more than the near-equal band: never picked, whatever the draw.
    needs = _needs(units=10)
    best = _candidate("best", _offer(100))
    second = _candidate("second", _offer(115))
    rng = random.Random(99)
    picked: Counter[str | None] = Counter()
    for _ in range(200):
        choice = choose(needs, [second, best], rng)
        picked[None if choice is None else choice.worker_id] += 1
    assert picked == {"best": 200}


# --- reputation ----------------------------------------------------------------------------


def test_better_reputation_wins_between_equal_offers() -> None:
    needs = _needs(units=10)
    trusted = _candidate("trusted", _offer(), reputation=0.95)
    flaky = _candidate("flaky", _offer(), reputation=0.4)
    assert _picks(needs, [flaky, trusted]) == {"trusted"}


def test_a_worker_below_the_reputation_floor_gets_no_work() -> None:
    needs = replace(_needs(units=10), min_reputation=0.25)
    shunned = _candidate("shunned", _offer(price=1), reputation=0.1)
    assert "below the floor" in (exclusion_reason(needs, shunned) or "")
    assert _picks(needs, [shunned, _candidate("ok", _offer(price=900), reputation=0.3)]) == {"ok"}
    assert choose(needs, [shunned], random.Random(0)) is None


@pytest.mark.parametrize(
    ("score", "said"),
    [
        (0.248, "reputation 0.248 is below the floor 0.250"),
        (0.1, "reputation 0.10 is below the floor 0.25"),
        (0.2499999, "reputation 0.2499999 is below the floor 0.2500000"),
    ],
)
def test_the_reputation_reason_never_rounds_a_score_up_to_the_floor(
    score: float, said: str
) -> None:
    needs = replace(_needs(units=10), min_reputation=0.25)
    assert exclusion_reason(needs, _candidate("w", _offer(), reputation=score)) == said


# --- measured performance ------------------------------------------------------------------


def test_measured_throughput_overrides_the_self_reported_one() -> None:
    needs = _needs(units=100)
    key = offer_key(JobType.INFERENCE, MODEL, Precision.FP32)
    offer = _offer(units_per_s=1_000)
    boaster = _candidate("boaster", offer, perf={key: {"units_per_s": 10.0}})

    assert units_per_s(needs, boaster, offer) == 10.0
    assert units_per_s(needs, _candidate("honest", offer), offer) == 1_000.0


def test_measured_throughput_for_another_precision_does_not_count() -> None:
    needs = _needs(units=100)
    fp16_key = offer_key(JobType.INFERENCE, MODEL, Precision.FP16)
    offer = _offer(units_per_s=1_000)
    worker = _candidate("w", offer, perf={fp16_key: {"units_per_s": 10.0}})
    assert units_per_s(needs, worker, offer) == 1_000.0


def test_without_figures_the_prior_applies_and_a_gpu_is_assumed_faster() -> None:
    needs = _needs()
    offer = _offer()
    cpu = _candidate("cpu", offer)
    gpu = _candidate("gpu", offer, has_gpu=True, vram_mb=8_000)
    prior = DEFAULT_UNITS_PER_S[JobType.INFERENCE]
    assert units_per_s(needs, cpu, offer) == prior
    assert units_per_s(needs, gpu, offer) == prior * GPU_SPEEDUP_PRIOR


def test_measured_slowness_decides_speed_and_deadline() -> None:
    key = offer_key(JobType.INFERENCE, MODEL, Precision.FP32)
    boaster = _candidate(
        "boaster", _offer(100, units_per_s=1_000), perf={key: {"units_per_s": 10.0}}
    )
    steady = _candidate("steady", _offer(100, units_per_s=100))

    speed = _needs(preference=Preference.SPEED, units=100)
    assert _picks(speed, [boaster, steady]) == {"steady"}

    # 100 units: 0.1 s as claimed, 10 s as measured; 5 s are left.
    tight = _needs(units=100, time_left_s=5.0)
    assert exclusion_reason(tight, boaster) == "cannot finish before the deadline"
    assert exclusion_reason(replace(tight, time_left_s=11.0), boaster) is None


def test_uniform_choice_ignores_price_so_checks_cannot_be_bought() -> None:
    needs = replace(_needs(units=10), uniform=True)
    cheap = _candidate("cheap", _offer(price=1))
    dear = _candidate("dear", _offer(price=900))
    picks = Counter(_pick(needs, [cheap, dear], seed) for seed in range(200))
    assert set(picks) == {"cheap", "dear"} and min(picks.values()) > 60
    # A plain choice gives every such job to the cheap one; the hard constraints still hold.
    assert _picks(replace(needs, uniform=False), [cheap, dear]) == {"cheap"}
    too_dear = _candidate("too-dear", _offer(price=10_000))
    assert choose(needs, [too_dear], random.Random(0)) is None


def _pick(needs: JobNeeds, candidates: list[Candidate], seed: int) -> str | None:
    choice = choose(needs, candidates, random.Random(seed))
    return None if choice is None else choice.worker_id
