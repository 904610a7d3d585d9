"""The buyer's sweep pages: their sweeps with a form to launch one, and a sweep's trials, live.

The form says each setting as a person would type it (one value, a list, or a range for random search)
and is read into a sweep spec here, in one place: the page's script sends the same form to
`/sweeps/quote` for the price as it changes, so the live check and the launch say the same things.
"""

from __future__ import annotations

import math
import re
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from compute_swarm import money
from compute_swarm.coordinator.domain.lifecycle import OPEN_STATES
from compute_swarm.coordinator.service import trials
from compute_swarm.coordinator.service.submissions import JobError
from compute_swarm.coordinator.store import ledger
from compute_swarm.coordinator.store.tables import File, Sweep
from compute_swarm.coordinator.transport.api.deps import CurrentBuyer, Services, ServicesDep
from compute_swarm.coordinator.transport.api.sweeps import OwnedSweep, SweepQuote, TrialRefused, quote_sweep
from compute_swarm.coordinator.transport.web import render
from compute_swarm.coordinator.transport.web.buyer_pages import files_of
from compute_swarm.engine.jobs import DEFAULT_MODEL
from compute_swarm.protocol import format_credits
from compute_swarm.sweeps import MAX_TRIALS, SWEEPABLE

router = APIRouter(include_in_schema=False)

# The settings a sweep may vary, as the form shows them: label, default, help, under "Advanced".
SETTINGS = {
    "learning_rate": ("Learning rate", "0.0003, 0.001", "e.g. 0.0003, 0.001 — or 0.00001:0.001:log", False),
    "rank": ("LoRA rank", "4, 8", "Size of the adapter (1–1024), e.g. 4, 8, 16", False),
    "max_steps": ("Steps", "30", "Optimizer steps a trial trains, e.g. 30", False),
    "alpha": ("LoRA alpha", "16", "Scale of the adapter; often twice the rank", True),
    "batch_size": ("Batch size", "4", "Examples per forward pass", True),
    "gradient_accumulation_steps": ("Accumulation", "1", "Batches summed into one step", True),
    "dropout": ("Dropout", "0.05", "LoRA dropout, 0 to below 1", True),
    "warmup_steps": ("Warm-up steps", "0", "Steps the learning rate ramps up over", True),
    "weight_decay": ("Weight decay", "0", "0 to 1", True),
    "seed": ("Seed", "0", "Several seeds: how much luck moves the loss", True),
}
# The rest of the form, with defaults: each is one value (or a choice), never swept.
OTHER_FIELDS = {
    "dataset": "",
    "base_model": DEFAULT_MODEL,
    "strategy": "grid",
    "trials": "",
    "max_sequence_length": "512",
    "evaluations_per_trial": "4",
    "early_stopping": "on",
    "max_total_price": "",
    "max_price_per_trial": "",
}
ADVANCED_FIELDS = {name for name, (*_rest, advanced) in SETTINGS.items() if advanced} | {
    "max_sequence_length",
    "evaluations_per_trial",
}
# Where the spec keeps what a form field says (a spec error's location names the field at fault).
SPEC_NAMES = {"max_total_price_micro": "max_total_price", "max_price_per_trial_micro": "max_price_per_trial"}
LISTED_SWEEPS = 50  # the newest, on the page (each is read trial by trial); the API lists more
_SPEC_LOCATION = re.compile(r"^(?:(?:parameters|base)\.)?(\w+)")


def default_values() -> dict[str, str]:
    return {name: default for name, (_label, default, _help, _advanced) in SETTINGS.items()} | OTHER_FIELDS


def form_values(form: Any) -> dict[str, str]:
    """What the buyer typed, kept to give back on an error (an unticked box sends nothing)."""
    values = {name: str(form.get(name, ""))[:200] for name in [*SETTINGS, *OTHER_FIELDS]}
    values["early_stopping"] = "on" if form.get("early_stopping") else ""
    return values


# ---- reading the form


class FieldProblem(ValueError):
    """A field that says nothing a sweep can use; the message is shown next to it."""


def _number(text: str, whole: bool) -> int | float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise FieldProblem(f"{text!r} is not a number")
    if whole:
        if value != int(value):
            raise FieldProblem(f"{text} is not a whole number")
        return int(value)
    return value


