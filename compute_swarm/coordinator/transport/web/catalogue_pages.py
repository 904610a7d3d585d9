"""The catalogue's page, public: every model offered, with its size, licence, prices, and the smallest
graphics card a fine-tune of it fits, so buyers choose a model and sellers see what their card can take."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from compute_swarm.coordinator.domain import pricing
from compute_swarm.coordinator.domain.scheduler import required_memory_bytes
from compute_swarm.coordinator.transport.api.deps import ServicesDep
from compute_swarm.coordinator.transport.web import render
from compute_swarm.engine.jobs import CatalogueModel
from compute_swarm.engine.memory import reference_lora_spec, smallest_card_gb
from compute_swarm.protocol import format_credits

router = APIRouter(include_in_schema=False)


@router.get("/models")
def models_page(request: Request, services: ServicesDep) -> Response:
    return render.page(
        request,
        "models.html",
        title="Models",
        models=[_row(model) for model in services.catalogue.models()],
        reference=reference_lora_spec("nf4"),
    )


def _row(model: CatalogueModel) -> dict:
    rates = pricing.model_rates_micro(model)
    return {
        "model": model,
        "parameters": _parameters(model.parameters),
        "fine_tune_rate": format_credits(rates["fine_tune_per_million_tokens_micro"]),
        "inference_rate": format_credits(rates["inference_per_million_tokens_micro"]),
        "qlora_card": _card(model, "nf4"),
        "lora_card": _card(model, "none"),
    }


def _card(model: CatalogueModel, quantization: str) -> str:
    """The smallest card the catalogue's reference fine-tune of `model` fits, held so (CUDA, bf16)."""
    try:
        needed = required_memory_bytes(reference_lora_spec(quantization, model.name), model, backend="cuda")
    except ValueError:  # no shape is recorded for it
        return "—"
    card = smallest_card_gb(needed)
    return f"{card} GB" if card is not None else "more than 80 GB"


def _parameters(count: int) -> str:
    return f"{count / 1e9:.1f} B" if count >= 1e9 else f"{count / 1e6:.0f} M"
