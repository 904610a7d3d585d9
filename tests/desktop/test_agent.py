"""One node agent against a scripted coordinator on loopback (a fake engine runner and HTTP client, so
no training and no real coordinator), and the `compute-swarm node` command."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import tarfile
import threading
from pathlib import Path
from typing import ClassVar

import pytest
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

from compute_swarm import protocol
from compute_swarm.desktop import cli, token_store
from compute_swarm.desktop.agent import NodeAgent
from compute_swarm.desktop.node_stopped import NodeStopped
from compute_swarm.desktop.outbox import Reportable
from compute_swarm.engine import artifacts
from compute_swarm.engine.catalogue import fetch_catalogue_model, models_directory
from compute_swarm.engine.jobs import CATALOGUE, DEFAULT_MODEL, ChatMessage, Sampling
from compute_swarm.engine.records import CheckpointSaved, Completed, Failed, Log, Progress, Started
from compute_swarm.sdk.client import SwarmError
from tests.crashing_llama import CrashingLlama
from tests.desktop.test_messages import DATASET, DATASET_SHA256, inventory, lease_text, make_lease

# The model cache shared by the test run, read before conftest points SWARM_MODELS_DIR at an empty one.
SHARED_MODELS_DIRECTORY = models_directory()

# ---- one agent against a scripted coordinator


class FakeCoordinator:
    """A websocket endpoint that records what the node sends and lets the test speak for the coordinator."""

    def __init__(
        self,
        *,
        heartbeat_interval: float = 0.2,
        close_with: tuple[int, str] | None = None,
        auto_acknowledge: bool = False,
        credit_value: protocol.CreditValue | None = None,
    ):
        self.heartbeat_interval = heartbeat_interval
        self.credit_value = credit_value
        self.auto_acknowledge = auto_acknowledge
        self.close_with = close_with
        self.received: asyncio.Queue = asyncio.Queue()
        self.connections: asyncio.Queue = asyncio.Queue()
        self.authorizations: list[str | None] = []
        self.paths: list[str] = []
        self.close_codes: list[int | None] = []
        self.log: list[protocol.NodeMessage] = []  # everything received, in order

    async def handle(self, websocket) -> None:
        self.authorizations.append(websocket.request.headers.get("Authorization"))
        self.paths.append(websocket.request.path)
        if self.close_with is not None:
            await websocket.close(*self.close_with)
            return
        try:
            hello = protocol.parse_node_message(await websocket.recv())
            self.log.append(hello)
            await self.received.put(hello)
            welcome = protocol.Welcome(
                protocol_version=protocol.PROTOCOL_VERSION,
                node_id="node_1",
                heartbeat_interval_seconds=self.heartbeat_interval,
                lease_seconds=60.0,
                earnings=protocol.Earnings(pending_micro=0, available_micro=0, jobs_completed=0),
                standing=protocol.Standing(state="active"),
                credit_value=self.credit_value,
            )
            await websocket.send(welcome.model_dump_json())
            await self.connections.put(websocket)
            async for text in websocket:
                message = protocol.parse_node_message(text)
                self.log.append(message)
                await self.received.put(message)
                if self.auto_acknowledge and isinstance(message, Reportable):
                    await websocket.send(ack(message))
        except ConnectionClosed:
            pass
        self.close_codes.append(websocket.close_code)

    async def expect(self, kind: type, timeout: float = 5.0, **fields: object):
        """The next message of this type (with these field values), skipping heartbeats and others."""
        async with asyncio.timeout(timeout):
            while True:
                message = await self.received.get()
                if isinstance(message, kind) and all(getattr(message, k) == v for k, v in fields.items()):
                    return message


class FakeClient:
    """NodeClient's node half, in memory."""

    def __init__(self, coordinator: str, token: str):
        self.token = token
        self.downloads: list[str] = []
        self.uploads: list[tuple[str, str, bytes]] = []

    def download_artifact(self, sha256: str, destination: Path, *, size: int | None = None) -> Path:
        if sha256 == CATALOGUE[DEFAULT_MODEL].sha256:  # the lease's base model, once per node
            os.link(fetch_catalogue_model(DEFAULT_MODEL, SHARED_MODELS_DIRECTORY), destination)
            return Path(destination)
        self.downloads.append(sha256)
        assert sha256 == DATASET_SHA256 and size == len(DATASET)
        Path(destination).write_bytes(DATASET)
        return Path(destination)

    def transfer_offer(self, sha256: str, *, holding: bool = False):
        """A coordinator with peer transfer off: everything comes over HTTP."""
        raise SwarmError("peer transfer is off on this coordinator", status_code=404)

    def upload_artifact(self, path, *, purpose: str, job_id: str, lease_id: str) -> str:
        content = Path(path).read_bytes()
        self.uploads.append((purpose, job_id, content))
        return hashlib.sha256(content).hexdigest()

    def me(self) -> dict:
        return {
            "node_id": "node_1",
            "name": "n",
            "earnings": {"pending_micro": 5, "available_micro": 7, "jobs_completed": 1},
        }

    def close(self) -> None:
        pass


