"""Typed dependencies shared by the routes."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from orchestrator.exceptions import Unauthorized
from orchestrator.services.auth import Principal
from orchestrator.wiring import Services

_bearer = HTTPBearer(auto_error=False, description="API key, worker session or operator token")
BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


async def get_services(request: Request) -> Services:
    # async: no I/O here, and FastAPI would run a plain function in the thread pool (a thread
    # hop on every request).
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


def _token(credentials: HTTPAuthorizationCredentials | None) -> str:
    if credentials is None or not credentials.credentials:
        raise Unauthorized("missing credentials: send 'Authorization: Bearer <token>'")
    return credentials.credentials


async def require_client(credentials: BearerDep, services: ServicesDep) -> Principal:
    # async, answered from the token cache when it can: no thread hop, no database read.
    token = _token(credentials)
    known = services.auth.cached(token)
    if known is not None and known.kind == "client":
        return known
    return await run_in_threadpool(services.auth.client, token)


async def require_worker(credentials: BearerDep, services: ServicesDep) -> Principal:
    token = _token(credentials)
    known = services.auth.cached(token)
    if known is not None and known.kind == "worker":
        return known
    return await run_in_threadpool(services.auth.worker, token)


def require_operator(credentials: BearerDep, services: ServicesDep) -> Principal:
    return services.auth.operator(_token(credentials))


def require_client_or_worker(credentials: BearerDep, services: ServicesDep) -> Principal:
    return services.auth.any(_token(credentials))


def _source(request: Request) -> str:
    return request.client.host if request.client else "unknown"


async def limit_challenge(request: Request, services: ServicesDep) -> None:
    """Spend one of the source address's challenge requests (429 when none)."""
    services.challenge_limit.take(_source(request), services.now())


async def limit_registration(request: Request, services: ServicesDep) -> None:
    """Spend one of the source address's registration requests (429 when none)."""
    services.registration_limit.take(_source(request), services.now())


ChallengeLimitDep = Depends(limit_challenge)
RegistrationLimitDep = Depends(limit_registration)
ClientDep = Annotated[Principal, Depends(require_client)]
WorkerDep = Annotated[Principal, Depends(require_worker)]
OperatorDep = Annotated[Principal, Depends(require_operator)]
AnyPrincipalDep = Annotated[Principal, Depends(require_client_or_worker)]
