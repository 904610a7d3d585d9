"""Nodes: registration, their earnings (now and hour by hour), their payouts, the artifacts of the jobs
they hold, and the `/node` websocket."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, Response, WebSocket, WebSocketDisconnect, status
from fastapi.responses import FileResponse

from compute_swarm import protocol
from compute_swarm.coordinator.service import accounts, admission, receipts
from compute_swarm.coordinator.service.payouts import PayoutError
from compute_swarm.coordinator.store.database import UnstorableText
from compute_swarm.coordinator.store.tables import Job, Node
from compute_swarm.coordinator.transport.api import swarm
from compute_swarm.coordinator.transport.api.deps import CurrentNode, Services, ServicesDep, bearer_token
from compute_swarm.coordinator.transport.api.schemas import (
    EarningsHistoryOut,
    EarningsHourOut,
    EarningsOut,
    NodeOut,
    NodePayoutsOut,
    NodeRegistrationIn,
    NodeRegistrationOut,
    PayoutOut,
    PayoutReceiptOut,
    PayoutRequestIn,
    file_download,
)
from compute_swarm.coordinator.transport.hub import Connection
from compute_swarm.coordinator.transport.node_session import NodeSession
from compute_swarm.protocol import CloseCode, ProtocolViolation

logger = logging.getLogger("compute_swarm.coordinator.nodes")
HELLO_TIMEOUT_SECONDS = 15.0
# Enough for a month's chart with room to compare; the answer stays small (at most 1,440 hours).
EARNINGS_HISTORY_MAX_DAYS = 60

router = APIRouter(tags=["nodes"])


@router.post("/api/nodes/register", status_code=status.HTTP_201_CREATED)
def register(body: NodeRegistrationIn, request: Request, services: ServicesDep) -> NodeRegistrationOut:
    """A new node's id and token. Open, by invite code, or awaiting ops' approval, as ops chose
    (Settings.node_admission); rate-limited per address."""
    try:
        request.app.state.registrations.admit(request.client.host if request.client else "unknown")
        with services.database.transaction() as session:
            node, token = admission.register(
                session, body.name, services.settings.node_admission, body.invite_code
            )
            approved = node.approved_at is not None
    except admission.AdmissionRefused as error:
        raise HTTPException(error.status_code, str(error)) from None
    except accounts.AccountError as error:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(error)) from None
    return NodeRegistrationOut(node_id=node.id, token=token, approved=approved)


@router.get("/api/nodes/me")
def me(node: CurrentNode, services: ServicesDep) -> NodeOut:
    earnings = services.node_accounts.earnings(node.id)
    return NodeOut(
        node_id=node.id, name=node.name, earnings=EarningsOut(**earnings.model_dump(exclude={"type"}))
    )


@router.get("/api/nodes/me/payouts")
def payouts(node: CurrentNode, services: ServicesDep) -> NodePayoutsOut:
    """This node's payouts, newest first, with what may be paid out and the least a payout may be."""
    earnings = services.node_accounts.earnings(node.id)
    value = services.settings.credit_value_for_nodes
    return NodePayoutsOut(
        earnings=EarningsOut(**earnings.model_dump(exclude={"type"})),
        minimum_micro=services.payouts.minimum_micro,
        currency=value.currency,
        value_micro_per_credit=value.micro_per_credit,
        payouts=[PayoutOut(**payout) for payout in services.payouts.of_node(node.id)],
    )


@router.post("/api/nodes/me/payouts", status_code=status.HTTP_201_CREATED)
def request_payout(
    body: PayoutRequestIn, node: CurrentNode, services: ServicesDep, response: Response
) -> PayoutOut:
    """Ask to be paid this node's available credit (or `amount_micro` of it) at `payee`. 201 with the
    new payout; 200 with the same one when its request key was sent before."""
    try:
        payout, new = services.payouts.request(node.id, body.request_key, body.payee, body.amount_micro)
    except PayoutError as error:
        raise HTTPException(error.status_code, str(error)) from None
    if not new:
        response.status_code = status.HTTP_200_OK
    return PayoutOut(**payout)


@router.get("/api/nodes/me/payouts/{payout_id}")
def payout_receipt(payout_id: str, node: CurrentNode, services: ServicesDep) -> PayoutReceiptOut:
    """One of this node's payouts with every ledger entry it moved."""
    try:
        return PayoutReceiptOut(**services.payouts.receipt(payout_id, node.id))
    except PayoutError as error:
        raise HTTPException(error.status_code, str(error)) from None


@router.get("/api/nodes/me/jobs/{job_id}/receipt")
def job_receipt(job_id: str, node: CurrentNode, services: ServicesDep) -> dict:
    """The receipt of a job this node ran (or re-ran to verify): the same one its buyer reads."""
    with services.database.reading() as session:
        job = session.get(Job, job_id)
        if job is None or not receipts.ran_on(session, job_id, node.id):
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no job {job_id!r} that this node ran")
        return receipts.receipt(session, job)


