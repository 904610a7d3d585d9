"""The market's figures from a seeded history on a real SQLite file (nodes of two classes, jobs leased
and finished at known times, live requests, the ledger's charges), the seller's forecast computed from
them, and `GET /api/market` on a real coordinator process."""

from __future__ import annotations

import secrets
import time

import httpx
import pytest
from sqlalchemy import update

from compute_swarm import protocol
from compute_swarm.coordinator.service import accounts
from compute_swarm.coordinator.service.market import market_figures
from compute_swarm.coordinator.store import ledger
from compute_swarm.coordinator.store.database import Database
from compute_swarm.coordinator.store.tables import InferenceRequest, Job, JobEvent, LedgerTransaction, Node
from compute_swarm.desktop.electricity import Conversion, ElectricitySettings, cost_per_hour_micro
from compute_swarm.engine.jobs import DEFAULT_MODEL
from compute_swarm.market import CPU_ONLY, MarketFigures, forecast, hardware_class
from tests.swarm_processes import Coordinator

NOW = 2_000_000_000.0
HOUR = 3600
GIB = 1024**3
VALUE = protocol.CreditValue(currency="USD", micro_per_credit=500)
RTX_4070 = "NVIDIA GeForce RTX 4070 · 12 GB"


@pytest.fixture
def database(tmp_path):
    database = Database(f"sqlite:///{tmp_path / 'market.sqlite3'}")
    database.upgrade()
    yield database
    database.close()


def add_node(session, gpus: list[tuple[str, int]], *, last_seen: float = NOW - HOUR) -> str:
    node_id = f"node_{secrets.token_hex(4)}"
    telemetry = {
        "gpus": [{"name": name, "memory_total_bytes": memory} for name, memory in gpus],
        "cpu": {"name": "x", "logical_cores": 8},
    }
    session.add(
        Node(
            id=node_id,
            name=node_id,
            token_hash=secrets.token_hex(32),
            created_at=NOW - 30 * 86_400,
            last_seen_at=last_seen,
            description={"telemetry": telemetry},
            approved_at=NOW - 30 * 86_400,
        )
    )
    return node_id