class FakeRunner:
    """Stands in for engine.runner.JobRunner: writes what train_lora writes, reports records, and
    waits for a cancel when told to."""

    instances: ClassVar[list[FakeRunner]] = []

    def __init__(
        self, spec, output_dir: Path, *, resume_from=None, device=None, wait_for_cancel: bool = False
    ):
        self.spec, self.output_dir, self.wait_for_cancel = spec, Path(output_dir), wait_for_cancel
        self.cancelled = threading.Event()
        self.checkpoint_reported = threading.Event()
        self.exit = threading.Event()  # the child lingers after its last record until this is set
        self.exit.set()
        self.killed = False
        FakeRunner.instances.append(self)

    def start(self) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / artifacts.WORKER_LOG).write_text("training\n")

    def cancel(self, grace_seconds: float = 60.0) -> None:
        self.cancelled.set()

    def kill(self) -> None:
        self.killed = True

    def records(self):
        assert Path(self.spec.dataset).read_bytes() == DATASET
        yield Started(process_id=1, device="cpu", total_steps=4, train_examples=8, eval_examples=1)
        for step in (1, 2):
            yield Progress(
                step=step,
                total_steps=4,
                loss=2.0 / step,
                learning_rate=1e-4,
                tokens_per_second=100.0,
                elapsed_seconds=step,
                eta_seconds=4 - step,
            )
        checkpoint = artifacts.checkpoint_directory(self.output_dir) / artifacts.checkpoint_name(2)
        checkpoint.mkdir(parents=True)
        (checkpoint / artifacts.CHECKPOINT_STATE_FILE).write_text('{"step": 2}')
        yield CheckpointSaved(step=2, path=str(checkpoint))
        # A checkpoint is worth uploading only while the job runs on: wait until it is reported.
        assert self.checkpoint_reported.wait(5)
        if self.wait_for_cancel:
            assert self.cancelled.wait(5)
            # As the trainer does: a checkpoint of the last step taken, then the end.
            checkpoint = artifacts.checkpoint_directory(self.output_dir) / artifacts.checkpoint_name(3)
            checkpoint.mkdir(parents=True)
            (checkpoint / artifacts.CHECKPOINT_STATE_FILE).write_text('{"step": 3}')
            yield CheckpointSaved(step=3, path=str(checkpoint))
            yield Failed(kind="cancelled", message="cancelled", checkpoint=str(checkpoint))
            return
        yield Log(level="warning", message="a warning from the engine")
        (self.output_dir / artifacts.ADAPTER_CONFIG_FILE).write_text("{}")
        (self.output_dir / artifacts.ADAPTER_WEIGHTS_FILE).write_bytes(b"weights")
        (self.output_dir / artifacts.METRICS_FILE).write_text(
            json.dumps({"spec": {"dataset": self.spec.dataset}})
        )
        yield Completed(
            output_dir=str(self.output_dir),
            steps=4,
            final_loss=0.5,
            eval_loss=0.6,
            train_tokens=64,
            seconds=1.5,
        )
        assert self.exit.wait(5)


