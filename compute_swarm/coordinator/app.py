"""The coordinator's web application: wiring of services and routers, and how to serve it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from compute_swarm import protocol
from compute_swarm.coordinator.service.accounts import BuyerKeys
from compute_swarm.coordinator.service.admission import RegistrationLimiter
from compute_swarm.coordinator.service.catalogue import Catalogue
from compute_swarm.coordinator.service.inference import InferenceService
from compute_swarm.coordinator.service.leases import Leases
from compute_swarm.coordinator.service.node_accounts import NodeAccounts
from compute_swarm.coordinator.service.payouts import payouts_service
from compute_swarm.coordinator.service.reports import Reports
from compute_swarm.coordinator.service.request_limiter import RequestLimiter
from compute_swarm.coordinator.service.submissions import Submissions
from compute_swarm.coordinator.service.swarm_transfer import SwarmTransfer, transfer_key
from compute_swarm.coordinator.service.tokens import TokenCounters
from compute_swarm.coordinator.service.uploads import UploadService
from compute_swarm.coordinator.service.verifier import Verifier
from compute_swarm.coordinator.settings import Settings
from compute_swarm.coordinator.store.artifacts import ArtifactStore
from compute_swarm.coordinator.store.database import Database, UnstorableText
from compute_swarm.coordinator.transport import web
from compute_swarm.coordinator.transport.api import (
    account,
    files,
    jobs,
    keys,
    market,
    nodes,
    openai,
    openai_errors,
    openai_fine_tuning,
    ops,
    payouts,
    service,
    swarm,
    sweeps,
)
from compute_swarm.coordinator.transport.api.deps import Services, database_unavailable
from compute_swarm.coordinator.transport.collector import keep_collections_short
from compute_swarm.coordinator.transport.hub import Hub
from compute_swarm.coordinator.transport.limits import RequestLimits
from compute_swarm.coordinator.transport.metrics import Metrics, ServedBytes
from compute_swarm.coordinator.transport.replicas import Replicas
from compute_swarm.engine.jobs import CATALOGUE

logger = logging.getLogger("compute_swarm.coordinator")


def build_services(settings: Settings) -> Services:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    database = Database(settings.resolved_database_url)
    database.upgrade()
    store = ArtifactStore.configured(
        settings.artifacts_dir, settings.artifact_bucket, settings.artifact_bucket_endpoint
    )
    catalogue = Catalogue(database, store)
    tokens = TokenCounters(catalogue.gguf_path)
    verifier = Verifier(settings, store, tokens=tokens)
    leases = Leases(database, settings, verifier, catalogue)
    reports = Reports(
        database,
        settings,
        store,
        verifier,
        model_file=catalogue.gguf_path,
        tokens=tokens,
        catalogue=catalogue,
    )
    node_accounts = NodeAccounts(database, verifier)
    metrics = Metrics()
    metrics.count_jobs_with(leases.counts)
    replicas = Replicas(database, settings.replica_name)
    inference = InferenceService(database, settings, tokens, catalogue, replica=replicas.instance)
    hub = Hub(leases, reports, node_accounts, settings, metrics, inference, replicas)
    # What committed transactions decided (a job to dispatch, a node to stop) reaches the hub.
    database.on_commit = hub.carry_out
    return Services(
        settings=settings,
        database=database,
        store=store,
        submissions=Submissions(database, settings, catalogue, leases=leases, placement=hub.dispatcher),
        leases=leases,
        reports=reports,
        node_accounts=node_accounts,
        verifier=verifier,
        uploads=UploadService(database, store, settings),
        inference=inference,
        limiter=RequestLimiter(
            settings.inference_requests_per_minute, settings.inference_concurrent_requests
        ),
        hub=hub,
        metrics=metrics,
        swarm_transfer=SwarmTransfer(
            store,
            transfer_key(settings.transfer_secret_value, database),
            peer_address=hub.peer_address,
            # Only the built-in model is public (its package is on PyPI); ops' models stay in the swarm.
            public=lambda sha256: (
                settings.transfer_dht_and_pex and catalogue.model_of_file(sha256) in CATALOGUE
            ),
        ),
        payouts=payouts_service(settings, database),
        buyer_keys=BuyerKeys(database),
        catalogue=catalogue,
        replicas=replicas,
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services = build_services(settings)
        app.state.services = services
        stop_watching = services.metrics.watch_garbage_collector()
        await services.hub.start()
        collector = asyncio.create_task(
            keep_collections_short(settings.collector_freeze_seconds, settings.collector_full_seconds)
        )
        try:
            yield
        finally:
            collector.cancel()
            await services.hub.stop()
            services.database.close()
            stop_watching()

    app = FastAPI(title="compute-swarm coordinator", version="0.1.0", lifespan=lifespan)
    app.state.registrations = RegistrationLimiter(settings.registrations_per_hour_per_address)
    for module in (
        files,
        jobs,
        sweeps,
        account,
        keys,
        market,
        nodes,
        swarm,
        ops,
        payouts,
        service,
        openai,
        openai_fine_tuning,
    ):
        app.include_router(module.router)
    openai_errors.install(app)

    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    async def database_is_unavailable(request: Request, error: DBAPIError) -> JSONResponse:
        logger.warning("%s %s: the database is unavailable: %s", request.method, request.url.path, error.orig)
        refusal = database_unavailable()
        body = (
            openai_errors.error_body(refusal.status_code, refusal.detail)
            if request.url.path.startswith(openai_errors.OPENAI_PREFIX)
            else {"detail": refusal.detail}
        )
        return JSONResponse(body, status_code=refusal.status_code, headers=refusal.headers)

    @app.exception_handler(UnstorableText)
    async def unstorable_text(request: Request, error: UnstorableText) -> JSONResponse:
        if request.url.path.startswith(openai_errors.OPENAI_PREFIX):
            return JSONResponse(openai_errors.error_body(400, str(error)), status_code=400)
        return JSONResponse({"detail": str(error)}, status_code=400)

    web.install(app)
    app.add_middleware(RequestLimits)
    app.add_middleware(ServedBytes)
    return app


def serve(settings: Settings) -> None:
    import uvicorn

    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        ws_max_size=protocol.MAX_FRAME_BYTES,
        ws_ping_interval=protocol.PING_INTERVAL_SECONDS,
        ws_ping_timeout=protocol.PING_TIMEOUT_SECONDS,
        # Messages are small JSON; compression would cost about 40 KiB of memory per connected node.
        ws_per_message_deflate=False,
        log_level="warning",
        timeout_graceful_shutdown=5,
    )