def finished_job(
    session, buyer_id: str, node_id: str, *, started: float, seconds: float, node_share: int
) -> None:
    """A 30-step fine-tune leased at `started` and finished `seconds` later, charged `node_share`."""
    job_id = f"job_{secrets.token_hex(6)}"
    session.add(
        Job(
            id=job_id,
            buyer_id=buyer_id,
            kind="lora",
            spec={"type": "lora", "base_model": DEFAULT_MODEL, "dataset": "file_demo", "max_steps": 30},
            base_model=DEFAULT_MODEL,
            dataset_sha256="0" * 64,
            dataset_size=1000,
            dataset_lines=40,
            required_memory_bytes=1,
            required_memory_bytes_16bit=1,
            price_micro=node_share + node_share // 9,
            state="completed",
            attempt=1,
            max_attempts=3,
            queued_at=started - 5,
            node_id=node_id,
            created_at=started - 5,
            updated_at=started + seconds,
            finished_at=started + seconds,
        )
    )
    session.flush()
    session.add(JobEvent(job_id=job_id, at=started, state="leased", attempt=1, node_id=node_id, message=""))
    ledger.hold_in_escrow(session, buyer_id, job_id, node_share + node_share // 9)
    ledger.charge(session, job_id, node_id, node_share, node_share // 9)
    stamp(session, f"settle:{job_id}", started + seconds)


def served_request(
    session, buyer_id: str, node_id: str, *, started: float, seconds: float, node_share: int
) -> None:
    request_id = f"req_{secrets.token_hex(6)}"
    session.add(
        InferenceRequest(
            id=request_id,
            buyer_id=buyer_id,
            model=DEFAULT_MODEL,
            state="completed",
            node_id=node_id,
            held_micro=node_share * 2,
            price_micro=node_share + node_share // 9,
            prompt_tokens=100,
            completion_tokens=400,
            created_at=started,
            finished_at=started + seconds,
        )
    )
    ledger.hold_in_escrow(session, buyer_id, request_id, node_share * 2)
    ledger.charge(session, request_id, node_id, node_share, node_share // 9, buyer_id=buyer_id)
    stamp(session, f"settle:{request_id}", started + seconds)


def stamp(session, key: str, at: float) -> None:
    session.execute(
        update(LedgerTransaction).where(LedgerTransaction.idempotency_key == key).values(created_at=at)
    )


def seed(database: Database) -> dict[str, str]:
    with database.transaction() as session:
        buyer, _ = accounts.create_buyer(session, "market buyer", 10**12)
        fast = add_node(session, [("NVIDIA GeForce RTX 4070", 12 * GIB)])
        slow = add_node(session, [("NVIDIA GeForce RTX 4070", 12 * GIB)])
        cpu = add_node(session, [])
        add_node(session, [("NVIDIA GeForce RTX 4070", 12 * GIB)], last_seen=NOW - 30 * 86_400)  # gone
        # RTX 4070s: three jobs over the week, paying 360, 720 and 180 credits an hour of work.
        finished_job(session, buyer.id, fast, started=NOW - 2 * 86_400, seconds=HOUR, node_share=360_000_000)
        finished_job(session, buyer.id, fast, started=NOW - 86_400, seconds=HOUR / 2, node_share=360_000_000)
        finished_job(
            session, buyer.id, slow, started=NOW - 3 * 86_400, seconds=2 * HOUR, node_share=360_000_000
        )
        # Outside the window: not counted.
        finished_job(session, buyer.id, slow, started=NOW - 9 * 86_400, seconds=HOUR, node_share=999_000_000)
        # The CPU node served two live requests of 50 s, paying 1 credit each: 72 credits an hour.
        for day in (1, 2):
            served_request(
                session, buyer.id, cpu, started=NOW - day * 86_400, seconds=50, node_share=1_000_000
            )
    return {"fast": fast, "slow": slow, "cpu": cpu}


def test_market_figures_and_the_forecast_come_from_the_recorded_history(database) -> None:
    nodes = seed(database)
    with database.reading() as session:
        market = market_figures(session, [nodes["fast"]], VALUE, now=NOW)

    assert [figures.hardware_class for figures in market.classes] == [CPU_ONLY, RTX_4070]
    gpus = market.figures_for(RTX_4070)
    assert (gpus.nodes_active, gpus.nodes_connected) == (2, 1)
    assert gpus.jobs_per_day == round(3 / 7, 2) and gpus.requests_per_day == 0
    assert gpus.tokens_per_day == 3 * 30 * 4 * 512 // 7  # the tokens each job was priced by
    assert gpus.median_pay_per_work_hour_micro == 360_000_000
    # 3.5 hours of work over 2 nodes and 7 days: 0.25 hours a node a day, at 360 credits an hour.
    assert gpus.work_hours_per_node_per_day == 0.25
    assert gpus.expected_pay_per_day_micro == 90_000_000
    cpu = market.figures_for(CPU_ONLY)
    assert (cpu.requests_per_day, cpu.tokens_per_day) == (round(2 / 7, 2), 2 * 500 // 7)
    assert cpu.median_pay_per_work_hour_micro == 72_000_000

    # A seller's RTX 4070 at 200 W, electricity at $0.30/kWh: 90 credits a day are $0.045; a quarter
    # hour of 200 W is 0.05 kWh, $0.015; net $0.03.
    mine = forecast(market, hardware_class([("NVIDIA GeForce RTX 4070", 12 * GIB)]))
    assert mine.own_class and mine.pay_per_day_micro == 90_000_000
    conversion = Conversion(market.credit_value, ElectricitySettings(price_per_kwh="0.30", currency="USD"))
    gross = conversion.local_micro(mine.pay_per_day_micro)
    electricity = int(cost_per_hour_micro(200.0, conversion.settings) * mine.work_hours_per_day)
    assert (gross, electricity, gross - electricity) == (45_000, 15_000, 30_000)

    # A class the market has not seen is forecast from the busiest class, and says so.
    other = forecast(market, hardware_class([("AMD Radeon RX 7600", 8 * GIB)]))
    assert not other.own_class and other.basis.hardware_class == RTX_4070
    assert forecast(MarketFigures(**{**market.model_dump(), "classes": ()}), RTX_4070) is None


def test_the_market_api_answers_from_a_real_coordinator(tmp_path) -> None:
    coordinator = Coordinator(tmp_path / "coordinator").start()
    try:
        database = Database(f"sqlite:///{coordinator.data_dir / 'coordinator.sqlite3'}")
        with database.transaction() as session:
            buyer, _ = accounts.create_buyer(session, "api buyer", 10**12)
            node = add_node(session, [("NVIDIA GeForce RTX 4070", 12 * GIB)], last_seen=time.time())
            finished_job(
                session, buyer.id, node, started=time.time() - HOUR, seconds=HOUR / 2, node_share=50_000_000
            )
        database.close()
        answer = httpx.get(f"{coordinator.url}/api/market", timeout=10)
        assert answer.status_code == 200
        market = MarketFigures.model_validate(answer.json())
        assert market.credit_value == VALUE and market.window_days == 7
        assert market.figures_for(RTX_4070).median_pay_per_work_hour_micro == 100_000_000
        # The sell page shows the same figures, the pay also in money at the credit's value.
        page = httpx.get(f"{coordinator.url}/sell", timeout=10).text
        assert "What computers earn here" in page and RTX_4070 in page
        assert "100 credits ($0.05)" in page
    finally:
        coordinator.stop()
