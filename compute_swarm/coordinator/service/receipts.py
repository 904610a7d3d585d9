"""A job's receipt, the same for its buyer and for the nodes that ran it: what ran, on which nodes,
how verification ended, and every movement of money the job caused. Buyers appear as "buyer" only,
so a seller reading it learns nothing of who bought the work."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from compute_swarm.coordinator.domain.lifecycle import result_released
from compute_swarm.coordinator.store import ledger
from compute_swarm.coordinator.store.tables import Job, JobEvent, LedgerEntry, LedgerTransaction


def _role(account: str, job_ids: set[str]) -> str:
    if account.startswith("buyer:"):
        return "buyer"
    if account.startswith("escrow:") and account.removeprefix("escrow:") in job_ids:
        return "escrow"
    if account == ledger.FEES:
        return "platform fees"
    if account.startswith("node:"):
        _, node_id, balance = account.split(":")
        return f"node {node_id} ({balance})"
    return account


def ran_on(session: Session, job_id: str, node_id: str) -> bool:
    """Did this node hold a lease of the job (or of its verification re-run)?"""
    jobs = [job_id, *session.scalars(select(Job.id).where(Job.verifies_job_id == job_id))]
    return (
        session.scalar(
            select(JobEvent.id).where(JobEvent.job_id.in_(jobs), JobEvent.node_id == node_id).limit(1)
        )
        is not None
    )


def receipt(session: Session, job: Job) -> dict[str, Any]:
    reruns = session.scalars(select(Job).where(Job.verifies_job_id == job.id).order_by(Job.created_at)).all()
    job_ids = {job.id, *(rerun.id for rerun in reruns)}
    attempts: dict[int, dict[str, Any]] = {}
    for event in session.scalars(select(JobEvent).where(JobEvent.job_id == job.id).order_by(JobEvent.id)):
        if event.attempt and event.node_id:
            attempt = attempts.setdefault(
                event.attempt, {"attempt": event.attempt, "node_id": event.node_id, "started_at": event.at}
            )
            attempt.update(last_state=event.state, last_message=event.message, ended_at=event.at)
    money = [
        {
            "at": transaction.created_at,
            "kind": transaction.kind,
            "job_id": transaction.job_id,
            "account": _role(entry.account, job_ids),
            "amount_micro": entry.amount_micro,
            "memo": transaction.memo,
        }
        for entry, transaction in session.execute(
            select(LedgerEntry, LedgerTransaction)
            .join(LedgerTransaction, LedgerEntry.transaction_id == LedgerTransaction.id)
            .where(LedgerTransaction.job_id.in_(job_ids))
            .order_by(LedgerEntry.id)
        )
    ]
    return {
        "job_id": job.id,
        "kind": job.kind,
        "base_model": job.base_model,
        "dataset_sha256": job.dataset_sha256,
        "spec": {**job.spec, "dataset": job.dataset_sha256},
        "state": job.state,
        "price_micro": job.price_micro,
        "created_at": job.created_at,
        "finished_at": job.finished_at,
        "completed_by": job.node_id if job.result_sha256 else None,
        "result_sha256": job.result_sha256 if result_released(job.state) else None,
        # After a mismatch the buyer's result is the trusted re-run's, not what completed_by delivered.
        "result_from": (
            next((rerun.node_id for rerun in reruns if rerun.result_sha256 == job.result_sha256), None)
            if job.verification == "mismatch"
            else (job.node_id if job.result_sha256 else None)
        ),
        "attempts": list(attempts.values()),
        "verification": {
            "state": job.verification,
            "detail": job.verification_detail,
            "credit_release_at": job.credit_release_at,
            "reruns": [
                {
                    "job_id": rerun.id,
                    "node_id": rerun.node_id,
                    "state": rerun.state,
                    "result_sha256": rerun.result_sha256,
                }
                for rerun in reruns
            ],
        },
        "money": money,
    }
