"""A job submitted while nothing waits in the queue is leased to a free node in the transaction that
queues it (Submissions.submit_async with the dispatcher's reservation), and never past a job queued
before it. In-process: a real database, leases and dispatcher, and nodes whose sockets are lists."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import pytest

from compute_swarm import protocol
from compute_swarm.coordinator.domain.effects import WakeDispatcher
from compute_swarm.coordinator.domain.lifecycle import LEASED, QUEUED
from compute_swarm.coordinator.service import accounts
from compute_swarm.coordinator.service.catalogue import Catalogue
from compute_swarm.coordinator.service.leases import Leases
from compute_swarm.coordinator.service.node_accounts import NodeAccounts
from compute_swarm.coordinator.service.submissions import JobError, Submissions
from compute_swarm.coordinator.service.verifier import Verifier
from compute_swarm.coordinator.settings import Settings
from compute_swarm.coordinator.store.artifacts import ArtifactStore
from compute_swarm.coordinator.store.tables import Job
from compute_swarm.coordinator.transport.hub.dispatcher import Dispatcher
from compute_swarm.coordinator.transport.hub.registry import Connection, Registry
from compute_swarm.coordinator.transport.metrics import Metrics
from tests.coordinator.test_effects import SPEC, buyer_with_a_dataset
from tests.coordinator.test_node_socket import TELEMETRY


class Swarm:
    """The services a submission and a dispatch round use, around one database."""

    def __init__(self, database, tmp_path):
        settings = Settings(data_dir=tmp_path)
        verifier = Verifier(settings, ArtifactStore(settings.artifacts_dir))
        catalogue = Catalogue(database)
        self.database = database
        self.leases = Leases(database, settings, verifier, catalogue)
        self.metrics = Metrics()
        self.registry = Registry(self.metrics, slot_freed=lambda: self.dispatcher.wake())
        self.dispatcher = Dispatcher(
            self.registry, self.leases, NodeAccounts(database, verifier), settings, self.metrics
        )
        self.submissions = Submissions(
            database, settings, catalogue, leases=self.leases, placement=self.dispatcher
        )
        self.buyer_id = buyer_with_a_dataset(database, "leasing", 10_000_000)
        self.spec = {**SPEC, "dataset": "file_leasing"}
        catalogue.get(SPEC["base_model"])  # read once, as the first quote reads it
        self.sent: dict[str, list[dict]] = {}

    def connect(self, name: str) -> Connection:
        """A node with a free slot (registered in the database, as the hub's `connect` leaves it)."""
        with self.database.transaction() as session:
            node, _ = accounts.register_node(session, name)
        sent = self.sent.setdefault(node.id, [])

        async def send_text(text: str) -> None:
            sent.append(json.loads(text))

        async def close(_code: int, _reason: str) -> None:
            pass

        telemetry = protocol.Telemetry.model_validate_json(json.dumps(TELEMETRY))
        connection = Connection(
            node_id=node.id,
            send_text=send_text,
            close=close,
            hello=protocol.Hello(
                protocol_version=protocol.PROTOCOL_VERSION, agent_version="test", telemetry=telemetry
            ),
            telemetry=telemetry,
            accepting_jobs=True,
        )
        self.registry.add(connection)
        return connection

    def leases_sent(self, connection: Connection) -> list[str]:
        return [message["job_id"] for message in self.sent[connection.node_id] if message["type"] == "lease"]

    def state(self, job_id: str) -> str:
        with self.database.reading() as session:
            return session.get_one(Job, job_id).state


async def settle() -> None:
    """Let the leases handed over be sent (each is a task of its own)."""
    for _ in range(5):
        await asyncio.sleep(0)


def test_a_job_submitted_to_an_idle_swarm_is_leased_in_the_transaction_that_queues_it(database, tmp_path):
    swarm = Swarm(database, tmp_path)

    async def scenario() -> None:
        node = swarm.connect("idle")
        assert await swarm.dispatcher.dispatch_once() == 0  # the queue read, and empty
        groups = database.groups_committed

        job = await swarm.submissions.submit_async(swarm.buyer_id, swarm.spec, None)
        await settle()

        assert job.state == LEASED and job.node_id == node.node_id
        assert swarm.state(job.id) == LEASED
        assert database.groups_committed == groups + 1, "one commit queued it and leased it"
        assert swarm.leases_sent(node) == [job.id]
        assert list(node.leases.values()) == [job.id] and node.reserved == 0
        assert node.node_id not in swarm.registry.free
        assert WakeDispatcher() not in database.carried[-1:], "nothing left for a dispatch round"
        assert swarm.metrics.leases_on_submission._value.get() == 1

    asyncio.run(scenario())


def test_a_submission_never_passes_a_job_queued_before_it(database, tmp_path):
    swarm = Swarm(database, tmp_path)

    async def scenario() -> None:
        node = swarm.connect("only")
        assert await swarm.dispatcher.dispatch_once() == 0
        # Queued by another path (a thread's submission, a job put back): the hub hears of it.
        older = await asyncio.to_thread(swarm.submissions.submit, swarm.buyer_id, swarm.spec, None)
        swarm.dispatcher.job_queued()

        newer = await swarm.submissions.submit_async(swarm.buyer_id, swarm.spec, None)
        assert newer.state == QUEUED, "the queue holds older work: the round leases it first"
        assert await swarm.dispatcher.dispatch_once() == 1
        assert swarm.leases_sent(node) == [older.id]
        assert swarm.state(newer.id) == QUEUED

    asyncio.run(scenario())


def test_a_refused_submission_frees_the_node_reserved_for_it(database, tmp_path):
    swarm = Swarm(database, tmp_path)
    poor = buyer_with_a_dataset(database, "poor", 1)

    async def scenario() -> None:
        node = swarm.connect("kept")
        assert await swarm.dispatcher.dispatch_once() == 0
        with pytest.raises(JobError) as refused:
            await swarm.submissions.submit_async(poor, {**SPEC, "dataset": "file_poor"}, None)
        assert refused.value.status_code == 402
        assert node.reserved == 0 and node.node_id in swarm.registry.free

        job = await swarm.submissions.submit_async(swarm.buyer_id, swarm.spec, None)
        await settle()
        assert job.state == LEASED and swarm.leases_sent(node) == [job.id]

    asyncio.run(scenario())


def test_a_round_keeps_the_nodes_it_planned_while_their_leases_commit(database, tmp_path):
    swarm = Swarm(database, tmp_path)
    free_while_leasing: list[set[str]] = []
    lease = swarm.leases.lease

    async def watched_lease(assignments):
        free_while_leasing.append(set(swarm.registry.free))
        return await lease(assignments)

    swarm.leases.lease = watched_lease  # type: ignore[method-assign]

    async def scenario() -> None:
        planned, spare = swarm.connect("planned"), swarm.connect("spare")
        job = await asyncio.to_thread(swarm.submissions.submit, swarm.buyer_id, swarm.spec, None)
        swarm.dispatcher.job_queued()
        assert await swarm.dispatcher.dispatch_once() == 1
        (leased_to,) = [node for node in (planned, spare) if swarm.leases_sent(node) == [job.id]]
        (other,) = {planned, spare} - {leased_to}
        # While its lease committed, the planned node was not free: a submission then could not take it.
        assert free_while_leasing == [{other.node_id}]
        assert leased_to.reserved == 0 and set(swarm.registry.free) == {other.node_id}

    asyncio.run(scenario())


def test_a_job_whose_real_needs_do_not_fit_the_reserved_node_stays_queued(database, tmp_path):
    swarm = Swarm(database, tmp_path)

    async def scenario() -> None:
        node = swarm.connect("small")
        too_small = dataclasses.replace(node.snapshot, memory_bytes=1 << 20)
        with database.transaction() as session:
            job = swarm.submissions._queueing(swarm.buyer_id, swarm.spec, None, None)(session)
            assert swarm.leases.lease_on_submission(session, job, too_small) is None
        assert swarm.state(job.id) == QUEUED
        assert database.carried[-1] == WakeDispatcher(), "the dispatcher is told of it"

    asyncio.run(scenario())


def test_the_work_of_a_cancelled_caller_still_reports_its_commit(database):
    reported: list[bool] = []

    async def scenario() -> None:
        waiting = asyncio.ensure_future(
            database.grouped_async(lambda session: session.get(Job, "none"), when_done=reported.append)
        )
        await asyncio.sleep(0)
        waiting.cancel()
        for _ in range(200):
            if reported:
                break
            await asyncio.sleep(0.01)

    asyncio.run(scenario())
    assert reported == [True]
