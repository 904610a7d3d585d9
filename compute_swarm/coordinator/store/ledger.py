"""The double-entry ledger: integer micro-credits moving between accounts, append-only.

Accounts are named, not stored: `buyer:<id>`, `escrow:<job id>`, `node:<id>:pending`,
`node:<id>:available`, `node:<id>:payout_pending` (asked to be paid out, waiting for ops),
`platform:fees`, `platform:issued` (the source of granted credits, so it runs negative by exactly what
was ever granted) and `platform:paid_out` (what left the swarm as payouts to sellers). Each transaction's entries sum to zero, so all
balances together always sum to zero; a balance is the sum of an account's entries.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterable
from dataclasses import dataclass

import sqlalchemy
from sqlalchemy import Executable, bindparam, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from compute_swarm.coordinator.store.tables import AccountBalance, LedgerEntry, LedgerTransaction
from compute_swarm.protocol import format_credits

ISSUED = "platform:issued"
FEES = "platform:fees"
PAID_OUT = "platform:paid_out"

# The transaction kinds that credit a node for work: `charge` pays both a finished job and a live
# inference request (see `charge`), `verification` pays a trusted node for re-running a job, and
# `clawback` takes back a mismatched job's credit (negative, counted against the hour it was posted
# in). Moving credit from pending to available (`release`) is not earning it again.
EARNING_KINDS = ("charge", "verification", "clawback")
SECONDS_PER_HOUR = 3600


def buyer_account(buyer_id: str) -> str:
    return f"buyer:{buyer_id}"


def escrow_account(job_id: str) -> str:
    return f"escrow:{job_id}"


def node_pending_account(node_id: str) -> str:
    return f"node:{node_id}:pending"


def node_available_account(node_id: str) -> str:
    return f"node:{node_id}:available"


def node_payout_account(node_id: str) -> str:
    return f"node:{node_id}:payout_pending"


class LedgerError(Exception):
    pass


class InsufficientCredits(LedgerError):
    pass


def post(
    session: Session,
    *,
    kind: str,
    idempotency_key: str,
    entries: dict[str, int],
    job_id: str | None = None,
    memo: str = "",
) -> int | None:
    """Record one transaction, in the caller's database transaction, and return its id. Returns None,
    changing nothing, when a transaction with this idempotency key exists already.

    Written as plain statements, not ORM objects: this runs for every submission, lease settlement and
    chat request, and the ORM's unit of work was most of a submission's time."""
    if any(not isinstance(amount, int) for amount in entries.values()):
        raise LedgerError("ledger amounts are whole micro-credits")
    if sum(entries.values()) != 0:
        raise LedgerError(f"a {kind} transaction must sum to zero, not {sum(entries.values())}")
    statements = _statements(session.get_bind().dialect.name)
    connection = session.connection()
    # A concurrent transaction (on PostgreSQL) may post the same key first: this one then waits for
    # it and, once it committed, is the harmless repeat it is meant to be, not an error.
    transaction_id = connection.execute(
        statements.open_transaction,
        {"kind": kind, "idempotency_key": idempotency_key, "job_id": job_id, "memo": memo,
         "created_at": time.time()},
    ).scalar()  # fmt: skip
    if transaction_id is None:
        return None
    moved = [
        {"transaction_id": transaction_id, "account": account, "amount_micro": amount}
        for account, amount in entries.items()
        if amount != 0
    ]
    if moved:
        connection.execute(statements.add_entry, moved)
        # Added in the database, under the row's lock: never a value read earlier and written back.
        connection.execute(
            statements.add_to_balance,
            [{"account": entry["account"], "balance_micro": entry["amount_micro"]} for entry in moved],
        )
    return transaction_id


@dataclass(frozen=True)
class _Statements:
    open_transaction: Executable  # a new transaction's id, or none for a key posted before
    add_entry: Executable
    add_to_balance: Executable  # opens the account's balance row, or adds to it
    locked_balance: Executable


@functools.cache
def _statements(dialect: str) -> _Statements:
    """The ledger's statements, built once per database kind (building one costs more than running
    it), with the database's own INSERT, which knows ON CONFLICT (SQLite and PostgreSQL both do)."""
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    opened = insert(AccountBalance)
    return _Statements(
        open_transaction=insert(LedgerTransaction)
        .on_conflict_do_nothing(index_elements=[LedgerTransaction.idempotency_key])
        .returning(LedgerTransaction.id),
        add_entry=sqlalchemy.insert(LedgerEntry),
        add_to_balance=opened.on_conflict_do_update(
            index_elements=[AccountBalance.account],
            set_={"balance_micro": AccountBalance.balance_micro + opened.excluded.balance_micro},
        ),
        locked_balance=select(AccountBalance.balance_micro)
        .where(AccountBalance.account == bindparam("account"))
        .with_for_update(),
    )


