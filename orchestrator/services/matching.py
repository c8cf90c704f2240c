"""Matching: which worker gets a job. Pure functions, no I/O, so every rule is unit-testable.

First the hard constraints (job type, model, precision, VRAM, price, deadline reachable, not
excluded, a free slot); then a score in [0, 1] over the eligible workers, with weights set by
the client's preference. Workers scoring within ``NEAR_EQUAL`` of the best are picked among at
random, so equal offers share the work instead of herding it onto one worker.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

from protocol import JobType, Offer, Precision, Preference

NEAR_EQUAL = 0.02
# Priors used until a worker has measured figures for a model (units per second).
DEFAULT_UNITS_PER_S = {
    JobType.INFERENCE: 50.0,
    JobType.TRANSCODE: 20_000_000.0,
    JobType.GENERATE: 15.0,  # tokens/s of a small LLM on a few CPU cores
}
GPU_SPEEDUP_PRIOR = 10.0
# World-average grid intensity, gCO2 per kWh, when an operator has not set one.
DEFAULT_CARBON_INTENSITY = 475.0
JOULES_PER_KWH = 3_600_000.0


@dataclass(frozen=True)
class Weights:
    price: float
    speed: float
    reputation: float
    load: float
    green: float


WEIGHTS: dict[Preference, Weights] = {
    Preference.COST: Weights(price=0.6, speed=0.1, reputation=0.2, load=0.1, green=0.0),
    Preference.SPEED: Weights(price=0.05, speed=0.6, reputation=0.2, load=0.15, green=0.0),
    Preference.GREEN: Weights(price=0.1, speed=0.05, reputation=0.2, load=0.05, green=0.6),
    Preference.BALANCED: Weights(price=0.3, speed=0.25, reputation=0.2, load=0.1, green=0.15),
}


@dataclass
class Candidate:
    """A worker as matching sees it. ``perf`` holds measured figures per offer key."""

    worker_id: str
    offers: list[Offer]
    vram_mb: int = 0
    has_gpu: bool = False
    free_slots: int = 1
    running: int = 0
    max_concurrency: int = 1
    reputation: float = 0.5
    carbon_intensity_g_per_kwh: float | None = None
    perf: dict[str, dict[str, float]] = field(default_factory=dict)
    # Staked enough in WorkerRegistry, not unbonding, not slashed (always True without payments).
    staked: bool = True


@dataclass(frozen=True)
class JobNeeds:
    """What a job asks for. ``units`` may be unknown (None) until the worker measures it."""

    type: JobType
    model: str
    precision: Precision
    max_price_wei_per_unit: int
    preference: Preference = Preference.BALANCED
    # Generate jobs: the cap on a prompt token (None: max_price_wei_per_unit), and the most
    # prompt and completion tokens it may bill (its prompt's bound, max_tokens): the weights
    # of the two prices when offers are scored.
    max_prompt_price_wei_per_unit: int | None = None
    prompt_units: int = 0
    completion_units: int = 0
    min_vram_mb: int = 0
    units: int | None = None
    time_left_s: float | None = None
    excluded: frozenset[str] = frozenset()
    # May the excluded workers have the job when no one else can take it now?
    retry_excluded: bool = True
    # Workers whose reputation is below this get no work until it recovers.
    min_reputation: float = 0.0
    # Pick uniformly among every eligible worker, ignoring score: for verification checks, so
    # no worker can win the checks of a partner's results by undercutting (docs/TRUST.md).
    uniform: bool = False


@dataclass(frozen=True)
class Choice:
    worker_id: str
    offer: Offer
    score: float


def offer_key(job_type: str, model: str, precision: str) -> str:
    return f"{job_type}:{model}:{precision}"


def find_offer(needs: JobNeeds, candidate: Candidate) -> Offer | None:
    for offer in candidate.offers:
        if (
            offer.job_type is needs.type
            and offer.model == needs.model
            and (needs.type is JobType.TRANSCODE or offer.precision is needs.precision)
        ):
            return offer
    return None


def within_price(
    offer: Offer, max_price_wei_per_unit: int, max_prompt_price_wei_per_unit: int | None = None
) -> str | None:
    """Why ``offer`` asks more than a job's max prices allow, or None when it does not."""
    if offer.price_wei_per_unit > max_price_wei_per_unit:
        unit = "token" if offer.job_type is JobType.GENERATE else "unit"
        price = offer.price_wei_per_unit
        return f"asks {price} wei/{unit}, above the job's {max_price_wei_per_unit}"
    if offer.job_type is JobType.GENERATE:
        cap = max_prompt_price_wei_per_unit or max_price_wei_per_unit
        if offer.prompt_price > cap:
            return f"asks {offer.prompt_price} wei/prompt token, above the job's {cap}"
    return None


