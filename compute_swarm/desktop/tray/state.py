"""What the tray shows, decided from the agent's status without Qt: the icon's state, the tooltip, the
job's line, the earnings summary, the notifications a change deserves, and the charts' histories.
"""

from __future__ import annotations

import datetime
from collections import deque
from dataclasses import dataclass
from typing import Literal

from compute_swarm.desktop.agent_status import AgentStatus
from compute_swarm.desktop.connection_rules import sell_page
from compute_swarm.desktop.job import JobStatus
from compute_swarm.desktop.runtime.fetch import Progress
from compute_swarm.protocol import Standing, StandingState, Telemetry, format_credits

# "waiting": for someone else before work can come (the swarm operator's approval, an invite code).
IconState = Literal["offline", "idle", "earning", "paused", "waiting", "error"]

AWAITING_APPROVAL = "waiting for the swarm operator to approve this computer"
PAUSED_BY_OPERATOR = "Paused by the swarm operator"
INVITE_CODE_NEEDED = (
    "this swarm lets computers join by invitation: type the invite code the swarm operator gave you"
)

_PHASES = {
    "downloading": "getting the job's data",
    "training": "fine-tuning",
    "generating": "generating answers",
    "uploading": "sending the result",
}


@dataclass(frozen=True)
class RunState:
    """The app's side of things: is the agent running, and did it end with an error."""

    running: bool = False
    stopping: bool = False
    error: str | None = None  # why the agent stopped for good (a refused token, an old protocol)
    fetching_engine: bool = False  # a packaged app's first start: its engine runtime comes first
    # The coordinator does not work with this app's version: its sell page offers the one it does.
    download_page: str | None = None


def icon_state(status: AgentStatus | None, activity: RunState) -> IconState:
    if activity.error is not None:
        return "error"
    if status is not None and activity.running and status.invite_code_wanted is not None:
        return "waiting"
    if status is None or not activity.running or not status.connected:
        return "offline"
    # The operator's hold comes first: while it lasts no work comes, whatever the guards say.
    standing = standing_state(status)
    if standing == "awaiting_approval":
        return "waiting"
    if standing == "quarantined" or status.paused:
        return "paused"
    return "earning" if status.job is not None else "idle"


def standing_state(status: AgentStatus | None) -> StandingState:
    """The coordinator's last word on whether this computer gets work ("active" until it says)."""
    return status.standing.state if status is not None and status.standing is not None else "active"


def headline(status: AgentStatus | None, activity: RunState) -> str:
    """One line for the tray menu and the tooltip."""
    title, detail = headline_parts(status, activity)
    return f"{title}: {detail}" if detail else title


def headline_parts(status: AgentStatus | None, activity: RunState) -> tuple[str, str | None]:
    """The state in a word or two, and what it is about (the pause's reason), for the window's header."""
    state = icon_state(status, activity)
    if activity.download_page is not None:  # the update line below says where to get it
        return "Update needed", "this swarm works with another version of the app"
    if state == "error":
        return "Stopped: needs your attention", None
    if activity.stopping:
        if status is None or status.job is None:
            return "Stopping…", None
        return "Stopping", "saving the job's progress…"
    if not activity.running:
        return "Not earning", None
    if activity.fetching_engine:
        return "Getting ready", "fetching the engine, once"
    if status is None:
        return "Connecting…", None
    if status.invite_code_wanted == "missing":
        return "Invite code needed", INVITE_CODE_NEEDED
    if status.invite_code_wanted == "refused":
        return "Invite code refused", status.problem
    if state == "offline":
        return ("Connecting…", None) if status.problem is None else ("Offline", "reconnecting…")
    if state == "waiting":
        return "Waiting for approval", AWAITING_APPROVAL
    if status.standing is not None and status.standing.state == "quarantined":
        return PAUSED_BY_OPERATOR, status.standing.reason or None
    if state == "paused":
        return "Paused", status.pause_reason
    if state == "earning":
        return "Earning", "running a job"
    return "Ready", "waiting for a job"


@dataclass(frozen=True)
class UpdateNotice:
    text: str
    link_text: str
    url: str  # the coordinator's sell page