def _locked_balance(session: Session, account: str) -> int:
    """An account's balance as committed now, its row locked to the end of the transaction (PostgreSQL;
    SQLite's BEGIN IMMEDIATE holds the whole database already): a check against it (enough credit for
    a hold) stays true until the caller commits."""
    statement = _statements(session.get_bind().dialect.name).locked_balance
    return session.connection().execute(statement, {"account": account}).scalar() or 0


def balance(session: Session, account: str) -> int:
    # A column, not an AccountBalance object: the session's identity map would keep an old value.
    return session.scalar(select(AccountBalance.balance_micro).where(AccountBalance.account == account)) or 0


def balance_by_account(session: Session, accounts: list[str]) -> dict[str, int]:
    """Each of a few accounts' balance, read in one statement (0 for an account with no entries)."""
    found = session.connection().execute(_BALANCES, {"accounts": accounts}).all()
    return {account: 0 for account in accounts} | {account: int(amount) for account, amount in found}


_BALANCES = select(AccountBalance.account, AccountBalance.balance_micro).where(
    AccountBalance.account.in_(bindparam("accounts", expanding=True))
)


def balances(session: Session, accounts: list[str]) -> int:
    """The sum of several accounts' balances (a buyer's escrow over their jobs)."""
    total_micro = 0
    for start in range(0, len(accounts), 500):
        total_micro += session.scalar(
            select(func.coalesce(func.sum(AccountBalance.balance_micro), 0)).where(
                AccountBalance.account.in_(accounts[start : start + 500])
            )
        )
    return int(total_micro)


def grant(
    session: Session, buyer_id: str, amount_micro: int, *, idempotency_key: str, memo: str = ""
) -> bool:
    if amount_micro <= 0:
        raise LedgerError("a grant must be a positive amount")
    posted = post(
        session,
        kind="grant",
        idempotency_key=idempotency_key,
        entries={ISSUED: -amount_micro, buyer_account(buyer_id): amount_micro},
        memo=memo,
    )
    return posted is not None


def check_balance(
    session: Session, buyer_id: str, amount_micro: int, *, what: str = "this job costs"
) -> None:
    """Raise InsufficientCredits unless the buyer's balance covers `amount_micro`; read under the
    balance's row lock (see hold_in_escrow)."""
    available = _locked_balance(session, buyer_account(buyer_id))
    if available < amount_micro:
        raise InsufficientCredits(
            f"{what} {format_credits(amount_micro)} credits; the balance is {format_credits(available)}"
        )


def hold_in_escrow(
    session: Session, buyer_id: str, job_id: str, amount_micro: int, *, what: str = "this job costs"
) -> None:
    """Move what a job or request may cost from its buyer's balance to its escrow, in the caller's
    transaction, or raise InsufficientCredits. Every spending of a buyer's balance (jobs, sweeps'
    trials, batches, live requests) comes here: the balance is read under its row lock, kept until the
    caller commits, so two holds at once on PostgreSQL take turns and the second sees what the first
    spent, instead of both passing the check against the same balance."""
    check_balance(session, buyer_id, amount_micro, what=what)
    move_to_escrow(session, buyer_id, job_id, amount_micro)


def move_to_escrow(session: Session, buyer_id: str, job_id: str, amount_micro: int) -> None:
    """The posting of hold_in_escrow, for a caller that checked the balance (check_balance) in this
    transaction already."""
    post(
        session,
        kind="escrow",
        idempotency_key=f"escrow:{job_id}",
        job_id=job_id,
        entries={buyer_account(buyer_id): -amount_micro, escrow_account(job_id): amount_micro},
        memo="held at submission",
    )


def charge(
    session: Session,
    job_id: str,
    node_id: str,
    node_share: int,
    platform_fee: int,
    *,
    buyer_id: str | None = None,
    memo: str = "job completed",
) -> bool:
    """Pay for completed work out of its escrow: the node's share (pending until verified) and the fee.
    With buyer_id, escrow may hold more than the price (an inference request holds its most) and the
    rest goes back to the buyer in the same transaction. Returns False, changing nothing, when the job
    was settled (charged or refunded) before."""
    if _settled(session, job_id):
        return False
    held = balance(session, escrow_account(job_id))
    price = node_share + platform_fee
    if held < price or (held != price and buyer_id is None):
        raise LedgerError(f"job {job_id} has {held} in escrow, not {price}")
    entries = {escrow_account(job_id): -held, node_pending_account(node_id): node_share, FEES: platform_fee}
    if buyer_id is not None:
        entries[buyer_account(buyer_id)] = held - price
    posted = post(
        session, kind="charge", idempotency_key=f"settle:{job_id}", job_id=job_id, entries=entries, memo=memo
    )
    return posted is not None


