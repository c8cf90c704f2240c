"""The catalog: which models live workers offer now, at what prices (``GET /v1/models``, and the
market price an OpenAI-style request pays when it names no maximum of its own)."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select

from orchestrator.config import Settings
from orchestrator.services.workers import REGISTERED
from orchestrator.store import Store
from orchestrator.store.models import Worker
from protocol import JobType, Offer


@dataclass(frozen=True)
class OfferedModel:
    """A model live workers offer: its cheapest price (wei per unit: per token for generate;
    per prompt token apart), how many workers offer it, its context length (generate) and best
    measured units/s. ``prices``: each offer's (price, prompt price), cheapest first."""

    model: str
    job_type: JobType
    min_price_wei_per_unit: int
    workers: int
    context_tokens: int | None
    units_per_s: float | None
    min_prompt_price_wei_per_unit: int | None = None
    prices: tuple[tuple[int, int], ...] = ()

    def cheapest_for(self, prompt_tokens: int, completion_tokens: int) -> tuple[int, int]:
        """The (price, prompt price) of the offer that bills these tokens least (wei)."""
        return min(self.prices, key=lambda p: (prompt_tokens * p[1] + completion_tokens * p[0], p))


class Catalog:
    def __init__(self, store: Store, settings: Settings) -> None:
        self._store = store
        self._settings = settings

    def offered(self, now: float) -> dict[str, OfferedModel]:
        """Models offered by registered workers heard from within a lease's time."""
        found: dict[str, OfferedModel] = {}
        with self._store.read() as s:
            rows = s.scalars(
                select(Worker.offers).where(
                    Worker.status == REGISTERED,
                    Worker.last_seen_at >= now - self._settings.lease_ttl_s,
                )
            )
            for worker_offers in rows:
                for raw in worker_offers:
                    offer = Offer.model_validate(raw)
                    found[offer.model] = _merge(found.get(offer.model), offer)
        return found


def _merge(known: OfferedModel | None, offer: Offer) -> OfferedModel:
    generate = offer.job_type is JobType.GENERATE
    pair = (offer.price_wei_per_unit, offer.prompt_price)
    if known is None:
        return OfferedModel(
            model=offer.model,
            job_type=offer.job_type,
            min_price_wei_per_unit=offer.price_wei_per_unit,
            workers=1,
            context_tokens=offer.context_tokens,
            units_per_s=offer.units_per_s,
            min_prompt_price_wei_per_unit=offer.prompt_price if generate else None,
            prices=(pair,),
        )
    speeds = [v for v in (known.units_per_s, offer.units_per_s) if v is not None]
    contexts = [v for v in (known.context_tokens, offer.context_tokens) if v is not None]
    return OfferedModel(
        model=known.model,
        job_type=known.job_type,
        min_price_wei_per_unit=min(known.min_price_wei_per_unit, offer.price_wei_per_unit),
        workers=known.workers + 1,
        context_tokens=min(contexts) if contexts else None,
        units_per_s=max(speeds) if speeds else None,
        min_prompt_price_wei_per_unit=min(known.min_prompt_price_wei_per_unit, offer.prompt_price)
        if known.min_prompt_price_wei_per_unit is not None and generate
        else None,
        prices=tuple(sorted({*known.prices, pair})),
    )