def unit_price(needs: JobNeeds, offer: Offer) -> float:
    """The offer's price per unit of this job (wei): for generate, the prompt and completion
    prices weighed by the job's prompt bound and max_tokens, so offers compare on its cost."""
    total = needs.prompt_units + needs.completion_units
    if offer.job_type is not JobType.GENERATE or total <= 0:
        return float(offer.price_wei_per_unit)
    prompt_cost = needs.prompt_units * offer.prompt_price
    return (prompt_cost + needs.completion_units * offer.price_wei_per_unit) / total


def units_per_s(needs: JobNeeds, candidate: Candidate, offer: Offer) -> float:
    """Measured throughput, else the worker's own benchmark, else a prior."""
    measured = candidate.perf.get(offer_key(needs.type, needs.model, needs.precision), {})
    if measured.get("units_per_s"):
        return float(measured["units_per_s"])
    if offer.units_per_s:
        return offer.units_per_s
    prior = DEFAULT_UNITS_PER_S[needs.type]
    return prior * GPU_SPEEDUP_PRIOR if candidate.has_gpu else prior


def energy_j_per_unit(needs: JobNeeds, candidate: Candidate, offer: Offer) -> float | None:
    measured = candidate.perf.get(offer_key(needs.type, needs.model, needs.precision), {})
    value = measured.get("energy_j_per_unit", offer.energy_j_per_unit)
    return None if value is None else float(value)


def expected_seconds(needs: JobNeeds, candidate: Candidate, offer: Offer) -> float:
    """Expected completion time: work divided by throughput, stretched by current load."""
    work = units_per_s(needs, candidate, offer)
    load = candidate.running / max(candidate.max_concurrency, 1)
    return (needs.units or 1) / work * (1.0 + load)


def co2_grams(energy_j: float, intensity_g_per_kwh: float | None) -> float:
    """Estimated grams of CO2 for ``energy_j`` joules at a grid intensity (gCO2/kWh; None:
    the world average)."""
    if intensity_g_per_kwh is None:
        intensity_g_per_kwh = DEFAULT_CARBON_INTENSITY
    return energy_j / JOULES_PER_KWH * intensity_g_per_kwh


def grams_co2(needs: JobNeeds, candidate: Candidate, offer: Offer) -> float | None:
    per_unit = energy_j_per_unit(needs, candidate, offer)
    if per_unit is None:
        return None
    return co2_grams(per_unit * (needs.units or 1), candidate.carbon_intensity_g_per_kwh)