def refund(session: Session, job_id: str, buyer_id: str, memo: str) -> bool:
    if _settled(session, job_id):
        return False
    held = balance(session, escrow_account(job_id))
    posted = post(
        session,
        kind="refund",
        idempotency_key=f"settle:{job_id}",
        job_id=job_id,
        entries={escrow_account(job_id): -held, buyer_account(buyer_id): held},
        memo=memo,
    )
    return posted is not None


def return_charge(session: Session, job_id: str, buyer_id: str, amount_micro: int, memo: str) -> bool:
    """Give a buyer back what a job was charged, out of the platform's fees (a charge that verification
    found unearned). Once per job; returns False, changing nothing, on a repeat."""
    posted = post(
        session,
        kind="refund",
        idempotency_key=f"mismatch-refund:{job_id}",
        job_id=job_id,
        entries={FEES: -amount_micro, buyer_account(buyer_id): amount_micro},
        memo=memo,
    )
    return posted is not None


def node_credit_for_job(session: Session, job_id: str, node_id: str) -> int:
    """What a job's charge credited its node (0 when it was not charged to that node)."""
    return int(
        session.scalar(
            select(func.coalesce(func.sum(LedgerEntry.amount_micro), 0))
            .join(LedgerTransaction, LedgerEntry.transaction_id == LedgerTransaction.id)
            .where(
                LedgerTransaction.idempotency_key == f"settle:{job_id}",
                LedgerEntry.account == node_pending_account(node_id),
            )
        )
    )


def release(session: Session, job_id: str, node_id: str, memo: str) -> int:
    """Move a job's pending credit to the node's available balance (verified, or its window passed).
    Once per job; returns the amount moved (0 when released or clawed back before)."""
    amount = node_credit_for_job(session, job_id, node_id)
    if amount <= 0 or _posted(session, f"pending-end:{job_id}") or _posted(session, f"clawback:{job_id}"):
        return 0
    post(
        session,
        kind="release",
        idempotency_key=f"pending-end:{job_id}",
        job_id=job_id,
        entries={node_pending_account(node_id): -amount, node_available_account(node_id): amount},
        memo=memo,
    )
    return amount


def clawback(session: Session, job_id: str, node_id: str, memo: str) -> int:
    """Take back what a mismatched job credited its node, from its pending credit, or from what is
    available when that was released already. Once per job; returns the amount."""
    amount = node_credit_for_job(session, job_id, node_id)
    if amount <= 0 or _posted(session, f"clawback:{job_id}"):
        return 0
    released = _posted(session, f"pending-end:{job_id}")
    source = node_available_account(node_id) if released else node_pending_account(node_id)
    post(
        session,
        kind="clawback",
        idempotency_key=f"clawback:{job_id}",
        job_id=job_id,
        entries={source: -amount, FEES: amount},
        memo=memo,
    )
    return amount


def pay_for_verification(
    session: Session, verification_job_id: str, node_id: str, amount: int, memo: str
) -> bool:
    """The platform pays a trusted node for re-running a job, out of its fees; available at once
    (a trusted node's work is not itself re-checked)."""
    if amount <= 0:
        return False
    posted = post(
        session,
        kind="verification",
        idempotency_key=f"settle:{verification_job_id}",
        job_id=verification_job_id,
        entries={FEES: -amount, node_available_account(node_id): amount},
        memo=memo,
    )
    return posted is not None


PAYOUT_STEPS = ("requested", "paid", "rejected")


def payout_key(payout_id: str, step: str) -> str:
    """The idempotency key of one step of a payout (requested, paid, rejected): each happens once."""
    return f"payout:{payout_id}:{step}"


def hold_for_payout(session: Session, node_id: str, payout_id: str, amount_micro: int) -> None:
    """Move credit a seller asked to be paid from the node's available balance to its payout-pending
    account, in the caller's transaction, or raise InsufficientCredits. Read under the balance's row
    lock, as hold_in_escrow does, so two requests at once cannot both spend the same credit."""
    available = _locked_balance(session, node_available_account(node_id))
    if amount_micro <= 0:
        raise LedgerError("a payout must be a positive amount")
    if available < amount_micro:
        raise InsufficientCredits(
            f"the payout asks for {format_credits(amount_micro)} credits; "
            f"{format_credits(available)} are available"
        )
    post(
        session,
        kind="payout_request",
        idempotency_key=payout_key(payout_id, "requested"),
        entries={node_available_account(node_id): -amount_micro, node_payout_account(node_id): amount_micro},
        memo=f"payout {payout_id} requested",
    )


