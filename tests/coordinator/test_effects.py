"""Effects leave the database only with a commit: the services queue them in their transaction and the
transport hears of them once it committed (coordinator.domain.effects), never from a rollback."""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from compute_swarm.coordinator.domain.effects import StopOnNode, WakeDispatcher
from compute_swarm.coordinator.service import accounts
from compute_swarm.coordinator.service.leases import Leases
from compute_swarm.coordinator.service.submissions import JobError, Submissions
from compute_swarm.coordinator.service.verifier import Verifier
from compute_swarm.coordinator.settings import Settings
from compute_swarm.coordinator.store import ledger
from compute_swarm.coordinator.store.artifacts import ArtifactStore
from compute_swarm.coordinator.store.database import after_commit
from compute_swarm.coordinator.store.tables import Artifact, File

SPEC = {"base_model": "smollm2-135m-instruct", "dataset": "file_effects", "max_steps": 2}


def test_what_a_transaction_queues_is_carried_out_after_its_commit_and_dropped_with_a_rollback(database):
    with database.transaction() as session:
        after_commit(session, WakeDispatcher())
        assert database.carried == [], "nothing happens before the commit"
    assert database.carried == [WakeDispatcher()]
    with pytest.raises(RuntimeError), database.transaction() as session:
        after_commit(session, StopOnNode("node_1", "job_1", "lease_1", "cancelled"))
        raise RuntimeError("the transaction fails")
    assert database.carried == [WakeDispatcher()], "a rolled-back transaction's effects are dropped"


def buyer_with_a_dataset(database, name: str, credits: int) -> str:
    """A buyer with `credits` and a dataset file `file_<name>`."""
    sha256 = hashlib.sha256(b"effects").hexdigest()
    with database.transaction() as session:
        buyer, _ = accounts.create_buyer(session, name, credits)
        if session.get(Artifact, sha256) is None:
            session.add(Artifact(sha256=sha256, size=7, created_at=0.0))
            session.flush()
        session.add(File(id=f"file_{name}", buyer_id=buyer.id, sha256=sha256, filename="d.jsonl", size=7,
                         purpose="dataset", lines=10, created_at=0.0))  # fmt: skip
        return buyer.id


def test_a_submission_wakes_the_dispatcher_and_a_cancellation_stops_the_node_running_it(database, tmp_path):
    settings = Settings(data_dir=tmp_path)
    submissions = Submissions(database, settings)
    leases = Leases(database, settings, Verifier(settings, ArtifactStore(settings.artifacts_dir)))
    buyer_id = buyer_with_a_dataset(database, "effects", 10_000_000)
    with database.transaction() as session:
        node, _ = accounts.register_node(session, "effects-node")

    job = submissions.submit(buyer_id, SPEC, None)
    assert database.carried == [WakeDispatcher()]
    (grant,) = asyncio.run(leases.lease([(job.id, node.id)]))
    submissions.cancel(job.id)
    assert database.carried[-1] == StopOnNode(
        node.id, job.id, grant.message.lease_id, "the buyer cancelled the job"
    )
    with database.reading() as session:
        assert ledger.balance(session, ledger.buyer_account(buyer_id)) == 10_000_000, "refunded"

    # A refused submission (not enough credits) rolls back: no job, no hold, no wake-up.
    carried = len(database.carried)
    poor = buyer_with_a_dataset(database, "poor", 1)
    with pytest.raises(JobError) as refused:
        submissions.submit(poor, {**SPEC, "dataset": "file_poor"}, None)
    assert refused.value.status_code == 402
    assert len(database.carried) == carried
