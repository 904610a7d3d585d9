"""Swarm transfer: the coordinator's egress and the time to fetch for N nodes, with peer transfer and
with HTTP alone, in the same run.

A real coordinator runs as a child process. N nodes register and connect (scripted websocket nodes),
and N fine-tunes on one dataset are leased to them, so each may read the dataset, as a sweep's
trials do. Then every node fetches the demo model (98 MB, a catalogue model) and the dataset at once,
through `desktop.transfer.fetch_artifact` as the agent does: first each with its own libtorrent
session (peers, the coordinator the tracker and last-resort web seed), then over HTTP alone (the
baseline: the coordinator sends every copy). Egress is the coordinator's own count of the artifact
bytes it sent (`swarm_artifact_bytes_served` in /metrics), so a Range answer counts what it sent.

    python bench/transfer.py [--nodes 8] [--dataset-mb 6] [--upload-limit-kib 0]

On loopback the network is not the limit, so the times say what the protocols cost, not what a home
line gives; the egress ratio is what carries over. Writes bench/results/transfer.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY))
RESULTS = REPOSITORY / "bench" / "results" / "transfer.json"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", type=int, default=8, help="nodes fetching at once (1 to 64)")
    parser.add_argument("--dataset-mb", type=int, default=6, help="the dataset's size in MB")
    parser.add_argument(
        "--upload-limit-kib", type=int, default=0, help="each node's upload cap in KiB/s (0: none)"
    )
    arguments = parser.parse_args()
    if not 1 <= arguments.nodes <= 64:
        parser.error("--nodes must be between 1 and 64")

    from compute_swarm.desktop.transfer import PeerTransfer
    from compute_swarm.engine.catalogue import fetch_catalogue_model
    from compute_swarm.engine.jobs import CATALOGUE, DEFAULT_MODEL
    from tests.coordinator.test_node_socket import ScriptedNode, new_buyer
    from tests.swarm_processes import Coordinator, artifact_egress, chat_dataset, fetch_everywhere

    model = CATALOGUE[DEFAULT_MODEL]
    fetch_catalogue_model(DEFAULT_MODEL)  # the coordinator's copy comes from this machine's cache
    with tempfile.TemporaryDirectory(prefix="bench-transfer-") as scratch:
        root = Path(scratch)
        coordinator = Coordinator(root / "coordinator").start()
        nodes: list = []
        transfers: list = []
        try:
            buyer = new_buyer(coordinator, "bench", credits="100000")
            uploaded = buyer.upload_file(chat_dataset(root / "chat.jsonl", arguments.dataset_mb))
            nodes = [ScriptedNode(coordinator, f"bench-{index}") for index in range(arguments.nodes)]
            for node in nodes:
                node.connect()
            for _ in nodes:
                buyer.submit_lora({"base_model": DEFAULT_MODEL, "dataset": uploaded["id"], "max_steps": 3})
            leases = [node.receive_type("lease", timeout=60) for node in nodes]
            dataset, dataset_size = leases[0]["dataset_sha256"], leases[0]["dataset_size"]
            artifacts = [("model", model.sha256, model.file_size_bytes), ("dataset", dataset, dataset_size)]
            transfers = [
                PeerTransfer(
                    listen_host="127.0.0.1", upload_bytes_per_second=arguments.upload_limit_kib * 1024
                )
                for _ in nodes
            ]
            ways = {
                "peers": [(node.http, transfer) for node, transfer in zip(nodes, transfers, strict=True)],
                "http": [(node.http, None) for node in nodes],
            }
            results: dict = {}
            for way, clients in ways.items():
                for name, sha256, size in artifacts:
                    before = artifact_egress(coordinator)
                    started = time.monotonic()
                    seconds = fetch_everywhere(clients, sha256, root / way, size)
                    after = artifact_egress(coordinator)
                    sent = {route: after[route] - before[route] for route in after}
                    results[f"{way}/{name}"] = {
                        "bytes": size,
                        "egress_bytes": sum(sent.values()),
                        "egress_by_route": sent,
                        "egress_copies": sum(sent.values()) / size,
                        "seconds_last": seconds[-1],
                        "seconds_median": statistics.median(seconds),
                        "wall_seconds": time.monotonic() - started,
                    }
        finally:
            for transfer in transfers:
                transfer.close()
            for node in nodes:
                node.disconnect()
            coordinator.stop()

    print(
        f"{arguments.nodes} nodes, each fetching the demo model ({model.file_size_bytes / 1e6:.0f} MB) "
        f"and a dataset ({dataset_size / 1e6:.1f} MB) at once, on loopback:"
    )
    print(f"{'artifact':10} {'way':6} {'coordinator egress':>24} {'last node':>10} {'median':>8}")
    for key, row in results.items():
        way, name = key.split("/")
        print(
            f"{name:10} {way:6} {row['egress_bytes'] / 1e6:11.1f} MB = {row['egress_copies']:5.2f} copies "
            f"{row['seconds_last']:9.1f}s {row['seconds_median']:7.1f}s"
        )
    total = {way: sum(results[f"{way}/{name}"]["egress_bytes"] for name, _, _ in artifacts) for way in ways}
    print(
        f"egress with peers / HTTP alone: {total['peers'] / total['http']:.3f} "
        f"({total['http'] / max(total['peers'], 1):.1f}× less)"
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"nodes": arguments.nodes, "results": results}, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(REPOSITORY)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
