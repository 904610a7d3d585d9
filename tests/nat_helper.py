"""What tests/test_nat.py runs inside its network namespaces, where the test process cannot reach:

python -m tests.nat_helper wait URL                      until the coordinator answers
python -m tests.nat_helper node URL ADMIN_TOKEN NAME     the node's row on the ops API, as JSON
python -m tests.nat_helper fetch URL HOST DIRECTORY      a new node fetches the demo model from
                                                         its swarm; prints what it measured
python -m tests.nat_helper egress URL                    the artifact bytes the coordinator sent
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import httpx


def wait(url: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"no coordinator at {url}")


def node(url: str, admin_token: str, name: str) -> None:
    overview = httpx.get(
        f"{url}/api/ops/overview", headers={"Authorization": f"Bearer {admin_token}"}, timeout=10
    ).json()
    rows = [row for row in overview["nodes"] if row["name"] == name]
    print(json.dumps(rows[0] if rows else None))


def fetch(url: str, host: str, directory: str) -> None:
    from compute_swarm.desktop.transfer import PeerTransfer
    from compute_swarm.engine.jobs import CATALOGUE, DEFAULT_MODEL
    from compute_swarm.sdk.client import NodeClient
    from tests.swarm_processes import sha256_of

    model = CATALOGUE[DEFAULT_MODEL]
    _, token = NodeClient.register(url, "fetcher")
    client = NodeClient(url, token)
    transfer = PeerTransfer(listen_host=host)
    try:
        offer = client.transfer_offer(model.sha256)
        started = time.monotonic()
        path = transfer.fetch(offer, Path(directory) / "model.gguf")
        seconds = time.monotonic() - started
        print(
            json.dumps(
                {
                    "web_seed_at_once": offer.web_seed_at_once,
                    "verified": sha256_of(path) == model.sha256,
                    "seconds": seconds,
                }
            )
        )
    finally:
        transfer.close()


def egress(url: str) -> None:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    print(
        sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("swarm_artifact_bytes_served_total")
        )
    )


if __name__ == "__main__":
    command, *arguments = sys.argv[1:]
    {"wait": wait, "node": node, "fetch": fetch, "egress": egress}[command](*arguments)
