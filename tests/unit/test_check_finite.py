"""protocol.jobs.check_finite: NaN and infinities refused anywhere in a JSON-like value, lists
of numbers checked in one pass, and what is not a float (huge ints, strings, None) let be."""

from __future__ import annotations

from typing import Any

import pytest

from protocol.jobs import check_finite

BAD = [float("nan"), float("inf"), -float("inf")]


@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize(
    "shape",
    [
        lambda b: b,
        lambda b: [[0.5] * 383 + [b]],  # an embedding: the one-pass path
        lambda b: {"a": [1, "x", None, b]},  # a mixed list: item by item
        lambda b: [{"k": [10**400, b]}],  # an int too large for a float, then the bad one
        lambda b: {"nested": {"deeper": [[1.0], [2.0, b]]}},
    ],
)
def test_a_non_finite_number_anywhere_is_refused_and_named(shape: Any, bad: float) -> None:
    with pytest.raises(ValueError, match=rf"output holds {bad}; numbers must be finite"):
        check_finite(shape(bad), "output")


def test_finite_values_of_every_json_kind_pass() -> None:
    check_finite(
        {"a": [1, 2.5, True, None, "s", [3.0, -0.0]], "b": [], "c": [10**400, 1.5], "d": {}},
        "output",
    )
