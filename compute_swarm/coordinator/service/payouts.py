"""Payouts: a seller asks to be paid their available credit; ops export the requests in batches (a CSV
with the amounts converted at a rate they set), pay them outside the swarm and mark each paid with the
payment's reference, or reject it with a reason. The ledger moves available → payout pending → paid
(or back to available), each step once, whatever is retried.

Payment rails (card processors, bank transfers) stay outside: the export and the references are the
interface. A node token may ask for a payout but not be paid: ops pay the payee on record, and see
each request before they do.
"""

from __future__ import annotations

import csv
import io
import time
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from sqlalchemy import bindparam, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from compute_swarm import money
from compute_swarm.coordinator.service.accounts import new_id
from compute_swarm.coordinator.settings import Settings
from compute_swarm.coordinator.store import ledger
from compute_swarm.coordinator.store.database import Database
from compute_swarm.coordinator.store.tables import Node, Payout, PayoutBatch
from compute_swarm.protocol import format_credits

REQUESTED, EXPORTED, PAID, REJECTED = "requested", "exported", "paid", "rejected"
PAYOUT_STATES = (REQUESTED, EXPORTED, PAID, REJECTED)
OPEN_STATES = (REQUESTED, EXPORTED)
MAX_LISTED = 500
CSV_COLUMNS = (
    "payout_id",
    "node_id",
    "node_name",
    "payee",
    "credits",
    "amount",
    "currency",
    "rate",
    "requested_at",
)


class PayoutError(Exception):
    """A payout request or decision that cannot be carried out, with why; `status_code` for HTTP."""

    def __init__(self, message: str, status_code: int = 422):
        super().__init__(message)
        self.status_code = status_code


@dataclass(frozen=True)
class Rate:
    """Currency per credit, exact, as ops typed it."""

    currency: str
    value: Decimal

    @classmethod
    def parse(cls, currency: str, text: str) -> Rate:
        try:
            money.check_currency(currency)
            value = Decimal(str(text).strip())
        except (money.MoneyError, InvalidOperation):
            raise PayoutError(
                f"a rate is a currency code and a positive number of it per credit, like USD 0.0005; "
                f"not {currency!r} {text!r}"
            ) from None
        if not value.is_finite() or value <= 0 or value.as_tuple().exponent < -12:
            raise PayoutError(f"the rate must be a positive number with at most 12 decimals, not {text!r}")
        return cls(currency, value)


def describe(payout: Payout, batch: PayoutBatch | None = None, node_name: str | None = None) -> dict:
    """A payout as its seller and ops read it."""
    described = {
        "id": payout.id,
        "node_id": payout.node_id,
        "amount_micro": payout.amount_micro,
        "payee": payout.payee,
        "state": payout.state,
        "requested_at": payout.requested_at,
        "batch_id": payout.batch_id,
        "currency": batch.currency if batch else None,
        "rate": batch.rate if batch else None,
        "amount": money.minor_text(payout.amount_minor, batch.currency)
        if batch and payout.amount_minor is not None
        else None,
        "reference": payout.reference,
        "reason": payout.reason,
        "decided_at": payout.decided_at,
    }
    if node_name is not None:
        described["node_name"] = node_name
    return described


