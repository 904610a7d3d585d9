"""OpenAI-compatible files and fine-tuning jobs: /v1/files and /v1/fine_tuning/jobs.

They are views of the swarm's own files and LoRA jobs (the same rows /api serves), so a job started
here shows in `compute-swarm jobs` and the other way round. Its fine-tuned model is
ft:<base model>:<suffix>:<job id>, usable in /v1/chat/completions once the job has succeeded.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Form, UploadFile
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from compute_swarm.coordinator.domain.lifecycle import HELD_STATES, OPEN_STATES
from compute_swarm.coordinator.service import buyer_reads
from compute_swarm.coordinator.service.catalogue import CatalogueError
from compute_swarm.coordinator.service.inference import fine_tuned_model_id
from compute_swarm.coordinator.service.submissions import JobError
from compute_swarm.coordinator.service.uploads import Holder, UploadError
from compute_swarm.coordinator.store.tables import File, Job, JobEvent
from compute_swarm.coordinator.transport.api.deps import CurrentBuyer, OwnedFile, OwnedJob, ServicesDep
from compute_swarm.coordinator.transport.api.openai_errors import OpenAIError
from compute_swarm.coordinator.transport.api.schemas import MAX_ROW_ID, file_download
from compute_swarm.engine.jobs import LoraJobSpec
from compute_swarm.protocol import SUCCEEDED_JOB_STATES

router = APIRouter(prefix="/v1", tags=["openai"])

# OpenAI's purpose for a fine-tuning file, and ours.
PURPOSES = {"fine-tune": "dataset", "batch": "prompts"}
OPENAI_STATUS = {
    "queued": "queued",
    "leased": "running",
    "running": "running",
    "verifying": "running",  # the result is held until a trusted node verifies it
    "completed": "succeeded",
    "verified": "succeeded",
    "failed": "failed",
    "cancelled": "cancelled",
}
DEFAULT_EPOCHS = 3
SUFFIX = re.compile(r"^[A-Za-z0-9_-]{1,40}$")
# An event's id as OpenAI's clients page with it: ftevent-<our id>, or the bare number (ASCII digits:
# str.isdigit() also takes "²", which int() refuses).
EVENT_CURSOR = re.compile(r"^(?:ftevent-)?([0-9]{1,19})$")


def _fine_tuning_job(job: OwnedJob) -> Job:
    """A buyer's LoRA job: their batch inference jobs are not fine-tuning jobs."""
    if job.kind != "lora":
        raise OpenAIError(404, f"No fine-tuning job {job.id}: it is a batch inference job.", param="job_id")
    return job


FineTuningJob = Annotated[Job, Depends(_fine_tuning_job)]


# ---- files


def _file_object(file: File) -> dict:
    purpose = next((name for name, ours in PURPOSES.items() if ours == file.purpose), file.purpose)
    return {
        "id": file.id,
        "object": "file",
        "bytes": file.size,
        "created_at": int(file.created_at),
        "filename": file.filename,
        "purpose": purpose,
        "status": "processed",
        "status_details": None,
    }


@router.post("/files")
def upload_file(
    buyer: CurrentBuyer, services: ServicesDep, file: UploadFile, purpose: str = Form(...)
) -> dict:
    if purpose not in PURPOSES:
        raise OpenAIError(400, f"purpose must be one of: {', '.join(PURPOSES)}", param="purpose")
    try:
        stored = services.uploads.upload_whole(
            Holder("buyer", buyer.id), file.file, purpose=PURPOSES[purpose], filename=file.filename
        )
    except UploadError as error:
        status = 400 if error.status_code == 422 else error.status_code
        raise OpenAIError(status, str(error), param="file") from None
    return _file_object(stored)


@router.get("/files")
def list_files(buyer: CurrentBuyer, services: ServicesDep, purpose: str | None = None) -> dict:
    query = select(File).where(File.buyer_id == buyer.id).order_by(File.created_at.desc())
    if purpose is not None:
        query = query.where(File.purpose == PURPOSES.get(purpose, purpose))
    with services.database.reading() as session:
        files = session.scalars(query).all()
    return {"object": "list", "data": [_file_object(file) for file in files], "has_more": False}


@router.get("/files/{file_id}")
def get_file(file: OwnedFile) -> dict:
    return _file_object(file)


