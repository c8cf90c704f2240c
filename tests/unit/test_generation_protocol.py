"""Generation wire types and the teacher-forcing comparator: pure functions, no model."""

from __future__ import annotations

import pytest
from eth_account import Account
from pydantic import ValidationError

from orchestrator.services.comparators import compare_generations
from orchestrator.services.matching import within_price
from protocol import JobSpec, Offer
from protocol.generation import MAX_GENERATION_TOKENS, GenerationInput
from protocol.signing import (
    recover_job_result_signer,
    recover_result_signer,
    result_hash,
    sign_result,
    sign_result_batch,
)
from protocol.units import cost_wei


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


# -- prompt and completion prices -------------------------------------------------------------


def test_cost_is_prompt_tokens_at_their_price_plus_the_rest_at_the_price() -> None:
    assert cost_wei(7, 7, 3, 3) == 3 * 3 + 4 * 7
    assert cost_wei(7, 7) == 49  # no prompt units: every unit at the one price
    big = 10**40  # wei past 2**64 stay exact ints
    assert cost_wei(2**40, big, 2**39, big + 1) == 2**39 * big + 2**39 * (big + 1)
    with pytest.raises(ValueError, match="between 0 and units"):
        cost_wei(3, 1, 4, 1)


def test_the_bound_takes_the_prompt_cap_for_prompt_tokens_and_the_max_price_for_the_rest() -> None:
    body = {
        "type": "generate",
        "model": "m",
        "generation": {"prompt": "abc", "max_tokens": 5},
        "max_price_wei_per_unit": "7",
    }
    one_cap = JobSpec.model_validate(body)
    assert one_cap.cost_bound_wei() == (3 + 64 + 5) * 7
    two_caps = JobSpec.model_validate({**body, "max_prompt_price_wei_per_unit": "2"})
    assert two_caps.prompt_price_cap == 2
    assert two_caps.cost_bound_wei() == (3 + 64) * 2 + 5 * 7
    with pytest.raises(ValidationError, match="generate jobs only"):
        JobSpec.model_validate(
            {
                "type": "inference",
                "model": "m",
                "input": {"texts": ["x"]},
                "max_price_wei_per_unit": "1",
                "max_prompt_price_wei_per_unit": "1",
            }
        )


def test_a_generate_offer_may_price_prompt_tokens_apart_and_only_it_may() -> None:
    offer = Offer(job_type="generate", model="m", price_wei_per_unit=7)
    assert offer.prompt_price == 7
    priced = offer.model_copy(update={"prompt_price_wei_per_unit": 3})
    assert priced.prompt_price == 3
    assert within_price(priced, 7) is None
    assert within_price(priced, 7, 2) == "asks 3 wei/prompt token, above the job's 2"
    assert within_price(priced, 6) == "asks 7 wei/token, above the job's 6"
    with pytest.raises(ValidationError, match="generate offers only"):
        Offer(job_type="inference", model="m", price_wei_per_unit=1, prompt_price_wei_per_unit=1)


def test_the_signed_result_commits_to_both_counts_and_both_prices() -> None:
    account = Account.create()
    digest = "ab" * 32
    terms = {"prompt_units": 3, "prompt_price_wei_per_unit": 3}
    signature = sign_result(account.key, "job", 1, digest, 7, 7, **terms)
    assert recover_result_signer("job", 1, digest, 7, 7, signature, **terms) == account.address
    for changed in ({"prompt_units": 4}, {"prompt_price_wei_per_unit": 7}):
        other = recover_result_signer("job", 1, digest, 7, 7, signature, **{**terms, **changed})
        assert other != account.address
    # In a batch: the struct hash carries both too, and proves one job's part alone.
    hashes = [result_hash(j, 1, digest, 7, 7, **terms) for j in ("a", "job")]
    assert hashes[1] != result_hash("job", 1, digest, 7, 7)
    batch = sign_result_batch(account.key, hashes)
    proof = {"index": 1, "batch_count": 2, "batch_path": [hashes[0]]}
    proven = recover_job_result_signer("job", 1, digest, 7, 7, batch, **terms, **proof)
    assert proven == account.address
    other = recover_job_result_signer("job", 1, digest, 7, 7, batch, prompt_units=2, **proof)
    assert other != account.address