def update_notice(status: AgentStatus | None, activity: RunState) -> UpdateNotice | None:
    """The line that says this app needs (or could have) the version the coordinator offers."""
    if activity.download_page is not None:
        return UpdateNotice(
            "This swarm no longer works with this version of the app.",
            "Download the version it offers",
            activity.download_page,
        )
    if activity.running and status is not None and status.newer_version:
        return UpdateNotice(
            f"Update available: version {status.newer_version}.",
            "Download it",
            sell_page(status.coordinator),
        )
    return None


def hottest_temperature(telemetry: Telemetry | None) -> float | None:
    if telemetry is None:
        return None
    readings = [gpu.temperature_celsius for gpu in telemetry.gpus if gpu.temperature_celsius is not None]
    return max(readings, default=None)


def tooltip(
    status: AgentStatus | None,
    activity: RunState,
    telemetry: Telemetry | None,
    earned_today_micro: int | None,
) -> str:
    lines = ["compute-swarm — " + headline(status, activity)]
    temperature = hottest_temperature(telemetry)
    if temperature is not None:
        lines.append(f"GPU {temperature:.0f} °C")
    if earned_today_micro is not None:
        lines.append(f"Today: {format_credits(earned_today_micro)} credits")
    return "\n".join(lines)


def no_job_text(status: AgentStatus | None) -> str:
    """The job card's line while no job runs: why none can come, where the operator holds this computer."""
    standing = standing_state(status)
    if standing == "awaiting_approval":
        return "No jobs until approved. Nothing to do meanwhile: work starts by itself"
    if standing == "quarantined":
        return "No jobs while the swarm operator has paused this computer"
    return "No job right now"


def describe_job(job: JobStatus) -> str:
    kind = "Batch inference" if job.phase == "generating" else "LoRA fine-tune"
    return f"{kind} · job {job.job_id} · {_PHASES.get(job.phase, job.phase)}"


def job_progress(job: JobStatus) -> tuple[int, int]:
    """(done, total) for a progress bar; total 0 means the work has not been sized yet."""
    return min(job.step, job.total_steps), job.total_steps


def job_details(job: JobStatus) -> str:
    parts = []
    if job.total_steps:
        unit = "prompts" if job.phase == "generating" else "steps"
        parts.append(f"{min(job.step, job.total_steps)} of {job.total_steps} {unit}")
    if job.loss is not None:
        parts.append(f"loss {job.loss:.3f}")
    if job.tokens_per_second is not None:
        parts.append(f"{job.tokens_per_second:.0f} tokens/s")
    if job.eta_seconds is not None:
        parts.append(f"about {format_duration(job.eta_seconds)} left")
    if job.attempt > 1:
        parts.append(f"attempt {job.attempt} of {job.max_attempts}")
    return " · ".join(parts)


def format_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def format_bytes(count: int | None) -> str:
    if count is None:
        return "?"
    return f"{count / 1024**3:.1f} GiB"


def format_size(count: int) -> str:
    """A byte count as people read it: 0 B, 12 KB, 3.4 MB, 1.2 GB (powers of 1000, as file managers)."""
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}" if count < 100 * scale else f"{count / scale:.0f} {unit}"
    return f"{count} B"


REACHABILITY_TEXT = {
    "reachable": "other nodes reach this computer",
    "tunnelled": "behind NAT, tunnelled",
    "unreachable": "not reachable by other nodes",
}


def sharing_text(status: AgentStatus | None) -> str:
    """What this computer has served to other nodes, and whether they reach it; empty while it does
    not share."""
    if status is None or status.served_bytes is None:
        return ""
    text = f"Served to other nodes: {format_size(status.served_bytes)}"
    reachability = REACHABILITY_TEXT.get(status.reachability or "")
    return f"{text} · {reachability}" if reachability else text


def runtime_fetch_text(progress: Progress) -> str:
    """The line under the engine runtime's progress bar: what is done of what, and the time left."""
    if progress.stage == "looking up":
        return f"Finding the files: {progress.done_bytes} of {progress.total_bytes} packages"
    if progress.stage == "checking":
        return "Checking the engine's files"
    if progress.stage == "ready":
        return "Ready"
    done, total = progress.done_bytes / 1024**2, progress.total_bytes / 1024**2
    left = (
        f", about {format_duration(progress.seconds_left)} left" if progress.seconds_left is not None else ""
    )
    return f"{done:,.0f} of {total:,.0f} MB ({progress.fraction:.0%}){left}"


# ---- earnings


