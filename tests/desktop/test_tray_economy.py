"""What the tray says about money, decided without Qt: net profit by period and by day, the jobs'
lines, the forecast's words, the payouts' lines and a receipt, from fixed inputs."""

from __future__ import annotations

import datetime
import json

from compute_swarm.desktop.electricity import ElectricitySettings
from compute_swarm.desktop.payouts_cli import payout_lines
from compute_swarm.desktop.tray import economy
from compute_swarm.desktop.tray.state import EarningsSummary
from compute_swarm.market import ClassFigures, MarketFigures
from compute_swarm.protocol import CreditValue, Telemetry
from tests.desktop.test_economics import entry

VALUE = CreditValue(currency="USD", micro_per_credit=500)
DOLLARS = ElectricitySettings(price_per_kwh="0.20", currency="USD")
TODAY = datetime.date(2026, 12, 9)  # a Wednesday


def test_net_profit_by_period_and_day_in_the_sellers_money() -> None:
    monday, sunday = datetime.date(2026, 12, 7), datetime.date(2026, 12, 6)
    earnings = EarningsSummary(
        today_micro=200_000_000,  # 200 credits: $0.10
        week_micro=300_000_000,
        total_micro=1_000_000_000,
        daily=((sunday, 400_000_000), (monday, 100_000_000), (TODAY, 200_000_000)),
    )
    spent = ((sunday.isoformat(), 50_000), (monday.isoformat(), 20_000), (TODAY.isoformat(), 30_000))
    summary = economy.money_summary(earnings, spent, VALUE, DOLLARS, TODAY)
    assert (summary.today.gross_micro, summary.today.electricity_micro, summary.today.net_micro) == (
        100_000,
        30_000,
        70_000,
    )
    assert summary.week.net_micro == 150_000 - 50_000  # Monday and today: the week starts on Monday
    assert summary.total.net_micro == 500_000 - 100_000
    assert summary.net_by_day == ((sunday, 150_000), (monday, 30_000), (TODAY, 70_000))
    assert summary.problem is None

    euros = ElectricitySettings(price_per_kwh="0.30", currency="EUR")
    unconverted = economy.money_summary(earnings, spent, VALUE, euros, TODAY)
    assert unconverted.today.net_micro is None and unconverted.net_by_day == ()
    assert "set how much 1 USD is in EUR" in unconverted.problem
    assert economy.money_text(0, "USD") == "$0.00" and economy.money_text(-300, "USD") == "-$0.00030"


def test_job_lines_and_chart_show_pay_beside_electricity() -> None:
    jobs = (
        entry("job_a", seconds=90.0, joules=3600.0, pay_micro=100_000_000, electricity_micro=200),
        entry(
            "job_b",
            seconds=600.0,
            outcome="cancelled",
            pay_micro=0,
            electricity_micro=1_000,
            energy_estimated=True,
        ),
    )
    lines = economy.job_lines(jobs, VALUE, DOLLARS)
    assert [line.job_id for line in lines] == ["job_b", "job_a"]  # newest first
    assert "job_a · 2 min · 1.0 Wh, $0.00020 · pays 100 credits · net $0.05" in lines[1].text
    assert "job_b · cancelled · 10 min" in lines[0].text and "(estimated)" in lines[0].text
    assert lines[1].net_micro == 50_000 - 200
    assert economy.job_chart(jobs, VALUE, DOLLARS) == ([0.05, 0.0], [0.0002, 0.001])
    assert economy.measured_watts(jobs) == 40.0  # the completed, measured one: 3.6 kJ over 90 s


