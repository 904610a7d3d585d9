"""Writes that scale: group commit (Database.grouped; submissions that arrive together share one commit,
each caller returns only once its work is durable, one caller's failure rolls back its own work only),
a node's hello in one transaction, and API keys kept in memory for at most a second."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time

from sqlalchemy import event, func, select

from compute_swarm import protocol
from compute_swarm.coordinator.domain.effects import WakeDispatcher
from compute_swarm.coordinator.service import accounts
from compute_swarm.coordinator.service.accounts import BuyerKeys
from compute_swarm.coordinator.service.leases import Leases
from compute_swarm.coordinator.service.node_accounts import NodeAccounts
from compute_swarm.coordinator.service.submissions import JobError, Submissions
from compute_swarm.coordinator.service.verifier import Verifier
from compute_swarm.coordinator.settings import Settings
from compute_swarm.coordinator.store.artifacts import ArtifactStore
from compute_swarm.coordinator.store.database import Database, after_commit
from compute_swarm.coordinator.store.tables import ApiKey, Artifact, Job, Node
from tests.coordinator.test_effects import buyer_with_a_dataset

SPEC = {"base_model": "smollm2-135m-instruct", "dataset": "file_{name}", "max_steps": 2}
CALLERS = 24


def write_commits(database: Database) -> list:
    """A list that gains an item with each commit of a writing transaction from now on (reads, which
    also end in a commit, are not counted)."""
    commits: list = []

    def count(connection) -> None:
        if not connection.get_execution_options().get("read_only"):
            commits.append(1)

    event.listen(database.engine, "commit", count)
    return commits


def spec_for(name: str) -> dict:
    return {**SPEC, "dataset": f"file_{name}"}


def run_together(database: Database, callers: list) -> list:
    """Start every caller while the write lock is held, so they all queue, then let the database go:
    the first caller's work is a group of its own, and the rest commit in the group after it."""
    outcomes: list = [None] * len(callers)

    def call(index: int) -> None:
        outcomes[index] = _outcome(callers[index])

    def wait_for(condition) -> None:
        deadline = time.monotonic() + 10
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert condition()

    taken: list = []  # the groups the writer took
    commit_group = database._commit_group

    def taking(group) -> None:
        taken.append(len(group))
        commit_group(group)

    threads = [threading.Thread(target=call, args=(index,)) for index in range(len(callers))]
    database._commit_group = taking
    with database._write_lock:
        groups_before = database.groups_committed
        # The writer takes the first caller's work as a group of one and waits for the lock with it;
        # the others queue behind it.
        threads[0].start()
        wait_for(lambda: taken == [1])
        for thread in threads[1:]:
            thread.start()
        wait_for(lambda: len(database._group_waiting) == len(callers) - 1)
    for thread in threads:
        thread.join(10)
    del database._commit_group
    assert taken == [1, len(callers) - 1]
    assert database.groups_committed - groups_before == 2
    return outcomes


def test_submissions_that_arrive_together_commit_together_and_each_is_durable_when_it_returns(
    database, tmp_path
):
    submissions = Submissions(database, Settings(data_dir=tmp_path))
    names = [f"buyer{index}" for index in range(CALLERS)]
    buyers = {name: buyer_with_a_dataset(database, name, 10_000 * 10**6) for name in names}
    commits = write_commits(database)

    jobs = run_together(
        database,
        [lambda name=name: submissions.submit(buyers[name], spec_for(name), None) for name in names],
    )

    assert all(isinstance(job, Job) for job in jobs), jobs
    assert len(commits) == 2, "two commits (two fsyncs) for all the submissions"
    # Read from another connection, as after a crash: every job a caller was given is there.
    with sqlite3.connect(tmp_path / "swarm.db") as connection:
        stored = {row[0] for row in connection.execute("SELECT id FROM jobs")}
    assert stored == {job.id for job in jobs}
    assert database.carried.count(WakeDispatcher()) >= 1


def test_one_callers_failure_rolls_back_its_own_work_and_its_effects_only(database, tmp_path):
    submissions = Submissions(database, Settings(data_dir=tmp_path))
    rich = buyer_with_a_dataset(database, "rich", 10_000 * 10**6)
    poor = buyer_with_a_dataset(database, "poor", 0)

    def fails_after_writing(session):
        session.add(Artifact(sha256="f" * 64, size=1, created_at=0.0))
        session.flush()
        after_commit(session, "an effect of rolled-back work")
        raise RuntimeError("this caller's work fails")

    callers = [
        lambda: submissions.submit(rich, spec_for("rich"), None),
        lambda: submissions.submit(poor, spec_for("poor"), None),  # cannot pay
        lambda: database.grouped(fails_after_writing),
        lambda: submissions.submit(rich, spec_for("rich"), None),
    ]
    outcomes = run_together(database, callers)

    assert isinstance(outcomes[0], Job) and isinstance(outcomes[3], Job)
    assert isinstance(outcomes[1], JobError) and outcomes[1].status_code == 402
    assert isinstance(outcomes[2], RuntimeError)
    with database.reading() as session:
        assert session.get(Artifact, "f" * 64) is None
        assert session.scalar(select(func.count()).select_from(Job).where(Job.buyer_id == poor)) == 0
        assert session.scalar(select(func.count()).select_from(Job).where(Job.buyer_id == rich)) == 2
    assert "an effect of rolled-back work" not in database.carried