@router.get("/files/{file_id}/content", **file_download("application/jsonl"))
def file_content(file: OwnedFile, services: ServicesDep) -> FileResponse:
    return FileResponse(services.store.blob_path(file.sha256), media_type="application/jsonl")


@router.delete("/files/{file_id}")
def delete_file(file: OwnedFile, services: ServicesDep) -> dict:
    with services.database.transaction() as session:
        row = session.get(File, file.id)
        if row is not None:
            session.delete(row)
        # The bytes go too unless another file names them or a job still needs them.
        still_used = session.scalar(
            select(File.id).where(File.sha256 == file.sha256).limit(1)
        ) or session.scalar(
            select(Job.id).where(Job.dataset_sha256 == file.sha256, Job.state.in_(OPEN_STATES)).limit(1)
        )
    if not still_used:
        services.store.delete(file.sha256)
    return {"id": file.id, "object": "file", "deleted": True}


# ---- fine-tuning jobs


class Hyperparameters(BaseModel):
    """OpenAI's three, and the swarm's own LoRA settings (documented in coordinator/API.md)."""

    model_config = ConfigDict(extra="forbid")

    n_epochs: int | Literal["auto"] = "auto"
    batch_size: int | Literal["auto"] = "auto"
    learning_rate_multiplier: float | Literal["auto"] = "auto"
    n_steps: int | None = Field(default=None, ge=1)  # instead of n_epochs
    learning_rate: float | None = None
    rank: int | None = None
    alpha: float | None = None
    max_sequence_length: int | None = None


class FineTuningJobIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    training_file: str
    hyperparameters: Hyperparameters = Hyperparameters()
    method: dict[str, Any] | None = None
    suffix: str | None = None
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1)
    validation_file: str | None = None


@router.post("/fine_tuning/jobs")
def create_fine_tuning_job(body: FineTuningJobIn, buyer: CurrentBuyer, services: ServicesDep) -> dict:
    try:
        services.catalogue.for_fine_tuning(body.model)
    except CatalogueError:
        raise OpenAIError(
            404,
            f"The model '{body.model}' cannot be fine-tuned here; choose one of: "
            f"{', '.join(services.catalogue.names())}",
            code="model_not_found",
            param="model",
        ) from None
    if body.validation_file is not None:
        raise OpenAIError(
            400,
            "validation_file is not supported: a share of the training file is held out for evaluation",
            param="validation_file",
        )
    if body.suffix is not None and not SUFFIX.match(body.suffix):
        raise OpenAIError(400, "suffix must be 1 to 40 letters, digits, '-' or '_'", param="suffix")
    hyperparameters = _method_hyperparameters(body)
    spec: dict[str, Any] = {"base_model": body.model, "dataset": body.training_file}
    if hyperparameters.n_steps is not None:
        spec["max_steps"] = hyperparameters.n_steps
    else:
        spec["epochs"] = DEFAULT_EPOCHS if hyperparameters.n_epochs == "auto" else hyperparameters.n_epochs
    if hyperparameters.batch_size != "auto":
        spec["batch_size"] = hyperparameters.batch_size
    learning_rate = hyperparameters.learning_rate or LoraJobSpec.model_fields["learning_rate"].default
    if hyperparameters.learning_rate_multiplier != "auto":
        learning_rate *= hyperparameters.learning_rate_multiplier
    spec["learning_rate"] = learning_rate
    for name in ("rank", "alpha", "max_sequence_length"):
        if getattr(hyperparameters, name) is not None:
            spec[name] = getattr(hyperparameters, name)
    if body.seed is not None:
        spec["seed"] = body.seed
    try:
        job = services.submissions.submit(buyer.id, spec, None, model_suffix=body.suffix)
    except JobError as error:
        status = 400 if error.status_code == 422 else error.status_code
        param = "training_file" if "file" in str(error) else None
        raise OpenAIError(status, str(error), param=param) from None
    return _job_object(job)


def _method_hyperparameters(body: FineTuningJobIn) -> Hyperparameters:
    if body.method is None:
        return body.hyperparameters
    if body.method.get("type") != "supervised":
        raise OpenAIError(400, "only the 'supervised' fine-tuning method is supported", param="method")
    given = (body.method.get("supervised") or {}).get("hyperparameters") or {}
    try:
        return Hyperparameters.model_validate(given)
    except ValueError as error:
        raise OpenAIError(400, f"method.supervised.hyperparameters: {error}", param="method") from None


