"""Swarm transfer against a real coordinator process: eight nodes fetch the demo model and a dataset
from each other with the coordinator sending about one copy (measured, against HTTP alone in the same
run), only the nodes the coordinator names get a swarm, and a lying peer is banned and reported while
the fetch completes from the honest one."""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from urllib.parse import quote_from_bytes

import httpx
import pytest

from compute_swarm.desktop.transfer import PeerTransfer
from compute_swarm.engine.catalogue import fetch_catalogue_model
from compute_swarm.engine.jobs import CATALOGUE, DEFAULT_MODEL
from compute_swarm.sdk.client import SwarmError
from tests.coordinator.test_node_socket import ScriptedNode, new_buyer
from tests.swarm_processes import Coordinator, artifact_egress, chat_dataset, fetch_everywhere, sha256_of

libtorrent = pytest.importorskip("libtorrent")

# The scripted nodes keep their sockets open across calls (as in tests/coordinator/test_node_socket.py).
pytestmark = pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager")
NODES = 8
MODEL = CATALOGUE[DEFAULT_MODEL]


ADMIN_TOKEN = secrets.token_urlsafe(32)


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory):
    server = Coordinator(
        tmp_path_factory.mktemp("coordinator"), environment={"SWARM_ADMIN_TOKEN": ADMIN_TOKEN}
    ).start()
    yield server
    server.stop()


def reports_against(coordinator: Coordinator, node: ScriptedNode) -> int:
    """The reports of bad pieces against a node, as the ops API shows them."""
    overview = httpx.get(
        f"{coordinator.url}/api/ops/overview", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10
    ).json()
    return next(row["reported_by_peers"] for row in overview["nodes"] if row["id"] == node.node_id)


def test_eight_nodes_fetch_the_model_and_a_dataset_while_the_coordinator_sends_about_one_copy(
    coordinator, tmp_path
):
    fetch_catalogue_model(DEFAULT_MODEL)  # the coordinator's copy comes from the same cache
    buyer = new_buyer(coordinator, "eight-nodes", credits="1000")
    dataset_file = buyer.upload_file(chat_dataset(tmp_path / "chat.jsonl"))
    scripted = [ScriptedNode(coordinator, f"peer-{index}") for index in range(NODES)]
    for node in scripted:
        node.connect()
    for _ in range(NODES):  # the same dataset, as a sweep's trials share theirs
        buyer.submit_lora({"base_model": DEFAULT_MODEL, "dataset": dataset_file["id"], "max_steps": 3})
    leases = [node.receive_type("lease") for node in scripted]
    dataset = leases[0]["dataset_sha256"]
    assert all(lease["dataset_sha256"] == dataset for lease in leases)
    dataset_size = leases[0]["dataset_size"]

    transfers = [PeerTransfer(listen_host="127.0.0.1") for _ in scripted]
    try:
        with_peers = [(node.http, transfer) for node, transfer in zip(scripted, transfers, strict=True)]
        http_only = [(node.http, None) for node in scripted]
        results = {}
        for name, nodes in (("peers", with_peers), ("http", http_only)):
            before = artifact_egress(coordinator)
            seconds = max(fetch_everywhere(nodes, MODEL.sha256, tmp_path / name, MODEL.file_size_bytes))
            seconds += max(fetch_everywhere(nodes, dataset, tmp_path / name, dataset_size))
            after = artifact_egress(coordinator)
            sent = sum(after.values()) - sum(before.values())
            results[name] = (sent / (MODEL.file_size_bytes + dataset_size), seconds)
        print(
            f"\n{NODES} nodes, model {MODEL.file_size_bytes / 1e6:.0f} MB + dataset {dataset_size / 1e6:.1f} MB: "
            f"coordinator egress {results['peers'][0]:.2f}× with peers ({results['peers'][1]:.1f} s), "
            f"{results['http'][0]:.2f}× over HTTP alone ({results['http'][1]:.1f} s)"
        )
        assert results["peers"][0] <= 1.5
        assert results["http"][0] == pytest.approx(NODES, rel=0.01)
        # The nodes served each other what the coordinator did not send.
        served = sum(transfer.stats().served_bytes for transfer in transfers)
        assert served >= (NODES - 1.5) * (MODEL.file_size_bytes + dataset_size)
    finally:
        for transfer in transfers:
            transfer.close()
        for node in scripted:
            node.disconnect()


