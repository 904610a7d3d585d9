"""The buyer's pages: sign in (or sign up), files, jobs, a job, the playground, the account.

Every page asks for the buyer through `CurrentBuyer` and for a job through `OwnedJob`, the same
dependencies as the API, so a page can show nothing the API would refuse. Forms post here with the
session's CSRF token; the scripts call the JSON API with it in a header.
"""

from __future__ import annotations

import collections
import contextlib
import secrets
import threading
import time
from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import Response
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from compute_swarm.coordinator.domain.lifecycle import OPEN_STATES
from compute_swarm.coordinator.service import accounts, buyer_reads, sessions
from compute_swarm.coordinator.service.inference import fine_tuned_model_id
from compute_swarm.coordinator.service.submissions import JobError
from compute_swarm.coordinator.store import ledger
from compute_swarm.coordinator.store.tables import File, Job, JobEvent, LedgerEntry, LedgerTransaction
from compute_swarm.coordinator.transport.api.account import inference_requests
from compute_swarm.coordinator.transport.api.deps import (
    CurrentBuyer,
    OwnedJob,
    ServicesDep,
    check_browser_request,
)
from compute_swarm.coordinator.transport.api.keys import list_keys
from compute_swarm.coordinator.transport.api.openai_fine_tuning import SUFFIX
from compute_swarm.coordinator.transport.api.schemas import FileOut, JobOut
from compute_swarm.coordinator.transport.web import render
from compute_swarm.engine.jobs import DEFAULT_MODEL
from compute_swarm.protocol import SUCCEEDED_JOB_STATES

router = APIRouter(include_in_schema=False)

# The launch form: each field, its default, and whether it is under "Advanced".
LAUNCH_FIELDS = {
    "max_steps": ("30", False),
    "rank": ("8", True),
    "alpha": ("16", True),
    "learning_rate": ("0.001", True),
    "batch_size": ("4", True),
    "gradient_accumulation_steps": ("1", True),
    "max_sequence_length": ("512", True),
}
LISTED_REQUESTS = 100  # the newest live requests on the account page; the totals count them all
INTEGER_FIELDS = {"max_steps", "rank", "batch_size", "gradient_accumulation_steps", "max_sequence_length"}


class SignupLimiter:
    """At most `per_minute` accounts created in any minute, by everyone together."""

    def __init__(self, per_minute: int):
        self.per_minute = per_minute
        self._moments: collections.deque[float] = collections.deque()
        self._lock = threading.Lock()

    def allow(self) -> bool:
        now = time.monotonic()
        with self._lock:
            while self._moments and now - self._moments[0] > 60:
                self._moments.popleft()
            if len(self._moments) >= self.per_minute:
                return False
            self._moments.append(now)
            return True


def _signup_limiter(request: Request, per_minute: int) -> SignupLimiter:
    limiter = getattr(request.app.state, "signup_limiter", None)
    if limiter is None:
        limiter = request.app.state.signup_limiter = SignupLimiter(per_minute)
    return limiter


# ---- signing in and out


@router.get("/")
def home() -> Response:
    return render.redirect("/jobs")


def _sign_in_page(
    request: Request,
    services: ServicesDep,
    next: str | None,
    errors: dict[str, str],
    status_code: int = 200,
    name="",
) -> Response:
    return render.page(
        request,
        "sign_in.html",
        status_code=status_code,
        title="Sign in",
        next=render.safe_next(next, "/jobs"),
        allow_signup=services.settings.allow_signup,
        signup_credits=services.settings.signup_credits_micro,
        errors=errors,
        name=name,
    )


@router.get("/sign-in")
def sign_in_page(request: Request, services: ServicesDep, next: str | None = None) -> Response:
    return _sign_in_page(request, services, next, {})


def check_anonymous_form(request: Request, services: ServicesDep, csrf_token: str) -> None:
    """A sign-in form (no session yet) must come from our page: its Origin, and the token in its
    hidden field matching the anonymous CSRF cookie the page set (a browser without it fails)."""
    expected = request.cookies.get(sessions.ANONYMOUS_CSRF_COOKIE) or secrets.token_hex(16)
    check_browser_request(request, services.settings, expected, csrf_token)


