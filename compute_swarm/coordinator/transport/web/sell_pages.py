"""The sellers' page, public: what the app does and earns, and the app for the visitor's OS, made to join
this swarm (its address, and the invite code of an invite link: /sell?invite=CODE) with no typing."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from compute_swarm import money
from compute_swarm.coordinator.domain import pricing
from compute_swarm.coordinator.service import admission, app_downloads
from compute_swarm.coordinator.transport.api.deps import ServicesDep
from compute_swarm.coordinator.transport.api.market import CurrentMarket
from compute_swarm.coordinator.transport.web import render
from compute_swarm.invitation import INVITE_CODE, MAX_INVITE_CODE_CHARACTERS, Invitation
from compute_swarm.market import ClassFigures
from compute_swarm.protocol import CreditValue, format_credits

router = APIRouter(prefix="/sell", include_in_schema=False)
InviteQuery = Annotated[str | None, Query(max_length=MAX_INVITE_CODE_CHARACTERS)]


@router.get("")
def sell_page(
    request: Request, services: ServicesDep, market: CurrentMarket, invite: InviteQuery = None
) -> Response:
    settings = services.settings
    packages = app_downloads.offered(settings.resolved_app_downloads_dir)
    visitor = app_downloads.platform_of(request.headers.get("user-agent", ""))
    invite_state = None if invite is None else ("usable" if _invite_usable(services, invite) else "unusable")
    primary = packages.get(visitor) if visitor else None
    return render.page(
        request,
        "sell.html",
        title="Earn with your GPU",
        offered=bool(packages),
        # Every other system, with its package or None where this swarm offers none.
        others=[
            (platform, packages.get(platform))
            for platform in app_downloads.PLATFORMS
            if primary is None or platform != primary.platform
        ],
        platform_names=app_downloads.PLATFORM_NAMES,
        visitor=visitor,
        primary=primary,
        download_query=f"?invite={invite}" if invite_state == "usable" else "",
        invite_state=invite_state,
        admission=settings.node_admission,
        seller_share_percent=(pricing.BASIS_POINTS - settings.platform_fee_basis_points) / 100,
        training_rate=format_credits(pricing.DEFAULT_MICRO_PER_MILLION_TOKEN_PARAMETERS),
        inference_rate=format_credits(pricing.INFERENCE_MICRO_PER_MILLION_TOKEN_PARAMETERS),
        version=settings.offered_agent_version,
        market=market,
        earnings=[_class_earnings(figures, market.credit_value) for figures in market.classes],
    )


@router.get("/download/{platform}")
def download(request: Request, services: ServicesDep, platform: str, invite: InviteQuery = None) -> Response:
    package = app_downloads.offered(services.settings.resolved_app_downloads_dir).get(platform)
    if package is None:
        raise HTTPException(
            404, "This swarm offers no app for that system yet: see the sell page for those it has."
        )
    if invite is not None and not _invite_usable(services, invite):
        raise HTTPException(
            403,
            "This invite link is unknown, used up or expired: ask the swarm's operators for a new one "
            "(or download the app from /sell and type a code later).",
        )
    coordinator = services.settings.public_origin or str(request.base_url).rstrip("/")
    try:
        sent = app_downloads.download(package, Invitation(coordinator, invite))
    except OSError:
        raise HTTPException(404, "The app's package is being replaced: try again in a minute.") from None
    return StreamingResponse(
        sent.chunks,
        media_type="application/octet-stream",
        headers={
            "Content-Length": str(sent.size),
            "Content-Disposition": f'attachment; filename="{sent.file_name}"',
            "Cache-Control": "no-store",  # it may carry an invite code
            "X-Content-Type-Options": "nosniff",
        },
    )


@router.get("/wheels/{project}/")
def wheel_index(services: ServicesDep, project: str) -> Response:
    """A package index page (PEP 503) of the wheels this swarm hands out with its app."""
    found = app_downloads.wheels(services.settings.resolved_app_downloads_dir, project)
    if not found:
        raise HTTPException(404, f"no wheels of {project[:100]} here")
    links = "\n".join(f'<a href="{path.name}">{path.name}</a><br>' for path in found)
    body = f"<!DOCTYPE html>\n<html><body>\n<h1>Links for {project}</h1>\n{links}\n</body></html>\n"
    return Response(body, media_type="text/html", headers={"Cache-Control": "no-cache"})


@router.get("/wheels/{project}/{file_name}")
def wheel_file(services: ServicesDep, project: str, file_name: str) -> Response:
    for path in app_downloads.wheels(services.settings.resolved_app_downloads_dir, project):
        if path.name == file_name:
            return FileResponse(path, media_type="application/octet-stream")
    raise HTTPException(404, f"no wheel {file_name[:200]} here")


def _class_earnings(figures: ClassFigures, value: CreditValue) -> dict:
    """One class's row of the sell page's table: its figures, with the pay also in ops' currency."""

    def worth(micro: int | None) -> str:
        return "—" if micro is None else money.credits_worth(micro, value)

    return {
        "figures": figures,
        "per_hour": worth(figures.median_pay_per_work_hour_micro),
        "per_day": worth(figures.expected_pay_per_day_micro),
    }


def _invite_usable(services: ServicesDep, code: str) -> bool:
    if not INVITE_CODE.match(code):
        return False
    with services.database.reading() as session:
        return admission.invite_usable(session, code)
