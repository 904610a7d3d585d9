"""Nodes' side of the books and of trust: earnings, standing (trusted, waiting for ops' approval,
quarantined) and when each was last seen; the release of credit whose verification window passed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from sqlalchemy import bindparam, select, update
from sqlalchemy.orm import Session

from compute_swarm import protocol
from compute_swarm.coordinator.domain.effects import NodeConnected, NodeRevoked, StandingChanged, StopOnNode
from compute_swarm.coordinator.domain.verification import VerificationPolicy, is_trusted
from compute_swarm.coordinator.service import accounts, payouts
from compute_swarm.coordinator.service.accounts import AccountError
from compute_swarm.coordinator.service.leases import Leases
from compute_swarm.coordinator.service.verifier import Verifier, node_record
from compute_swarm.coordinator.store import ledger
from compute_swarm.coordinator.store.database import Database, after_commit
from compute_swarm.coordinator.store.tables import Node


@dataclass(frozen=True)
class EarningsHistory:
    """A node's earnings now and what it was credited for work, per UTC hour, since `since`."""

    earnings: protocol.Earnings
    since: int  # the start of the first hour in the window, epoch seconds
    hourly: list[tuple[int, int]]  # (hour start, micro-credits credited), ascending; empty hours left out
    total_credited_micro: int  # all time


class NodeAccounts:
    def __init__(self, database: Database, verifier: Verifier):
        self.database = database
        self.verifier = verifier

    def earnings(self, node_id: str) -> protocol.Earnings:
        with self.database.reading() as session:
            return _earnings(session, node_id)

    def earnings_history(self, node_id: str, days: int, now: float | None = None) -> EarningsHistory:
        """The last `days` days of a node's credits for work, hour by hour, beside its balances: read
        in one session, so the hours, the total and the balances agree."""
        since = ledger.hour_start((time.time() if now is None else now) - days * 86_400)
        accounts = ledger.node_accounts(node_id)
        with self.database.reading() as session:
            return EarningsHistory(
                earnings=_earnings(session, node_id),
                since=since,
                hourly=ledger.hourly_credits(session, accounts, since),
                total_credited_micro=ledger.total_credited(session, accounts),
            )

    def mark_seen(self, node_ids: Iterable[str]) -> None:
        node_ids, now = list(node_ids), time.time()
        with self.database.transaction() as session:
            for start in range(0, len(node_ids), 500):
                session.execute(
                    update(Node).where(Node.id.in_(node_ids[start : start + 500])).values(last_seen_at=now)
                )

    def revoked_nodes(self, node_ids: Iterable[str]) -> list[str]:
        node_ids = list(node_ids)
        revoked: list[str] = []
        with self.database.reading() as session:
            for start in range(0, len(node_ids), 500):
                revoked += session.scalars(
                    select(Node.id).where(
                        Node.id.in_(node_ids[start : start + 500]), Node.revoked_at.is_not(None)
                    )
                ).all()
        return revoked

    def change_standing(self, node_id: str, change: Callable[[Node, VerificationPolicy], None]) -> Node:
        """Apply ops' change(node, policy) to a node's standing; connected nodes hear of it once this
        commits. Raises AccountError for an unknown node."""
        with self.database.transaction() as session:
            node = session.get(Node, node_id)
            if node is None:
                raise AccountError(f"no node {node_id!r}")
            change(node, self.verifier.policy)
            after_commit(session, StandingChanged())
            return node

    def revoke(self, node_id: str) -> Node:
        """Revoke a node's token: it is disconnected once this commits, and its leases run out."""
        with self.database.transaction() as session:
            node = accounts.revoke_node(session, node_id)
            after_commit(session, NodeRevoked(node_id))
            return node

    def release_due_credits(self, now: float | None = None) -> int:
        """Release the pending credit of jobs whose verification window passed."""
        with self.database.transaction() as session:
            return self.verifier.release_due(session, time.time() if now is None else now)

    def record_reachability(self, node_id: str, state: str | None, address: str | None) -> None:
        """What the coordinator found when it connected to the node from outside, into its record."""
        with self.database.transaction() as session:
            session.execute(
                update(Node)
                .where(Node.id == node_id)
                .values(reachability=state, peer_address=address, reachability_checked_at=time.time())
            )

    def standing(self) -> tuple[set[str], dict[str, protocol.Standing]]:
        """The nodes that may verify others (trusted), and those barred from work, each with why, as
        its seller is told (waiting for ops' approval, or quarantined): few, read in one query."""
        trusted: set[str] = set()
        barred: dict[str, protocol.Standing] = {}
        with self.database.reading() as session:
            for node in session.scalars(
                select(Node).where(
                    Node.revoked_at.is_(None),
                    Node.trusted | Node.quarantined_at.is_not(None) | Node.approved_at.is_(None),
                )
            ):
                is_trusted_node, barred_standing = _standing(node, self.verifier.policy)
                if is_trusted_node:
                    trusted.add(node.id)
                if barred_standing is not None:
                    barred[node.id] = barred_standing
        return trusted, barred

    async def greet(
        self, node_id: str, hello: protocol.Hello, leases: Leases, connected: NodeConnected | None = None
    ) -> Greeting:
        """A node said hello: note it, settle the jobs it says it runs (Leases.adopt), and read what
        its welcome tells it, all in one transaction, committed with others' (a reconnect storm is
        thousands of hellos). Once it commits, `connected` closes the node's older connections, on
        whichever replica they are."""

        description = hello.model_dump(mode="json", exclude={"running"})

        def work(session: Session) -> Greeting:
            node = session.get(Node, node_id)
            if node is None:
                raise AccountError(f"no node {node_id!r}")
            # A plain statement, not a change to the row's object: the ORM's flush of it cost more.
            session.connection().execute(
                _GREETED, {"node_id": node_id, "last_seen_at": time.time(), "description": description}
            )
            kept, revoked = leases.adopt(session, node_id, hello.running)
            if connected is not None:
                after_commit(session, connected)
            trusted, barred = _standing(node, self.verifier.policy)
            return Greeting(kept, revoked, trusted, barred, _earnings(session, node_id, node))

        return await self.database.grouped_async(work)