@router.get("/fine_tuning/jobs")
def list_fine_tuning_jobs(
    buyer: CurrentBuyer, services: ServicesDep, after: str | None = None, limit: int = 20
) -> dict:
    limit = min(max(limit, 1), 100)
    query = buyer_reads.buyers_jobs(buyer.id).where(Job.kind == "lora").order_by(Job.created_at.desc())
    with services.database.reading() as session:
        if after is not None:
            cursor = session.get(Job, after)
            if cursor is not None and cursor.buyer_id == buyer.id:
                query = query.where(Job.created_at < cursor.created_at)
        jobs = session.scalars(query.limit(limit + 1)).all()
    return {
        "object": "list",
        "data": [_job_object(job) for job in jobs[:limit]],
        "has_more": len(jobs) > limit,
    }


@router.get("/fine_tuning/jobs/{job_id}")
def get_fine_tuning_job(job: FineTuningJob) -> dict:
    return _job_object(job)


@router.post("/fine_tuning/jobs/{job_id}/cancel")
def cancel_fine_tuning_job(job: FineTuningJob, services: ServicesDep) -> dict:
    try:
        cancelled = services.submissions.cancel(job.id)
    except JobError as error:
        raise OpenAIError(400 if error.status_code == 409 else error.status_code, str(error)) from None
    return _job_object(cancelled)


@router.get("/fine_tuning/jobs/{job_id}/events")
def list_fine_tuning_events(
    job: FineTuningJob, services: ServicesDep, after: str | None = None, limit: int = 20
) -> dict:
    limit = min(max(limit, 1), 100)
    query = select(JobEvent).where(JobEvent.job_id == job.id).order_by(JobEvent.id.desc())
    cursor = EVENT_CURSOR.match(after or "")
    if cursor is not None and int(cursor[1]) <= MAX_ROW_ID:
        query = query.where(JobEvent.id < int(cursor[1]))
    with services.database.reading() as session:
        events = session.scalars(query.limit(limit + 1)).all()
    data = [
        {
            "id": f"ftevent-{event.id}",
            "object": "fine_tuning.job.event",
            "created_at": int(event.at),
            "level": "error" if event.state == "failed" else "info",
            "message": event.message,
            "type": "message",
            "data": {"state": event.state, "attempt": event.attempt},
        }
        for event in events[:limit]
    ]
    return {"object": "list", "data": data, "has_more": len(events) > limit}


def _job_object(job: Job) -> dict:
    spec = job.submitted_spec
    assert isinstance(spec, LoraJobSpec)  # the fine-tuning API lists fine-tunes only
    succeeded = job.state in SUCCEEDED_JOB_STATES
    default_learning_rate = LoraJobSpec.model_fields["learning_rate"].default
    metrics = job.metrics or {}
    return {
        "id": job.id,
        "object": "fine_tuning.job",
        "created_at": int(job.created_at),
        "finished_at": int(job.finished_at) if job.finished_at else None,
        "model": job.base_model,
        "fine_tuned_model": fine_tuned_model_id(job) if succeeded and job.result_gguf_sha256 else None,
        "organization_id": job.buyer_id,
        "result_files": [],
        "status": OPENAI_STATUS.get(job.state, job.state),
        "training_file": spec.dataset,
        "validation_file": None,
        "hyperparameters": {
            "n_epochs": spec.epochs or "auto",
            "batch_size": spec.batch_size,
            "learning_rate_multiplier": spec.learning_rate / default_learning_rate,
        },
        "trained_tokens": metrics.get("train_tokens"),
        "error": {"code": job.error_kind or "error", "message": job.error_message or "", "param": None}
        if job.state == "failed"
        else None,
        "seed": spec.seed,
        "estimated_finish": None,
        "integrations": [],
        "user_provided_suffix": job.model_suffix,
        "method": {"type": "supervised"},
        # The swarm's own view: progress and price.
        "progress": job.progress if job.state in HELD_STATES else None,
        "price_micro": job.price_micro,
    }
