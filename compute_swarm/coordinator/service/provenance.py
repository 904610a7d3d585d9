"""Checkpoints are untrusted input: who made each one, and what a result built on one is owed.

A node that hands a job back uploads a checkpoint, and whichever node takes the job next resumes from
it. A hostile node can upload garbage at a late step and leave: the honest node that resumes delivers a
bad adapter through no fault of its own. So:

- Every checkpoint records its author and the checkpoint its lease started from (its lineage).
- A result (or a stopped trial's checkpoint) is "built on a foreign checkpoint" when a node other than
  the one delivering it, and not trusted by ops, made any checkpoint in the lineage it resumed from.
  Such work is always re-run by a trusted node (no sampling), and a finished job's result is held from
  the buyer (`verifying`) until that re-run decides.
- Where ops trust no node, nothing could check such work: a lease does not start from a foreign
  checkpoint, it starts over from step 0.
- A mismatch on work built on a foreign checkpoint does not blame the node that delivered it yet. The
  buyer is made whole at once (the trusted result, or the stopped trial's charge back), then a trusted
  node checks the checkpoint the work resumed from, as a stopped trial's checkpoint is checked: trained
  from scratch to its step, its held-out loss measured. A clean checkpoint puts the fault on the work
  done after it; a bad one on its author, or further back when it was itself built on another node's
  checkpoint. Only the node found at fault loses credit and reputation; the others are released.
"""

from __future__ import annotations

import time

from sqlalchemy import select
from sqlalchemy.orm import Session

from compute_swarm.coordinator.store.tables import Checkpoint, Job, Node

# A lineage is at most one checkpoint per lease: a job's attempts bound it well below this.
LINEAGE_LIMIT = 256


def record(session: Session, job: Job, node_id: str, sha256: str, step: int) -> None:
    """A checkpoint the node holding `job` uploaded, built on the checkpoint its lease started from."""
    known = session.scalar(select(Checkpoint).where(Checkpoint.job_id == job.id, Checkpoint.sha256 == sha256))
    if known is not None:
        return  # the same bytes again: its first author made it
    session.add(
        Checkpoint(
            job_id=job.id,
            sha256=sha256,
            step=step,
            node_id=node_id,
            lease_id=job.lease_id or "",
            resumed_from_sha256=job.resumed_from_sha256,
            uploaded_at=time.time(),
        )
    )


def find(session: Session, job: Job, sha256: str | None) -> Checkpoint | None:
    if sha256 is None:
        return None
    return session.scalar(select(Checkpoint).where(Checkpoint.job_id == job.id, Checkpoint.sha256 == sha256))


def lineage(session: Session, job: Job, sha256: str | None) -> list[Checkpoint]:
    """The checkpoint `sha256` and those it was built on, newest first (those recorded)."""
    chain: list[Checkpoint] = []
    checkpoint = find(session, job, sha256)
    while checkpoint is not None and len(chain) < LINEAGE_LIMIT:
        chain.append(checkpoint)
        checkpoint = find(session, job, checkpoint.resumed_from_sha256)
    return chain


def trusted_by_ops(session: Session, node_id: str) -> bool:
    node = session.get(Node, node_id)
    return node is not None and node.trusted and node.quarantined_at is None and node.revoked_at is None


def suspect(session: Session, job: Job, sha256: str | None, node_id: str) -> Checkpoint | None:
    """The checkpoint `sha256` when work `node_id` built on it cannot be taken on trust: a node other
    than `node_id` that ops do not trust made it or one it was built on. None: `node_id`'s own (or a
    trusted node's) state."""
    chain = lineage(session, job, sha256)
    foreign = any(
        checkpoint.node_id != node_id and not trusted_by_ops(session, checkpoint.node_id)
        for checkpoint in chain
    )
    return chain[0] if foreign else None


def foreign_base(session: Session, job: Job) -> Checkpoint | None:
    """The foreign checkpoint the job's latest lease started from, if its work was built on one."""
    if job.node_id is None or job.verifies_job_id is not None:
        return None  # re-runs run on trusted nodes only
    return suspect(session, job, job.resumed_from_sha256, job.node_id)


def anyone_could_check(session: Session) -> bool:
    """Does ops trust a node that could re-run work built on a foreign checkpoint?"""
    return (
        session.scalar(
            select(Node.id)
            .where(Node.trusted.is_(True), Node.quarantined_at.is_(None), Node.revoked_at.is_(None))
            .limit(1)
        )
        is not None
    )


def reason_to_start_over(session: Session, job: Job, node_id: str) -> str | None:
    """Why the lease to `node_id` must not start from the job's checkpoint (it starts over), or None."""
    checkpoint = suspect(session, job, job.checkpoint_sha256, node_id)
    if checkpoint is None or anyone_could_check(session):
        return None
    return (
        f"the checkpoint at step {job.checkpoint_step} is not resumed: it holds work of another node, and "
        f"no node trusted by ops could check a result built on it; starting from step 0"
    )