def exclusion_reason(needs: JobNeeds, candidate: Candidate) -> str | None:
    """Why ``candidate`` cannot take the job, or None when it can."""
    if not candidate.staked:
        return "is not staked in WorkerRegistry (or is unbonding or slashed)"
    if candidate.worker_id in needs.excluded:
        return "already failed or lost this job"
    if candidate.reputation < needs.min_reputation:
        have, floor = distinct_figures(candidate.reputation, needs.min_reputation)
        return f"reputation {have} is below the floor {floor}"
    if candidate.free_slots <= 0:
        return "no free slot"
    offer = find_offer(needs, candidate)
    if offer is None:
        return f"does not offer {needs.type}/{needs.model}/{needs.precision}"
    if needs.min_vram_mb and candidate.vram_mb < needs.min_vram_mb:
        return f"has {candidate.vram_mb} MiB VRAM, job needs {needs.min_vram_mb}"
    caps = (needs.max_price_wei_per_unit, needs.max_prompt_price_wei_per_unit)
    too_dear = within_price(offer, *caps)
    if too_dear is not None:
        return too_dear
    if needs.time_left_s is not None and needs.units is not None:
        if expected_seconds(needs, candidate, offer) > needs.time_left_s:
            return "cannot finish before the deadline"
    return None


def distinct_figures(a: float, b: float, fewest: int = 2, most: int = 9) -> tuple[str, str]:
    """``a`` and ``b`` with as many decimals (at least ``fewest``) as it takes to tell them
    apart, so 0.248 against 0.25 reads "0.248" and "0.250", never "0.25 is below 0.25"."""
    for places in range(fewest, most + 1):
        first, second = f"{a:.{places}f}", f"{b:.{places}f}"
        if first != second or a == b:
            return first, second
    return repr(a), repr(b)


def _score_all(needs: JobNeeds, eligible: list[tuple[Candidate, Offer]]) -> list[float]:
    weights = WEIGHTS[needs.preference]
    prices = [unit_price(needs, offer) for _, offer in eligible]
    times = [expected_seconds(needs, c, o) for c, o in eligible]
    co2 = [grams_co2(needs, c, o) for c, o in eligible]
    known_co2 = [g for g in co2 if g is not None]
    min_price, min_time = min(prices), min(times)
    min_co2 = min(known_co2) if known_co2 else None
    scores = []
    for (candidate, _), price, seconds, grams in zip(eligible, prices, times, co2, strict=True):
        if min_co2 is None or grams is None:
            green = 0.5  # unknown energy: neither rewarded nor ruled out
        elif grams <= 0:
            green = 1.0
        else:
            green = min_co2 / grams
        load = 1.0 - candidate.running / max(candidate.max_concurrency, 1)
        scores.append(
            weights.price * (min_price / price)
            + weights.speed * (min_time / seconds)
            + weights.reputation * candidate.reputation
            + weights.load * max(load, 0.0)
            + weights.green * green
        )
    return scores


def choose(needs: JobNeeds, candidates: list[Candidate], rng: random.Random) -> Choice | None:
    """The worker for this job, or None when no worker passes the hard constraints.

    Workers that already failed or lost this job are avoided, but not forever: once
    ``retry_excluded`` allows it and no one else can take the job now, they get another try.
    """
    choice = _choose(needs, candidates, rng)
    if choice is None and needs.excluded and needs.retry_excluded:
        # (unstaked workers stay out: exclusion_reason checks stake before exclusion)
        choice = _choose(replace(needs, excluded=frozenset()), candidates, rng)
    return choice


def _choose(needs: JobNeeds, candidates: list[Candidate], rng: random.Random) -> Choice | None:
    eligible: list[tuple[Candidate, Offer]] = []
    for candidate in candidates:
        offer = find_offer(needs, candidate)
        if offer is not None and exclusion_reason(needs, candidate) is None:
            eligible.append((candidate, offer))
    if not eligible:
        return None
    if needs.uniform:
        candidate, offer = eligible[rng.randrange(len(eligible))]
        return Choice(worker_id=candidate.worker_id, offer=offer, score=0.0)
    scores = _score_all(needs, eligible)
    best = max(scores)
    near = [i for i, s in enumerate(scores) if s >= best - NEAR_EQUAL]
    pick = near[rng.randrange(len(near))]
    candidate, offer = eligible[pick]
    return Choice(worker_id=candidate.worker_id, offer=offer, score=scores[pick])
