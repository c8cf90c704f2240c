"""Operator routes (bearer: the operator token)."""

from __future__ import annotations

from fastapi import APIRouter

from contracts.deploy import Deployment
from orchestrator.api.deps import OperatorDep, ServicesDep
from orchestrator.api.openapi import problems
from orchestrator.api.strict_json import StrictJSONRoute
from orchestrator.exceptions import NotFound
from protocol import WorkerView
from protocol.workers import ClientCreate, ClientCreated, MarketStats, SettlementReport

router = APIRouter(tags=["operator"], route_class=StrictJSONRoute)


@router.get("/v1/workers", responses=problems(401, 422))
def list_workers(
    _: OperatorDep, services: ServicesDep, include_deregistered: bool = False
) -> list[WorkerView]:
    return services.workers.list(services.now(), include_gone=include_deregistered)


@router.get("/v1/stats", responses=problems(401))
def stats(_: OperatorDep, services: ServicesDep) -> MarketStats:
    return services.workers.stats(services.now())


@router.post("/v1/clients", status_code=201, responses=problems(400, 401, 413, 422))
def create_client(req: ClientCreate, _: OperatorDep, services: ServicesDep) -> ClientCreated:
    """Make a client account; the API key is shown only in this response."""
    client_id, key = services.auth.create_client(req.name, services.now())
    return ClientCreated(client_id=client_id, api_key=key)


@router.get("/v1/settlement", responses=problems(401, 503))
def settlement(_: OperatorDep, services: ServicesDep) -> SettlementReport:
    """Ledger, vouchers and on-chain redemptions per (payer, worker), and whether they agree."""
    return services.accounts.settlement()


@router.get("/v1/chain", responses=problems(404))
def chain_info(services: ServicesDep) -> Deployment:
    """Where the contracts are (the deployment file), for workers and payers."""
    deployment = services.payments.deployment
    if deployment is None:
        raise NotFound("this orchestrator runs without on-chain payments")
    return deployment
