"""Swarm transfer's routes: a node's offer for an artifact it may read, and the ticketed tracker, web
seed and peer report (service/swarm_transfer.py explains the design)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, Response, status
from fastapi.responses import FileResponse

from compute_swarm.coordinator.service.swarm_transfer import Announce, Ticket, TicketError
from compute_swarm.coordinator.store.artifacts import SHA256
from compute_swarm.coordinator.transport.api.deps import CurrentNode, Services, ServicesDep
from compute_swarm.coordinator.transport.api.schemas import file_download
from compute_swarm.swarm_transfer import PeerReport, TransferOffer

logger = logging.getLogger("compute_swarm.coordinator.swarm")
router = APIRouter(tags=["swarm transfer"])

BENCODED = "text/plain"  # what BitTorrent trackers answer with


def may_read(services: Services, node_id: str, sha256: str) -> bool:
    """What a node may fetch: the inputs of a job it holds, the adapter of a live request it serves,
    or a catalogue model's files (any node may run any catalogue model)."""
    return (
        services.catalogue.model_of_file(sha256) is not None
        or services.leases.may_download(node_id, sha256)
        or services.hub.serves_adapter(node_id, sha256)
    )


def stored(services: Services, sha256: str) -> bool:
    """Whether the coordinator holds the blob, adopting the built-in model into its store first."""
    return services.catalogue.stored(sha256)


def readable_blob(services: Services, node_id: str, sha256: str) -> bool:
    return (
        SHA256.match(sha256) is not None and may_read(services, node_id, sha256) and stored(services, sha256)
    )


NOT_READABLE = "no such artifact for a job or request this node holds"


@router.get("/api/swarm/{sha256}/offer")
async def offer(
    sha256: str,
    request: Request,
    node: CurrentNode,
    services: ServicesDep,
    holding: Annotated[bool, Query(description="the node holds the artifact and offers to serve it")] = False,
) -> TransferOffer:
    """How to fetch an artifact from peers (or serve it to them): its torrent, a ticketed tracker and
    the web seed."""
    if not services.settings.peer_transfer:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "peer transfer is off on this coordinator")
    if not await asyncio.to_thread(readable_blob, services, node.id, sha256):
        raise HTTPException(status.HTTP_404_NOT_FOUND, NOT_READABLE)
    base_url = services.settings.public_origin or str(request.base_url).rstrip("/")
    return await asyncio.to_thread(services.swarm_transfer.offer, node.id, sha256, base_url, holding=holding)


def _ticket(services: Services, text: str) -> Ticket:
    try:
        return services.swarm_transfer.ticket(text)
    except TicketError as error:
        raise HTTPException(status.HTTP_403_FORBIDDEN, str(error)) from None


@router.get("/swarm/{ticket}/announce", response_class=Response)
async def announce(
    ticket: str,
    request: Request,
    services: ServicesDep,
    port: Annotated[int, Query(ge=1, le=65535)],
    uploaded: Annotated[int, Query(ge=0)] = 0,
    downloaded: Annotated[int, Query(ge=0)] = 0,
    left: Annotated[int | None, Query(ge=0)] = None,
    event: Annotated[str, Query(max_length=16)] = "",
) -> Response:
    """The BitTorrent tracker (BEP 3): names the other nodes holding a ticket for the same artifact."""
    checked = _ticket(services, ticket)
    # info_hash is read from the raw query: 20 binary bytes, percent-encoded, that text decoding mangles.
    raw_hash = _raw_query_value(request.scope.get("query_string", b""), b"info_hash")
    host = request.client.host if request.client else ""
    body = await asyncio.to_thread(
        services.swarm_transfer.announce,
        checked,
        host,
        Announce(port, left, uploaded, downloaded, event, raw_hash),
    )
    return Response(body, media_type=BENCODED)


def _raw_query_value(query: bytes, name: bytes) -> bytes:
    from urllib.parse import unquote_to_bytes

    for pair in query.split(b"&"):
        key, _, value = pair.partition(b"=")
        if key == name:
            return unquote_to_bytes(value)[:32]
    return b""


@router.get("/swarm/seed/{ticket}/{name}", **file_download("application/octet-stream"))
def web_seed(ticket: str, name: str, services: ServicesDep) -> FileResponse:
    """The coordinator's copy, the swarm's last resort (BEP 19: ranges, as peers ask for pieces). The
    URL ends in the torrent's file name, its sha256, as web seeds of multi-file torrents do (libtorrent
    counts its pad files)."""
    checked = _ticket(services, ticket)
    if name != checked.sha256 or not services.store.has(checked.sha256):
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such artifact")
    return FileResponse(services.store.blob_path(checked.sha256), media_type="application/octet-stream")


@router.post("/swarm/report/{ticket}", status_code=status.HTTP_202_ACCEPTED)
def report(ticket: str, body: PeerReport, services: ServicesDep) -> dict:
    """A node's report of a peer whose pieces failed their hash: that peer is never named to it again,
    and ops see the report."""
    checked = _ticket(services, ticket)
    host, _, port_text = body.peer.rpartition(":")
    host = host.strip("[]")
    if not host or not port_text.isdigit():
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "peer must be host:port")
    reported = services.swarm_transfer.tracker.report(
        checked.sha256, checked.node_id, host, int(port_text), time.time()
    )
    if reported is not None:
        services.metrics.peers_reported.inc()
        logger.warning(
            "node %s reports node %s for bad pieces of %s: %s",
            checked.node_id,
            reported,
            checked.sha256[:12],
            body.reason,
        )
    return {"reported_node": reported is not None}