def _signed_in_response(request: Request, services: ServicesDep, cookie: str, location: str) -> Response:
    response = render.redirect(location)
    render.set_cookie(
        request,
        response,
        sessions.COOKIES[sessions.BUYER],
        cookie,
        int(services.settings.session_hours * 3600),
    )
    return response


@router.post("/sign-in")
def sign_in(
    request: Request,
    services: ServicesDep,
    api_key: Annotated[str, Form()] = "",
    next: Annotated[str, Form()] = "/jobs",
    csrf_token: Annotated[str, Form()] = "",
) -> Response:
    # Lengths are checked here, not by FastAPI, so that a wrong paste gets this page, not JSON.
    check_anonymous_form(request, services, csrf_token)
    api_key = api_key.strip()
    next = next if len(next) <= 2000 else "/jobs"
    error = None
    if not api_key:
        error = "paste your API key (it starts with swarm-buyer-)"
    elif len(api_key) > 200:
        error = "this is longer than any API key: paste only the key"
    elif not api_key.startswith(accounts.BUYER_KEY_PREFIX):
        error = "this is not a buyer API key: those start with swarm-buyer-"
    else:
        with services.database.transaction() as session:
            key = accounts.api_key_for_secret(session, api_key)
            if key is not None:
                _row, cookie = sessions.open_session(
                    session,
                    sessions.BUYER,
                    services.settings.session_hours,
                    buyer_id=key.buyer_id,
                    api_key_id=key.id,
                )
        if key is None:
            error = "no account has this key (or it was revoked)"
    if error is not None:
        return _sign_in_page(request, services, next, {"api_key": error}, 422)
    return _signed_in_response(request, services, cookie, render.safe_next(next, "/jobs"))


@router.post("/sign-up")
def sign_up(
    request: Request,
    services: ServicesDep,
    name: Annotated[str, Form()] = "",
    csrf_token: Annotated[str, Form()] = "",
) -> Response:
    check_anonymous_form(request, services, csrf_token)
    settings = services.settings

    def refuse(status_code: int, errors: dict[str, str]) -> Response:
        return _sign_in_page(request, services, "/jobs", errors, status_code, name=name)

    if not settings.allow_signup:
        return refuse(403, {"name": "this coordinator does not create accounts: ask its operator for a key"})
    name = name.strip() or f"buyer-{secrets.token_hex(4)}"
    if len(name) > 100:
        return refuse(422, {"name": "a name is at most 100 characters"})
    if not _signup_limiter(request, settings.signups_per_minute).allow():
        return refuse(429, {"name": "many accounts were just created: try again in a minute"})
    try:
        with services.database.transaction() as session:
            buyer, api_key = accounts.create_buyer(session, name, settings.signup_credits_micro)
            key = accounts.api_key_for_secret(session, api_key)
            _row, cookie = sessions.open_session(
                session, sessions.BUYER, settings.session_hours, buyer_id=buyer.id, api_key_id=key.id
            )
    except accounts.AccountError as error:
        return refuse(422, {"name": str(error)})
    # The key is shown on this answer only, never stored in plain text nor put in a URL.
    response = render.page(request, "new_key.html", title="Your API key", api_key=api_key, name=buyer.name)
    render.set_cookie(
        request, response, sessions.COOKIES[sessions.BUYER], cookie, int(settings.session_hours * 3600)
    )
    return response


@router.post("/sign-out")
def sign_out(buyer: CurrentBuyer, request: Request, services: ServicesDep) -> Response:
    with services.database.transaction() as session:
        sessions.close_session(session, request.cookies.get(sessions.COOKIES[sessions.BUYER]))
    response = render.redirect("/sign-in")
    response.delete_cookie(sessions.COOKIES[sessions.BUYER], path="/")
    return response


# ---- files and jobs


def files_of(services: ServicesDep, buyer_id: str, purpose: str | None = None) -> list[FileOut]:
    query = select(File).where(File.buyer_id == buyer_id).order_by(File.created_at.desc()).limit(500)
    if purpose is not None:
        query = query.where(File.purpose == purpose)
    with services.database.reading() as session:
        return [FileOut.of(file) for file in session.scalars(query)]


