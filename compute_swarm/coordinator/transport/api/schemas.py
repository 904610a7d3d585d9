"""What the REST API answers: response models built from table rows (see coordinator/API.md)."""

from __future__ import annotations

from typing import Any

from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field

from compute_swarm.coordinator.domain.lifecycle import result_released
from compute_swarm.coordinator.service.inference import fine_tuned_model_id
from compute_swarm.coordinator.store.tables import ApiKey, File, Job, Upload

# The largest row id: ids are Integer columns, 32 bits on PostgreSQL (SQLite stores 64). A query
# parameter compared with ids is bounded by it, or PostgreSQL fails on it (a 500) before the query runs.
MAX_ROW_ID = 2**31 - 1


def file_download(media_type: str) -> dict[str, Any]:
    """A route's options for answering with a file: documented under the file's own content type,
    not the JSON FastAPI assumes."""
    return {"response_class": FileResponse, "responses": {200: {"content": {media_type: {}}}}}


class FileOut(BaseModel):
    id: str
    filename: str
    sha256: str
    size: int
    purpose: str
    lines: int
    created_at: float

    @classmethod
    def of(cls, file: File) -> FileOut:
        return cls.model_validate(file, from_attributes=True)


class UploadIn(BaseModel):
    sha256: str = Field(min_length=64, max_length=64)
    size: int
    purpose: str = "dataset"
    filename: str | None = Field(default=None, max_length=1000)
    job_id: str | None = Field(default=None, max_length=64)
    lease_id: str | None = Field(default=None, max_length=64)


class UploadOut(BaseModel):
    upload_id: str
    sha256: str
    size: int
    offset: int
    complete: bool
    chunk_limit: int
    file: FileOut | None = None

    @classmethod
    def of(cls, upload: Upload, chunk_limit: int, file: File | None = None) -> UploadOut:
        return cls(
            upload_id=upload.id,
            sha256=upload.sha256,
            size=upload.size,
            offset=upload.received,
            complete=upload.completed_at is not None,
            chunk_limit=chunk_limit,
            file=FileOut.of(file) if file is not None else None,
        )


class JobIn(BaseModel):
    spec: dict[str, Any]
    max_attempts: int | None = None


class JobError(BaseModel):
    kind: str
    message: str


class JobOut(BaseModel):
    id: str
    state: str
    spec: dict[str, Any]
    price_micro: int
    attempt: int
    max_attempts: int
    progress: dict[str, Any] | None
    metrics: dict[str, Any] | None
    error: JobError | None
    checkpoint_step: int  # the latest step a retry would resume from
    result_sha256: str | None
    # A completed fine-tune's model for /v1/chat/completions (ft:<base>:<suffix>:<job id>).
    fine_tuned_model: str | None
    # Its check on a trusted node: pending, passed, mismatch, skipped or unavailable (None until completed).
    verification: str | None
    verification_detail: str | None
    created_at: float
    updated_at: float
    finished_at: float | None

    @classmethod
    def of(cls, job: Job) -> JobOut:
        return cls(
            id=job.id,
            state=job.state,
            spec=job.spec,
            price_micro=job.price_micro,
            attempt=job.attempt,
            max_attempts=job.max_attempts,
            progress=job.progress,
            metrics=job.metrics,
            error=JobError(kind=job.error_kind or "error", message=job.error_message or "")
            if job.state == "failed"
            else None,
            checkpoint_step=job.checkpoint_step,
            result_sha256=job.result_sha256 if result_released(job.state) else None,
            fine_tuned_model=fine_tuned_model_id(job)
            if job.result_gguf_sha256 and result_released(job.state)
            else None,
            verification=job.verification,
            verification_detail=job.verification_detail,
            created_at=job.created_at,
            updated_at=job.updated_at,
            finished_at=job.finished_at,
        )


class NodeRegistrationIn(BaseModel):
    name: str = Field(min_length=1, max_length=100)
    # Where ops admit nodes by invitation (Settings.node_admission "invite").
    invite_code: str | None = Field(default=None, max_length=100)


class NodeRegistrationOut(BaseModel):
    node_id: str
    token: str
    # False where ops approve nodes: it may connect, but gets work only once approved.
    approved: bool = True


class InviteIn(BaseModel):
    uses: int = Field(default=1, ge=1, le=100_000)
    hours: float | None = Field(default=24 * 7, gt=0, le=24 * 365)
    note: str = Field(default="", max_length=200)


class InviteOut(BaseModel):
    code: str
    uses: int
    expires_at: float | None


class EarningsOut(BaseModel):
    pending_micro: int
    available_micro: int
    jobs_completed: int
    payout_pending_micro: int = 0
    paid_out_micro: int = 0


class PayoutRequestIn(BaseModel):
    """A seller's request to be paid. `request_key` is the node's own, new for each request: the same
    key again answers with the payout it made, so a lost answer is retried without paying twice."""

    model_config = ConfigDict(extra="forbid")
    request_key: str = Field(min_length=8, max_length=100, pattern=r"^[A-Za-z0-9_.:-]+$")
    payee: str = Field(min_length=1, max_length=200, description="where to be paid, as the operator pays")
    amount_micro: int | None = Field(default=None, ge=1, le=2**62, description="default: all available")


class PayoutOut(BaseModel):
    id: str
    node_id: str
    node_name: str | None = None
    amount_micro: int
    payee: str
    state: str  # requested, exported, paid, rejected
    requested_at: float
    batch_id: str | None
    currency: str | None  # the batch's, once exported
    rate: str | None  # currency per credit, as exported
    amount: str | None  # in the currency, exact decimal text
    reference: str | None  # the payment's, once paid
    reason: str | None  # why it was rejected
    decided_at: float | None


class PayoutMoneyOut(BaseModel):
    at: float
    kind: str
    account: str
    amount_micro: int
    memo: str


class PayoutReceiptOut(PayoutOut):
    money: list[PayoutMoneyOut]


class NodePayoutsOut(BaseModel):
    earnings: EarningsOut
    minimum_micro: int
    currency: str  # what a credit is worth, in ops' currency
    value_micro_per_credit: int
    payouts: list[PayoutOut]


class NodeOut(BaseModel):
    node_id: str
    name: str
    earnings: EarningsOut


class EarningsHourOut(BaseModel):
    hour_start: int  # epoch seconds, the start of a UTC hour
    credited_micro: int


class EarningsHistoryOut(BaseModel):
    earnings: EarningsOut
    since: int  # epoch seconds, the start of the first hour in the window
    hourly: list[EarningsHourOut]  # ascending; hours with nothing credited are left out
    total_credited_micro: int  # all time


class QuoteIn(BaseModel):
    spec: dict[str, Any]


class QuoteOut(BaseModel):
    price_micro: int
    available_micro: int
    affordable: bool
    # Free memory a node needs: training in fp32 (CPU, Apple) and in 16 bits (CUDA/ROCm).
    required_memory_bytes: int
    required_memory_bytes_16bit: int


class ProgressPointOut(BaseModel):
    id: int
    attempt: int
    step: int
    loss: float | None
    eval_loss: float | None
    at: float


class JobEventOut(BaseModel):
    at: float
    state: str
    attempt: int
    node_id: str | None
    message: str


class ApiKeyIn(BaseModel):
    name: str = Field(min_length=1, max_length=100)


class ApiKeyOut(BaseModel):
    id: str
    name: str
    hint: str
    created_at: float
    revoked_at: float | None

    @classmethod
    def of(cls, key: ApiKey) -> ApiKeyOut:
        return cls.model_validate(key, from_attributes=True)


class NewApiKeyOut(ApiKeyOut):
    api_key: str  # shown this once
