"""The web page the coordinator serves: buyers' pages, the ops page, and their static assets.

Pages are rendered on the server (Jinja2) and made live by one small script; everything they load
ships in this package, so the page works with no network beyond the coordinator.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from compute_swarm.coordinator.transport.web import (
    buyer_pages,
    catalogue_pages,
    ops_pages,
    render,
    sell_pages,
    sweep_pages,
)

STATIC = Path(__file__).parent / "static"


def install(app: FastAPI) -> None:
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.include_router(buyer_pages.router)
    app.include_router(sweep_pages.router)
    app.include_router(ops_pages.router)
    app.include_router(sell_pages.router)
    app.include_router(catalogue_pages.router)
    # Errors on pages become pages (401: the sign-in page); the API's own handler answers the rest.
    api_handler = app.exception_handlers[StarletteHTTPException]

    async def http_error(request, error):
        if render.is_page(request.url.path):
            return render.error_page(request, error)
        return await api_handler(request, error)

    app.add_exception_handler(StarletteHTTPException, http_error)
    api_validation_handler = app.exception_handlers[RequestValidationError]

    async def validation_error(request, error):
        if render.is_page(request.url.path):
            problems = "; ".join(
                f"{problem['loc'][-1]}: {problem['msg']}"
                for problem in error.errors()[:3]
                if problem.get("loc")
            )
            return render.error_page(
                request, StarletteHTTPException(422, f"This request was not understood ({problems}).")
            )
        return await api_validation_handler(request, error)

    app.add_exception_handler(RequestValidationError, validation_error)
