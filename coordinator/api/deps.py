"""What route handlers depend on: the services, who is calling, and the one ownership check."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status

from coordinator import accounts
from coordinator.artifacts import ArtifactStore
from coordinator.database import Database
from coordinator.hub import Hub
from coordinator.inference import InferenceService, RequestLimiter
from coordinator.jobs import JobService
from coordinator.metrics import Metrics
from coordinator.settings import Settings
from coordinator.tables import Buyer, File, Job, Node
from coordinator.uploads import Holder, UploadService


@dataclass
class Services:
    settings: Settings
    database: Database
    store: ArtifactStore
    jobs: JobService
    uploads: UploadService
    inference: InferenceService
    limiter: RequestLimiter
    hub: Hub
    metrics: Metrics


def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, message, headers={"WWW-Authenticate": "Bearer"})


def _token(request: Request) -> str:
    token = bearer_token(request.headers.get("authorization"))
    if token is None:
        raise _unauthorized("send your key as 'Authorization: Bearer <key>'")
    return token


def _identify(request: Request, services: Services, lookup, refusal: str):
    token = _token(request)
    with services.database.reading() as session:
        who = lookup(session, token)
    if who is None:
        raise _unauthorized(refusal)
    return who


def current_buyer(request: Request, services: ServicesDep) -> Buyer:
    return _identify(request, services, accounts.buyer_for_key, "this API key is not valid")


def current_node(request: Request, services: ServicesDep) -> Node:
    return _identify(
        request, services, accounts.node_for_token, "this node token is not valid or was revoked"
    )


def current_holder(request: Request, services: ServicesDep) -> Holder:
    """A buyer or a node, told apart by their key's prefix."""
    token = _token(request)
    if token.startswith(accounts.NODE_TOKEN_PREFIX):
        return Holder("node", current_node(request, services).id)
    return Holder("buyer", current_buyer(request, services).id)


CurrentBuyer = Annotated[Buyer, Depends(current_buyer)]
CurrentNode = Annotated[Node, Depends(current_node)]
CurrentHolder = Annotated[Holder, Depends(current_holder)]


def _owned(services: Services, table: type[Job] | type[File], resource_id: str, buyer: Buyer):
    # The single ownership check: another buyer's resource does not exist, as far as they can tell.
    with services.database.reading() as session:
        resource = session.get(table, resource_id)
    if resource is None or resource.buyer_id != buyer.id:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no {table.__tablename__[:-1]} {resource_id!r}")
    return resource


def owned_job(job_id: str, buyer: CurrentBuyer, services: ServicesDep) -> Job:
    return _owned(services, Job, job_id, buyer)


def owned_file(file_id: str, buyer: CurrentBuyer, services: ServicesDep) -> File:
    return _owned(services, File, file_id, buyer)


OwnedJob = Annotated[Job, Depends(owned_job)]
OwnedFile = Annotated[File, Depends(owned_file)]
