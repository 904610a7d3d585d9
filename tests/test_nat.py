"""A node behind a real NAT, in network namespaces this test makes: it is found unreachable, opens a
tunnel through the tunnel server, is found reachable through it, and serves the demo model to a peer
on the other side without the coordinator sending a byte.

    inet   10.201.0.1   the coordinator, the tunnel server (frps) and the fetching peer
    router 10.201.0.2 / 192.168.77.1   forwards, masquerading the home side: nothing gets in
    home   192.168.77.2  the node agent (`compute-swarm node`), holding the demo model

Needs root (network namespaces), iproute2 and nftables; skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from compute_swarm.engine.catalogue import fetch_catalogue_model
from compute_swarm.engine.jobs import CATALOGUE, DEFAULT_MODEL
from compute_swarm.frp import FrpNotFound, find_program
from tests.swarm_processes import COMMAND, REPOSITORY, SwarmProcess

pytest.importorskip("libtorrent")

TAG = f"cs{os.getpid() % 100000}"
INET, ROUTER, HOME = f"{TAG}-inet", f"{TAG}-router", f"{TAG}-home"
COORDINATOR_HOST, TUNNEL_PORT, COORDINATOR_PORT = "10.201.0.1", 7000, 8000
URL = f"http://{COORDINATOR_HOST}:{COORDINATOR_PORT}"
TOKEN = secrets.token_urlsafe(32)
ADMIN_TOKEN = secrets.token_urlsafe(32)


def run(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=30)


def in_namespace(namespace: str, *command: str) -> list[str]:
    return ["ip", "netns", "exec", namespace, *command]


def helper(*arguments: str, timeout: float = 120) -> str:
    result = subprocess.run(
        in_namespace(INET, sys.executable, "-m", "tests.nat_helper", *arguments),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPOSITORY,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""


def network_namespaces_or_skip() -> None:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    for program in ("ip", "nft"):
        if shutil.which(program) is None:
            pytest.skip(f"no {program} here (installers/debian-packages.sh installs it)")
    try:
        run("ip", "netns", "add", f"{TAG}-probe")
        run("ip", "netns", "del", f"{TAG}-probe")
    except (subprocess.CalledProcessError, OSError) as error:
        pytest.skip(f"cannot make network namespaces here: {error}")


@pytest.fixture
def namespaces():
    network_namespaces_or_skip()
    for namespace in (INET, ROUTER, HOME):
        run("ip", "netns", "add", namespace)
    try:
        run(
            "ip",
            "link",
            "add",
            f"{TAG}-i0",
            "netns",
            INET,
            "type",
            "veth",
            "peer",
            "name",
            f"{TAG}-r0",
            "netns",
            ROUTER,
        )
        run(
            "ip",
            "link",
            "add",
            f"{TAG}-h0",
            "netns",
            HOME,
            "type",
            "veth",
            "peer",
            "name",
            f"{TAG}-r1",
            "netns",
            ROUTER,
        )
        for namespace, device, address in (
            (INET, f"{TAG}-i0", "10.201.0.1/24"),
            (ROUTER, f"{TAG}-r0", "10.201.0.2/24"),
            (ROUTER, f"{TAG}-r1", "192.168.77.1/24"),
            (HOME, f"{TAG}-h0", "192.168.77.2/24"),
        ):
            run(*in_namespace(namespace, "ip", "addr", "add", address, "dev", device))
            run(*in_namespace(namespace, "ip", "link", "set", device, "up"))
        for namespace in (INET, ROUTER, HOME):
            run(*in_namespace(namespace, "ip", "link", "set", "lo", "up"))
        run(*in_namespace(HOME, "ip", "route", "add", "default", "via", "192.168.77.1"))
        run(*in_namespace(ROUTER, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1"))
        # Masquerade what leaves for the inet side; let in only what answers it (a home router).
        rules = f"""
