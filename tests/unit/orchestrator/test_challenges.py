"""Challenges are spent once and only for what they were issued for."""

from __future__ import annotations

import pytest
from eth_account import Account

from orchestrator.exceptions import Unauthorized
from orchestrator.wiring import Services
from tests.support import new_client, register_request


def test_a_payer_link_challenge_cannot_register_a_worker(services: Services) -> None:
    client, _ = new_client(services)
    account = Account.create()
    challenge = services.accounts.payer_challenge(client, account.address, services.now())
    req = register_request(account, challenge.nonce, challenge.message)
    with pytest.raises(Unauthorized, match="/v1/workers/challenge"):
        services.workers.register(req, services.now())


def test_a_registration_challenge_cannot_link_a_payer(services: Services) -> None:
    from protocol.signing import sign_registration

    client, _ = new_client(services)
    account = Account.create()
    challenge = services.workers.challenge(account.address, services.now())
    signature = sign_registration(account.key, challenge.message)
    with pytest.raises(Unauthorized, match="/v1/account/payer/challenge"):
        services.accounts.link_payer(
            client, account.address, challenge.nonce, signature, services.now()
        )
    # ...and is still good for what it was issued for.
    req = register_request(account, challenge.nonce, challenge.message)
    assert services.workers.register(req, services.now()).worker_id
