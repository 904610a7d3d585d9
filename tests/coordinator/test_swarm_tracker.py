"""The coordinator's side of swarm transfer, in process: tickets, who the tracker names, the first
fetcher, reports (tests/test_swarm_transfer.py runs it with real peers)."""

from __future__ import annotations

import hashlib

import pytest

from compute_swarm.coordinator.service.swarm_transfer import (
    FIRST_FETCHER_SECONDS,
    MEMBER_SECONDS,
    TICKET_SECONDS,
    Announce,
    SwarmTransfer,
    TicketError,
    Tickets,
    Tracker,
)
from compute_swarm.coordinator.store.artifacts import ArtifactStore

ARTIFACT = "a" * 64
OTHER = "b" * 64


def announce(left: int | None, port: int = 7000, event: str = "") -> Announce:
    return Announce(port=port, left=left, uploaded=0, downloaded=0, event=event, info_hash=b"")


def test_a_ticket_binds_node_artifact_and_expiry_under_the_coordinators_key():
    tickets = Tickets(b"k" * 32)
    issued = tickets.issue("node_1", ARTIFACT, now=1000.0)
    decoded = tickets.decode(tickets.encode(issued), now=1000.0)
    assert (decoded.node_id, decoded.sha256) == ("node_1", ARTIFACT)
    assert decoded.expires_at == 1000.0 + TICKET_SECONDS
    text = tickets.encode(issued)
    with pytest.raises(TicketError, match="expired"):
        tickets.decode(text, now=1000.0 + TICKET_SECONDS + 1)
    with pytest.raises(TicketError, match="not a ticket this coordinator issued"):
        Tickets(b"x" * 32).decode(text, now=1000.0)
    mac = text.split(".")[1]
    with pytest.raises(TicketError):
        # Another node's ticket, made by editing this one: the MAC no longer matches.
        edited = tickets.encode(tickets.issue("node_2", ARTIFACT, now=1000.0)).split(".")[0]
        tickets.decode(f"{edited}.{mac}", now=1000.0)
    for garbage in ("", ".", "x" * 500, "!!!.???"):
        with pytest.raises(TicketError):
            tickets.decode(garbage, now=1000.0)


def test_the_tracker_names_only_fresh_members_of_the_same_swarm_seeds_first():
    tracker = Tracker()
    tracker.announce(ARTIFACT, "fetching", "10.0.0.1", announce(left=500, port=1), now=0)
    tracker.announce(ARTIFACT, "seed", "10.0.0.2", announce(left=0, port=2), now=0)
    tracker.announce(OTHER, "elsewhere", "10.0.0.3", announce(left=0, port=3), now=0)
    named = tracker.announce(ARTIFACT, "new", "10.0.0.4", announce(left=1000, port=4), now=1)
    assert [member.node_id for member in named] == ["seed", "fetching"]
    # A member that stops announcing is forgotten; one that says "stopped" at once.
    assert (
        tracker.announce(ARTIFACT, "new", "10.0.0.4", announce(left=1000, port=4), now=MEMBER_SECONDS + 1)
        == []
    )
    tracker.announce(ARTIFACT, "seed", "10.0.0.2", announce(left=0, port=2), now=MEMBER_SECONDS + 2)
    tracker.announce(
        ARTIFACT, "seed", "10.0.0.2", announce(left=0, port=2, event="stopped"), now=MEMBER_SECONDS + 3
    )
    assert (
        tracker.announce(ARTIFACT, "new", "10.0.0.4", announce(left=1000, port=4), now=MEMBER_SECONDS + 4)
        == []
    )


def test_the_swarms_nobody_announces_to_any_more_are_forgotten():
    tracker = Tracker()
    for index in range(100):
        tracker.announce(f"{index:064x}", "node", "10.0.0.1", announce(left=0), now=0)
    tracker.announce(
        ARTIFACT, "node", "10.0.0.1", announce(left=0), now=FIRST_FETCHER_SECONDS + MEMBER_SECONDS
    )
    assert list(tracker._swarms) == [ARTIFACT]


