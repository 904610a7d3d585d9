"""OpenAI's error shape for everything under /v1, so the official client raises its usual exceptions
(AuthenticationError for 401, NotFoundError for 404, RateLimitError for 429, ...)."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler, request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

OPENAI_PREFIX = "/v1"

# The `type` OpenAI gives each status, and the `code` it uses when the handler names none.
_TYPES = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    402: ("insufficient_quota", "insufficient_quota"),
    403: ("invalid_request_error", "forbidden"),
    404: ("invalid_request_error", "not_found"),
    409: ("invalid_request_error", "conflict"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("requests", "rate_limit_exceeded"),
}


class OpenAIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status_code: int, message: str, *, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.code = code
        self.param = param


def error_body(status_code: int, message: str, *, code: str | None = None, param: str | None = None) -> dict:
    kind, default_code = _TYPES.get(
        status_code, ("server_error" if status_code >= 500 else "invalid_request_error", None)
    )
    return {"error": {"message": message, "type": kind, "param": param, "code": code or default_code}}


def error_response(error: OpenAIError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        error_body(error.status_code, error.message, code=error.code, param=error.param),
        status_code=error.status_code,
        headers=headers,
    )


def install(app: FastAPI) -> None:
    """Answer /v1 errors in OpenAI's shape; the rest of the API keeps FastAPI's {"detail": ...}."""

    @app.exception_handler(OpenAIError)
    async def openai_error(request: Request, error: OpenAIError) -> JSONResponse:
        headers = {"Retry-After": "1"} if error.status_code in (429, 503) else None
        return error_response(error, headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        if not request.url.path.startswith(OPENAI_PREFIX):
            return await http_exception_handler(request, error)
        message = error.detail if isinstance(error.detail, str) else str(error.detail)
        if error.status_code == 401:
            message = f"Incorrect API key provided: {message}. Send your compute-swarm key as the api_key."
        return JSONResponse(
            error_body(error.status_code, message), status_code=error.status_code, headers=error.headers
        )

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError):
        if not request.url.path.startswith(OPENAI_PREFIX):
            return await request_validation_exception_handler(request, error)
        problems = error.errors()
        first = problems[0] if problems else {"loc": (), "msg": "invalid request"}
        location = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path")]
        param = ".".join(location) or None
        message = "; ".join(
            f"{'.'.join(str(part) for part in problem['loc'] if part != 'body') or 'body'}: "
            f"{problem['msg'].removeprefix('Value error, ')}"
            for problem in problems[:5]
        )
        return JSONResponse(error_body(400, message, param=param), status_code=400)
