"""How a seller's node joins a swarm that admits machines by invitation or by the operator's approval:
the real agent (and the real `compute-swarm node` command) against a real coordinator on loopback."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from compute_swarm.desktop import token_store
from compute_swarm.desktop.activity import Activity
from compute_swarm.desktop.agent import NodeAgent
from compute_swarm.desktop.node_stopped import InviteCodeRefused, UnsupportedVersion
from tests.coordinator.test_admission import coordinator_with, ops
from tests.desktop.test_messages import inventory
from tests.swarm_processes import Coordinator, Node, run_cli, wait_for

pytestmark = pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager")


@pytest.fixture
def invitation(tmp_path: Path):
    server = coordinator_with(tmp_path / "coordinator", SWARM_NODE_ADMISSION="invite")
    yield server
    server.stop()


def create_invite(coordinator: Coordinator) -> str:
    printed = run_cli("admin", "create-invite", "--data-dir", str(coordinator.data_dir), "--uses", "1")
    assert printed.returncode == 0, printed.stderr
    return printed.stdout.strip().splitlines()[-1]


def node_agent(coordinator: Coordinator, data_dir: Path, **options) -> NodeAgent:
    return NodeAgent(
        coordinator.url,
        data_dir,
        name="gaming-pc",
        probe=lambda check_torch: inventory(),
        activity=lambda: Activity(user_idle_seconds=None, fullscreen_application=None),
        inference_slots=0,
        **options,
    )


async def until(condition, timeout: float, what: str) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.05)


def test_the_agent_asks_for_an_invite_code_and_registers_once_given_a_good_one(
    invitation: Coordinator, tmp_path: Path
) -> None:
    async def scenario() -> None:
        agent = node_agent(invitation, tmp_path / "node", wait_for_invite_code=True)
        running = asyncio.create_task(agent.run())
        try:
            await until(lambda: agent.status.invite_code_wanted == "missing", 30, "the refusal")
            assert "invite code" in agent.status.problem and not agent.status.connected
            assert not running.done()  # waiting for a code, not stopped

            for typed, said in (("   ", "type the invite code"), ("x" * 101, "at most 100 characters")):
                with pytest.raises(ValueError, match=said):
                    agent.set_invite_code(typed)
            agent.set_invite_code("swarm-invite-guessed")
            await until(lambda: agent.status.invite_code_wanted == "refused", 15, "the wrong code's refusal")
            assert "unknown, used up or expired" in agent.status.problem

            # Pasted with the line break a chat window adds.
            agent.set_invite_code(create_invite(invitation) + "\n")
            await until(lambda: agent.status.connected, 15, "the connection")
            assert agent.status.invite_code_wanted is None and agent.status.problem is None
            assert agent.status.standing is not None and agent.status.standing.state == "active"
            stored = token_store.load(agent.coordinator, tmp_path / "node")
            assert stored is not None and stored.node_id == agent.status.node_id
        finally:
            agent.stop()
            await asyncio.wait_for(running, 15)

    asyncio.run(scenario())


def test_without_someone_to_ask_the_agent_and_the_node_command_say_to_give_invite_code(
    invitation: Coordinator, tmp_path: Path
) -> None:
    with pytest.raises(InviteCodeRefused) as refused:
        asyncio.run(asyncio.wait_for(node_agent(invitation, tmp_path / "agent").run(), 30))
    assert not refused.value.code_given and "invite code" in refused.value.detail

    node = ["node", "--coordinator", invitation.url, "--data-dir", str(tmp_path / "node")]
    uninvited = run_cli(*node, environment={"SWARM_INVITE_CODE": ""})
    assert uninvited.returncode == 1, uninvited.stderr
    assert "admits computers by invitation" in uninvited.stderr
    assert "run again with --invite-code CODE (or set SWARM_INVITE_CODE)" in uninvited.stderr
    guessed = run_cli(*node, "--invite-code", "swarm-invite-guessed")
    assert guessed.returncode == 1, guessed.stderr
    assert "refused the invite code" in guessed.stderr and "--invite-code" in guessed.stderr
    for typed, said in (("  ", "type the invite code"), ("x" * 101, "at most 100 characters")):
        bad = run_cli(*node, "--invite-code", typed)
        assert bad.returncode == 2 and "--invite-code: " in bad.stderr and said in bad.stderr
    assert token_store.load(invitation.url, tmp_path / "node") is None


def test_the_agent_hears_it_waits_for_approval_and_hears_at_once_when_it_is_approved(
    tmp_path: Path,
) -> None:
    coordinator = coordinator_with(
        tmp_path / "coordinator", SWARM_NODE_ADMISSION="approval", SWARM_SWEEP_INTERVAL_SECONDS="60"
    )

    async def scenario() -> None:
        agent = node_agent(coordinator, tmp_path / "node")
        running = asyncio.create_task(agent.run())
        try:
            await until(lambda: agent.status.connected, 30, "the connection")
            standing = agent.status.standing
            assert standing is not None and standing.state == "awaiting_approval"
            assert "approves each new computer" in standing.reason
            approved = await asyncio.to_thread(
                ops, coordinator, f"/api/ops/nodes/{agent.status.node_id}/approve"
            )
            assert approved.status_code == 200
            await until(lambda: agent.status.standing.state == "active", 5, "the approval")
            assert agent.status.connected  # told on the same connection
        finally:
            agent.stop()
            await asyncio.wait_for(running, 15)

    try:
        asyncio.run(scenario())
    finally:
        coordinator.stop()


def test_the_node_command_says_it_waits_for_the_operator_and_when_it_is_let_in(tmp_path: Path) -> None:
    coordinator = coordinator_with(tmp_path / "coordinator", SWARM_NODE_ADMISSION="approval")
    node = Node(coordinator, tmp_path / "node")
    try:
        node.start()
        wait_for(
            lambda: "waiting for the swarm operator to approve this computer" in node.log(), 90, "the wait"
        )
        assert "waiting for jobs" not in node.log()
        credentials = token_store.load(coordinator.url, tmp_path / "node")
        assert credentials is not None
        # Ops' CLI writes from another process: the coordinator finds it at its next sweep.
        approved = run_cli(
            "admin", "approve-node", "--data-dir", str(coordinator.data_dir), credentials.node_id
        )
        assert approved.returncode == 0, approved.stderr
        wait_for(lambda: "lets this computer take work now" in node.log(), 15, "the approval")
    finally:
        node.stop()
        coordinator.stop()


def test_an_app_older_than_the_coordinator_takes_stops_and_names_the_sell_page(tmp_path: Path) -> None:
    coordinator = coordinator_with(
        tmp_path / "coordinator", SWARM_NODE_ADMISSION="open", SWARM_MINIMUM_AGENT_VERSION="99.0"
    )
    try:
        agent = node_agent(coordinator, tmp_path / "node")
        with pytest.raises(UnsupportedVersion) as stopped:
            asyncio.run(asyncio.wait_for(agent.run(), 60))
        assert stopped.value.download_page == f"{coordinator.url}/sell"
        assert "older than the oldest this coordinator takes, 99.0" in str(stopped.value)
        assert f"install the version it offers at {coordinator.url}/sell" in str(stopped.value)
    finally:
        coordinator.stop()


def test_an_app_older_than_the_latest_is_told_an_update_is_available(tmp_path: Path) -> None:
    coordinator = coordinator_with(
        tmp_path / "coordinator", SWARM_NODE_ADMISSION="open", SWARM_LATEST_AGENT_VERSION="99.0"
    )

    async def scenario() -> None:
        agent = node_agent(coordinator, tmp_path / "node")
        running = asyncio.create_task(agent.run())
        try:
            await until(lambda: agent.status.connected, 60, "the welcome")
            assert agent.status.newer_version == "99.0"
        finally:
            agent.stop()
            await asyncio.wait_for(running, 30)

    try:
        asyncio.run(scenario())
    finally:
        coordinator.stop()
