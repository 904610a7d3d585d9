"""The ops page: sign in with the admin token; the swarm's nodes, queue and jobs, live."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import Response

from compute_swarm.coordinator.service import sessions
from compute_swarm.coordinator.transport.api.deps import Operator, ServicesDep
from compute_swarm.coordinator.transport.web import render
from compute_swarm.coordinator.transport.web.buyer_pages import check_anonymous_form

router = APIRouter(prefix="/ops", include_in_schema=False)


@router.get("/sign-in")
def sign_in_page(request: Request, services: ServicesDep) -> Response:
    return render.page(
        request,
        "ops_sign_in.html",
        title="Ops sign-in",
        errors={},
        closed=services.settings.admin_token is None,
    )


@router.post("/sign-in")
def sign_in(
    request: Request,
    services: ServicesDep,
    admin_token: Annotated[str, Form()] = "",
    csrf_token: Annotated[str, Form()] = "",
) -> Response:
    check_anonymous_form(request, services, csrf_token)
    expected = services.settings.admin_token
    if expected is None or not sessions.admin_token_matches(expected.get_secret_value(), admin_token):
        error = (
            "the ops view is closed: start the coordinator with SWARM_ADMIN_TOKEN set"
            if expected is None
            else "this is not the admin token"
        )
        return render.page(
            request,
            "ops_sign_in.html",
            status_code=422,
            title="Ops sign-in",
            errors={"admin_token": error},
            closed=expected is None,
        )
    with services.database.transaction() as session:
        _row, cookie = sessions.open_session(
            session, sessions.OPS, services.settings.session_hours, admin_token=expected.get_secret_value()
        )
    response = render.redirect("/ops")
    render.set_cookie(
        request, response, sessions.COOKIES[sessions.OPS], cookie, int(services.settings.session_hours * 3600)
    )
    return response


@router.post("/sign-out", dependencies=[Operator])
def sign_out(request: Request, services: ServicesDep) -> Response:
    with services.database.transaction() as session:
        sessions.close_session(session, request.cookies.get(sessions.COOKIES[sessions.OPS]))
    response = render.redirect("/ops/sign-in")
    response.delete_cookie(sessions.COOKIES[sessions.OPS], path="/")
    return response


@router.get("", dependencies=[Operator])
def ops_page(request: Request) -> Response:
    # The tables fill from /api/ops/overview, refreshed every few seconds by the page's script.
    return render.page(request, "ops.html", title="Ops", ops=True)