@dataclass(frozen=True)
class EarningsSummary:
    today_micro: int
    week_micro: int  # since Monday, local time
    total_micro: int  # everything ever credited
    daily: tuple[tuple[datetime.date, int], ...]  # the last days, oldest first, for the chart


def summarize_earnings(history: dict, now: datetime.datetime, days: int = 14) -> EarningsSummary:
    """The coordinator's hourly credits (UTC hours) added up by the seller's local days; `now` is local
    and aware."""
    by_day: dict[datetime.date, int] = {}
    for bucket in history.get("hourly", ()):
        start = datetime.datetime.fromtimestamp(int(bucket["hour_start"]), tz=now.tzinfo)
        by_day[start.date()] = by_day.get(start.date(), 0) + int(bucket["credited_micro"])
    today = now.date()
    monday = today - datetime.timedelta(days=today.weekday())
    chart_days = [today - datetime.timedelta(days=back) for back in range(days - 1, -1, -1)]
    return EarningsSummary(
        today_micro=by_day.get(today, 0),
        week_micro=sum(amount for day, amount in by_day.items() if monday <= day <= today),
        total_micro=int(history.get("total_credited_micro", 0)),
        daily=tuple((day, by_day.get(day, 0)) for day in chart_days),
    )


# ---- notifications


def notifications(previous: AgentStatus | None, current: AgentStatus) -> list[tuple[str, str]]:
    """(title, message) for what a seller wants to hear about without looking: a job finished, work
    paused by a guard or held by the swarm operator, an invite code wanted, the connection lost."""
    said: list[tuple[str, str]] = []
    if current.invite_code_wanted is not None and (
        previous is None or previous.invite_code_wanted != current.invite_code_wanted
    ):
        if current.invite_code_wanted == "missing":
            said.append(("Invite code needed", _sentence(INVITE_CODE_NEEDED)))
        else:
            said.append(("Invite code refused", _sentence(current.problem or "the coordinator refused it")))
    said += _standing_notifications(previous.standing if previous is not None else None, current.standing)
    if current.last_job is not None and (previous is None or previous.last_job != current.last_job):
        outcome = current.last_job
        if outcome.outcome == "completed":
            said.append(("Job finished", f"Job {outcome.job_id} is done: {outcome.message}"))
        elif outcome.outcome == "failed":
            said.append(("Job failed", f"Job {outcome.job_id}: {outcome.message}"))
    if previous is not None:
        if current.paused_by == "guard" and previous.paused_by != "guard":
            said.append(("Paused", f"Work paused: {current.pause_reason}"))
        if previous.paused and previous.paused_by == "guard" and not current.paused:
            said.append(("Earning again", "Work resumed"))
        if previous.connected and not current.connected and not current.stopped:
            said.append(("Disconnected", "Lost the coordinator; reconnecting…"))
    return said


def _standing_notifications(previous: Standing | None, current: Standing | None) -> list[tuple[str, str]]:
    if current is None or current == previous:
        return []
    was = previous.state if previous is not None else None
    if current.state == "awaiting_approval":
        return [("Waiting for approval", _sentence(AWAITING_APPROVAL))]
    if current.state == "quarantined":
        return [(PAUSED_BY_OPERATOR, _sentence(current.reason or "this computer gets no work for now"))]
    if was == "awaiting_approval":
        return [("Approved", "The swarm operator approved this computer: it takes jobs now")]
    if was == "quarantined":
        return [("Earning again", "The swarm operator lifted the pause: this computer takes jobs again")]
    return []  # active from the first welcome: nothing to say


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


# ---- chart histories


class TemperatureHistory:
    """The hottest GPU's temperature over the last `keep_seconds`, one point per reading."""

    def __init__(self, keep_seconds: float = 30 * 60):
        self.keep_seconds = keep_seconds
        self.points: deque[tuple[float, float]] = deque()

    def add(self, at: float, telemetry: Telemetry | None) -> bool:
        temperature = hottest_temperature(telemetry)
        if temperature is None:
            return False
        self.points.append((at, temperature))
        while self.points and self.points[0][0] < at - self.keep_seconds:
            self.points.popleft()
        return True

    def values(self) -> list[float]:
        return [temperature for _, temperature in self.points]


def credits_text(micro: int | None) -> str:
    return "—" if micro is None else format_credits(micro)
