"""Client account routes: link an on-chain payer, see what it can still pay."""

from __future__ import annotations

from fastapi import APIRouter

from orchestrator.api.deps import ClientDep, ServicesDep
from orchestrator.api.openapi import problems
from orchestrator.api.strict_json import StrictJSONRoute
from protocol import ChallengeResponse
from protocol.workers import AccountView, PayerChallengeRequest, PayerLinkRequest

router = APIRouter(prefix="/v1/account", tags=["account"], route_class=StrictJSONRoute)


@router.get("", responses=problems(401, 503))
def get_account(client: ClientDep, services: ServicesDep) -> AccountView:
    """Your payer and, with payments on, what it can still be charged (wei)."""
    return services.accounts.account(client)


@router.post("/payer/challenge", responses=problems(400, 401, 413, 422))
def payer_challenge(
    req: PayerChallengeRequest, client: ClientDep, services: ServicesDep
) -> ChallengeResponse:
    """Step 1 of linking a payer: a one-time message for the payer account to sign."""
    return services.accounts.payer_challenge(client, req.address, services.now())


@router.post("/payer", responses=problems(400, 401, 409, 413, 422, 503))
def link_payer(req: PayerLinkRequest, client: ClientDep, services: ServicesDep) -> AccountView:
    """Step 2: the signed challenge; jobs are then charged to this payer's deposit."""
    return services.accounts.link_payer(
        client, req.address, req.nonce, req.signature, services.now()
    )
