"""What a request may send: every route's body has a size limit, counted as it streams (a declared
Content-Length or a chunked body alike), and a caller without valid credentials is refused before a
byte of the body is read, whatever its size.

One ASGI middleware does it for every route. It gates the body rather than the request: the checks run
when the route first asks for the body, after the router has chosen the route (so the route's own
dependencies say who may call it) and before FastAPI reads the body (which it does before it solves
those dependencies). A refusal is raised there as an HTTPException, so each API answers in its own
shape (OpenAI's under /v1, {"detail": ...} under /api, a page for the web page).
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import HTTPException, Request, status
from fastapi.dependencies.models import Dependant
from starlette.datastructures import Headers
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from compute_swarm.coordinator.transport.api.deps import (
    CHECKS_BEFORE_BODY,
    DATABASE_UNAVAILABLE,
    Services,
    database_unavailable,
)
from compute_swarm.coordinator.transport.api.openai_fine_tuning import PURPOSES as OPENAI_FILE_PURPOSES

# A multipart body holds its file and, around it, part headers, boundaries and the purpose field.
MULTIPART_ALLOWANCE = 64 * 1024


@dataclass(frozen=True)
class BodyLimit:
    limit: int
    # What the limit is for, as the refusal names it.
    what: str
    # The bound on the bytes on the wire, when it is larger than `limit` (multipart framing).
    wire_limit: int | None = None

    @property
    def most(self) -> int:
        return self.wire_limit or self.limit

    def refusal(self) -> HTTPException:
        return HTTPException(
            status.HTTP_413_CONTENT_TOO_LARGE,
            f"{self.what} may be at most {self.limit} bytes ({_size(self.limit)})",
        )


def body_limit(services: Services, method: str, path: str) -> BodyLimit:
    """The limit on one route's body: its purpose's for an upload, a small one for everything else."""
    settings = services.settings
    if (method, path) == ("PATCH", "/api/uploads/{upload_id}"):
        return BodyLimit(settings.chunk_limit_bytes, "an upload chunk")
    if (method, path) == ("POST", "/v1/files"):
        largest = max(services.uploads.size_limit(ours) for ours in OPENAI_FILE_PURPOSES.values())
        # The upload service then holds the file to its own purpose's limit.
        return BodyLimit(largest, "an uploaded file", wire_limit=largest + MULTIPART_ALLOWANCE)
    return BodyLimit(settings.max_request_body_bytes, "a request's body")


def _size(count: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= scale:
            return f"{count / scale:g} {unit}"
    return f"{count} bytes"


def _authenticating(dependant: Dependant) -> list:
    """The dependencies of a route that say who is calling, however deep they are declared."""
    found, pending = [], [dependant]
    while pending:
        current = pending.pop()
        if current.call in CHECKS_BEFORE_BODY and current.call not in found:
            found.append(current.call)
        pending.extend(current.dependencies)
    return found


def _has_body(headers: Headers) -> bool:
    return headers.get("content-length", "0") != "0" or "transfer-encoding" in headers


class RequestLimits:
    """ASGI middleware: bounds every request's body and checks credentials before it is read."""

    def __init__(self, app: ASGIApp):
        self.app = app
        # Per route (by id: routes live as long as the app), the dependencies that authenticate.
        self._authenticating: dict[int, list] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _has_body(Headers(scope=scope)):
            await self.app(scope, receive, send)
            return
        gate = _BodyGate(self, scope, receive)

        async def send_closing(message: Message) -> None:
            # Answered before its body was read (refused here, or by a route's dependency): the rest
            # is not wanted, and closing the connection stops it coming (kept open, the server would
            # read and drop it, however large).
            if message["type"] == "http.response.start" and not gate.finished:
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        await self.app(scope, gate.receive, send_closing)

    def authenticating(self, route: BaseRoute | None) -> list:
        if route is None:
            return []
        if id(route) not in self._authenticating:
            dependant = getattr(route, "dependant", None)
            self._authenticating[id(route)] = _authenticating(dependant) if dependant is not None else []
        return self._authenticating[id(route)]


class _BodyGate:
    """One request's receive channel: checked when the body is first asked for, then counted."""

    def __init__(self, limits: RequestLimits, scope: Scope, receive: Receive):
        self.limits = limits
        self.scope = scope
        self._receive = receive
        self.limit: BodyLimit | None = None
        self.received = 0
        self.finished = False
        self.refused = False

    async def receive(self) -> Message:
        if self.refused:
            return {"type": "http.disconnect"}
        try:
            if self.limit is None:
                self.limit = await self._open()
            message = await self._receive()
            if message["type"] == "http.request":
                self.received += len(message.get("body", b""))
                if self.received > self.limit.most:
                    raise self.limit.refusal()
                self.finished = not message.get("more_body", False)
            return message
        except HTTPException:
            self.refused = True
            raise

    async def _open(self) -> BodyLimit:
        request = Request(self.scope)
        services: Services = request.app.state.services
        # The router has chosen the route by now (FastAPI puts it in the scope).
        route = self.scope.get("route")
        for dependency in self.limits.authenticating(route):
            # A caller who passes is looked up again by the route's dependency (which then checks a
            # browser's CSRF token, perhaps in the form): one indexed read more, against reading a
            # body of any size from anyone.
            try:
                await CHECKS_BEFORE_BODY[dependency](request, services)
            except DATABASE_UNAVAILABLE as error:
                # Raised from here, anything but an HTTPException becomes FastAPI's 400 "error parsing
                # the body".
                raise database_unavailable() from error
        path = getattr(route, "path", self.scope["path"])
        limit = body_limit(services, self.scope["method"], path)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit.most:
            raise limit.refusal()
        return limit
