"""One process's services, built from its Settings (the object the routes reach through deps)."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.orm import Session

from orchestrator.blobs import LocalBlobStore
from orchestrator.config import Settings
from orchestrator.services.accounts import AccountService
from orchestrator.services.auth import Authenticator
from orchestrator.services.blame import Blame
from orchestrator.services.blobs import BlobService
from orchestrator.services.catalog import Catalog
from orchestrator.services.dashboard import DashboardService
from orchestrator.services.inputs import InputChecks
from orchestrator.services.jobs import JobService
from orchestrator.services.leases import LeaseService
from orchestrator.services.lifecycle import CHANGED_JOBS
from orchestrator.services.ratelimit import RateLimiter
from orchestrator.services.replicas import (
    JOB_KEY,
    WORKER_KEY,
    DutyLock,
    PgWakeBus,
    ReplicaRegistry,
    shared_config,
)
from orchestrator.services.settlement import ChainPayments, NoPayments, Payments
from orchestrator.services.streams import TokenStreams
from orchestrator.services.verification import VerificationService
from orchestrator.services.wakeups import WakeHub
from orchestrator.services.workers import WorkerService
from orchestrator.store import Store

Clock = Callable[[], float]


@dataclass
class Services:
    settings: Settings
    store: Store
    auth: Authenticator
    jobs: JobService
    workers: WorkerService
    leases: LeaseService
    blobs: BlobService
    hub: WakeHub
    streams: TokenStreams
    catalog: Catalog
    clock: Clock
    payments: Payments
    accounts: AccountService
    verification: VerificationService
    dashboard: DashboardService
    duties: DutyLock
    replicas: ReplicaRegistry
    # Challenges and registrations per source address (see services/ratelimit.py).
    # Per source address, one bucket for challenges and one for registrations: a registration
    # never competes with other workers' challenges for the token its own challenge left it
    # (one shared bucket livelocked workers behind one address, each retry's challenge taking
    # the token another's registration needed).
    challenge_limit: RateLimiter
    registration_limit: RateLimiter
    # Wake-ups to and from other replicas (PostgreSQL only); started by the app's lifespan.
    bus: PgWakeBus | None = None

    def now(self) -> float:
        return self.clock()


def build_services(
    settings: Settings,
    *,
    store: Store | None = None,
    clock: Clock = time.time,
    rng: random.Random | None = None,
    payments: Payments | None = None,
) -> Services:
    store = store or Store(settings.database_url)
    hub = WakeHub()
    bus = PgWakeBus(store, hub) if store.is_postgres else None
    payments = payments or build_payments(settings, store, clock)

    def wake_job_watchers(session: Session) -> None:
        changed = session.info.get(CHANGED_JOBS)
        if not changed:
            return
        hub.notify_jobs(changed)  # a stream's reader ends with its job too
        if bus is not None:
            for job_id in changed:
                bus.publish(f"{JOB_KEY}{job_id}")

    def wake_worker(worker_id: str) -> None:
        hub.notify(worker_id)
        if bus is not None:
            bus.publish(f"{WORKER_KEY}{worker_id}")

    store.on_commit(wake_job_watchers)
    blob_store = LocalBlobStore(settings.blob_path)
    verification = VerificationService(
        store,
        settings,
        payments,
        blob_store.path,
        rng=random.Random(rng.random()) if rng is not None else None,
    )
    inputs = InputChecks(store, blob_store.path)
    blame = Blame(store, settings, inputs)
    auth = Authenticator(store, settings.resolve_admin_token())
    # A stream chunk taken here is read live on every replica (PostgreSQL).
    streams = TokenStreams(store, hub, relay=bus.publish_chunk if bus is not None else None)
    if bus is not None:
        bus.on_stream_chunk = streams.take_relayed
    workers = WorkerService(store, settings, payments, forget_session=auth.forget_worker)
    return Services(
        settings=settings,
        store=store,
        auth=auth,
        jobs=JobService(store, payments, settings, inputs),
        workers=workers,
        leases=LeaseService(
            store,
            settings,
            payments,
            verification,
            blame,
            blob_path=blob_store.path,
            rng=rng,
            notify=wake_worker,
        ),
        blobs=BlobService(store, blob_store, settings.max_blob_bytes),
        verification=verification,
        hub=hub,
        streams=streams,
        catalog=Catalog(store, settings),
        clock=clock,
        payments=payments,
        accounts=AccountService(store, settings, payments),
        dashboard=DashboardService(store, payments, workers),
        duties=DutyLock(store),
        replicas=ReplicaRegistry(store, _shared_config(settings, payments, blob_store)),
        bus=bus,
        challenge_limit=RateLimiter(
            settings.registration_rate_per_min / 60.0,
            settings.registration_burst,
            what="worker challenges",
        ),
        registration_limit=RateLimiter(
            settings.registration_rate_per_min / 60.0,
            settings.registration_burst,
            what="worker registrations",
        ),
    )


def _shared_config(
    settings: Settings, payments: Payments, blob_store: LocalBlobStore
) -> dict[str, str | None]:
    signer = deployment = None
    if isinstance(payments, ChainPayments):
        signer = payments.signer_address
        d = payments.deployment
        deployment = f"{d.chain_id}:{d.payment_broker}:{d.worker_registry}"
    return shared_config(settings.resolve_admin_token(), signer, deployment, blob_store.identity())


def build_payments(settings: Settings, store: Store, clock: Clock) -> Payments:
    """On-chain settlement when a deployment file is configured, else none."""
    if settings.deployment_file is None:
        return NoPayments()
    from eth_account import Account
    from pydantic import ValidationError

    from contracts.anvil import DEV_CHAIN_ID, DEV_PRIVATE_KEYS
    from contracts.chain import Chain, ChainError
    from contracts.deploy import check_deployment, read_deployment

    path = settings.deployment_file
    try:
        deployment = read_deployment(path)
    except ValidationError as exc:
        missing = ", ".join(str(e["loc"][0]) for e in exc.errors() if e["loc"])
        raise ValueError(
            f"GPUMARKET_DEPLOYMENT_FILE {path} is not a deployment file (bad or missing: "
            f"{missing}); `gpumarket chain up` writes one"
        ) from exc
    try:
        chain = Chain.connect(deployment.rpc_url)
    except ChainError as exc:
        raise ValueError(
            f"the chain at {deployment.rpc_url} (from {path}) does not answer; start it "
            "(`gpumarket chain up`) or fix the file"
        ) from exc
    if settings.signer_key is not None:
        key = settings.signer_key.get_secret_value()
    elif settings.env == "dev" and chain.chain_id == DEV_CHAIN_ID:
        key = DEV_PRIVATE_KEYS[0]  # anvil's well-known deployer key: the dev chain only
    else:
        raise ValueError("GPUMARKET_SIGNER_KEY is required to sign vouchers on this chain")
    try:
        check_deployment(chain, deployment)
    except ChainError as exc:
        raise ValueError(f"{path} does not match the chain: {exc}") from exc
    return ChainPayments(
        store,
        chain,
        deployment,
        Account.from_key(key),
        voucher_ttl_s=settings.voucher_ttl_s,
        clock=clock,
        verification_payer=settings.verification_payer,
        redemption_confirmations=settings.redemption_confirmations,
    )