def test_a_refused_submission_is_refused_before_it_writes_so_its_group_is_not_run_twice(database, tmp_path):
    # A refusal that wrote first would roll back its whole group and run the others again: a buyer
    # with no credit could then make every group of the moment run twice.
    submissions = Submissions(database, Settings(data_dir=tmp_path))
    rich = buyer_with_a_dataset(database, "rich", 10_000 * 10**6)
    poor = buyer_with_a_dataset(database, "poor", 0)
    rollbacks: list = []
    event.listen(database.engine, "rollback", lambda _connection: rollbacks.append(1))

    outcomes = run_together(
        database,
        [
            lambda: submissions.submit(rich, spec_for("rich"), None),
            lambda: submissions.submit(poor, spec_for("poor"), None),
            lambda: submissions.submit(poor, {**spec_for("poor"), "dataset": "file_nothing"}, None),
            lambda: submissions.submit(rich, spec_for("rich"), None),
        ],
    )

    assert [type(outcome) for outcome in outcomes] == [Job, JobError, JobError, Job]
    assert [outcome.status_code for outcome in outcomes[1:3]] == [402, 422]
    assert rollbacks == [], "no group was rolled back"
    with database.reading() as session:
        assert session.scalar(select(func.count()).select_from(Job).where(Job.buyer_id == rich)) == 2


def test_a_failed_commit_fails_every_caller_of_its_group(database, tmp_path):
    submissions = Submissions(database, Settings(data_dir=tmp_path))
    buyer = buyer_with_a_dataset(database, "buyer", 10_000 * 10**6)

    def refuse(_session):
        raise OSError("disk full")

    event.listen(database._sessions, "before_commit", refuse)
    try:
        outcomes = [
            outcome
            for outcome in (
                _outcome(lambda: submissions.submit(buyer, spec_for("buyer"), None)) for _ in range(2)
            )
        ]
    finally:
        event.remove(database._sessions, "before_commit", refuse)
    assert all(isinstance(outcome, OSError) for outcome in outcomes), outcomes
    with database.reading() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 0
    assert isinstance(submissions.submit(buyer, spec_for("buyer"), None), Job), "and the next group commits"


def _outcome(call):
    try:
        return call()
    except Exception as error:
        return error


def test_a_nodes_hello_is_one_transaction_that_keeps_its_job_and_stops_a_stale_one(database, tmp_path):
    settings = Settings(data_dir=tmp_path)
    leases = Leases(database, settings, Verifier(settings, ArtifactStore(settings.artifacts_dir)))
    node_accounts = NodeAccounts(database, leases.verifier)
    submissions = Submissions(database, settings)
    buyer = buyer_with_a_dataset(database, "buyer", 10_000 * 10**6)
    with database.transaction() as session:
        node, _ = accounts.register_node(session, "greeted")
    job = submissions.submit(buyer, spec_for("buyer"), None)
    (grant,) = asyncio.run(leases.lease([(job.id, node.id)]))
    writes = write_commits(database)

    held = protocol.LeaseReference(job_id=job.id, lease_id=grant.message.lease_id)
    stale = protocol.LeaseReference(job_id=job.id, lease_id="lease_0000000000000000")
    telemetry = {
        "cpu": {"name": "cpu", "logical_cores": 2, "memory_total_bytes": 16 << 30,
                "memory_available_bytes": 12 << 30},
        "backends": ["cpu"],
    }  # fmt: skip
    hello = protocol.Hello.model_validate_json(
        json.dumps(
            {
                "type": "hello",
                "protocol_version": protocol.PROTOCOL_VERSION,
                "agent_version": "9.9.9",
                "telemetry": telemetry,
                "running": [held.model_dump(), stale.model_dump()],
            }
        )
    )
    greeting = asyncio.run(node_accounts.greet(node.id, hello, leases))

    assert writes == [1], "one committed transaction"
    assert greeting.kept == [held.lease_id]
    assert [stop.lease_id for stop in greeting.revoked] == [stale.lease_id]
    assert greeting.barred is not None and greeting.barred.state == "awaiting_approval"
    assert greeting.earnings.jobs_completed == 0
    with database.reading() as session:
        assert session.get(Node, node.id).description["agent_version"] == "9.9.9"


def test_a_revoked_api_key_stops_at_once_where_it_was_revoked_and_within_a_second_elsewhere(database):
    now = [0.0]
    here, elsewhere = (BuyerKeys(database, clock=lambda: now[0]) for _ in range(2))  # two replicas
    with database.transaction() as session:
        buyer, api_key = accounts.create_buyer(session, "keys")
        key_id = session.scalar(select(ApiKey.id).where(ApiKey.buyer_id == buyer.id))
    assert here.buyer(api_key).id == buyer.id and elsewhere.buyer(api_key).id == buyer.id
    reads = []
    event.listen(database.engine, "begin", lambda _connection: reads.append(1))
    assert elsewhere.buyer(api_key).id == buyer.id and reads == [], "answered from memory"

    here.revoke(buyer.id, key_id)
    assert here.buyer(api_key) is None
    now[0] += 0.5
    assert elsewhere.buyer(api_key) is not None, "kept for up to a second"
    now[0] += BuyerKeys.KEPT_SECONDS
    assert elsewhere.buyer(api_key) is None
    assert here.buyer("swarm-buyer-not-a-key") is None