def read_setting(text: str, whole: bool, random: bool) -> list[int | float] | dict | None:
    """One setting as typed: None (blank), its values (one or several, comma-separated), or a range
    `low:high` / `low:high:log` (random search only), as the CLI's --range takes it."""
    text = text.strip()
    if not text:
        return None
    if ":" in text:
        parts = [part.strip() for part in text.split(":")]
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2].lower() != "log"):
            raise FieldProblem("a range is low:high, or low:high:log to draw on a log scale")
        if not random:
            raise FieldProblem("a range is for random search: a grid takes values, e.g. 0.0003, 0.001")
        low, high = _number(parts[0], False), _number(parts[1], False)
        if not low < high:
            raise FieldProblem("the low end of a range must be below its high end")
        log = len(parts) == 3
        if log and low <= 0:
            raise FieldProblem("a log range needs a low end above 0")
        return {"low": low, "high": high, "log": log}
    values = [_number(part.strip(), whole) for part in text.split(",") if part.strip()]
    if not values:
        raise FieldProblem("give a number, or several separated by commas")
    if len(values) > MAX_TRIALS:
        raise FieldProblem(f"at most {MAX_TRIALS} values")
    return values


def _whole(values: dict[str, str], name: str, errors: dict[str, str], low: int, high: int) -> int | None:
    text = values.get(name, "").strip()
    if not text:
        return None
    if not re.fullmatch(r"\d+", text) or not low <= int(text) <= high:
        errors[name] = f"a whole number from {low} to {high}"
        return None
    return int(text)


def _credits(values: dict[str, str], name: str, errors: dict[str, str]) -> int | None:
    text = values.get(name, "").strip()
    if not text:
        return None
    try:
        micro = money.parse_micro(text, "amount")
    except money.MoneyError:
        errors[name] = "an amount of credits, like 5 or 2.5"
        return None
    if micro == 0:
        errors[name] = "more than 0 credits (leave it blank for no cap)"
        return None
    return micro


def sweep_spec(values: dict[str, str]) -> tuple[dict, dict[str, str]]:
    """The sweep spec the form describes, and each field that cannot be read, with why.

    A setting given one value is the same for every trial (the trials' base); several values, or a
    range, are swept."""
    random = values.get("strategy") == "random"
    errors: dict[str, str] = {}
    base: dict[str, Any] = {"base_model": values.get("base_model", ""), "dataset": values.get("dataset", "")}
    parameters: dict[str, dict] = {}
    for name in SETTINGS:
        try:
            setting = read_setting(values.get(name, ""), SWEEPABLE[name], random)
        except FieldProblem as problem:
            errors[name] = str(problem)
            continue
        if isinstance(setting, dict):
            parameters[name] = setting
        elif setting is not None and len(setting) == 1:
            base[name] = setting[0]
        elif setting is not None:
            parameters[name] = {"values": setting}
    if "max_steps" not in base and "max_steps" not in parameters and "max_steps" not in errors:
        errors["max_steps"] = "required: how many steps each trial trains"
    if not base["dataset"]:
        errors["dataset"] = "choose a dataset (upload one on the Datasets page)"
    length = _whole(values, "max_sequence_length", errors, 8, 131_072)
    if length is not None:
        base["max_sequence_length"] = length
    spec: dict[str, Any] = {
        "base": base,
        "parameters": parameters,
        "strategy": "random" if random else "grid",
        # The seed the trials train with also draws a random sweep's settings, as the CLI does.
        "seed": base.get("seed", 0),
        "median_stopping": {"enabled": bool(values.get("early_stopping"))},
    }
    count = _whole(values, "trials", errors, 1, MAX_TRIALS)
    if count is not None:
        spec["trials"] = count
    elif random and "trials" not in errors:
        errors["trials"] = f"random search needs how many trials to draw (1 to {MAX_TRIALS})"
    evaluations = _whole(values, "evaluations_per_trial", errors, 1, 100)
    if evaluations is not None:
        spec["evaluations_per_trial"] = evaluations
    for field, key in (
        ("max_total_price", "max_total_price_micro"),
        ("max_price_per_trial", "max_price_per_trial_micro"),
    ):
        cap = _credits(values, field, errors)
        if cap is not None:
            spec[key] = cap
    if not parameters and not errors:
        errors["form"] = (
            "nothing is swept: give a setting several values separated by commas "
            "(e.g. learning rate 0.0003, 0.001)" + (", or a range like 0.00001:0.001:log" if random else "")
        )
    return spec, errors