def settle_payout(
    session: Session, node_id: str, payout_id: str, amount_micro: int, *, paid: bool, memo: str
) -> bool:
    """End a payout: paid (the credit leaves the swarm) or rejected (it goes back to available).
    Once per payout, whichever comes first; returns False, changing nothing, when it had ended."""
    if _posted(session, payout_key(payout_id, "paid")) or _posted(session, payout_key(payout_id, "rejected")):
        return False
    destination = PAID_OUT if paid else node_available_account(node_id)
    posted = post(
        session,
        kind="payout_paid" if paid else "payout_rejected",
        idempotency_key=payout_key(payout_id, "paid" if paid else "rejected"),
        entries={node_payout_account(node_id): -amount_micro, destination: amount_micro},
        memo=memo,
    )
    return posted is not None


def payout_entries(session: Session, payout_id: str) -> list[tuple[LedgerTransaction, LedgerEntry]]:
    """Every ledger entry of one payout, in the order posted: its receipt's money lines."""
    return list(
        session.execute(
            select(LedgerTransaction, LedgerEntry)
            .join(LedgerEntry, LedgerEntry.transaction_id == LedgerTransaction.id)
            .where(
                LedgerTransaction.idempotency_key.in_([payout_key(payout_id, step) for step in PAYOUT_STEPS])
            )
            .order_by(LedgerEntry.id)
        ).tuples()
    )


def _posted(session: Session, key: str) -> bool:
    return (
        session.scalar(select(LedgerTransaction.id).where(LedgerTransaction.idempotency_key == key))
        is not None
    )


def _settled(session: Session, job_id: str) -> bool:
    key = f"settle:{job_id}"
    return (
        session.scalar(select(LedgerTransaction.id).where(LedgerTransaction.idempotency_key == key))
        is not None
    )


def hour_start(at: float) -> int:
    """The start of the UTC hour holding `at` (epoch seconds): whole hours are whole in UTC, whatever
    the viewer's time zone, so a client can regroup them into its own days."""
    return int(at // SECONDS_PER_HOUR) * SECONDS_PER_HOUR


def sum_by_hour(credits: Iterable[tuple[float, int]]) -> list[tuple[int, int]]:
    """(posted at, amount) pairs summed per UTC hour: (hour start, micro) ascending, only hours that
    have entries. Grouped here rather than in SQL, whose float-to-integer casts differ between
    databases (PostgreSQL rounds, SQLite truncates, and SQLite may have no floor())."""
    totals: dict[int, int] = {}
    for posted_at, amount_micro in credits:
        hour = hour_start(posted_at)
        totals[hour] = totals.get(hour, 0) + amount_micro
    return sorted(totals.items())


def node_accounts(node_id: str) -> list[str]:
    """Both of a node's accounts: work is credited to pending, verification pay to available, and a
    clawback takes from either."""
    return [node_pending_account(node_id), node_available_account(node_id)]


def hourly_credits(session: Session, accounts: list[str], since: float) -> list[tuple[int, int]]:
    """What these accounts were credited for work (EARNING_KINDS) per UTC hour, from `since` (epoch
    seconds) on: (hour start, micro) ascending, hours with nothing omitted."""
    rows = session.execute(
        select(LedgerTransaction.created_at, LedgerEntry.amount_micro)
        .join(LedgerTransaction, LedgerEntry.transaction_id == LedgerTransaction.id)
        .where(
            LedgerEntry.account.in_(accounts),
            LedgerTransaction.kind.in_(EARNING_KINDS),
            LedgerTransaction.created_at >= since,
        )
    ).all()
    return sum_by_hour((posted_at, amount_micro) for posted_at, amount_micro in rows)


def total_credited(session: Session, accounts: list[str]) -> int:
    """Everything these accounts were ever credited for work (EARNING_KINDS)."""
    return int(
        session.scalar(
            select(func.coalesce(func.sum(LedgerEntry.amount_micro), 0))
            .join(LedgerTransaction, LedgerEntry.transaction_id == LedgerTransaction.id)
            .where(LedgerEntry.account.in_(accounts), LedgerTransaction.kind.in_(EARNING_KINDS))
        )
    )


def total(session: Session) -> int:
    """The sum of every entry: zero, always."""
    return int(session.scalar(select(func.coalesce(func.sum(LedgerEntry.amount_micro), 0))))