@router.get("/api/nodes/me/earnings")
def earnings_history(
    node: CurrentNode,
    services: ServicesDep,
    days: Annotated[
        int, Query(ge=1, le=EARNINGS_HISTORY_MAX_DAYS, description="how many days back the hours go")
    ] = 30,
) -> EarningsHistoryOut:
    history = services.node_accounts.earnings_history(node.id, days)
    return EarningsHistoryOut(
        earnings=EarningsOut(**history.earnings.model_dump(exclude={"type"})),
        since=history.since,
        hourly=[
            EarningsHourOut(hour_start=hour_start, credited_micro=credited_micro)
            for hour_start, credited_micro in history.hourly
        ],
        total_credited_micro=history.total_credited_micro,
    )


@router.get("/api/artifacts/{sha256}", **file_download("application/octet-stream"))
def download(sha256: str, node: CurrentNode, services: ServicesDep) -> FileResponse:
    """An artifact the node may read (swarm.may_read), over plain HTTP: what a node without peer
    transfer fetches, and every node's last resort."""
    if not swarm.readable_blob(services, node.id, sha256):
        raise HTTPException(status.HTTP_404_NOT_FOUND, swarm.NOT_READABLE)
    return FileResponse(services.store.blob_path(sha256), media_type="application/octet-stream")


@router.websocket("/node")
async def node_socket(websocket: WebSocket) -> None:
    services: Services = websocket.app.state.services
    token = bearer_token(websocket.headers.get(protocol.AUTHORIZATION_HEADER))
    node = await asyncio.to_thread(_authenticate, services, token) if token else None
    if node is None:
        # Refused in the handshake (HTTP 403), before any message is read.
        await websocket.close(CloseCode.UNAUTHORIZED, "unknown or revoked node token")
        return
    if (
        node.id not in services.hub.connections
        and len(services.hub.connections) >= services.settings.max_nodes
    ):
        await websocket.close(CloseCode.GOING_AWAY, "the coordinator is full; try again later")
        return
    await websocket.accept()
    session = NodeSession(node.id, minimum_agent_version=services.settings.minimum_agent_version)
    connection: Connection | None = None
    reason = "the node disconnected"
    try:
        text = await asyncio.wait_for(_next_frame(websocket), HELLO_TIMEOUT_SECONDS)
        hello = session.receive(text)
        assert isinstance(hello, protocol.Hello)
        connection = Connection(
            node_id=node.id,
            send_text=websocket.send_text,
            close=lambda code, why: websocket.close(code, why),
            hello=hello,
            telemetry=hello.telemetry,
            accepting_jobs=hello.accepting_jobs,
            remote_host=websocket.client.host if websocket.client else "",
            network=hello.network,
        )
        await services.hub.connect(connection)
        while True:
            message = session.receive(await _next_frame(websocket))
            await services.hub.handle(connection, message)
    except ProtocolViolation as violation:
        reason = f"protocol violation: {violation.reason}"
        logger.warning("closing node %s: %s", node.id, violation.reason)
        await _close(websocket, violation.code, violation.reason)
    except asyncio.TimeoutError:
        await _close(websocket, CloseCode.MALFORMED, "no hello within 15 s")
    except (WebSocketDisconnect, RuntimeError):
        pass
    except UnstorableText as error:
        # The node's own input, which it would send again on reconnecting: refused as malformed.
        reason = f"protocol violation: {error}"
        logger.warning("closing node %s: %s", node.id, error)
        await _close(websocket, CloseCode.MALFORMED, str(error))
    except Exception:
        # A bug or a database outage must not leave the node hanging: it reconnects and re-sends.
        logger.exception("node %s: error while handling its messages", node.id)
        reason = "coordinator error"
        await _close(websocket, 1011, "the coordinator failed to handle a message; reconnect")
    finally:
        if connection is not None:
            await services.hub.disconnect(connection, reason)


async def _next_frame(websocket: WebSocket) -> str:
    frame = await websocket.receive()
    if frame["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(frame.get("code", 1000))
    if frame.get("text") is None:
        raise ProtocolViolation(
            CloseCode.MALFORMED, "binary frames are not part of the protocol: send JSON text"
        )
    return frame["text"]


async def _close(websocket: WebSocket, code: int, reason: str) -> None:
    # RuntimeError: closed already; WebSocketDisconnect: the node went away before hearing why.
    with contextlib.suppress(RuntimeError, WebSocketDisconnect):
        await websocket.close(code, reason)


def _authenticate(services: Services, token: str) -> Node | None:
    with services.database.reading() as session:
        return accounts.node_for_token(session, token)
