"""The ops page's payout queue in real headless Chromium against a real coordinator: sellers whose
verified work made credit available ask for payouts with their node tokens; ops export a batch at a
rate they type, download its CSV, mark one payout paid and reject another, and see the API's refusals."""

from __future__ import annotations

import csv
import io
import secrets

import pytest

from compute_swarm.coordinator.store.database import Database
from tests.coordinator.test_node_socket import check_ledger
from tests.coordinator.test_payouts import earning_node
from tests.swarm_processes import Coordinator

expect = pytest.importorskip("playwright.sync_api").expect

ADMIN_TOKEN = secrets.token_urlsafe(32)
CREDIT = 1_000_000


@pytest.fixture
def coordinator(tmp_path):
    server = Coordinator(
        tmp_path / "coordinator",
        environment={
            "SWARM_ADMIN_TOKEN": ADMIN_TOKEN,
            "SWARM_PAYOUT_MINIMUM_MICRO": str(1_000 * CREDIT),
            "SWARM_CREDIT_CURRENCY": "USD",
            "SWARM_CREDIT_VALUE": "0.0005",
        },
    ).start()
    yield server
    server.stop()
    check_ledger(server.data_dir)


@pytest.fixture
def database(coordinator):
    database = Database(f"sqlite:///{coordinator.data_dir / 'coordinator.sqlite3'}")
    yield database
    database.close()


def ops_sign_in(page, url: str) -> None:
    page.goto(f"{url}/ops")
    page.fill("#admin_token", ADMIN_TOKEN)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_selector("#payout-queue")


def text(page, selector: str) -> str:
    """An element's text with the page's thousands spaces (7 000) taken out."""
    return page.text_content(selector).replace("\u202f", "")


def payout_row(page, payout_id: str):
    return page.locator(f'#payout-queue tr[data-payout="{payout_id}"]')


def test_ops_export_a_batch_then_pay_one_payout_and_reject_another(coordinator, database, page, tmp_path):
    _, paid_seller = earning_node(coordinator, database, 6_000)
    rejected_id, rejected_seller = earning_node(coordinator, database, 3_000)
    to_pay = paid_seller.request_payout("seller@example.com", amount_micro=4_000 * CREDIT)
    to_reject = rejected_seller.request_payout("wallet:not-a-bank")

    ops_sign_in(page, coordinator.url)
    expect(page.locator("#payout-queue tbody tr[data-payout]")).to_have_count(2)
    assert text(page, "#payouts-owed") == "7000"
    assert "7000 waiting for export" in text(page, "#payouts-split")
    row = payout_row(page, to_pay["id"])
    expect(row).to_contain_text("seller@example.com")
    expect(row.locator(".state")).to_have_text("requested")
    # Only an exported payout can be paid: its amount in the currency is on record first.
    expect(row.get_by_role("button", name="Mark paid")).to_have_count(0)
    # The rate is prefilled with the credit's value.
    assert (page.input_value("#export-currency"), page.input_value("#export-rate")) == ("USD", "0.0005")

    # A rate the coordinator refuses is shown, and nothing is exported.
    page.fill("#export-currency", "E1")
    page.click("#export-button")
    expect(page.locator("#payouts-error")).to_contain_text("Could not export: a rate is a currency code")
    expect(row.locator(".state")).to_have_text("requested")

    page.fill("#export-currency", "EUR")
    page.fill("#export-rate", "0.00046")
    page.click("#export-button")
    expect(page.locator("#batch-csv")).to_be_visible()
    expect(page.locator("#payouts-error")).to_be_hidden()
    with page.expect_download() as download:
        page.click("#batch-csv")
    batch = tmp_path / "batch.csv"
    download.value.save_as(batch)
    rows = {line["payout_id"]: line for line in csv.DictReader(io.StringIO(batch.read_text()))}
    assert (rows[to_pay["id"]]["amount"], rows[to_pay["id"]]["currency"]) == ("1.84", "EUR")
    assert rows[to_reject["id"]]["amount"] == "1.38"
    expect(row.locator(".state")).to_have_text("exported")
    expect(row).to_contain_text("1.84 EUR")
    expect(page.locator("#export-button")).to_be_disabled()  # nothing left to export

    # A payment needs its reference: an empty answer sends nothing.
    page.once("dialog", lambda dialog: dialog.accept("   "))
    row.get_by_role("button", name="Mark paid").click()
    expect(page.locator("#payouts-error")).to_contain_text("a payment needs its reference")
    expect(row.locator(".state")).to_have_text("exported")

    questions: list[str] = []

    def answer(text: str):
        def accept(dialog) -> None:
            questions.append(dialog.message)
            dialog.accept(text)

        return accept

    page.once("dialog", answer("SEPA-2026-12-07-001"))
    row.get_by_role("button", name="Mark paid").click()
    expect(row).to_have_count(0)  # paid: out of the queue of what is owed
    assert "1.84 EUR to seller@example.com" in questions[-1]
    page.once("dialog", answer("the bank knows no such payee"))
    payout_row(page, to_reject["id"]).get_by_role("button", name="Reject").click()
    expect(payout_row(page, to_reject["id"])).to_have_count(0)
    expect(page.locator("#payout-queue tr.empty")).to_be_visible()
    assert text(page, "#payouts-owed") == "0"
    assert "4000 paid so far" in text(page, "#payouts-split")

    # The ledger agrees: one seller paid, the other's credit back where they can ask again.
    assert paid_seller.me()["earnings"]["paid_out_micro"] == 4_000 * CREDIT
    rejected = rejected_seller.payouts()
    assert rejected["earnings"]["available_micro"] == 3_000 * CREDIT
    assert [(payout["state"], payout["reason"]) for payout in rejected["payouts"]] == [
        ("rejected", "the bank knows no such payee")
    ]
    assert rejected_id == rejected["payouts"][0]["node_id"]
