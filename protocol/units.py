"""Units and their wire encodings.

- money: ``Wei`` (int, >= 0), serialized as a decimal string;
- time: seconds as float (``*_s``), instants as UTC datetimes;
- energy: joules (``*_j``); data: bytes; video: pixels.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer, WithJsonSchema

_DECIMAL = re.compile(r"[0-9]{1,78}")
SHA256_PATTERN = r"^[0-9a-f]{64}$"
ADDRESS_PATTERN = r"^0x[0-9a-fA-F]{40}$"


MAX_WEI = 2**256 - 1  # what a uint256 on chain (and NUMERIC(78, 0) in the store) can hold
MAX_UNITS = 2**63 - 1  # a signed 64-bit count of items or pixels


def _parse_wei(value: Any) -> int:
    amount = _wei_value(value)
    if amount > MAX_WEI:  # the lower bound is each field's own (gt=0 for prices)
        raise ValueError("wei must be at most 2**256 - 1 (a uint256)")
    return amount


def _wei_value(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("wei must be an integer, not a boolean")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and _DECIMAL.fullmatch(value):
        # Exactly the digits: no sign, no spaces, no "_" (int() would take " 1" and "1_0").
        return int(value)
    if isinstance(value, float) and value.is_integer():
        # JSON numbers like 1e9 arrive as floats; only whole values are money.
        return int(value)
    raise ValueError("wei must be a whole number, as an integer or a decimal string like '1000'")


Wei = Annotated[
    int,
    BeforeValidator(_parse_wei),
    PlainSerializer(lambda v: str(v), return_type=str, when_used="json"),
    WithJsonSchema(
        {"type": "string", "pattern": "^[0-9]+$", "description": "amount in wei, decimal"}
    ),
]


def cost_wei(
    units: int, price_wei_per_unit: int, prompt_units: int = 0, prompt_price_wei_per_unit: int = 0
) -> int:
    """What ``units`` cost (wei, exact): ``prompt_units`` of them (generate: prompt tokens) at
    ``prompt_price_wei_per_unit``, the rest (completion tokens, items, pixels) at
    ``price_wei_per_unit``. The same formula bounds a job before it runs (its most units and
    prompt tokens at the client's max prices) and bills it after (what a result signs)."""
    if not 0 <= prompt_units <= units:
        raise ValueError(f"prompt units {prompt_units} must lie between 0 and units {units}")
    return (units - prompt_units) * price_wei_per_unit + prompt_units * prompt_price_wei_per_unit
