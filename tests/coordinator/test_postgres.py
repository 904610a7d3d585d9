"""The same migrations and the same job and ledger code on PostgreSQL (a throwaway server from the
`pgserver` wheel), as ops run it when a swarm outgrows one SQLite file."""

from __future__ import annotations

import asyncio
import hashlib

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from compute_swarm import protocol
from compute_swarm.coordinator.service import accounts
from compute_swarm.coordinator.service.leases import Leases
from compute_swarm.coordinator.service.reports import Reports
from compute_swarm.coordinator.service.submissions import Submissions
from compute_swarm.coordinator.service.verifier import Verifier
from compute_swarm.coordinator.settings import Settings
from compute_swarm.coordinator.store import ledger
from compute_swarm.coordinator.store.artifacts import ArtifactStore
from compute_swarm.coordinator.store.database import Database
from compute_swarm.coordinator.store.tables import Artifact, ArtifactHolder, Base, File, Upload

pgserver = pytest.importorskip("pgserver", reason="PostgreSQL tests need the pgserver wheel (the dev extra)")
pytest.importorskip("psycopg", reason="PostgreSQL tests need psycopg (the dev extra)")


@pytest.fixture(scope="module")
def database(tmp_path_factory):
    server = pgserver.get_server(tmp_path_factory.mktemp("postgres"), cleanup_mode="stop")
    database = Database(server.get_uri().replace("postgresql://", "postgresql+psycopg://", 1))
    database.upgrade()
    yield database
    database.close()
    server.cleanup()


def test_migrations_build_the_declared_schema(database):
    database.upgrade()
    with database.engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []


def test_a_job_is_submitted_leased_completed_and_paid_once(database, tmp_path):
    settings = Settings(data_dir=tmp_path)
    store = ArtifactStore(settings.artifacts_dir)
    verifier = Verifier(settings, store)
    submissions, leases = Submissions(database, settings), Leases(database, settings, verifier)
    reports = Reports(database, settings, store, verifier, model_file=lambda name: tmp_path / name)
    dataset = b'{"prompt": "hi", "completion": "ahoy"}\n' * 10
    sha256 = hashlib.sha256(dataset).hexdigest()
    with database.transaction() as session:
        buyer, _ = accounts.create_buyer(session, "pg-buyer", 5_000_000)
        node, _ = accounts.register_node(session, "pg-node")
        session.add(Artifact(sha256=sha256, size=len(dataset), created_at=0.0))
        session.flush()
        session.add(File(id="file_pg", buyer_id=buyer.id, sha256=sha256, filename="d.jsonl", size=len(dataset),
                         purpose="dataset", lines=10, created_at=0.0))  # fmt: skip

    job = submissions.submit(
        buyer.id, {"base_model": "smollm2-135m-instruct", "dataset": "file_pg", "max_steps": 2}, None
    )
    (grant,) = asyncio.run(leases.lease([(job.id, node.id)]))
    result_sha256 = "ab" * 32
    with database.transaction() as session:  # what a finished upload of the node's result leaves
        session.add(Artifact(sha256=result_sha256, size=3, created_at=0.0))
        session.flush()
        session.add(ArtifactHolder(sha256=result_sha256, holder=f"node:{node.id}"))
        session.add(Upload(id="upload_0123456789abcdef", holder=f"node:{node.id}", sha256=result_sha256, size=3,
                           received=3, purpose="result", job_id=job.id, lease_id=grant.message.lease_id,
                           created_at=0.0, completed_at=0.0))  # fmt: skip
    report = protocol.JobResult(job_id=job.id, lease_id=grant.message.lease_id, sha256=result_sha256, steps=2)
    assert reports.result(node.id, report).accepted
    assert not reports.result(node.id, report).accepted
    with database.transaction() as session:
        assert ledger.balance(session, ledger.buyer_account(buyer.id)) == 5_000_000 - job.price_micro
        assert (
            ledger.balance(session, ledger.node_pending_account(node.id))
            == job.price_micro - job.price_micro // 10
        )
        assert ledger.total(session) == 0


def test_concurrent_submissions_cannot_overspend(database, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from compute_swarm.coordinator.domain import pricing
    from compute_swarm.coordinator.service.submissions import JobError
    from compute_swarm.engine.jobs import CATALOGUE, parse_job_spec

    service = Submissions(database, Settings(data_dir=tmp_path))
    spec = {"base_model": "smollm2-135m-instruct", "dataset": "file_race", "max_steps": 2}
    price = pricing.price_micro(
        parse_job_spec({"type": "lora", **spec}), CATALOGUE["smollm2-135m-instruct"], 10
    )
    dataset_sha256 = hashlib.sha256(b"race").hexdigest()
    with database.transaction() as session:
        buyer, _ = accounts.create_buyer(session, "racer", price)  # enough for exactly one job
        session.add(Artifact(sha256=dataset_sha256, size=4, created_at=0.0))
        session.flush()
        session.add(File(id="file_race", buyer_id=buyer.id, sha256=dataset_sha256, filename="d.jsonl", size=4,
                         purpose="dataset", lines=10, created_at=0.0))  # fmt: skip

    def attempt(_: int) -> bool:
        try:
            service.submit(buyer.id, spec, None)
            return True
        except JobError as error:
            assert error.status_code == 402
            return False

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(attempt, range(8)))
    assert outcomes.count(True) == 1
    with database.transaction() as session:
        assert ledger.balance(session, ledger.buyer_account(buyer.id)) == 0
