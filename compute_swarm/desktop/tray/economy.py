"""What the tray says about money, decided without Qt: gross earnings, electricity and net profit for
today, this week and in total (and per day and per job, for the charts), the forecast before *Start
earning*, and a job's receipt (the payouts' words are desktop.payouts_cli's, shared with the CLI).
Integer micro-units throughout; words only at the end.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from compute_swarm import money
from compute_swarm.desktop.electricity import Conversion, ElectricitySettings, cost_per_hour_micro
from compute_swarm.desktop.energy import Hardware, estimated_watts
from compute_swarm.desktop.tray.state import EarningsSummary, format_duration
from compute_swarm.desktop.work_journal import JobEntry
from compute_swarm.market import Forecast, MarketFigures, forecast, hardware_class
from compute_swarm.protocol import CreditValue, Telemetry, format_credits


@dataclass(frozen=True)
class Period:
    """One column of the earnings card: what was earned (credits, and in the seller's money where it
    converts), what the electricity cost, and the difference."""

    credits_micro: int
    gross_micro: int | None
    electricity_micro: int

    @property
    def net_micro(self) -> int | None:
        return None if self.gross_micro is None else self.gross_micro - self.electricity_micro


@dataclass(frozen=True)
class MoneySummary:
    currency: str
    today: Period
    week: Period
    total: Period
    net_by_day: tuple[tuple[datetime.date, int], ...]  # for the chart; empty when it does not convert
    electricity_by_day: tuple[tuple[datetime.date, int], ...]
    problem: str | None  # why net profit cannot be shown (no exchange rate), in words


def money_summary(
    earnings: EarningsSummary,
    electricity_by_day: tuple[tuple[str, int], ...],
    credit_value: CreditValue | None,
    settings: ElectricitySettings,
    today: datetime.date,
) -> MoneySummary:
    electricity = {datetime.date.fromisoformat(day): amount for day, amount in electricity_by_day}
    monday = today - datetime.timedelta(days=today.weekday())
    conversion = Conversion(credit_value, settings) if credit_value is not None else None

    def value(credits_micro: int) -> int | None:
        return conversion.local_micro(credits_micro) if conversion is not None else None

    def period(credits_micro: int, since: datetime.date | None) -> Period:
        spent = sum(amount for day, amount in electricity.items() if since is None or since <= day <= today)
        return Period(credits_micro, value(credits_micro), spent)

    net_by_day: tuple[tuple[datetime.date, int], ...] = ()
    if conversion is not None and conversion.possible:
        net_by_day = tuple(
            (day, (value(credits) or 0) - electricity.get(day, 0)) for day, credits in earnings.daily
        )
    problem = None
    if credit_value is None:
        problem = "connect once to learn what a credit is worth in money"
    elif conversion is not None and not conversion.possible:
        problem = conversion.missing()
    return MoneySummary(
        currency=settings.currency,
        today=period(earnings.today_micro, today),
        week=period(earnings.week_micro, monday),
        total=period(earnings.total_micro, None),
        net_by_day=net_by_day,
        electricity_by_day=tuple(sorted(electricity.items())),
        problem=problem,
    )


def money_text(micro: int | None, currency: str) -> str:
    """An amount for the cards: a sum under a cent keeps two significant digits ($0.00030), so a job's
    electricity or a CPU's pay does not read as nothing."""
    if micro is None:
        return "—"
    places = None
    if 0 < abs(micro) < 10_000:
        places = min(6, 8 - len(str(abs(micro))))
    return money.format_money(micro, currency, places)


@dataclass(frozen=True)
class JobLine:
    job_id: str
    text: str  # one line for the list
    net_micro: int | None  # for the per-job chart


def job_lines(
    entries: tuple[JobEntry, ...], credit_value: CreditValue | None, settings: ElectricitySettings
) -> list[JobLine]:
    """The latest jobs first: what ran, how long, its energy and electricity, its pay and the net."""
    conversion = Conversion(credit_value, settings) if credit_value is not None else None
    lines = []
    for entry in reversed(entries):
        kind = "Fine-tune" if entry.kind == "lora" else "Batch inference"
        when = datetime.datetime.fromtimestamp(entry.ended_at).strftime("%a %H:%M")
        energy = (
            f"{entry.energy_millijoules / 3_600_000:.1f} Wh{' (estimated)' if entry.energy_estimated else ''}"
        )
        electricity = money_text(entry.electricity_micro, entry.currency)
        pay = conversion.local_micro(entry.pay_micro) if conversion is not None else None
        net = (
            pay - entry.electricity_micro if pay is not None and entry.currency == settings.currency else None
        )
        outcome = "" if entry.outcome == "completed" else f" · {entry.outcome}"
        paid = f"pays {format_credits(entry.pay_micro)} credits" if entry.pay_micro else "no pay"
        net_text = f" · net {money_text(net, settings.currency)}" if net is not None else ""
        lines.append(
            JobLine(
                entry.job_id,
                f"{when} · {kind} {entry.job_id}{outcome} · {format_duration(entry.seconds)} · {energy}, "
                f"{electricity} · {paid}{net_text}",
                net,
            )
        )
    return lines


