"""For ops and tools: health, Prometheus metrics, and the model catalogue."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Response
from fastapi.responses import FileResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from compute_swarm.coordinator.domain import pricing
from compute_swarm.coordinator.transport.api.deps import ServicesDep
from compute_swarm.engine.jobs import CatalogueModel

router = APIRouter(tags=["service"])


@router.get("/healthz")
def health(services: ServicesDep, response: Response) -> dict:
    try:
        with services.database.reading() as session:
            session.execute(text("SELECT 1"))
        database = "ok"
    except Exception as error:  # the answer must still come back, saying what is wrong
        database = f"error: {error.__class__.__name__}"
        response.status_code = 503
    return {
        "status": "ok" if database == "ok" else "degraded",
        "database": database,
        # Which replica answered (several may serve one swarm behind a load balancer), and whether it
        # runs the swarm-wide duties.
        "replica": services.replicas.name,
        "leader": services.replicas.leading,
        "nodes_connected": len(services.hub.connections),
    }


# Prometheus' text format, documented as such (not as the JSON FastAPI assumes).
@router.get("/metrics", response_class=PlainTextResponse)
def metrics(services: ServicesDep) -> Response:
    return Response(generate_latest(services.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/api/models")
def models(services: ServicesDep) -> list[dict]:
    """The catalogue: every model offered (listed) or still served (deprecated), with its prices."""
    return [catalogue_entry(model) for model in services.catalogue.models()]


@router.get("/api/models/{name}/licence", response_class=PlainTextResponse)
def licence(name: str, services: ServicesDep) -> Response:
    """The licence text ops added a model with (the built-in model's is its package's: Apache-2.0)."""
    sha256 = services.catalogue.licence_sha256(name)
    if sha256 is None or not services.store.has(sha256):
        raise HTTPException(404, f"no licence text is stored for a model named {name[:64]!r}")
    return FileResponse(services.store.blob_path(sha256), media_type="text/plain; charset=utf-8")


def catalogue_entry(model: CatalogueModel) -> dict:
    return {
        "name": model.name,
        "state": model.state,
        "architecture": model.architecture,
        "parameters": model.parameters,
        "context_length": model.context_length,
        "licence": model.licence,
        "gguf_bytes": model.file_size_bytes,
        "weights_bytes": sum(file.size for file in model.weights),
        **pricing.model_rates_micro(model),
    }