def test_only_the_nodes_a_job_names_get_its_datasets_swarm(coordinator, tmp_path):
    buyer = new_buyer(coordinator, "private-data")
    dataset_file = buyer.upload_file(chat_dataset(tmp_path / "private.jsonl", megabytes=1))
    holder = ScriptedNode(coordinator, "holder")
    holder.connect()
    buyer.submit_lora({"base_model": DEFAULT_MODEL, "dataset": dataset_file["id"], "max_steps": 3})
    lease = holder.receive_type("lease")
    stranger = ScriptedNode(coordinator, "stranger")
    try:
        offer = holder.http.transfer_offer(lease["dataset_sha256"])
        with pytest.raises(SwarmError) as refused:
            stranger.http.transfer_offer(lease["dataset_sha256"])
        assert refused.value.status_code == 404
        # The holder's ticket cannot be borrowed for another artifact, nor forged.
        ticket = offer.tracker_url.split("/swarm/")[1].split("/")[0]
        seed = f"{coordinator.url}/swarm/seed/{ticket}/{MODEL.sha256}"
        assert httpx.get(seed, timeout=10).status_code == 404
        forged = ticket[:-2] + ("AA" if not ticket.endswith("AA") else "BB")
        assert (
            httpx.get(f"{coordinator.url}/swarm/seed/{forged}/{offer.sha256}", timeout=10).status_code == 403
        )
        ranged = httpx.get(f"{offer.web_seed_url}{offer.sha256}", headers={"Range": "bytes=0-99"}, timeout=10)
        assert ranged.status_code == 206 and len(ranged.content) == 100
    finally:
        holder.disconnect()


def corrupt_in_place(path: Path) -> None:
    """Flip the first byte of every 4 KiB block: every piece read from the file now fails its hash."""
    with open(path, "r+b") as file:
        size = file.seek(0, 2)
        for offset in range(0, size, 4096):
            file.seek(offset)
            byte = file.read(1)
            file.seek(offset)
            file.write(bytes([byte[0] ^ 0xFF]))


def test_a_lying_peer_is_banned_and_reported_and_the_fetch_completes_from_an_honest_one(
    coordinator, tmp_path
):
    model = fetch_catalogue_model(DEFAULT_MODEL)
    liar_node, honest_node, fetcher_node, observer = (
        ScriptedNode(coordinator, name) for name in ("liar", "honest", "fetcher", "observer")
    )
    # The liar joins with the real file, passes libtorrent's check, then changes it under its feet: a
    # modified client would serve anything it likes.
    liar_copy = tmp_path / "liar" / "model.gguf"
    liar_copy.parent.mkdir()
    liar_copy.write_bytes(model.read_bytes())
    liar = PeerTransfer(listen_host="127.0.0.1")
    honest = PeerTransfer(listen_host="127.0.0.1")
    fetcher = PeerTransfer(listen_host="127.0.0.1")
    try:
        assert liar.serve(liar_node.http.transfer_offer(MODEL.sha256, holding=True), liar_copy)
        corrupt_in_place(liar_copy)
        assert honest.serve(honest_node.http.transfer_offer(MODEL.sha256, holding=True), model)
        before = artifact_egress(coordinator)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(_seeds_named(observer)) < 2:
            time.sleep(0.5)  # both seeds have announced: the fetcher will meet the liar
        offer = fetcher_node.http.transfer_offer(MODEL.sha256)
        assert not offer.web_seed_at_once  # a seed is in the swarm: no need for the coordinator's copy
        path = fetcher.fetch(offer, tmp_path / "fetcher" / "model.gguf")
        assert sha256_of(path) == MODEL.sha256
        # The fetcher banned the liar and reported it. (libtorrent may ban an honest peer too, when
        # it shared failed pieces with the liar: a report is evidence for ops, not a verdict.)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not reports_against(coordinator, liar_node):
            time.sleep(0.2)
        assert reports_against(coordinator, liar_node) >= 1
        # The honest seed served the file, or (when libtorrent banned it too, for sharing a failed
        # piece with the liar, which it sometimes does) the web seed finished it: one copy from the
        # coordinator at most, plus the blocks it sent again of pieces that failed their hash (a piece
        # is fetched whole again, web-seeded blocks included, when the liar's block spoils it).
        failed = sum(torrent.status().total_failed_bytes for torrent in fetcher.session.get_torrents())
        sent = sum(artifact_egress(coordinator).values()) - sum(before.values())
        assert sent <= MODEL.file_size_bytes + failed
    finally:
        for transfer in (fetcher, honest, liar):
            transfer.close()


def _seeds_named(observer: ScriptedNode) -> list[tuple[str, int]]:
    """The seeds the tracker names for the demo model, as a node that announces it needs it sees them."""
    offer = observer.http.transfer_offer(MODEL.sha256, holding=True)
    info_hash = libtorrent.torrent_info(offer.torrent).info_hashes().v2.to_bytes()[:20]
    query = f"info_hash={quote_from_bytes(info_hash)}&port=9&left=1&uploaded=0&downloaded=0&compact=1"
    body = libtorrent.bdecode(httpx.get(f"{offer.tracker_url}?{query}", timeout=10).content)
    peers = body.get(b"peers", b"")
    return [
        (".".join(map(str, peers[index : index + 4])), int.from_bytes(peers[index + 4 : index + 6], "big"))
        for index in range(0, len(peers), 6)
    ]