def test_one_first_fetcher_per_artifact_until_a_seed_exists_or_it_goes_quiet():
    tracker = Tracker()
    assert tracker.choose_first_fetcher(ARTIFACT, "first", now=0)
    assert not tracker.choose_first_fetcher(ARTIFACT, "second", now=1)
    assert tracker.choose_first_fetcher(ARTIFACT, "first", now=2)  # asking again keeps it
    assert tracker.choose_first_fetcher(OTHER, "second", now=2)  # each artifact has its own
    # The first fetcher went quiet: the next node takes over the web seed.
    assert tracker.choose_first_fetcher(ARTIFACT, "third", now=2 + FIRST_FETCHER_SECONDS + 1)
    # Once any member holds the whole artifact, nobody needs the web seed at once.
    tracker.announce(ARTIFACT, "third", "10.0.0.3", announce(left=0), now=100)
    assert not tracker.choose_first_fetcher(ARTIFACT, "fourth", now=101)


def test_a_reported_peer_is_no_longer_named_to_its_reporter_but_still_to_others():
    tracker = Tracker()
    tracker.announce(ARTIFACT, "liar", "10.0.0.9", announce(left=0, port=9), now=0)
    tracker.announce(ARTIFACT, "victim", "10.0.0.1", announce(left=10, port=1), now=0)
    assert tracker.report(ARTIFACT, "victim", "10.0.0.9", 9, now=1) == "liar"
    assert tracker.report(ARTIFACT, "victim", "10.0.0.7", 7, now=1) is None  # no such member
    assert tracker.report(OTHER, "victim", "10.0.0.9", 9, now=1) is None
    assert tracker.announce(ARTIFACT, "victim", "10.0.0.1", announce(left=10, port=1), now=2) == []
    named = tracker.announce(ARTIFACT, "bystander", "10.0.0.2", announce(left=10, port=2), now=2)
    assert {member.node_id for member in named} == {"liar", "victim"}
    assert [(reporter, reported) for _, reporter, reported, _ in tracker.reports] == [("victim", "liar")]


def test_swarms_are_private_unless_ops_let_an_artifact_into_the_dht(tmp_path):
    libtorrent = pytest.importorskip("libtorrent")
    store = ArtifactStore(tmp_path)
    blobs = {}
    for content in (b"a public model" * 5000, b"a private dataset" * 5000):
        sha256 = hashlib.sha256(content).hexdigest()
        source = tmp_path / sha256
        source.write_bytes(content)
        store.adopt(source, sha256)
        blobs[content[:8]] = sha256
    public = blobs[b"a public"]
    transfer = SwarmTransfer(store, b"k" * 32, public=lambda sha256: sha256 == public)
    for sha256, is_public in ((public, True), (blobs[b"a privat"], False)):
        offer = transfer.offer("node_1", sha256, "http://coordinator")
        assert offer.public is is_public
        assert libtorrent.torrent_info(offer.torrent).priv() is not is_public


def test_a_node_is_named_where_the_coordinator_reached_it_even_after_its_last_announce():
    tunnels: dict[str, tuple[str, int]] = {}
    tracker = Tracker(peer_address=tunnels.get)
    tracker.announce(ARTIFACT, "behind-nat", "192.168.1.20", announce(left=0, port=6881), now=0)
    named = tracker.announce(ARTIFACT, "fetcher", "10.0.0.1", announce(left=10), now=1)
    assert [tracker.named_address(member) for member in named] == [("192.168.1.20", 6881)]
    tunnels["behind-nat"] = ("203.0.113.5", 21000)  # its tunnel came up; it has not announced since
    named = tracker.announce(ARTIFACT, "fetcher", "10.0.0.1", announce(left=10), now=2)
    assert [tracker.named_address(member) for member in named] == [("203.0.113.5", 21000)]
    assert tracker.report(ARTIFACT, "fetcher", "203.0.113.5", 21000, now=3) == "behind-nat"
