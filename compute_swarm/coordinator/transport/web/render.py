"""Rendering pages: the templates, what every page is given, and the headers every page carries."""

from __future__ import annotations

import datetime
import hashlib
from decimal import Decimal
from functools import cache
from pathlib import Path
from urllib.parse import quote

from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.exceptions import HTTPException

from compute_swarm.coordinator.service import sessions
from compute_swarm.protocol import format_credits

TEMPLATES = Path(__file__).parent / "templates"
STATIC = Path(__file__).parent / "static"
# Paths that answer JSON or bytes, not pages (the sweep form's price is JSON for the page's script).
NOT_PAGES = (
    "/api/",
    "/sweeps/quote",
    "/v1/",
    "/v1",
    "/node",
    "/swarm/",
    "/healthz",
    "/metrics",
    "/static/",
    "/docs",
    "/openapi.json",
)

# No inline script or style: the page runs only what this package ships.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}


def is_page(path: str) -> bool:
    return not path.startswith(NOT_PAGES)


@cache
def _environment() -> Environment:
    environment = Environment(
        loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html"]), trim_blocks=True
    )
    environment.filters["credits"] = format_credits
    environment.filters["when"] = _when
    environment.filters["size"] = _size
    environment.filters["setting"] = setting_text
    environment.globals["asset"] = asset_url
    environment.globals["ledger_label"] = ledger_label
    return environment


@cache
def asset_url(name: str) -> str:
    """A static file's URL with its content hash, so a browser never runs a stale script."""
    digest = hashlib.sha256((STATIC / name).read_bytes()).hexdigest()[:12]
    return f"/static/{name}?v={digest}"


def ledger_label(kind: str, amount_micro: int) -> str:
    """What a ledger entry meant to the buyer (a request's settlement returns the unused hold)."""
    if kind == "escrow":
        return "held in escrow"
    if kind == "charge":
        return "unused hold returned" if amount_micro > 0 else "charged"
    return {"refund": "refunded", "grant": "credits added"}.get(kind, kind)


def setting_text(value: float | int | None) -> str:
    """A trial's setting as people read it, to 4 significant digits: 0.0003, 16, 0.00001 (as the
    page's script writes it, so a refreshed table reads the same)."""
    if value is None:
        return ""
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return format(Decimal(f"{value:.4g}"), "f")


def _when(moment: float | None) -> str:
    if moment is None:
        return ""
    return datetime.datetime.fromtimestamp(moment, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _size(size: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    return ""


def csrf_token(request: Request) -> str:
    """The token this page's forms and scripts send back: the session's, or before sign-in the
    anonymous cookie's (set on the response by `page`)."""
    signed_in = getattr(request.state, "signed_in", None)
    if signed_in is not None:
        return signed_in.session.csrf_token
    token = request.cookies.get(sessions.ANONYMOUS_CSRF_COOKIE)
    if not token or len(token) > 100:
        token = getattr(request.state, "new_anonymous_csrf", None) or sessions.new_secret()
        request.state.new_anonymous_csrf = token
    return token


def page(request: Request, template: str, status_code: int = 200, **context) -> HTMLResponse:
    signed_in = getattr(request.state, "signed_in", None)
    body = (
        _environment()
        .get_template(template)
        .render(
            request=request,
            csrf_token=csrf_token(request),
            buyer=signed_in.buyer if signed_in is not None else None,
            path=request.url.path,
            **context,
        )
    )
    response = HTMLResponse(body, status_code=status_code, headers=SECURITY_HEADERS)
    new_token = getattr(request.state, "new_anonymous_csrf", None)
    if new_token is not None:
        set_cookie(request, response, sessions.ANONYMOUS_CSRF_COOKIE, new_token, max_age=None)
    return response


def set_cookie(request: Request, response: Response, name: str, value: str, max_age: int | None) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        httponly=True,
        # Lax: a link from elsewhere opens the page signed in; a form posted from elsewhere carries
        # no cookie (and would fail the Origin and CSRF checks anyway).
        samesite="lax",
        # Behind a TLS proxy the coordinator itself sees http: the public origin says what browsers use.
        secure=request.url.scheme == "https"
        or request.app.state.services.settings.public_origin.startswith("https://"),
        path="/",
    )


def redirect(location: str) -> RedirectResponse:
    return RedirectResponse(location, status_code=303, headers={"Cache-Control": "no-store"})


def safe_next(location: str | None, default: str) -> str:
    """Only a path on this site (never //host or a full URL): an open redirect is a phishing aid."""
    if location and location.startswith("/") and not location.startswith(("//", "/\\")):
        return location
    return default


def error_page(request: Request, error: HTTPException) -> Response:
    if error.status_code == 401:
        sign_in = "/ops/sign-in" if request.url.path.startswith("/ops") else "/sign-in"
        if request.method == "GET":
            return redirect(f"{sign_in}?next={quote(request.url.path)}")
        return redirect(sign_in)
    titles = {403: "Not allowed", 404: "Not found", 405: "Not allowed", 422: "Not understood"}
    message = error.detail if isinstance(error.detail, str) else "That did not work."
    return page(
        request,
        "error.html",
        status_code=error.status_code,
        title=titles.get(error.status_code, "Something went wrong"),
        message=message,
    )
