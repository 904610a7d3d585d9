"""Uploads (buyers' datasets, nodes' checkpoints and results) and buyers' files."""

from __future__ import annotations

from fastapi import APIRouter, Header, HTTPException, Request, status
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from compute_swarm.coordinator.service.uploads import UploadError
from compute_swarm.coordinator.store.tables import File, Upload
from compute_swarm.coordinator.transport.api.deps import CurrentBuyer, CurrentHolder, OwnedFile, ServicesDep
from compute_swarm.coordinator.transport.api.schemas import FileOut, UploadIn, UploadOut

router = APIRouter(prefix="/api", tags=["files"])


def _answer(services: ServicesDep, upload: Upload) -> UploadOut:
    file = None
    if upload.file_id is not None:
        with services.database.transaction() as session:
            file = session.get(File, upload.file_id)
    return UploadOut.of(upload, services.settings.chunk_limit_bytes, file)


@router.post("/uploads", status_code=status.HTTP_201_CREATED)
def create_upload(body: UploadIn, holder: CurrentHolder, services: ServicesDep) -> UploadOut:
    if holder.kind == "node" and (
        not body.job_id
        or not body.lease_id
        or not services.leases.holds_lease(holder.id, body.job_id, body.lease_id)
    ):
        raise HTTPException(status.HTTP_409_CONFLICT, "this node does not hold that job's lease")
    try:
        upload = services.uploads.create(
            holder,
            sha256=body.sha256,
            size=body.size,
            purpose=body.purpose,
            filename=body.filename,
            job_id=body.job_id,
            lease_id=body.lease_id,
        )
    except UploadError as error:
        raise HTTPException(error.status_code, str(error)) from None
    return _answer(services, upload)


@router.get("/uploads/{upload_id}")
def get_upload(upload_id: str, holder: CurrentHolder, services: ServicesDep) -> UploadOut:
    try:
        return _answer(services, services.uploads.get(holder, upload_id))
    except UploadError as error:
        raise HTTPException(error.status_code, str(error)) from None


@router.patch("/uploads/{upload_id}")
async def send_chunk(
    upload_id: str,
    request: Request,
    holder: CurrentHolder,
    services: ServicesDep,
    upload_offset: int = Header(alias="Upload-Offset", ge=0),
) -> UploadOut:
    # Bounded by the chunk limit as it arrives (coordinator/limits.py), after the caller is known.
    data = await request.body()
    try:
        upload = await run_in_threadpool(services.uploads.receive, holder, upload_id, upload_offset, data)
    except UploadError as error:
        raise HTTPException(error.status_code, str(error)) from None
    return await run_in_threadpool(_answer, services, upload)


@router.get("/files")
def list_files(buyer: CurrentBuyer, services: ServicesDep) -> list[FileOut]:
    with services.database.reading() as session:
        files = session.scalars(
            select(File).where(File.buyer_id == buyer.id).order_by(File.created_at.desc())
        ).all()
    return [FileOut.of(file) for file in files]


@router.get("/files/{file_id}")
def get_file(file: OwnedFile) -> FileOut:
    return FileOut.of(file)
