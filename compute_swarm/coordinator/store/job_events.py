"""A job's timeline: what happened to it, in order, for the buyer's job page, receipts and ops."""

from __future__ import annotations

import time

from sqlalchemy.orm import Session

from compute_swarm.coordinator.store.tables import Job, JobEvent


def record(session: Session, job: Job, message: str) -> None:
    session.add(
        JobEvent(
            job_id=job.id,
            at=time.time(),
            state=job.state,
            attempt=job.attempt,
            node_id=job.node_id,
            message=message,
        )
    )
