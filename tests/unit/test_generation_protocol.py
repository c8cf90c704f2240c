"""Generation wire types and the teacher-forcing comparator: pure functions, no model."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from orchestrator.services.comparators import compare_generations
from protocol import JobSpec
from protocol.generation import MAX_GENERATION_TOKENS, GenerationInput


def test_the_charge_is_bounded_before_the_job_runs() -> None:
    chat = GenerationInput(messages=[{"role": "user", "content": "héllo"}], max_tokens=10)
    # 6 UTF-8 bytes, 8 per message, 64 for the template, 10 to generate.
    assert chat.units_bound() == 6 + 8 + 64 + 10
    spec = JobSpec.model_validate(
        {
            "type": "generate",
            "model": "m",
            "generation": {"prompt": "abc", "max_tokens": 5},
            "max_price_wei_per_unit": "3",
        }
    )
    assert spec.max_units == 3 + 64 + 5
    with pytest.raises(ValidationError, match="below this job's token bound"):
        JobSpec.model_validate({**spec.model_dump(mode="json"), "max_units": 10})


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({}, "exactly one of messages"),
        ({"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, "exactly one"),
        ({"messages": []}, "at least 1"),
        ({"messages": [{"role": "user", "content": "  "}]}, "all empty"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "system"),
        ({"prompt": "x", "max_tokens": 0}, "greater than or equal to 1"),
        ({"prompt": "x", "max_tokens": MAX_GENERATION_TOKENS + 1}, "less than or equal"),
        ({"prompt": "x", "stop": [""]}, "stop strings must not be empty"),
        ({"prompt": "x", "temperature": -1}, "greater than or equal to 0"),
    ],
)
def test_bad_generation_input_is_refused_with_a_reason(body: dict, says: str) -> None:
    with pytest.raises(ValidationError, match=says):
        GenerationInput.model_validate(body)


CLAIM = {
    "text": "Paris.",
    "token_ids": [1, 2],
    "finish_reason": "stop",
    "usage": {"prompt_tokens": 30, "completion_tokens": 2},
}
CONFIRMED = {
    "check": {
        "prompt_tokens": 30,
        "checked": 2,
        "mismatches": 0,
        "first_mismatch": None,
        "text": "Paris.",
        "finish_reason": "stop",
    },
    "usage": {"prompt_tokens": 30, "completion_tokens": 2},
}


def _check(**changes: object) -> dict:
    return {**CONFIRMED, "check": {**CONFIRMED["check"], **changes}}


def test_a_claim_agrees_only_with_a_check_that_confirms_all_of_it() -> None:
    assert compare_generations(CLAIM, CONFIRMED).agrees
    assert compare_generations(CONFIRMED, CLAIM).agrees  # either order
    wrong_token = compare_generations(CLAIM, _check(mismatches=1, first_mismatch=1))
    assert not wrong_token.agrees and "not what the model would produce" in wrong_token.detail
    assert wrong_token.value == 0.5
    assert not compare_generations(CLAIM, _check(text="Lyon.")).agrees  # made-up text
    truncated = compare_generations(CLAIM, _check(finish_reason="truncated"))
    assert not truncated.agrees and "truncated" in truncated.detail
    assert not compare_generations(CLAIM, _check(prompt_tokens=29)).agrees  # prompt overbilled
    assert compare_generations(CONFIRMED, _check()).agrees  # two checks that agree
    assert not compare_generations(CONFIRMED, _check(mismatches=2)).agrees
    assert not compare_generations(CLAIM, CLAIM).agrees  # claims are checked, not compared
