"""Buyers' jobs: price, submit, list, inspect (progress, events), cancel, download the result."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, status
from fastapi.responses import FileResponse, JSONResponse
from sqlalchemy import select

from compute_swarm.coordinator.domain.lifecycle import result_released
from compute_swarm.coordinator.service import buyer_reads, receipts
from compute_swarm.coordinator.service.submissions import JobError
from compute_swarm.coordinator.store.tables import Job, JobEvent, JobProgressPoint
from compute_swarm.coordinator.transport.api.deps import CurrentBuyer, OwnedJob, ServicesDep
from compute_swarm.coordinator.transport.api.schemas import (
    MAX_ROW_ID,
    JobEventOut,
    JobIn,
    JobOut,
    ProgressPointOut,
    QuoteIn,
    QuoteOut,
    file_download,
)
from compute_swarm.protocol import JOB_STATES

router = APIRouter(prefix="/api/jobs", tags=["jobs"])


@router.post("", status_code=status.HTTP_201_CREATED)
async def submit(body: JobIn, buyer: CurrentBuyer, services: ServicesDep) -> JobOut:
    # On the event loop, not in a thread: the submission waits for its group's commit without one.
    try:
        job = await services.submissions.submit_async(buyer.id, body.spec, body.max_attempts)
    except JobError as error:
        return refusal(error)
    return JobOut.of(job)


def refusal(error: JobError) -> JSONResponse:
    """A job request refused: {"detail": message}, plus {"fields": {name: problem}} naming the spec's
    fields at fault, so a form can show each problem next to its field."""
    body: dict = {"detail": str(error)}
    if error.fields:
        body["fields"] = error.fields
    return JSONResponse(body, status_code=error.status_code)


@router.post("/quote")
def quote(body: QuoteIn, buyer: CurrentBuyer, services: ServicesDep) -> QuoteOut:
    """What submitting this spec would hold in escrow, next to the buyer's balance; nothing changes."""
    try:
        quoted, available = services.submissions.quote(buyer.id, body.spec)
    except JobError as error:
        return refusal(error)
    return QuoteOut(
        price_micro=quoted.price_micro,
        available_micro=available,
        affordable=quoted.price_micro <= available,
        required_memory_bytes=quoted.required_memory_bytes,
        required_memory_bytes_16bit=quoted.required_memory_bytes_16bit,
    )


@router.get("")
def list_jobs(
    buyer: CurrentBuyer, services: ServicesDep, state: str | None = None, limit: int = 200
) -> list[JobOut]:
    if state is not None and state not in JOB_STATES:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT, f"state must be one of: {', '.join(JOB_STATES)}"
        )
    query = buyer_reads.buyers_jobs(buyer.id).order_by(Job.created_at.desc()).limit(min(max(limit, 1), 1000))
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
        cancelled = services.submissions.cancel(job.id)
    except JobError as error:
        raise HTTPException(error.status_code, str(error)) from None
    return JobOut.of(cancelled)


@router.get("/{job_id}/result", **file_download("application/x-tar"))
def result(job: OwnedJob, services: ServicesDep) -> FileResponse:
    _refuse_held(job)
    if job.result_sha256 is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job.id} has no result yet; it is {job.state}")
    return FileResponse(
        services.store.blob_path(job.result_sha256),
        media_type="application/x-tar",
        filename=f"{job.id}-adapter.tar",
        headers={"X-Content-SHA256": job.result_sha256},
    )


@router.get("/{job_id}/adapter.gguf", **file_download("application/octet-stream"))
def gguf_adapter(job: OwnedJob, services: ServicesDep) -> FileResponse:
    """A fine-tune's adapter as a llama.cpp LoRA file (llama.cpp's --lora), without the tar around it."""
    _refuse_held(job)
    if job.result_gguf_sha256 is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job.id} has no GGUF adapter; it is {job.state}")
    return FileResponse(
        services.store.blob_path(job.result_gguf_sha256),
        media_type="application/octet-stream",
        filename=f"{job.id}-adapter.gguf",
        headers={"X-Content-SHA256": job.result_gguf_sha256},
    )


@router.get("/{job_id}/progress")
def progress(
    job: OwnedJob,
    services: ServicesDep,
    after: Annotated[int, Query(ge=0, le=MAX_ROW_ID, description="a point's id: the points after it")] = 0,
) -> list[ProgressPointOut]:
    """The losses nodes reported, in order (points after id `after` only, for a page that polls)."""
    query = (
        select(JobProgressPoint)
        .where(JobProgressPoint.job_id == job.id, JobProgressPoint.id > after)
        .order_by(JobProgressPoint.id)
        .limit(10_000)
    )
    with services.database.reading() as session:
        return [
            ProgressPointOut.model_validate(point, from_attributes=True) for point in session.scalars(query)
        ]


@router.get("/{job_id}/events")
def events(job: OwnedJob, services: ServicesDep) -> list[JobEventOut]:
    """What happened to the job, oldest first: submission, each lease and node, retries, the end."""
    query = select(JobEvent).where(JobEvent.job_id == job.id).order_by(JobEvent.id).limit(1000)
    with services.database.reading() as session:
        return [JobEventOut.model_validate(event, from_attributes=True) for event in session.scalars(query)]


@router.get("/{job_id}/receipt")
def receipt(job: OwnedJob, services: ServicesDep) -> dict:
    """What ran, on which nodes, how verification ended, and the money the job moved."""
    with services.database.reading() as session:
        return receipts.receipt(session, job)


def _refuse_held(job: Job) -> None:
    if not result_released(job.state):
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"job {job.id} is verifying: its result was built on a checkpoint another node made, and a "
            f"trusted node checks it before you get it",
        )