def _spec_errors(error: trials.SweepError) -> dict[str, str]:
    """A refused sweep spec's problems by form field, where the problem names one."""
    errors: dict[str, str] = {}
    for problem in str(error).split("; "):
        location, _, message = problem.partition(": ")
        found = _SPEC_LOCATION.match(location)
        field = SPEC_NAMES.get(found.group(1), found.group(1)) if found and message else None
        if field in SETTINGS or field in OTHER_FIELDS:
            errors.setdefault(field, message)
        else:
            errors.setdefault("form", str(error))
    return errors


def _trial_errors(error: JobError) -> dict[str, str]:
    """A trial the coordinator would refuse: its fields' problems, naming the trial where it matters."""
    errors: dict[str, str] = {}
    swept = error.values if isinstance(error, TrialRefused) else {}
    for field, problem in error.fields.items():
        if field in SETTINGS or field in OTHER_FIELDS:
            which = (
                f" (trial {error.number}: {field}={render.setting_text(swept[field])})"
                if field in swept
                else ""
            )
            errors[field] = f"{problem}{which}"
    if not errors:
        errors["form"] = str(error)
    return errors


def _cap_errors(spec: dict, quoted: SweepQuote) -> dict[str, str]:
    """The caps the quoted prices pass: submitting would be refused, so say so by the cap."""
    errors = {}
    total_cap, trial_cap = spec.get("max_total_price_micro"), spec.get("max_price_per_trial_micro")
    if total_cap is not None and quoted.price_micro > total_cap:
        errors["max_total_price"] = (
            f"the {len(quoted.trial_prices_micro)} trials cost {format_credits(quoted.price_micro)} credits "
            f"in all, more than this cap"
        )
    prices = quoted.trial_prices_micro
    over = [number for number, price in enumerate(prices, 1) if trial_cap is not None and price > trial_cap]
    if len(over) == len(prices):
        which = "each trial costs"
    elif len(over) == 1:
        which = f"trial {over[0]} costs"
    else:
        which = f"trials {', '.join(map(str, over[:5]))}{' …' if len(over) > 5 else ''} cost"
    if over:
        errors["max_price_per_trial"] = (
            f"{which} more than this cap (up to {format_credits(max(prices))} credits)"
        )
    return errors


def check_form(
    services: Services, buyer_id: str, values: dict[str, str]
) -> tuple[dict, SweepQuote | None, dict[str, str]]:
    """The form read and priced: (spec, its quote or None, the problems by field)."""
    spec, errors = sweep_spec(values)
    if errors:
        return spec, None, errors
    try:
        quoted = quote_sweep(services, buyer_id, spec)
    except trials.SweepError as error:
        return spec, None, _spec_errors(error)
    except JobError as error:
        return spec, None, _trial_errors(error)
    return spec, quoted, _cap_errors(spec, quoted)


# ---- the pages


def _loss(trial: dict | None) -> float | None:
    """What ranks a trial: its held-out loss, or its training loss where it held nothing out."""
    if trial is None:
        return None
    return trial["eval_loss"] if trial["eval_loss"] is not None else trial["final_loss"]


def _summary(view: dict) -> dict:
    """A sweep's line on the list: how far it got, its best held-out loss and what it cost."""
    rows = view["trials"]
    best = view["best"]
    spec = view["spec"]
    # The API says running or completed; a sweep whose every trial was cancelled reads as that.
    cancelled = bool(rows) and all(row["state"] == "cancelled" for row in rows)
    return {
        "id": view["id"],
        "state": "cancelled" if view["state"] == "completed" and cancelled else view["state"],
        "created_at": view["created_at"],
        "done": sum(row["state"] not in OPEN_STATES for row in rows),
        "total": len(rows),
        "best_loss": _loss(best),
        "best_trial": None if best is None else best["trial"],
        "cost_micro": view["cost_micro"],
        "held_micro": view["held_micro"],
        "strategy": spec["strategy"],
        "swept": sorted(spec["parameters"]),
        "base_model": spec["base"].get("base_model", ""),
    }