class Payouts:
    def __init__(self, database: Database, minimum_micro: int, default_rate: Rate):
        self.database = database
        self.minimum_micro = minimum_micro
        self.default_rate = default_rate

    # ---- sellers

    def request(
        self, node_id: str, request_key: str, payee: str, amount_micro: int | None
    ) -> tuple[dict, bool]:
        """Ask to pay out `amount_micro` (None: all that is available) to `payee`. Returns (the payout,
        whether it is new): the same request key again answers with the payout it made, so a request
        whose answer was lost can be sent again without paying twice."""
        payee = " ".join(payee.split())
        if not payee:
            raise PayoutError("say where to be paid (payee): an e-mail, an account name or a wallet")
        try:
            return self._request(node_id, request_key, payee, amount_micro)
        except IntegrityError:
            # The same request at the same moment (PostgreSQL): the other one made it; answer with it.
            return self._request(node_id, request_key, payee, amount_micro)

    def _request(
        self, node_id: str, request_key: str, payee: str, amount_micro: int | None
    ) -> tuple[dict, bool]:
        with self.database.transaction() as session:
            existing = session.scalar(
                select(Payout).where(Payout.node_id == node_id, Payout.request_key == request_key)
            )
            if existing is not None:
                if existing.payee != payee or (
                    amount_micro is not None and existing.amount_micro != amount_micro
                ):
                    raise PayoutError(
                        f"request key {request_key!r} was used for another payout ({existing.id}); use a new key",
                        409,
                    )
                return self._described(session, existing), False
            available = ledger.balance(session, ledger.node_available_account(node_id))
            amount = available if amount_micro is None else amount_micro
            if amount < self.minimum_micro:
                raise PayoutError(
                    f"a payout must be at least {format_credits(self.minimum_micro)} credits; "
                    f"this asks for {format_credits(amount)} ({format_credits(available)} available)"
                )
            payout = Payout(
                id=new_id("po"),
                node_id=node_id,
                request_key=request_key,
                amount_micro=amount,
                payee=payee,
                state=REQUESTED,
                requested_at=time.time(),
            )
            session.add(payout)
            session.flush()
            try:
                ledger.hold_for_payout(session, node_id, payout.id, amount)
            except ledger.InsufficientCredits as error:
                raise PayoutError(str(error)) from None
            return self._described(session, payout), True

    def of_node(self, node_id: str) -> list[dict]:
        with self.database.reading() as session:
            payouts = session.scalars(
                select(Payout)
                .where(Payout.node_id == node_id)
                .order_by(Payout.requested_at.desc())
                .limit(MAX_LISTED)
            ).all()
            return [self._described(session, payout) for payout in payouts]

    def receipt(self, payout_id: str, node_id: str | None = None) -> dict:
        """The payout with every ledger entry it posted; only the node's own when `node_id` is given."""
        with self.database.reading() as session:
            payout = session.get(Payout, payout_id)
            if payout is None or (node_id is not None and payout.node_id != node_id):
                raise PayoutError(f"no payout {payout_id!r}", 404)
            return {
                **self._described(session, payout),
                "money": [
                    {
                        "at": transaction.created_at,
                        "kind": transaction.kind,
                        "account": entry.account.removeprefix(f"node:{payout.node_id}:")
                        if entry.account.startswith("node:")
                        else entry.account,
                        "amount_micro": entry.amount_micro,
                        "memo": transaction.memo,
                    }
                    for transaction, entry in ledger.payout_entries(session, payout.id)
                ],
            }

    # ---- ops

    def queue(self, states: tuple[str, ...] = OPEN_STATES) -> dict:
        """Payouts in these states, oldest first, with their nodes' names and the totals ops owe."""
        with self.database.reading() as session:
            rows = session.execute(
                select(Payout, Node.name)
                .join(Node, Node.id == Payout.node_id)
                .where(Payout.state.in_(states))
                .order_by(Payout.requested_at)
                .limit(MAX_LISTED)
            ).all()
            totals = dict(
                session.execute(
                    select(Payout.state, func.coalesce(func.sum(Payout.amount_micro), 0)).group_by(
                        Payout.state
                    )
                ).all()
            )
            return {
                "payouts": [self._described(session, payout, name) for payout, name in rows],
                "totals_micro": {state: int(totals.get(state, 0)) for state in PAYOUT_STATES},
                "minimum_micro": self.minimum_micro,
                "default_rate": {
                    "currency": self.default_rate.currency,
                    "rate": str(self.default_rate.value),
                },
            }

    def export(self, rate: Rate | None = None) -> str:
        """Put every requested payout in a new batch converted at `rate` (default: the credit's value);
        returns the batch's id. PayoutError (409) when nothing waits to be exported."""
        rate = rate or self.default_rate
        with self.database.transaction() as session:
            waiting = session.scalars(
                select(Payout)
                .where(Payout.state == REQUESTED)
                .order_by(Payout.requested_at)
                .with_for_update()
            ).all()
            if not waiting:
                raise PayoutError("no payout is waiting to be exported", 409)
            batch = PayoutBatch(
                id=new_id("batch"), currency=rate.currency, rate=str(rate.value), created_at=time.time()
            )
            session.add(batch)
            session.flush()
            for payout in waiting:
                payout.state = EXPORTED
                payout.batch_id = batch.id
                payout.amount_minor = money.payable_minor(payout.amount_micro, rate.value, rate.currency)
            return batch.id

    def batch_csv(self, batch_id: str) -> str:
        """A batch as the file ops pay from: one row per payout, as it was exported (paid and rejected
        ones too, with their state left out: the file is the instruction, the queue is the record)."""
        with self.database.reading() as session:
            batch = session.get(PayoutBatch, batch_id)
            if batch is None:
                raise PayoutError(f"no payout batch {batch_id!r}", 404)
            rows = session.execute(
                select(Payout, Node.name)
                .join(Node, Node.id == Payout.node_id)
                .where(Payout.batch_id == batch_id)
                .order_by(Payout.requested_at)
            ).all()
            output = io.StringIO()
            writer = csv.writer(output, lineterminator="\n")
            writer.writerow(CSV_COLUMNS)
            for payout, name in rows:
                writer.writerow(
                    (
                        payout.id,
                        payout.node_id,
                        _spreadsheet_safe(name),
                        _spreadsheet_safe(payout.payee),
                        format_credits(payout.amount_micro),
                        money.minor_text(payout.amount_minor or 0, batch.currency),
                        batch.currency,
                        batch.rate,
                        time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(payout.requested_at)),
                    )
                )
            return output.getvalue()

    def mark_paid(self, payout_id: str, reference: str) -> dict:
        """Ops paid it (outside the swarm), with this payment reference: the credit leaves the ledger."""
        return self._end(payout_id, PAID, reference, "give the payment's reference (the transfer's id)")

    def reject(self, payout_id: str, reason: str) -> dict:
        """Ops will not pay it: the credit goes back to the seller's available balance."""
        return self._end(payout_id, REJECTED, reason, "say why the payout is rejected: its seller reads it")

    def _end(self, payout_id: str, outcome: str, words: str, missing: str) -> dict:
        """End a payout paid (`words`: the payment's reference) or rejected (the reason its seller
        reads). The same end again changes nothing (a rejection keeps its first reason); another end, or
        paying a payout not exported yet (its amount in the currency is not on record), is refused (409)."""
        words = " ".join(words.split())
        if not words:
            raise PayoutError(missing)
        with self.database.transaction() as session:
            payout = self._locked(session, payout_id)
            said = payout.reference if payout.state == PAID else payout.reason
            if payout.state == outcome and (outcome == REJECTED or said == words):
                return self._described(session, payout)
            if payout.state in (PAID, REJECTED):
                what = "reference" if payout.state == PAID else "reason"
                raise PayoutError(f"payout {payout_id} was {payout.state} already ({what} {said!r})", 409)
            if outcome == PAID and payout.state != EXPORTED:
                raise PayoutError(
                    f"payout {payout_id} is {payout.state}: only an exported payout can be marked paid "
                    f"(export it first, so its amount in the currency is on record)",
                    409,
                )
            ledger.settle_payout(
                session,
                payout.node_id,
                payout.id,
                payout.amount_micro,
                paid=outcome == PAID,
                memo=f"payout {payout.id} {outcome}: {words}"[:500],
            )
            payout.state, payout.decided_at = outcome, time.time()
            if outcome == PAID:
                payout.reference = words[:200]
            else:
                payout.reason = words[:500]
            return self._described(session, payout)

    def _locked(self, session: Session, payout_id: str) -> Payout:
        payout = session.get(Payout, payout_id, with_for_update=True, populate_existing=True)
        if payout is None:
            raise PayoutError(f"no payout {payout_id!r}", 404)
        return payout

    @staticmethod
    def _described(session: Session, payout: Payout, node_name: str | None = None) -> dict:
        batch = session.get(PayoutBatch, payout.batch_id) if payout.batch_id else None
        return describe(payout, batch, node_name)


def payouts_service(settings: Settings, database: Database) -> Payouts:
    """The payouts of this coordinator, at ops' minimum and the credit's value as the default rate."""
    return Payouts(
        database, settings.payout_minimum_micro, Rate.parse(settings.credit_currency, settings.credit_value)
    )


def paid_out_micro(session: Session, node_id: str) -> int:
    """Everything ever paid out to this node's seller."""
    return int(session.connection().execute(_PAID_OUT, {"node_id": node_id}).scalar_one())


# Built once: each node's hello asks it, and building it cost more than running it.
_PAID_OUT = select(func.coalesce(func.sum(Payout.amount_micro), 0)).where(
    Payout.node_id == bindparam("node_id"), Payout.state == PAID
)


def _spreadsheet_safe(text: str) -> str:
    """A seller's own text (node name, payee) as a spreadsheet will not run it: a cell starting with
    = + - @ is a formula in Excel and LibreOffice, so it is quoted with a leading apostrophe."""
    return f"'{text}" if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text
