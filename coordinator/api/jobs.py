"""Buyers' jobs: submit, list, inspect, cancel, download the result."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, status
from fastapi.responses import FileResponse
from sqlalchemy import select

from coordinator.api.deps import CurrentBuyer, OwnedJob, ServicesDep
from coordinator.api.schemas import JobIn, JobOut
from coordinator.jobs import JobError
from coordinator.lifecycle import STATES
from coordinator.tables import Job

router = APIRouter(prefix="/api/jobs", tags=["jobs"])


@router.post("", status_code=status.HTTP_201_CREATED)
def submit(body: JobIn, buyer: CurrentBuyer, services: ServicesDep) -> JobOut:
    try:
        job = services.jobs.submit(buyer.id, body.spec, body.max_attempts)
    except JobError as error:
        raise HTTPException(error.status_code, str(error)) from None
    services.hub.wake()
    return JobOut.of(job)


@router.get("")
def list_jobs(
    buyer: CurrentBuyer, services: ServicesDep, state: str | None = None, limit: int = 200
) -> list[JobOut]:
    if state is not None and state not in STATES:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT, f"state must be one of: {', '.join(STATES)}"
        )
    query = (
        select(Job)
        .where(Job.buyer_id == buyer.id)
        .order_by(Job.created_at.desc())
        .limit(min(max(limit, 1), 1000))
    )
    if state is not None:
        query = query.where(Job.state == state)
    with services.database.reading() as session:
        return [JobOut.of(job) for job in session.scalars(query).all()]


@router.get("/{job_id}")
def get_job(job: OwnedJob) -> JobOut:
    return JobOut.of(job)


@router.post("/{job_id}/cancel")
def cancel(job: OwnedJob, services: ServicesDep) -> JobOut:
    try:
        cancelled, revocation = services.jobs.cancel(job.id)
    except JobError as error:
        raise HTTPException(error.status_code, str(error)) from None
    if revocation is not None:
        services.hub.revoke([revocation])
    return JobOut.of(cancelled)


@router.get("/{job_id}/result")
def result(job: OwnedJob, services: ServicesDep) -> FileResponse:
    if job.result_sha256 is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job.id} has no result yet; it is {job.state}")
    return FileResponse(
        services.store.blob_path(job.result_sha256),
        media_type="application/x-tar",
        filename=f"{job.id}-adapter.tar",
        headers={"X-Content-SHA256": job.result_sha256},
    )