@router.get("/files")
def files_page(request: Request, buyer: CurrentBuyer, services: ServicesDep) -> Response:
    return render.page(
        request,
        "files.html",
        title="Datasets",
        files=files_of(services, buyer.id),
        max_bytes=services.settings.max_dataset_bytes,
    )


@router.get("/jobs")
def jobs_page(request: Request, buyer: CurrentBuyer, services: ServicesDep) -> Response:
    query = buyer_reads.buyers_jobs(buyer.id).order_by(Job.created_at.desc()).limit(200)
    with services.database.reading() as session:
        jobs = [JobOut.of(job) for job in session.scalars(query)]
    return render.page(request, "jobs.html", title="Jobs", jobs=jobs)


def _launch_page(
    request: Request,
    services: ServicesDep,
    buyer_id: str,
    values: dict[str, str],
    errors: dict[str, str],
    status_code=200,
) -> Response:
    with services.database.reading() as session:
        available = ledger.balance(session, ledger.buyer_account(buyer_id))
    return render.page(
        request,
        "new_job.html",
        status_code=status_code,
        title="New fine-tune",
        datasets=files_of(services, buyer_id, "dataset"),
        models=services.catalogue.models(states=("listed",)),
        fields=LAUNCH_FIELDS,
        values=values,
        errors=errors,
        available=available,
        # Open "Advanced" when one of its fields needs attention.
        advanced_open=any(LAUNCH_FIELDS.get(name, ("", False))[1] for name in errors),
    )


@router.get("/jobs/new")
def new_job_page(request: Request, buyer: CurrentBuyer, services: ServicesDep, dataset: str = "") -> Response:
    values = {name: default for name, (default, _advanced) in LAUNCH_FIELDS.items()}
    values.update(base_model=DEFAULT_MODEL, dataset=dataset, suffix="")
    return _launch_page(request, services, buyer.id, values, {})


def launch_spec(values: dict[str, str]) -> tuple[dict, dict[str, str]]:
    """The spec a launch form describes, and the fields that are not numbers where numbers belong."""
    spec: dict = {
        "type": "lora",
        "base_model": values.get("base_model", ""),
        "dataset": values.get("dataset", ""),
    }
    errors: dict[str, str] = {}
    for name in LAUNCH_FIELDS:
        text = values.get(name, "").strip()
        if not text:
            errors[name] = "required"
            continue
        try:
            spec[name] = int(text) if name in INTEGER_FIELDS else float(text)
        except ValueError:
            errors[name] = "a whole number" if name in INTEGER_FIELDS else "a number, e.g. 0.0002"
    return spec, errors


@router.post("/jobs/new")
async def launch(request: Request, buyer: CurrentBuyer, services: ServicesDep) -> Response:
    form = await request.form()
    values = {
        name: str(form.get(name, ""))[:200] for name in [*LAUNCH_FIELDS, "base_model", "dataset", "suffix"]
    }
    return await _launch(request, services, buyer.id, values)


async def _launch(request: Request, services: ServicesDep, buyer_id: str, values: dict[str, str]) -> Response:
    spec, errors = launch_spec(values)
    suffix = values["suffix"].strip() or None
    if suffix is not None and not SUFFIX.match(suffix):
        errors["suffix"] = "1 to 40 letters, digits, '-' or '_'"
    if not values["dataset"]:
        errors["dataset"] = "choose a dataset (upload one on the Datasets page)"
    if not errors:
        try:
            job = await run_in_threadpool(
                services.submissions.submit, buyer_id, spec, None, model_suffix=suffix
            )
        except JobError as error:
            errors = dict(error.fields) or {"form": str(error)}
            if error.status_code == 402:
                errors = {"form": f"{error} — your balance is on the Account page"}
        else:
            return render.redirect(f"/jobs/{job.id}")
    return await run_in_threadpool(_launch_page, request, services, buyer_id, values, errors, 422)