def test_the_forecast_says_what_it_is_based_on() -> None:
    figures = ClassFigures(
        hardware_class="NVIDIA GeForce RTX 4070 · 12 GB",
        nodes_active=4,
        nodes_connected=2,
        jobs_per_day=12.0,
        requests_per_day=30.0,
        tokens_per_day=10**6,
        median_pay_per_work_hour_micro=400_000_000,
        work_hours_per_node_per_day=5.0,
        expected_pay_per_day_micro=2_000_000_000,
    )
    market = MarketFigures(
        window_days=7, computed_at=0, queued_jobs=3, nodes_connected=9, credit_value=VALUE, classes=(figures,)
    )
    telemetry = Telemetry.model_validate_json(json.dumps(
        {
            "gpus": [
                {"index": 0, "vendor": "nvidia", "name": "NVIDIA GeForce RTX 4070", "backend": "cuda",
                 "memory_total_bytes": 12 * 1024**3}
            ],
            "cpu": {"name": "x", "logical_cores": 8, "memory_total_bytes": 1, "memory_available_bytes": 1},
            "backends": ["cuda", "cpu"],
        })
    )  # fmt: skip
    # 2,000 credits a day are $1.00; 5 hours at 200 W measured, at $0.20/kWh, cost $0.20.
    text = economy.forecast_text(market, telemetry, 200.0, DOLLARS)
    assert (
        text.headline
        == "This PC would earn about $1.00 a day at current demand, about $0.80 after electricity"
    )
    assert "computers like this one (NVIDIA GeForce RTX 4070 · 12 GB): 4 active" in text.basis
    assert "a median 400 credits an hour of work, 5.0 h of work a day each" in text.basis
    assert "3 jobs waiting for 9 connected computers" in text.basis
    # Without a measurement, the class estimate (250 W for 12 GB): $0.25 of electricity.
    assert "about $0.75 after electricity" in economy.forecast_text(market, telemetry, None, DOLLARS).headline
    empty = MarketFigures(**{**market.model_dump(), "classes": ()})
    assert economy.forecast_text(empty, telemetry, None, DOLLARS).headline.startswith("No forecast yet")


def test_payout_and_receipt_lines() -> None:
    listing = {
        "earnings": {"available_micro": 3_000_000_000, "payout_pending_micro": 0, "paid_out_micro": 20_000_000_000},
        "minimum_micro": 1_000_000_000,
        "currency": "USD",
        "value_micro_per_credit": 500,
        "payouts": [
            {"requested_at": 0, "amount_micro": 20_000_000_000, "amount": "10.00", "currency": "USD",
             "payee": "me@example.com", "state": "paid", "reference": "SEPA-1", "reason": None},
            {"requested_at": 0, "amount_micro": 5_000_000_000, "amount": None, "currency": None,
             "payee": "me@example.com", "state": "rejected", "reference": None, "reason": "unknown payee"},
        ],
    }  # fmt: skip
    balances, lines = payout_lines(listing)
    assert balances.startswith("Available 3000 credits ($1.50) · being paid 0 credits ($0.00) · paid so far")
    assert lines[0].endswith("20000 credits = 10.00 USD to me@example.com · paid (reference SEPA-1)")
    assert lines[1].endswith("· rejected: unknown payee")

    receipt = {
        "job_id": "job_1",
        "kind": "lora",
        "base_model": "smollm2-135m-instruct",
        "state": "verified",
        "spec": {"max_steps": 30},
        "verification": {"state": "passed", "detail": "held-out loss within tolerance"},
        "money": [
            {
                "kind": "charge",
                "account": "node node_1 (pending)",
                "amount_micro": 148_764,
                "memo": "job completed",
            },
            {
                "kind": "verification",
                "account": "node node_9 (available)",
                "amount_micro": 148_764,
                "memo": "x",
            },
            {
                "kind": "release",
                "account": "node node_1 (available)",
                "amount_micro": 148_764,
                "memo": "verified",
            },
        ],
    }
    text = economy.receipt_text(receipt, "node_1")
    assert "Fine-tune of smollm2-135m-instruct, 30 steps · job job_1 · verified" in text
    assert "Paid to this computer: 0.148764 credits" in text  # not the verifier's pay
    assert "checked by a trusted re-run: it matched" in text and "node_9" not in text
