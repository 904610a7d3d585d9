"""What route handlers depend on: the services, who is calling, and the one ownership check."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from sqlalchemy.exc import InterfaceError, OperationalError
from starlette.concurrency import run_in_threadpool

from compute_swarm.coordinator.service import accounts, sessions
from compute_swarm.coordinator.service.catalogue import Catalogue
from compute_swarm.coordinator.service.inference import InferenceService
from compute_swarm.coordinator.service.leases import Leases
from compute_swarm.coordinator.service.node_accounts import NodeAccounts
from compute_swarm.coordinator.service.payouts import Payouts
from compute_swarm.coordinator.service.reports import Reports
from compute_swarm.coordinator.service.request_limiter import RequestLimiter
from compute_swarm.coordinator.service.submissions import Submissions
from compute_swarm.coordinator.service.swarm_transfer import SwarmTransfer
from compute_swarm.coordinator.service.uploads import Holder, UploadService
from compute_swarm.coordinator.service.verifier import Verifier
from compute_swarm.coordinator.settings import Settings
from compute_swarm.coordinator.store.artifacts import ArtifactStore
from compute_swarm.coordinator.store.database import Database
from compute_swarm.coordinator.store.tables import Buyer, File, Job, Node, Sweep
from compute_swarm.coordinator.transport.hub import Hub
from compute_swarm.coordinator.transport.metrics import Metrics
from compute_swarm.coordinator.transport.replicas import Replicas


@dataclass
class Services:
    settings: Settings
    database: Database
    store: ArtifactStore
    submissions: Submissions
    leases: Leases
    reports: Reports
    node_accounts: NodeAccounts
    verifier: Verifier
    uploads: UploadService
    inference: InferenceService
    limiter: RequestLimiter
    hub: Hub
    metrics: Metrics
    swarm_transfer: SwarmTransfer
    payouts: Payouts
    catalogue: Catalogue
    buyer_keys: accounts.BuyerKeys
    replicas: Replicas


# The database went away (PostgreSQL restarting, a failover, the network): a request that needed it is
# answered 503 with Retry-After, never a 500 or a 400 (the app's handler, and the body gate's check).
# Its transaction rolled back, unless the database went in the middle of its commit.
DATABASE_UNAVAILABLE = (OperationalError, InterfaceError)
DATABASE_RETRY_AFTER_SECONDS = 2


def database_unavailable() -> HTTPException:
    return HTTPException(
        status.HTTP_503_SERVICE_UNAVAILABLE,
        "the database is unavailable for a moment; nothing was done, try again shortly",
        headers={"Retry-After": str(DATABASE_RETRY_AFTER_SECONDS)},
    )


async def get_services(request: Request) -> Services:
    # A coroutine: FastAPI runs a plain function dependency in a thread, a hop for every request.
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


def _refused(error: sessions.SessionRefused) -> HTTPException:
    return HTTPException(status.HTTP_403_FORBIDDEN, str(error))


async def _submitted_csrf_token(request: Request) -> str | None:
    """The CSRF token a browser sent: the page's scripts send a header, its forms a hidden field."""
    header = request.headers.get(sessions.CSRF_HEADER)
    if header:
        return header
    content_type = request.headers.get("content-type", "")
    if content_type.startswith(("application/x-www-form-urlencoded", "multipart/form-data")):
        value = (await request.form()).get(sessions.CSRF_FIELD)
        return value if isinstance(value, str) else None
    return None


def check_browser_request(request: Request, settings: Settings, csrf_expected: str, csrf_given: str | None):
    """A cookie-carrying request that changes something must come from our page, with its token."""
    if request.method not in sessions.UNSAFE_METHODS:
        return
    expected = sessions.expected_origin(
        settings.public_origin, request.url.scheme, request.headers.get("host", "")
    )
    try:
        sessions.check_origin(request.headers.get("origin"), request.headers.get("referer"), expected)
        sessions.check_csrf(csrf_expected, csrf_given)
    except sessions.SessionRefused as error:
        raise _refused(error) from None


def _browser_session(request: Request, services: Services, kind: str) -> sessions.SignedIn | None:
    """The browser session a request's cookie names; None when it carries a bearer token instead."""
    if request.headers.get("authorization") or sessions.COOKIES[kind] not in request.cookies:
        return None
    admin_token = services.settings.admin_token
    with services.database.reading() as session:
        signed_in = sessions.find_session(
            session,
            request.cookies.get(sessions.COOKIES[kind]),
            kind,
            admin_token=admin_token.get_secret_value() if admin_token is not None else None,
        )
    if signed_in is None:
        raise _unauthorized("your session has ended: sign in again")
    return signed_in


async def _check_from_our_page(request: Request, services: Services, signed_in: sessions.SignedIn) -> None:
    csrf_given = await _submitted_csrf_token(request) if request.method in sessions.UNSAFE_METHODS else None
    check_browser_request(request, services.settings, signed_in.session.csrf_token, csrf_given)
    # Pages read it to put the CSRF token into their forms.
    request.state.signed_in = signed_in