def measured_watts(entries: tuple[JobEntry, ...]) -> float | None:
    """The power this computer's completed jobs drew (the median of the measured ones), if any."""
    readings = sorted(
        entry.watts
        for entry in entries
        if entry.outcome == "completed" and not entry.energy_estimated and entry.watts
    )
    return readings[len(readings) // 2] if readings else None


def job_chart(
    entries: tuple[JobEntry, ...],
    credit_value: CreditValue | None,
    settings: ElectricitySettings,
    count: int = 20,
) -> tuple[list[float], list[float]]:
    """The latest jobs, oldest first: what each pays and what its electricity cost, in the seller's
    money (whole units) where the pay converts, else the pay in credits and no electricity."""
    latest = entries[-count:]
    conversion = Conversion(credit_value, settings) if credit_value is not None else None
    if conversion is None or not conversion.possible:
        return [entry.pay_micro / 1e6 for entry in latest], []
    pay = [(conversion.local_micro(entry.pay_micro) or 0) / 1e6 for entry in latest]
    spent = [
        entry.electricity_micro / 1e6 if entry.currency == settings.currency else 0.0 for entry in latest
    ]
    return pay, spent


def this_computers_watts(telemetry: Telemetry | None, measured: float | None) -> tuple[float, str] | None:
    """The power to forecast with: what its jobs drew (measured), else the GPUs' power readings
    (at rest, so low), else the class estimate."""
    if measured is not None:
        return measured, f"{measured:.0f} W, as its jobs drew"
    if telemetry is None:
        return None
    watts, words = estimated_watts(Hardware.of(telemetry))
    return watts, words.removeprefix("estimate: ")


@dataclass(frozen=True)
class ForecastText:
    headline: str
    basis: str


def forecast_text(
    market: MarketFigures,
    telemetry: Telemetry | None,
    measured_watts: float | None,
    settings: ElectricitySettings,
) -> ForecastText:
    """'This PC would earn about X a day at current demand, about Y after electricity', and the
    figures it came from."""
    hardware = (
        hardware_class((gpu.name, gpu.memory_total_bytes) for gpu in telemetry.gpus) if telemetry else None
    )
    found: Forecast | None = forecast(market, hardware) if hardware is not None else None
    if found is None:
        return ForecastText(
            "No forecast yet: the swarm has no finished work to go by",
            f"{market.queued_jobs} jobs waiting, {market.nodes_connected} computers connected",
        )
    conversion = Conversion(market.credit_value, settings)
    gross = conversion.local_micro(found.pay_per_day_micro)
    power = this_computers_watts(telemetry, measured_watts)
    electricity = int(cost_per_hour_micro(power[0], settings) * found.work_hours_per_day) if power else None
    earn = (
        money_text(gross, settings.currency)
        if gross is not None
        else f"{format_credits(found.pay_per_day_micro)} credits"
    )
    headline = f"This PC would earn about {earn} a day at current demand"
    if gross is not None and electricity is not None:
        headline += f", about {money_text(gross - electricity, settings.currency)} after electricity"
    basis = found.basis
    whose = (
        f"computers like this one ({basis.hardware_class})"
        if found.own_class
        else f"the busiest class, {basis.hardware_class} (none like this one has worked yet)"
    )
    rate = format_credits(basis.median_pay_per_work_hour_micro or 0)
    lines = [
        f"From the last {market.window_days} days of {whose}: {basis.nodes_active} active, "
        f"{basis.jobs_per_day:g} jobs and {basis.requests_per_day:g} chats a day, a median "
        f"{rate} credits an hour of work, {basis.work_hours_per_node_per_day:.1f} h of work a day each.",
        f"Now: {market.queued_jobs} jobs waiting for {market.nodes_connected} connected computers.",
    ]
    if power is not None:
        lines.append(f"Electricity at {settings.price_per_kwh} {settings.currency}/kWh and {power[1]}.")
    if gross is None:
        lines.append(conversion.missing().capitalize() + ".")
    return ForecastText(headline, " ".join(lines))


def receipt_text(receipt: dict, node_id: str) -> str:
    """A job's receipt (the coordinator's) as this node's seller reads it: what ran, what it paid this
    computer, and how verification ended."""
    own = f"node {node_id} ("
    spec = receipt.get("spec", {})
    what = "Fine-tune" if receipt.get("kind") == "lora" else "Batch inference"
    steps = f", {spec['max_steps']} steps" if spec.get("max_steps") else ""
    verification = receipt.get("verification") or {}
    state = verification.get("state")
    verdicts = {
        "pending": "a trusted computer is re-running it to check",
        "passed": "checked by a trusted re-run: it matched",
        "mismatch": "checked by a trusted re-run: it did NOT match, and its pay was taken back",
        "skipped": "not sampled for checking; its pay is released after the waiting time",
        "unavailable": "no trusted computer could check it in time; its pay is released",
        None: "not finished",
    }
    paid = sum(
        line["amount_micro"]
        for line in receipt.get("money", [])
        if line["account"].startswith(own) and line["kind"] in ("charge", "clawback", "verification")
    )
    lines = [
        f"{what} of {receipt.get('base_model')}{steps} · job {receipt.get('job_id')} · {receipt.get('state')}",
        f"Paid to this computer: {format_credits(paid)} credits",
        f"Verification: {verdicts.get(state, state)}",
    ]
    if verification.get("detail"):
        lines.append(str(verification["detail"]))
    for line in receipt.get("money", []):
        if line["account"].startswith(own):
            lines.append(f"  {line['kind']}: {format_credits(line['amount_micro'])} — {line['memo']}")
    return "\n".join(lines)
