"""A buyer's API keys: list, create (shown once), revoke."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, status
from sqlalchemy import select

from compute_swarm.coordinator.service import accounts
from compute_swarm.coordinator.store.tables import ApiKey
from compute_swarm.coordinator.transport.api.deps import CurrentBuyer, ServicesDep
from compute_swarm.coordinator.transport.api.schemas import ApiKeyIn, ApiKeyOut, NewApiKeyOut

router = APIRouter(prefix="/api/keys", tags=["account"])


def list_keys(services: ServicesDep, buyer_id: str) -> list[ApiKeyOut]:
    query = select(ApiKey).where(ApiKey.buyer_id == buyer_id).order_by(ApiKey.created_at.desc())
    with services.database.reading() as session:
        return [ApiKeyOut.of(key) for key in session.scalars(query)]


@router.get("")
def keys(buyer: CurrentBuyer, services: ServicesDep) -> list[ApiKeyOut]:
    return list_keys(services, buyer.id)


@router.post("", status_code=status.HTTP_201_CREATED)
def create(body: ApiKeyIn, buyer: CurrentBuyer, services: ServicesDep) -> NewApiKeyOut:
    try:
        with services.database.transaction() as session:
            key, api_key = accounts.create_api_key(session, buyer.id, body.name)
    except accounts.AccountError as error:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(error)) from None
    return NewApiKeyOut(**ApiKeyOut.of(key).model_dump(), api_key=api_key)


@router.post("/{key_id}/revoke")
def revoke(key_id: str, buyer: CurrentBuyer, services: ServicesDep) -> ApiKeyOut:
    """Revoke a key: it stops working at once, and browsers signed in with it are signed out."""
    try:
        key = services.buyer_keys.revoke(buyer.id, key_id)
    except accounts.AccountError as error:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(error)) from None
    return ApiKeyOut.of(key)
