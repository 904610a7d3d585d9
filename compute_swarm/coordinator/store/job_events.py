"""A job's timeline: what happened to it, in order, for the buyer's job page, receipts and ops."""

from __future__ import annotations

import time

from sqlalchemy import insert
from sqlalchemy.orm import Session

from compute_swarm.coordinator.store.tables import Job, JobEvent

# A plain statement, not an ORM object: every job's every change records one, and the ORM's unit of
# work for it cost more than the statement.
_RECORD = insert(JobEvent)


def record(session: Session, job: Job, message: str) -> None:
    session.connection().execute(
        _RECORD,
        {
            "job_id": job.id,
            "at": time.time(),
            "state": job.state,
            "attempt": job.attempt,
            "node_id": job.node_id,
            "message": message,
        },
    )