# Who is calling, from the request's headers and cookies alone (no body: a browser's CSRF token may
# be in its form, checked by the dependencies below once the caller is known).


def identify_buyer(request: Request, services: Services) -> tuple[Buyer, sessions.SignedIn | None]:
    signed_in = _browser_session(request, services, sessions.BUYER)
    if signed_in is not None and signed_in.buyer is not None:
        return signed_in.buyer, signed_in
    buyer = services.buyer_keys.buyer(_token(request))
    if buyer is None:
        raise _unauthorized("this API key is not valid")
    return buyer, None


def identify_node(request: Request, services: Services) -> Node:
    return _identify(
        request, services, accounts.node_for_token, "this node token is not valid or was revoked"
    )


def identify_holder(request: Request, services: Services) -> tuple[Holder, sessions.SignedIn | None]:
    """A buyer or a node, told apart by their key's prefix."""
    token = bearer_token(request.headers.get("authorization"))
    if token is not None and token.startswith(accounts.NODE_TOKEN_PREFIX):
        return Holder("node", identify_node(request, services).id), None
    buyer, signed_in = identify_buyer(request, services)
    return Holder("buyer", buyer.id), signed_in


def identify_operator(request: Request, services: Services) -> sessions.SignedIn | None:
    """Ops: the admin token as a bearer token, or an ops browser session opened with it."""
    admin_token = services.settings.admin_token
    if admin_token is None:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            "the ops view is closed: start the coordinator with SWARM_ADMIN_TOKEN set",
        )
    signed_in = _browser_session(request, services, sessions.OPS)
    if signed_in is None and not sessions.admin_token_matches(
        admin_token.get_secret_value(), _token(request)
    ):
        raise _unauthorized("this is not the admin token")
    return signed_in


# The dependencies routes declare. The API and the web page both ask here, so both check the same things.


def kept_buyer(request: Request, services: Services) -> Buyer | None:
    """The buyer of the request's API key if this replica looked the key up within the last second
    (BuyerKeys.kept): found on the event loop, with no thread and no database. None: ask identify_buyer."""
    token = bearer_token(request.headers.get("authorization"))
    return services.buyer_keys.kept(token) if token is not None else None


async def current_buyer(request: Request, services: ServicesDep) -> Buyer:
    """The buyer calling: by the API key in the Authorization header, or by their browser session."""
    buyer = kept_buyer(request, services)
    if buyer is not None:
        return buyer
    buyer, signed_in = await run_in_threadpool(identify_buyer, request, services)
    if signed_in is not None:
        await _check_from_our_page(request, services, signed_in)
    return buyer


def current_node(request: Request, services: ServicesDep) -> Node:
    return identify_node(request, services)


async def current_holder(request: Request, services: ServicesDep) -> Holder:
    holder, signed_in = await run_in_threadpool(identify_holder, request, services)
    if signed_in is not None:
        await _check_from_our_page(request, services, signed_in)
    return holder


async def current_operator(request: Request, services: ServicesDep) -> None:
    signed_in = await run_in_threadpool(identify_operator, request, services)
    if signed_in is not None:
        await _check_from_our_page(request, services, signed_in)


# What each dependency above checks before it needs the body. FastAPI reads a route's body before it
# solves the route's dependencies, so coordinator/limits.py runs these first: a caller without valid
# credentials is answered before a byte of the body is read, whatever its size.
# Each check is a coroutine: the database's checks run in a thread.


def _in_a_thread(check: Callable[[Request, Services], object]) -> Callable[[Request, Services], Awaitable]:
    async def checked(request: Request, services: Services) -> None:
        await run_in_threadpool(check, request, services)

    return checked


async def _check_buyer(request: Request, services: Services) -> None:
    if kept_buyer(request, services) is None:
        await run_in_threadpool(identify_buyer, request, services)


CHECKS_BEFORE_BODY: dict[Callable[..., object], Callable[[Request, Services], Awaitable]] = {
    current_buyer: _check_buyer,
    current_node: _in_a_thread(identify_node),
    current_holder: _in_a_thread(identify_holder),
    current_operator: _in_a_thread(identify_operator),
}

CurrentBuyer = Annotated[Buyer, Depends(current_buyer)]
CurrentNode = Annotated[Node, Depends(current_node)]
CurrentHolder = Annotated[Holder, Depends(current_holder)]
Operator = Depends(current_operator)


def owned(services: Services, table: type[Job] | type[File] | type[Sweep], resource_id: str, buyer: Buyer):
    # The single ownership check: another buyer's resource does not exist, as far as they can tell.
    with services.database.reading() as session:
        resource = session.get(table, resource_id)
    if resource is None or resource.buyer_id != buyer.id:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no {table.__tablename__[:-1]} {resource_id!r}")
    return resource


def owned_job(job_id: str, buyer: CurrentBuyer, services: ServicesDep) -> Job:
    return owned(services, Job, job_id, buyer)


def owned_file(file_id: str, buyer: CurrentBuyer, services: ServicesDep) -> File:
    return owned(services, File, file_id, buyer)


OwnedJob = Annotated[Job, Depends(owned_job)]
OwnedFile = Annotated[File, Depends(owned_file)]