class ZeroRandom(random.Random):
    def uniform(self, a: float, b: float) -> float:
        return a  # reconnect at once: the test is about what is sent, not when


def make_agent(tmp_path: Path, port: int, *, wait_for_cancel: bool = False, **options) -> NodeAgent:
    FakeRunner.instances.clear()
    return NodeAgent(
        f"http://127.0.0.1:{port}",
        tmp_path / "node",
        name="test-node",
        runner_factory=lambda *a, **k: FakeRunner(*a, wait_for_cancel=wait_for_cancel, **k),
        client_factory=FakeClient,
        register=lambda coordinator, name, invite_code=None: ("node_1", "swarm-node-token"),
        probe=lambda check_torch: inventory(),
        rng=ZeroRandom(),
        **options,
    )


def ack(report, accepted: bool = True, state: str = "running") -> str:
    return protocol.Acknowledged(
        job_id=report.job_id, lease_id=report.lease_id, about=report.type, accepted=accepted, state=state
    ).model_dump_json()


def test_agent_runs_a_lease_and_resends_its_result_after_a_reconnect(tmp_path: Path) -> None:
    async def scenario() -> None:
        coordinator = FakeCoordinator()
        server = await serve(coordinator.handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        changes = []
        agent = make_agent(tmp_path, port, on_change=changes.append)
        running = asyncio.create_task(agent.run())
        try:
            hello = await coordinator.expect(protocol.Hello)
            assert coordinator.authorizations == ["Bearer swarm-node-token"]
            assert coordinator.paths == ["/node"]
            assert (
                hello.accepting_jobs and hello.running == () and hello.telemetry.backends == ("cuda", "cpu")
            )
            saved = token_store.load(agent.coordinator, tmp_path / "node")
            assert saved is not None and saved.node_id == "node_1"
            await coordinator.expect(protocol.Heartbeat)
            assert agent.status.connected and agent.status.node_id == "node_1"

            websocket = await coordinator.connections.get()
            await websocket.send(make_lease(checkpoint_interval=2).model_dump_json())
            progress = await coordinator.expect(protocol.JobProgress)
            assert progress.job_id == "job_1"
            checkpoint = await coordinator.expect(protocol.CheckpointUploaded)
            assert checkpoint.step == 2
            FakeRunner.instances[0].checkpoint_reported.set()
            await websocket.send(ack(checkpoint))
            result = await coordinator.expect(protocol.JobResult)
            assert (result.steps, result.final_loss, result.train_tokens) == (4, 0.5, 64)

            client = agent._client
            assert client.downloads == [DATASET_SHA256]
            assert [purpose for purpose, _, _ in client.uploads] == ["checkpoint", "result"]
            archive = tmp_path / "result.tar"
            archive.write_bytes(client.uploads[-1][2])
            assert hashlib.sha256(archive.read_bytes()).hexdigest() == result.sha256
            with tarfile.open(archive) as tar:
                assert sorted(tar.getnames()) == [
                    artifacts.ADAPTER_CONFIG_FILE,
                    artifacts.ADAPTER_WEIGHTS_FILE,
                    artifacts.METRICS_FILE,
                ]
                metrics = json.load(tar.extractfile(artifacts.METRICS_FILE))
            assert metrics["spec"]["dataset"] == DATASET_SHA256  # not the seller's path
            assert agent.status.last_job.outcome == "completed" and agent.status.job is None

            # The coordinator goes away before acknowledging the result: it is sent again after reconnecting.
            await websocket.close(protocol.CloseCode.GOING_AWAY, "restarting")
            hello = await coordinator.expect(protocol.Hello)
            assert hello.running == ()
            resent = await coordinator.expect(protocol.JobResult)
            assert resent == result
            websocket = await coordinator.connections.get()
            job_directory = tmp_path / "node" / "jobs" / "job_1"
            assert (job_directory / "output").exists()
            await websocket.send(ack(resent, accepted=False, state="completed"))
            async with asyncio.timeout(5):
                while (job_directory / "output").exists():
                    await asyncio.sleep(0.02)
            assert (job_directory / artifacts.WORKER_LOG).read_text() == "training\n"

            assert await agent.earnings() == protocol.Earnings(
                pending_micro=5, available_micro=7, jobs_completed=1
            )
            assert any(status.job is not None and status.job.step == 2 for status in changes)
            assert {(s.job.attempt, s.job.max_attempts) for s in changes if s.job is not None} == {(1, 3)}
        finally:
            agent.stop()
            await asyncio.wait_for(running, 10)
            server.close()
        assert agent.status.stopped and not agent.status.connected

    asyncio.run(scenario())


def test_a_cancelled_lease_stops_the_job_and_a_pause_is_told_at_once(tmp_path: Path) -> None:
    async def scenario() -> None:
        coordinator = FakeCoordinator(heartbeat_interval=30.0, auto_acknowledge=True)
        server = await serve(coordinator.handle, "127.0.0.1", 0)
        agent = make_agent(tmp_path, server.sockets[0].getsockname()[1], wait_for_cancel=True)
        running = asyncio.create_task(agent.run())
        try:
            await coordinator.expect(protocol.Hello)
            websocket = await coordinator.connections.get()
            await websocket.send(make_lease().model_dump_json())
            await coordinator.expect(protocol.CheckpointUploaded)
            FakeRunner.instances[0].checkpoint_reported.set()
            # A second lease while busy is declined, and the unknown lease's cancel ignored.
            await websocket.send(make_lease(job_id="job_2", lease_id="lease_2").model_dump_json())
            declined = await coordinator.expect(protocol.JobFailure, job_id="job_2")
            assert declined.kind == "released" and "busy" in declined.message
            await websocket.send(
                protocol.Cancel(job_id="job_9", lease_id="lease_9", reason="x").model_dump_json()
            )

            agent.pause("a game started")
            heartbeat = await coordinator.expect(protocol.Heartbeat, timeout=2)
            assert not heartbeat.accepting_jobs
            assert heartbeat.running == (protocol.LeaseReference(job_id="job_1", lease_id="lease_1"),)
            assert not FakeRunner.instances[0].cancelled.is_set()  # a pause lets the job finish

            await websocket.send(
                protocol.Cancel(
                    job_id="job_1", lease_id="lease_1", reason="the buyer cancelled"
                ).model_dump_json()
            )
            failure = await coordinator.expect(protocol.JobFailure, job_id="job_1")
            assert failure.kind == "cancelled"
            assert FakeRunner.instances[0].cancelled.is_set()
            assert agent.status.last_job.outcome == "cancelled"
            # The lease was gone: nothing more of the job is uploaded for it.
            assert [purpose for purpose, _, _ in agent._client.uploads] == ["checkpoint"]
            assert not [
                m for m in coordinator.log if isinstance(m, protocol.CheckpointUploaded) and m.step == 3
            ]

            agent.resume()
            heartbeat = await coordinator.expect(protocol.Heartbeat, timeout=2)
            assert heartbeat.accepting_jobs and heartbeat.running == ()
        finally:
            agent.stop()
            await asyncio.wait_for(running, 10)
            server.close()

    asyncio.run(scenario())


def test_a_lease_naming_a_path_for_its_model_is_refused_without_downloading(tmp_path: Path) -> None:
    async def scenario() -> None:
        coordinator = FakeCoordinator(auto_acknowledge=True)
        server = await serve(coordinator.handle, "127.0.0.1", 0)
        agent = make_agent(tmp_path, server.sockets[0].getsockname()[1])
        running = asyncio.create_task(agent.run())
        try:
            await coordinator.expect(protocol.Hello)
            websocket = await coordinator.connections.get()
            await websocket.send(lease_text(spec={"base_model": "/etc/shadow"}))
            failure = await coordinator.expect(protocol.JobFailure)
            assert failure.kind == "invalid_spec" and "not the spec's base model" in failure.message
            assert agent._client.downloads == [] and FakeRunner.instances == []
        finally:
            agent.stop()
            await asyncio.wait_for(running, 10)
            server.close()

    asyncio.run(scenario())


def test_a_lease_whose_spec_does_not_validate_is_refused_and_the_connection_kept(tmp_path: Path) -> None:
    async def scenario() -> None:
        coordinator = FakeCoordinator(auto_acknowledge=True)
        server = await serve(coordinator.handle, "127.0.0.1", 0)
        agent = make_agent(tmp_path, server.sockets[0].getsockname()[1])
        running = asyncio.create_task(agent.run())
        try:
            await coordinator.expect(protocol.Hello)
            websocket = await coordinator.connections.get()
            unusable = json.loads(make_lease().model_dump_json())
            unusable["spec"]["rank"] = 0
            await websocket.send(json.dumps(unusable))
            failure = await coordinator.expect(protocol.JobFailure)
            assert (failure.job_id, failure.kind) == ("job_1", "invalid_spec") and "rank" in failure.message
            assert agent._client.downloads == [] and FakeRunner.instances == []
            # The same connection takes the next lease.
            await websocket.send(make_lease(job_id="job_2", lease_id="lease_2").model_dump_json())
            async with asyncio.timeout(10):
                while not FakeRunner.instances:
                    await asyncio.sleep(0.05)
            assert coordinator.connections.empty()
        finally:
            agent.stop()
            await asyncio.wait_for(running, 10)
            server.close()

    asyncio.run(scenario())


def test_a_refused_token_stops_the_agent_with_a_clear_error(tmp_path: Path) -> None:
    async def scenario() -> None:
        coordinator = FakeCoordinator(close_with=(protocol.CloseCode.UNAUTHORIZED, "token revoked"))
        server = await serve(coordinator.handle, "127.0.0.1", 0)
        agent = make_agent(tmp_path, server.sockets[0].getsockname()[1])
        try:
            with pytest.raises(NodeStopped, match=r"refused this node's token.*--forget"):
                await asyncio.wait_for(agent.run(), 10)
        finally:
            server.close()
        assert agent.status.stopped

    asyncio.run(scenario())


def test_the_agent_keeps_retrying_while_the_coordinator_is_down(tmp_path: Path) -> None:
    async def scenario() -> None:
        server = await serve(FakeCoordinator().handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        agent = make_agent(tmp_path, port)
        running = asyncio.create_task(agent.run())
        async with asyncio.timeout(5):
            while agent.status.problem is None:
                await asyncio.sleep(0.02)
        assert "cannot reach the coordinator" in agent.status.problem and not running.done()

        coordinator = FakeCoordinator()
        server = await serve(coordinator.handle, "127.0.0.1", port)
        try:
            await coordinator.expect(protocol.Hello)
        finally:
            agent.stop()
            await asyncio.wait_for(running, 10)
            server.close()

    asyncio.run(scenario())


def test_cli_forget_and_earnings_without_registration(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    parser = argparse.ArgumentParser()
    cli.register_commands(parser.add_subparsers(dest="command"))
    token_store.save(token_store.Credentials("http://localhost:9", "node_1", "t"), tmp_path)

    arguments = parser.parse_args(
        ["node", "--coordinator", "http://localhost:9/", "--data-dir", str(tmp_path), "--forget"]
    )
    assert arguments.handler(arguments) == 0
    assert token_store.load("http://localhost:9", tmp_path) is None

    arguments = parser.parse_args(
        ["node", "--coordinator", "http://localhost:9", "--data-dir", str(tmp_path), "--earnings"]
    )
    assert arguments.handler(arguments) == 1
    assert "has not registered" in capsys.readouterr().err


def test_a_result_acknowledged_before_the_child_exits_is_tidied_once_it_has(tmp_path: Path) -> None:
    async def scenario() -> None:
        coordinator = FakeCoordinator(heartbeat_interval=30.0, auto_acknowledge=True)
        server = await serve(coordinator.handle, "127.0.0.1", 0)
        agent = make_agent(tmp_path, server.sockets[0].getsockname()[1])
        running = asyncio.create_task(agent.run())
        output = tmp_path / "node" / "jobs" / "job_1" / "output"
        try:
            await coordinator.expect(protocol.Hello)
            websocket = await coordinator.connections.get()
            await websocket.send(make_lease().model_dump_json())
            async with asyncio.timeout(5):
                while not FakeRunner.instances:
                    await asyncio.sleep(0.01)
            runner = FakeRunner.instances[0]
            runner.exit.clear()
            runner.checkpoint_reported.set()
            await coordinator.expect(protocol.JobResult)
            await asyncio.sleep(0.2)  # the acknowledgement has arrived; the child is still exiting
            assert (output / artifacts.WORKER_LOG).exists()
            runner.exit.set()
            async with asyncio.timeout(5):
                while output.exists():
                    await asyncio.sleep(0.02)
            assert (output.parent / artifacts.WORKER_LOG).exists()
        finally:
            agent.stop()
            await asyncio.wait_for(running, 10)
            server.close()

    asyncio.run(scenario())


def test_a_new_lease_is_taken_once_the_last_job_is_reported_and_waits_for_its_child(tmp_path: Path) -> None:
    async def scenario() -> None:
        coordinator = FakeCoordinator(heartbeat_interval=30.0, auto_acknowledge=True)
        server = await serve(coordinator.handle, "127.0.0.1", 0)
        agent = make_agent(tmp_path, server.sockets[0].getsockname()[1])
        running = asyncio.create_task(agent.run())
        try:
            await coordinator.expect(protocol.Hello)
            websocket = await coordinator.connections.get()
            await websocket.send(make_lease().model_dump_json())
            async with asyncio.timeout(5):
                while not FakeRunner.instances:
                    await asyncio.sleep(0.01)
            first = FakeRunner.instances[0]
            first.exit.clear()
            first.checkpoint_reported.set()
            await coordinator.expect(protocol.JobResult, job_id="job_1")

            # The coordinator counts the node free now; the node takes the next lease but starts its
            # child only once the first one has exited.
            await websocket.send(make_lease(job_id="job_2", lease_id="lease_2").model_dump_json())
            await asyncio.sleep(0.2)
            assert len(FakeRunner.instances) == 1
            assert agent.status.job is not None and agent.status.job.job_id == "job_2"
            first.exit.set()
            async with asyncio.timeout(5):
                while len(FakeRunner.instances) < 2:
                    await asyncio.sleep(0.01)
            FakeRunner.instances[1].checkpoint_reported.set()
            await coordinator.expect(protocol.JobResult, job_id="job_2")
            assert not [message for message in coordinator.log if isinstance(message, protocol.JobFailure)]
        finally:
            agent.stop()
            await asyncio.wait_for(running, 10)
            server.close()

    asyncio.run(scenario())


def test_stopping_checkpoints_the_job_reports_it_and_closes_normally(tmp_path: Path) -> None:
    async def scenario() -> None:
        coordinator = FakeCoordinator(heartbeat_interval=30.0, auto_acknowledge=True)
        server = await serve(coordinator.handle, "127.0.0.1", 0)
        agent = make_agent(tmp_path, server.sockets[0].getsockname()[1], wait_for_cancel=True)
        running = asyncio.create_task(agent.run())
        try:
            await coordinator.expect(protocol.Hello)
            websocket = await coordinator.connections.get()
            await websocket.send(make_lease().model_dump_json())
            await coordinator.expect(protocol.CheckpointUploaded)
            FakeRunner.instances[0].checkpoint_reported.set()

            agent.stop()
            # First the node says it takes no more jobs, so the job is not leased straight back to it.
            heartbeat = await coordinator.expect(protocol.Heartbeat)
            assert not heartbeat.accepting_jobs
            # Its last checkpoint goes up before its end is reported, so another node resumes from it.
            checkpoint = await coordinator.expect(protocol.CheckpointUploaded)
            assert checkpoint.step == 3
            failure = await coordinator.expect(protocol.JobFailure)
            # Handed back for the node's own reasons: released, so it costs the buyer no attempt.
            assert (failure.kind, failure.message) == ("released", "the node is shutting down")
            await asyncio.wait_for(running, 10)
        finally:
            server.close()
        assert FakeRunner.instances[0].cancelled.is_set()
        assert coordinator.close_codes == [protocol.CloseCode.NORMAL]

    asyncio.run(scenario())


def test_pausing_with_stop_running_cancels_the_job_after_saying_so(tmp_path: Path) -> None:
    async def scenario() -> None:
        coordinator = FakeCoordinator(heartbeat_interval=30.0, auto_acknowledge=True)
        server = await serve(coordinator.handle, "127.0.0.1", 0)
        agent = make_agent(tmp_path, server.sockets[0].getsockname()[1], wait_for_cancel=True)
        running = asyncio.create_task(agent.run())
        try:
            await coordinator.expect(protocol.Hello)
            websocket = await coordinator.connections.get()
            await websocket.send(make_lease().model_dump_json())
            await coordinator.expect(protocol.CheckpointUploaded)
            FakeRunner.instances[0].checkpoint_reported.set()

            agent.pause("GPU at 90 °C", stop_running=True)
            heartbeat = await coordinator.expect(protocol.Heartbeat)
            assert not heartbeat.accepting_jobs
            assert (await coordinator.expect(protocol.CheckpointUploaded)).step == 3
            failure = await coordinator.expect(protocol.JobFailure)
            assert (failure.kind, failure.message) == (
                "released",
                "the seller paused the node (GPU at 90 °C)",
            )
            assert agent.status.paused and agent.status.pause_reason == "GPU at 90 °C"
            # Paused, the node declines a lease that crossed its heartbeat.
            await websocket.send(make_lease(job_id="job_2", lease_id="lease_2").model_dump_json())
            declined = await coordinator.expect(protocol.JobFailure, job_id="job_2")
            assert declined.kind == "released" and "paused" in declined.message
        finally:
            agent.stop()
            await asyncio.wait_for(running, 10)
            server.close()

    asyncio.run(scenario())


def test_a_model_that_crashes_llama_cpp_is_reported_at_once_and_refused_without_a_child(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, demo_gguf: Path
) -> None:
    pytest.importorskip("llama_cpp")
    llama = CrashingLlama(tmp_path / "llama")
    for name, value in llama.environment().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("SWARM_MODELS_DIR", str(demo_gguf.parent.parent))

    def chat(request_id: str) -> str:
        return protocol.InferenceRequest(
            request_id=request_id,
            model=DEFAULT_MODEL,
            model_file=protocol.ModelFiles.of(CATALOGUE[DEFAULT_MODEL], with_weights=False).gguf,
            messages=(ChatMessage(role="user", content="Hi"),),
            sampling=Sampling(max_tokens=4, temperature=0.0),
        ).model_dump_json()

    async def scenario() -> None:
        # Heartbeats a minute apart: one that comes sooner was sent because of the crash.
        coordinator = FakeCoordinator(heartbeat_interval=60.0)
        server = await serve(coordinator.handle, "127.0.0.1", 0)
        agent = make_agent(tmp_path, server.sockets[0].getsockname()[1], inference_slots=1)
        running = asyncio.create_task(agent.run())
        try:
            assert (await coordinator.expect(protocol.Hello)).crashed_models == ()
            websocket = await coordinator.connections.get()
            await websocket.send(chat("first"))
            crashed = await coordinator.expect(protocol.InferenceFailed, timeout=120, request_id="first")
            assert crashed.kind == "crashed" and "killed by SIGSEGV" in crashed.message
            heartbeat = await coordinator.expect(protocol.Heartbeat)
            report = (protocol.CrashedModel(model=DEFAULT_MODEL, message=crashed.message),)
            assert heartbeat.crashed_models == report and heartbeat.loaded_models == ()

            await websocket.send(chat("second"))
            refused = await coordinator.expect(protocol.InferenceFailed, request_id="second")
            assert (refused.kind, refused.message) == ("crashed", crashed.message)
            assert len(llama.starts()) == 1

            # A new connection hears of it in the hello, before any heartbeat.
            await websocket.close(protocol.CloseCode.GOING_AWAY, "restarting")
            assert (await coordinator.expect(protocol.Hello)).crashed_models == report
        finally:
            agent.stop()
            await asyncio.wait_for(running, 20)
            server.close()

    asyncio.run(scenario())