@router.get("/jobs/{job_id}")
def job_page(request: Request, job: OwnedJob, services: ServicesDep) -> Response:
    with services.database.reading() as session:
        events = session.scalars(
            select(JobEvent).where(JobEvent.job_id == job.id).order_by(JobEvent.id)
        ).all()
        money = session.execute(
            select(LedgerTransaction.kind, LedgerEntry.amount_micro)
            .join(LedgerEntry, LedgerEntry.transaction_id == LedgerTransaction.id)
            .where(
                LedgerTransaction.job_id == job.id, LedgerEntry.account == ledger.buyer_account(job.buyer_id)
            )
        ).all()
        dataset = session.get(File, job.submitted_spec.dataset)
    totals = collections.Counter()
    for kind, amount in money:
        totals[kind] += amount
    attempts: dict[int, dict] = {}
    for event in events:
        if event.attempt and event.node_id:
            attempt = attempts.setdefault(event.attempt, {"attempt": event.attempt, "node_id": event.node_id})
            attempt.update(last_state=event.state, ended=event.at, last_message=event.message)
            attempt.setdefault("started", event.at)
    return render.page(
        request,
        "job.html",
        title=f"Job {job.id}",
        job=JobOut.of(job),
        events=events,
        attempts=list(attempts.values()),
        # The buyer's side: escrow held (negative), then given back or charged.
        held=-totals["escrow"],
        refunded=totals["refund"],
        charged=max(0, -totals["escrow"] - totals["refund"]) if job.state not in OPEN_STATES else 0,
        dataset=dataset,
        fine_tuned_model=fine_tuned_model_id(job)
        if job.result_gguf_sha256 and job.state in SUCCEEDED_JOB_STATES
        else None,
        is_open=job.state in OPEN_STATES,
    )


@router.post("/jobs/{job_id}/cancel")
def cancel(job: OwnedJob, services: ServicesDep) -> Response:
    with contextlib.suppress(JobError):  # finished meanwhile: the page shows how
        services.submissions.cancel(job.id)
    return render.redirect(f"/jobs/{job.id}")


# ---- playground and account


@router.get("/playground")
def playground(request: Request, buyer: CurrentBuyer, services: ServicesDep, model: str = "") -> Response:
    query = buyer_reads.servable_models(buyer.id).limit(100)
    with services.database.reading() as session:
        fine_tuned = [fine_tuned_model_id(job) for job in session.scalars(query)]
    return render.page(
        request,
        "playground.html",
        title="Playground",
        base_models=[model.name for model in services.catalogue.models()],
        fine_tuned=fine_tuned,
        chosen=model or (fine_tuned[0] if fine_tuned else DEFAULT_MODEL),
        max_tokens=min(256, services.settings.inference_default_max_tokens),
    )


def _account_page(
    request: Request,
    services: ServicesDep,
    buyer_id: str,
    new_key: str | None = None,
    errors=None,
    status_code=200,
) -> Response:
    with services.database.reading() as session:
        balance = buyer_reads.balance(session, buyer_id)
        lines = buyer_reads.ledger_lines(session, buyer_id, limit=200)
        requests = inference_requests(session, buyer_id, limit=LISTED_REQUESTS)
    return render.page(
        request,
        "account.html",
        status_code=status_code,
        title="Account",
        balance=balance,
        lines=lines,
        requests=requests,
        keys=list_keys(services, buyer_id),
        new_key=new_key,
        errors=errors or {},
    )


@router.get("/account")
def account(request: Request, buyer: CurrentBuyer, services: ServicesDep) -> Response:
    return _account_page(request, services, buyer.id)


@router.post("/account/keys")
def create_key(
    request: Request,
    buyer: CurrentBuyer,
    services: ServicesDep,
    name: Annotated[str, Form(max_length=200)] = "",
) -> Response:
    try:
        with services.database.transaction() as session:
            _key, api_key = accounts.create_api_key(session, buyer.id, name)
    except accounts.AccountError as error:
        return _account_page(request, services, buyer.id, errors={"name": str(error)}, status_code=422)
    return _account_page(request, services, buyer.id, new_key=api_key)


@router.post("/account/keys/{key_id}/revoke")
def revoke_key(key_id: str, buyer: CurrentBuyer, services: ServicesDep) -> Response:
    with contextlib.suppress(accounts.AccountError):  # not theirs, or gone: the list shows what there is
        services.buyer_keys.revoke(buyer.id, key_id)
    # Revoking the key this browser signed in with ends its session: the next page asks to sign in.
    return render.redirect("/account")
