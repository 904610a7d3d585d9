"""Two holds on one buyer's balance at the same moment, on a real PostgreSQL (a throwaway server from
the `pgserver` wheel), which runs transactions side by side: the balance must not be spent twice.

The race is forced, not hoped for: each hold is stopped just before it posts its ledger transaction
(after it has checked the balance) until the other hold has got there too, or is waiting for a row
lock, which is the only way the two may be kept apart.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import event, func, select, text

from compute_swarm.coordinator.domain import pricing
from compute_swarm.coordinator.service import accounts
from compute_swarm.coordinator.service.inference import InferenceError, InferenceService, ServedModel
from compute_swarm.coordinator.service.submissions import JobError, Submissions
from compute_swarm.coordinator.settings import Settings
from compute_swarm.coordinator.store import ledger
from compute_swarm.coordinator.store.database import Database
from compute_swarm.coordinator.store.tables import Artifact, File, LedgerEntry
from compute_swarm.engine.jobs import CATALOGUE, parse_job_spec

pgserver = pytest.importorskip("pgserver", reason="PostgreSQL tests need the pgserver wheel (the dev extra)")
pytest.importorskip("psycopg", reason="PostgreSQL tests need psycopg (the dev extra)")

MODEL = ServedModel("smollm2-135m-instruct", CATALOGUE["smollm2-135m-instruct"])
RENDEZVOUS_SECONDS = 30


@pytest.fixture(scope="module")
def database(tmp_path_factory):
    server = pgserver.get_server(tmp_path_factory.mktemp("postgres"), cleanup_mode="stop")
    database = Database(server.get_uri().replace("postgresql://", "postgresql+psycopg://", 1))
    database.upgrade()
    yield database
    database.close()
    server.cleanup()


class Rendezvous:
    """Holds each racing thread at its INSERT INTO ledger_transactions (a hold's post, made after the
    balance check) until the other racer arrives there too, or until some session of this database
    waits for a lock: then the other racer is kept out by a lock, which is what a correct hold does."""

    def __init__(self, database: Database, racers: int):
        self.database = database
        self.racers = racers
        self.arrived = 0
        self.threads: set[int] = set()
        self.lock = threading.Lock()

    def __call__(self, _connection, _cursor, statement: str, *_args) -> None:
        if threading.get_ident() not in self.threads or not statement.lstrip().upper().startswith(
            "INSERT INTO LEDGER_TRANSACTIONS"
        ):
            return
        with self.lock:
            self.arrived += 1
        deadline = time.monotonic() + RENDEZVOUS_SECONDS
        while time.monotonic() < deadline:
            with self.lock:
                if self.arrived >= self.racers:
                    return
            if self._a_session_waits_for_a_lock():
                return
            time.sleep(0.02)
        raise AssertionError("the other hold neither reached its post nor waited for a lock")

    def _a_session_waits_for_a_lock(self) -> bool:
        with self.database.engine.connect() as connection:
            return bool(
                connection.scalar(
                    text(
                        "SELECT count(*) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND wait_event_type = 'Lock'"
                    )
                )
            )

    def run(self, *calls: Callable[[], object]) -> list[object]:
        """Each call in its own thread, at once; what each returned or raised."""

        def racer(call: Callable[[], object]) -> object:
            with self.lock:
                self.threads.add(threading.get_ident())
            try:
                return call()
            except (InferenceError, JobError) as error:
                return error

        event.listen(self.database.engine, "before_cursor_execute", self)
        try:
            with ThreadPoolExecutor(len(calls)) as pool:
                return list(pool.map(racer, calls))
        finally:
            event.remove(self.database.engine, "before_cursor_execute", self)


def buyer_money(database: Database, buyer_id: str) -> tuple[int, int]:
    """The buyer's balance row and the sum of the buyer's ledger entries (they must agree)."""
    with database.reading() as session:
        entries = session.scalar(
            select(func.coalesce(func.sum(LedgerEntry.amount_micro), 0)).where(
                LedgerEntry.account == ledger.buyer_account(buyer_id)
            )
        )
        return ledger.balance(session, ledger.buyer_account(buyer_id)), int(entries)


def test_two_inference_holds_at_once_cannot_overdraw_the_balance(database, tmp_path):
    service = InferenceService(database, Settings(data_dir=tmp_path))
    max_tokens = 1000
    held = pricing.inference_price_micro(MODEL.base, 10 + max_tokens)
    # Enough for either request, not for both (the finding's 10 of 2 × 8 credits).
    start = held + held // 4
    with database.transaction() as session:
        buyer, _ = accounts.create_buyer(session, "two-requests", start)

    outcomes = Rendezvous(database, 2).run(
        lambda: service.open(buyer.id, MODEL, max_tokens=max_tokens, prompt_bound=10),
        lambda: service.open(buyer.id, MODEL, max_tokens=max_tokens, prompt_bound=10),
    )

    opened = [outcome for outcome in outcomes if isinstance(outcome, str)]
    refused = [outcome for outcome in outcomes if isinstance(outcome, InferenceError)]
    balance, entries = buyer_money(database, buyer.id)
    print(f"balance after two holds of {held} from {start}: {balance} (entries sum to {entries})")
    assert len(opened) == 1 and len(refused) == 1, outcomes
    assert refused[0].status_code == 402
    assert balance == entries == start - held >= 0


def test_a_job_and_a_request_at_once_take_turns(database, tmp_path):
    """The job path locks the buyer too, and the two kinds of hold never deadlock each other."""
    jobs = Submissions(database, Settings(data_dir=tmp_path))
    inference = InferenceService(database, Settings(data_dir=tmp_path))
    spec = {"base_model": "smollm2-135m-instruct", "dataset": "file_turns", "max_steps": 2}
    job_price = pricing.price_micro(
        parse_job_spec({"type": "lora", **spec}), CATALOGUE["smollm2-135m-instruct"], 10
    )
    max_tokens = 1000
    request_price = pricing.inference_price_micro(MODEL.base, 10 + max_tokens)
    start = job_price + request_price - 1
    dataset_sha256 = hashlib.sha256(b"turns").hexdigest()
    with database.transaction() as session:
        buyer, _ = accounts.create_buyer(session, "job-and-request", start)
        session.add(Artifact(sha256=dataset_sha256, size=5, created_at=0.0))
        session.flush()
        session.add(File(id="file_turns", buyer_id=buyer.id, sha256=dataset_sha256, filename="d.jsonl", size=5,
                         purpose="dataset", lines=10, created_at=0.0))  # fmt: skip

    outcomes = Rendezvous(database, 2).run(
        lambda: jobs.submit(buyer.id, spec, None),
        lambda: inference.open(buyer.id, MODEL, max_tokens=max_tokens, prompt_bound=10),
    )

    refused = [outcome for outcome in outcomes if isinstance(outcome, InferenceError | JobError)]
    assert len(refused) == 1, outcomes
    assert refused[0].status_code == 402
    spent = request_price if isinstance(refused[0], JobError) else job_price
    assert buyer_money(database, buyer.id) == (start - spent, start - spent)