@dataclass(frozen=True)
class Greeting:
    """What a node's hello settled: the leases it keeps, those it must stop, and its standing and
    earnings for its welcome."""

    kept: list[str]
    revoked: list[StopOnNode]
    trusted: bool
    barred: protocol.Standing | None  # None: it may take work
    earnings: protocol.Earnings


def _standing(node: Node, policy: VerificationPolicy) -> tuple[bool, protocol.Standing | None]:
    """Whether the node may verify others, and why it may not work (None when it may)."""
    record = node_record(node, policy)
    if node.approved_at is None:
        return False, protocol.Standing(
            state="awaiting_approval",
            reason="the swarm operator approves each new computer before it gets work; it "
            "stays connected and takes jobs as soon as they do",
        )
    if record.quarantined:
        times = f" ({node.mismatches} times)" if node.mismatches > 1 else ""
        return False, protocol.Standing(
            state="quarantined",
            reason=f"this computer's results did not match trusted re-runs of the same "
            f"jobs{times}; it gets no work until the swarm operator looks into it and lifts "
            f"the quarantine",
        )
    return is_trusted(record, policy), None


# Statements a reconnect storm runs thousands of times, built once (building one cost more than
# running it).
_GREETED = (
    update(Node)
    .where(Node.id == bindparam("node_id"))
    .values(last_seen_at=bindparam("last_seen_at"), description=bindparam("description"))
)


def _earnings(session: Session, node_id: str, node: Node | None = None) -> protocol.Earnings:
    node = node or session.get(Node, node_id)
    pending, available, payout = (
        ledger.node_pending_account(node_id),
        ledger.node_available_account(node_id),
        ledger.node_payout_account(node_id),
    )
    balances = ledger.balance_by_account(session, [pending, available, payout])
    return protocol.Earnings(
        pending_micro=balances[pending],
        available_micro=balances[available],
        jobs_completed=node.jobs_completed if node else 0,
        payout_pending_micro=balances[payout],
        paid_out_micro=payouts.paid_out_micro(session, node_id),
    )
