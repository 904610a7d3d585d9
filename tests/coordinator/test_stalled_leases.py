"""A node cannot sit on a job (issue 16, M2): leases renew on heartbeats only while the job moves on."""

from __future__ import annotations

import time

import pytest

from tests.coordinator.test_node_socket import TELEMETRY, ScriptedNode, check_ledger, new_buyer, submit
from tests.swarm_processes import Coordinator

pytestmark = pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager")
STALL_SECONDS = 4


@pytest.fixture
def coordinator(tmp_path):
    server = Coordinator(
        tmp_path, environment={"SWARM_LEASE_SECONDS": "2", "SWARM_LEASE_PROGRESS_SECONDS": str(STALL_SECONDS)}
    ).start()
    yield server
    server.stop()
    check_ledger(server.data_dir)


def keep_alive(node: ScriptedNode, lease: dict, step_of, seconds: float) -> dict | None:
    """Heartbeats and progress reports (at the step `step_of(tick)` gives) for `seconds`; the cancel, if
    the coordinator sends one."""
    deadline, tick = time.monotonic() + seconds, 0
    while time.monotonic() < deadline:
        node.send({"type": "heartbeat", "telemetry": TELEMETRY})
        node.send({"type": "progress", "job_id": lease["job_id"], "lease_id": lease["lease_id"],
                   "step": step_of(tick), "total_steps": 1000, "loss": 2.0})  # fmt: skip
        tick += 1
        try:
            return node.receive_type("cancel", timeout=0.5)
        except TimeoutError:
            continue
    return None


def test_a_node_that_heartbeats_but_never_moves_loses_its_lease(coordinator):
    buyer = new_buyer(coordinator, "stalled buyer")
    node = ScriptedNode(coordinator, "squatter")
    node.connect()
    job = submit(buyer)
    lease = node.receive_type("lease")
    # Before: heartbeats and the same step forever kept the lease, and the job, for good.
    cancel = keep_alive(node, lease, lambda tick: 5, STALL_SECONDS + 8)
    assert cancel is not None and cancel["job_id"] == job["id"], "the stalled lease was never lost"
    assert f"no progress for {STALL_SECONDS} s" in cancel["reason"]
    assert buyer.job(job["id"])["state"] in ("queued", "leased")
    node.disconnect()


def test_a_node_whose_job_moves_keeps_its_lease(coordinator):
    buyer = new_buyer(coordinator, "patient buyer")
    node = ScriptedNode(coordinator, "worker")
    node.connect()
    job = submit(buyer)
    lease = node.receive_type("lease")
    assert keep_alive(node, lease, lambda tick: tick + 1, STALL_SECONDS + 4) is None
    assert buyer.job(job["id"])["state"] == "running"
    buyer.cancel(job["id"])
    node.disconnect()
