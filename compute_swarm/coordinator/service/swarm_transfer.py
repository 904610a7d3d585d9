"""Swarm transfer, the coordinator's side: tickets, torrents, the tracker and the web-seed policy.

Nodes fetch artifacts from each other over BitTorrent (libtorrent on the node, desktop/transfer.py);
the coordinator is the tracker and the HTTP web seed of every swarm, and each swarm holds one
artifact. Nothing here trusts a node: a ticket binds (node, artifact, expiry) under the coordinator's
key, the tracker names a node only to nodes holding a ticket for the same artifact, and every piece a
node receives is checked against the torrent's SHA-256 merkle tree, the whole file against its sha256.

The tracker's state lives in this process's memory: it is rebuilt within one announce interval after
a restart, because every node re-announces.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import logging
import os
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from compute_swarm.coordinator.store.artifacts import SHA256, ArtifactStore
from compute_swarm.coordinator.store.database import Database
from compute_swarm.swarm_transfer import (
    ANNOUNCE_INTERVAL_SECONDS,
    MAX_PEERS_PER_ANSWER,
    MAX_TORRENT_BYTES,
    STALL_SECONDS,
    TransferOffer,
)

logger = logging.getLogger(__name__)

TICKET_SECONDS = 6 * 3600
# A swarm member silent for this long is no longer named to others.
MEMBER_SECONDS = 3 * ANNOUNCE_INTERVAL_SECONDS
# How long the designated first fetcher keeps the web seed to itself without announcing progress.
FIRST_FETCHER_SECONDS = STALL_SECONDS + ANNOUNCE_INTERVAL_SECONDS
MAC_BYTES = 16


class TicketError(ValueError):
    """A ticket that is malformed, forged, or expired."""


@dataclass(frozen=True)
class Ticket:
    node_id: str
    sha256: str
    expires_at: float


class Tickets:
    """Capabilities for one node and one artifact: base64url(node|sha256|expiry) + '.' + MAC. Stateless,
    so the tracker and the web seed check them without the database."""

    def __init__(self, key: bytes):
        self._key = key

    def issue(self, node_id: str, sha256: str, now: float | None = None) -> Ticket:
        return Ticket(node_id, sha256, (now or time.time()) + TICKET_SECONDS)

    def encode(self, ticket: Ticket) -> str:
        payload = f"{ticket.node_id}|{ticket.sha256}|{int(ticket.expires_at)}".encode()
        mac = hmac.new(self._key, payload, hashlib.sha256).digest()[:MAC_BYTES]
        return f"{_b64(payload)}.{_b64(mac)}"

    def decode(self, text: str, now: float | None = None) -> Ticket:
        if len(text) > 400:
            raise TicketError("not a ticket")
        encoded_payload, _, encoded_mac = text.partition(".")
        try:
            payload = _unb64(encoded_payload)
            mac = _unb64(encoded_mac)
        except ValueError:
            raise TicketError("not a ticket") from None
        expected = hmac.new(self._key, payload, hashlib.sha256).digest()[:MAC_BYTES]
        if not hmac.compare_digest(mac, expected):
            raise TicketError("not a ticket this coordinator issued")
        node_id, sha256, expires = payload.decode("ascii", "replace").split("|")
        if float(expires) < (now or time.time()):
            raise TicketError("the ticket has expired; ask for a new offer")
        return Ticket(node_id, sha256, float(expires))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError) as error:
        raise ValueError(str(error)) from None


def transfer_key(configured: str | None, database: Database) -> bytes:
    """The tickets' key: the configured secret, else one the database keeps for every replica (so a
    ticket from one replica is good at another, and after a restart)."""
    secret = configured or database.shared_secret("transfer_tickets")
    return hashlib.sha256(secret.encode()).digest()


class Torrents:
    """One BitTorrent v2 torrent per stored blob (its one file named after the blob's sha256), made once
    and kept beside the blobs: private, or public for an artifact ops let into the DHT (`public`)."""

    def __init__(self, store: ArtifactStore, public: Callable[[str], bool] = lambda sha256: False):
        self.store = store
        self.public = public
        self.directory = store.root / "torrents"
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._info_hashes: dict[tuple[str, bool], bytes] = {}

    def torrent(self, sha256: str) -> bytes:
        """The torrent of a stored blob (blocks while it hashes the blob the first time)."""
        public = self.public(sha256)
        path = self.directory / f"{sha256}{'.public' if public else ''}.torrent"
        with self._lock:  # two nodes asking at once hash the blob once
            if not path.is_file():
                data = make_torrent(self.store.blob_path(sha256), private=not public)
                scratch = path.with_suffix(f".{os.getpid()}.partial")
                scratch.write_bytes(data)
                os.replace(scratch, path)
        return path.read_bytes()

    def info_hash(self, sha256: str) -> bytes:
        """The swarm's v2 info-hash (SHA-256 of the info dictionary)."""
        import libtorrent

        key = (sha256, self.public(sha256))
        known = self._info_hashes.get(key)
        if known is None:
            known = bytes(libtorrent.torrent_info(self.torrent(sha256)).info_hashes().v2.to_bytes())
            self._info_hashes[key] = known
        return known


def make_torrent(path: Path, *, private: bool = True) -> bytes:
    """A BitTorrent v2 torrent of one file; libtorrent picks the piece size. A private one (BEP 27)
    keeps its peers to those its tracker names: no DHT, no peer exchange."""
    import libtorrent

    entries = libtorrent.list_files(str(path))
    creator = libtorrent.create_torrent(entries, 0, libtorrent.create_torrent.v2_only)
    creator.set_priv(private)
    creator.set_creator("compute-swarm")
    libtorrent.set_piece_hashes(creator, str(path.parent))
    data = libtorrent.bencode(creator.generate())
    if len(data) > MAX_TORRENT_BYTES:
        raise ValueError(f"the torrent of {path.name} is {len(data)} bytes, over {MAX_TORRENT_BYTES}")
    return data


@dataclass
class Member:
    """One node in one artifact's swarm, as its last announce described it."""

    node_id: str
    host: str
    port: int
    left: int | None
    announced_at: float
    uploaded: int = 0
    downloaded: int = 0


@dataclass
class Swarm:
    members: dict[str, Member] = field(default_factory=dict)
    first_fetcher: str | None = None
    first_fetcher_since: float = 0.0
    # reporter node id -> node ids it reported: a node is never again named to whoever reported it.
    reported: dict[str, set[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Announce:
    port: int
    left: int | None
    uploaded: int
    downloaded: int
    event: str
    info_hash: bytes


class Tracker:
    """The swarms the coordinator tracks, one per artifact, in memory."""

    def __init__(self, peer_address: Callable[[str], tuple[str, int] | None] = lambda node_id: None):
        # Where the coordinator reached a node from outside (its tunnel's address, when tunnelled),
        # looked up when the node is named, so a tunnel that came up after its last announce counts.
        self.peer_address = peer_address
        self._swarms: dict[str, Swarm] = {}
        self._lock = threading.Lock()
        self._swept_at = 0.0
        self.reports: list[tuple[float, str, str, str]] = []  # (when, reporter, reported, artifact)

    def choose_first_fetcher(self, sha256: str, node_id: str, now: float) -> bool:
        """Whether `node_id` should fetch from the web seed at once: no fresh member has the whole
        artifact, and no other node is already the first fetcher (or it has gone quiet)."""
        with self._lock:
            swarm = self._swarms.setdefault(sha256, Swarm())
            fresh = [m for m in swarm.members.values() if now - m.announced_at < MEMBER_SECONDS]
            if any(m.left == 0 and m.node_id != node_id for m in fresh):
                return False
            holder = swarm.first_fetcher
            if holder is not None and holder != node_id:
                member = swarm.members.get(holder)
                last_heard = max(swarm.first_fetcher_since, member.announced_at if member else 0.0)
                if now - last_heard < FIRST_FETCHER_SECONDS:
                    return False
            swarm.first_fetcher = node_id
            swarm.first_fetcher_since = now
            return True

    def announce(self, sha256: str, node_id: str, host: str, announce: Announce, now: float) -> list[Member]:
        """Record an announce; the other fresh members to name to this node (seeds first)."""
        with self._lock:
            if now - self._swept_at >= MEMBER_SECONDS:
                self._forget_quiet(now)  # so swarms of artifacts nobody fetches any more do not pile up
            swarm = self._swarms.setdefault(sha256, Swarm())
            if announce.event == "stopped":
                swarm.members.pop(node_id, None)
                if swarm.first_fetcher == node_id:
                    swarm.first_fetcher = None
                return []
            previous = swarm.members.get(node_id)
            swarm.members[node_id] = Member(
                node_id,
                host,
                announce.port,
                announce.left,
                now,
                uploaded=announce.uploaded,
                downloaded=announce.downloaded,
            )
            if announce.left == 0 and swarm.first_fetcher == node_id:
                swarm.first_fetcher = None  # it is a seed now: everyone fetches from peers
            if previous is None:
                logger.debug("node %s joined the swarm of %s", node_id, sha256[:12])
            excluded = swarm.reported.get(node_id, set())
            others = [
                member
                for member in swarm.members.values()
                if member.node_id != node_id
                and member.node_id not in excluded
                and now - member.announced_at < MEMBER_SECONDS
            ]
            others.sort(key=lambda member: (member.left != 0, member.left or 0))
            return others[:MAX_PEERS_PER_ANSWER]

    def named_address(self, member: Member) -> tuple[str, int]:
        """Where other nodes are told to connect to a member: where the coordinator reached it, else
        the address its announce came from with the port it announced."""
        return self.peer_address(member.node_id) or (member.host, member.port)

    def report(self, sha256: str, reporter: str, host: str, port: int, now: float) -> str | None:
        """A node's report of a peer (by the address the tracker named) that served bad pieces; the id
        of the node behind that address, if it is in this swarm."""
        with self._lock:
            swarm = self._swarms.get(sha256)
            if swarm is None:
                return None
            for member in swarm.members.values():
                named = (host, port) in (self.named_address(member), (member.host, member.port))
                if named and member.node_id != reporter:
                    swarm.reported.setdefault(reporter, set()).add(member.node_id)
                    self.reports.append((now, reporter, member.node_id, sha256))
                    del self.reports[:-1000]
                    return member.node_id
            return None

    def reports_against(self) -> dict[str, int]:
        """Node id -> the reports against it still kept (the latest 1,000)."""
        with self._lock:
            counted: dict[str, int] = {}
            for _, _, reported, _ in self.reports:
                counted[reported] = counted.get(reported, 0) + 1
            return counted

    def _forget_quiet(self, now: float) -> None:
        """Drop the members silent for MEMBER_SECONDS, and the swarms left empty (under the lock)."""
        for sha256 in list(self._swarms):
            swarm = self._swarms[sha256]
            for node_id in [
                node_id
                for node_id, member in swarm.members.items()
                if now - member.announced_at >= MEMBER_SECONDS
            ]:
                del swarm.members[node_id]
            if not swarm.members and now - swarm.first_fetcher_since >= FIRST_FETCHER_SECONDS:
                del self._swarms[sha256]
        self._swept_at = now


class SwarmTransfer:
    """Offers, announces, web-seed reads and reports: what the routes in transport/api/swarm.py call."""

    def __init__(
        self,
        store: ArtifactStore,
        key: bytes,
        peer_address: Callable[[str], tuple[str, int] | None] = lambda node_id: None,
        public: Callable[[str], bool] = lambda sha256: False,
    ):
        self.store = store
        self.tickets = Tickets(key)
        self.torrents = Torrents(store, public)
        self.tracker = Tracker(peer_address)

    def offer(
        self, node_id: str, sha256: str, base_url: str, *, holding: bool = False, now: float | None = None
    ) -> TransferOffer:
        """A ticketed offer; a node that holds the artifact already is never the first fetcher."""
        now = now or time.time()
        ticket = self.tickets.issue(node_id, sha256, now)
        encoded = self.tickets.encode(ticket)
        torrent = self.torrents.torrent(sha256)
        return TransferOffer(
            sha256=sha256,
            size=self.store.blob_path(sha256).stat().st_size,
            torrent_base64=base64.b64encode(torrent).decode("ascii"),
            tracker_url=f"{base_url}/swarm/{encoded}/announce",
            web_seed_url=f"{base_url}/swarm/seed/{encoded}/",
            report_url=f"{base_url}/swarm/report/{encoded}",
            web_seed_at_once=not holding and self.tracker.choose_first_fetcher(sha256, node_id, now),
            public=self.torrents.public(sha256),
            expires_at=ticket.expires_at,
        )

    def ticket(self, text: str) -> Ticket:
        ticket = self.tickets.decode(text)
        if not SHA256.match(ticket.sha256):
            raise TicketError("not a ticket")
        return ticket

    def announce(self, ticket: Ticket, host: str, announce: Announce, now: float | None = None) -> bytes:
        """The bencoded tracker answer (BEP 3, with compact peer lists: BEP 23 and BEP 7)."""
        import libtorrent

        if announce.info_hash != self.torrents.info_hash(ticket.sha256)[: len(announce.info_hash)]:
            return libtorrent.bencode({b"failure reason": b"this ticket is for another torrent"})
        peers = self.tracker.announce(ticket.sha256, ticket.node_id, host, announce, now or time.time())
        compact4, compact6 = b"", b""
        for member in peers:
            named_host, named_port = self.tracker.named_address(member)
            address = ipaddress.ip_address(named_host)
            if address.version == 4:
                compact4 += address.packed + struct.pack("!H", named_port)
            else:
                compact6 += address.packed + struct.pack("!H", named_port)
        return libtorrent.bencode(
            {
                b"interval": ANNOUNCE_INTERVAL_SECONDS,
                b"min interval": ANNOUNCE_INTERVAL_SECONDS // 3,
                b"peers": compact4,
                b"peers6": compact6,
            }
        )
