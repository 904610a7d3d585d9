"""A lease carries the buyer's spec relocated to content hashes (engine.jobs.relocated): the node never
sees the buyer's file id, and a stored spec that no longer validates is refunded, not sent."""

from __future__ import annotations

import asyncio
import hashlib

import pytest
from sqlalchemy import update

from compute_swarm.coordinator.service import accounts
from compute_swarm.coordinator.service.leases import Leases
from compute_swarm.coordinator.service.submissions import Submissions
from compute_swarm.coordinator.service.verifier import Verifier
from compute_swarm.coordinator.settings import Settings
from compute_swarm.coordinator.store import ledger
from compute_swarm.coordinator.store.artifacts import ArtifactStore
from compute_swarm.coordinator.store.database import Database
from compute_swarm.coordinator.store.tables import Artifact, File, Job
from compute_swarm.engine.jobs import LoraJobSpec

DATASET_SHA256 = hashlib.sha256(b"wire").hexdigest()
SPEC = {"base_model": "smollm2-135m-instruct", "dataset": "file_wire", "max_steps": 2, "rank": 4}


@pytest.fixture
def services(tmp_path):
    database = Database(f"sqlite:///{tmp_path / 'swarm.db'}")
    database.upgrade()
    settings = Settings(data_dir=tmp_path)
    verifier = Verifier(settings, ArtifactStore(settings.artifacts_dir))
    with database.transaction() as session:
        buyer, _ = accounts.create_buyer(session, "wire", 10_000_000)
        node, _ = accounts.register_node(session, "wire-node")
        session.add(Artifact(sha256=DATASET_SHA256, size=4, created_at=0.0))
        session.flush()
        session.add(File(id="file_wire", buyer_id=buyer.id, sha256=DATASET_SHA256, filename="d.jsonl", size=4,
                         purpose="dataset", lines=10, created_at=0.0))  # fmt: skip
    yield Submissions(database, settings), Leases(database, settings, verifier), buyer.id, node.id, database
    database.close()


def test_a_lease_names_the_data_by_content_hash_never_by_the_buyers_file_id(services):
    submissions, leases, buyer_id, node_id, _ = services
    job = submissions.submit(buyer_id, SPEC, None)
    (grant,) = asyncio.run(leases.lease([(job.id, node_id)]))
    spec = grant.message.spec
    assert isinstance(spec, LoraJobSpec) and spec.dataset == DATASET_SHA256 == grant.message.dataset_sha256
    assert (spec.base_model, spec.rank, spec.max_steps, spec.evaluate_adapter) == (
        "smollm2-135m-instruct", 4, 2, None
    )  # fmt: skip
    assert "file_wire" not in grant.message.model_dump_json()


def test_a_stored_spec_that_no_longer_validates_is_refunded_and_the_others_still_lease(services):
    submissions, leases, buyer_id, node_id, database = services
    stale = submissions.submit(buyer_id, SPEC, None)
    sound = submissions.submit(buyer_id, SPEC, None)
    with database.transaction() as session:
        # As an older coordinator might have stored it: a setting this one no longer knows.
        session.execute(
            update(Job).where(Job.id == stale.id).values(spec={**stale.spec, "retired_setting": 1})
        )
    grants = asyncio.run(leases.lease([(stale.id, node_id), (sound.id, node_id)]))
    assert [grant.message.job_id for grant in grants] == [sound.id]
    with database.reading() as session:
        refused = session.get(Job, stale.id)
        assert (refused.state, refused.error_kind) == (
            "failed",
            "invalid_spec",
        ) and "can no longer be sent to a node" in refused.error_message
        held = ledger.balance(session, ledger.buyer_account(buyer_id))
    assert held == 10_000_000 - sound.price_micro, "the refused job's hold is refunded"