table ip nat {{
    chain post {{
        type nat hook postrouting priority 100;
        oifname "{TAG}-r0" masquerade
    }}
}}
table ip filter {{
    chain forward {{
        type filter hook forward priority 0; policy drop;
        iifname "{TAG}-r1" accept
        ct state established,related accept
    }}
}}
"""
        subprocess.run(in_namespace(ROUTER, "nft", "-f", "-"), input=rules, check=True, text=True, timeout=30)
        yield
    finally:
        for namespace in (INET, ROUTER, HOME):
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=30)


def test_a_node_behind_nat_is_unreachable_tunnels_and_then_serves_a_peer(namespaces, tmp_path):
    try:
        find_program("frps", tmp_path / "bin")
    except FrpNotFound as error:
        pytest.skip(f"no frp here: {error}")
    model = CATALOGUE[DEFAULT_MODEL]
    processes: list[SwarmProcess] = []

    def start(namespace: str, arguments: list[str], log: str, environment: dict[str, str]) -> SwarmProcess:
        process = SwarmProcess(arguments, tmp_path / log, environment)
        with open(process.log_path, "ab") as output:
            process.process = subprocess.Popen(
                in_namespace(namespace, COMMAND, *arguments),
                stdout=output,
                stderr=subprocess.STDOUT,
                cwd=REPOSITORY,
                env=process.environment,
                start_new_session=True,
            )
        processes.append(process)
        return process

    try:
        start(
            INET,
            ["tunnel-server", "--host", COORDINATOR_HOST, "--port", str(TUNNEL_PORT),
             "--proxy-host", COORDINATOR_HOST, "--ports", "21000-21010", "--data-dir", str(tmp_path / "frps")],
            "frps.log",
            {"SWARM_TUNNEL_TOKEN": TOKEN},
        )  # fmt: skip
        start(
            INET,
            ["coordinator", "--host", COORDINATOR_HOST, "--port", str(COORDINATOR_PORT),
             "--data-dir", str(tmp_path / "coordinator")],
            "coordinator.log",
            {
                "SWARM_NODE_ADMISSION": "open",
                "SWARM_ADMIN_TOKEN": ADMIN_TOKEN,
                "SWARM_TUNNEL_SERVER": f"{COORDINATOR_HOST}:{TUNNEL_PORT}",
                "SWARM_TUNNEL_TOKEN": TOKEN,
            },
        )  # fmt: skip
        helper("wait", URL)
        # The node holds the demo model: it serves it to whoever the coordinator names.
        models = tmp_path / "home-models"
        (models / model.sha256[:16]).mkdir(parents=True)
        shutil.copyfile(
            fetch_catalogue_model(DEFAULT_MODEL), models / model.sha256[:16] / Path(model.member).name
        )
        node = start(
            HOME,
            ["-v", "node", "--coordinator", URL, "--data-dir", str(tmp_path / "home"), "--name", "behind-nat"],
            "node.log",
            {
                "SWARM_TOKEN_STORE": "file",
                "SWARM_MODELS_DIR": str(models),
                "SWARM_CONFIG_DIR": str(tmp_path / "home-config"),
            },
        )  # fmt: skip

        deadline, row = time.monotonic() + 120, None
        while time.monotonic() < deadline:
            row = json.loads(helper("node", URL, ADMIN_TOKEN, "behind-nat") or "null")
            if row and row["reachability"] == "tunnelled":
                break
            time.sleep(1)
        node_log = node.log_path.read_text(errors="replace")
        assert row is not None and row["reachability"] == "tunnelled", node_log[-3000:]
        # It was found unreachable first: that is why it opened the tunnel.
        assert "other nodes cannot reach this one: opening a tunnel" in node_log
        assert row["peer_address"].startswith(f"{COORDINATOR_HOST}:210")

        before = float(helper("egress", URL))
        fetched = json.loads(helper("fetch", URL, COORDINATOR_HOST, str(tmp_path / "fetcher")))
        assert fetched["verified"] and not fetched["web_seed_at_once"], fetched
        assert float(helper("egress", URL)) == before  # every byte came from the node behind the NAT
    finally:
        for process in reversed(processes):
            process.stop(timeout=15)