def _sweeps_page(
    request: Request,
    services: ServicesDep,
    buyer_id: str,
    values: dict[str, str],
    errors: dict[str, str],
    status_code=200,
) -> Response:
    with services.database.reading() as session:
        sweeps = session.scalars(
            select(Sweep)
            .where(Sweep.buyer_id == buyer_id)
            .order_by(Sweep.created_at.desc())
            .limit(LISTED_SWEEPS)
        ).all()
        summaries = [_summary(trials.view(session, sweep)) for sweep in sweeps]
        available = ledger.balance(session, ledger.buyer_account(buyer_id))
    return render.page(
        request,
        "sweeps.html",
        status_code=status_code,
        title="Sweeps",
        sweeps=summaries,
        datasets=files_of(services, buyer_id, "dataset"),
        models=services.catalogue.models(states=("listed",)),
        settings=SETTINGS,
        values=values,
        errors=errors,
        available=available,
        max_trials=MAX_TRIALS,
        # Open "Advanced" when one of its fields needs attention.
        advanced_open=any(name in ADVANCED_FIELDS for name in errors),
    )


@router.get("/sweeps")
def sweeps_page(request: Request, buyer: CurrentBuyer, services: ServicesDep, dataset: str = "") -> Response:
    values = default_values()
    values["dataset"] = dataset[:200]
    return _sweeps_page(request, services, buyer.id, values, {})


@router.post("/sweeps/quote")
async def quote(request: Request, buyer: CurrentBuyer, services: ServicesDep) -> JSONResponse:
    """The launch form priced as it is typed: each field's problem, or what the trials would hold."""
    values = form_values(await request.form())
    _spec, quoted, errors = await run_in_threadpool(check_form, services, buyer.id, values)
    body: dict[str, Any] = {"fields": {name: problem for name, problem in errors.items() if name != "form"}}
    body["form"] = errors.get("form")
    if quoted is not None:
        body |= {
            "trials": len(quoted.trial_prices_micro),
            "price_micro": quoted.price_micro,
            "most_per_trial_micro": max(quoted.trial_prices_micro),
            "available_micro": quoted.available_micro,
            "affordable": quoted.price_micro <= quoted.available_micro,
        }
    return JSONResponse(body, headers={"Cache-Control": "no-store"})


@router.post("/sweeps")
async def launch(request: Request, buyer: CurrentBuyer, services: ServicesDep) -> Response:
    values = form_values(await request.form())
    spec, _quoted, errors = await run_in_threadpool(check_form, services, buyer.id, values)
    if not errors:
        try:
            sweep, _queued = await run_in_threadpool(services.submissions.submit_sweep, buyer.id, spec)
        except trials.SweepError as error:
            # Priced a moment ago: the balance changed meanwhile, or a cap was passed by a hair.
            account = " — your balance is on the Account page" if error.status_code == 402 else ""
            errors = {"form": f"{error}{account}"}
        else:
            return render.redirect(f"/sweeps/{sweep.id}")
    return await run_in_threadpool(_sweeps_page, request, services, buyer.id, values, errors, 422)


@router.get("/sweeps/{sweep_id}")
def sweep_page(request: Request, sweep: OwnedSweep, services: ServicesDep) -> Response:
    with services.database.reading() as session:
        view = trials.view(session, sweep)
        dataset = session.get(File, view["spec"]["base"].get("dataset", ""))
    best = view["best"]
    return render.page(
        request,
        "sweep.html",
        title=f"Sweep {sweep.id}",
        sweep=view,
        summary=_summary(view),
        swept=sorted(view["spec"]["parameters"]),
        dataset=dataset if dataset is not None and dataset.buyer_id == sweep.buyer_id else None,
        best=best,
        is_open=view["state"] == "running",
    )


@router.post("/sweeps/{sweep_id}/cancel")
def cancel(sweep: OwnedSweep, services: ServicesDep) -> Response:
    # Trials that finished meanwhile stay as they are: the page shows how.
    services.submissions.cancel_sweep(sweep.id)
    return render.redirect(f"/sweeps/{sweep.id}")
