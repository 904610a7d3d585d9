"""What the tray shows, decided without Qt: local-day earnings, the icon's state, notifications."""

from __future__ import annotations

import datetime
from dataclasses import replace

from compute_swarm.desktop.agent_status import AgentStatus
from compute_swarm.desktop.job import JobOutcome, JobStatus
from compute_swarm.desktop.runtime.fetch import Progress
from compute_swarm.desktop.tray import state
from compute_swarm.protocol import Earnings, Standing

TOKYO = datetime.timezone(datetime.timedelta(hours=9))


def test_earnings_add_up_by_the_sellers_local_days_and_week() -> None:
    now = datetime.datetime(2026, 12, 2, 10, 0, tzinfo=TOKYO)  # a Wednesday
    utc = datetime.timezone.utc

    def hour(*when: int) -> int:
        return int(datetime.datetime(*when, tzinfo=utc).timestamp())

    history = {
        "hourly": [
            {"hour_start": hour(2026, 11, 29, 12), "credited_micro": 7},  # Sunday 21:00 in Tokyo: last week
            {"hour_start": hour(2026, 11, 30, 16), "credited_micro": 100},  # Tuesday 01:00 in Tokyo
            {"hour_start": hour(2026, 12, 1, 14), "credited_micro": 20},  # Tuesday 23:00 in Tokyo
            {"hour_start": hour(2026, 12, 1, 15), "credited_micro": 3},  # Wednesday 00:00 in Tokyo
            {"hour_start": hour(2026, 12, 2, 0), "credited_micro": 5},  # Wednesday 09:00 in Tokyo
        ],
        "total_credited_micro": 1_000,
    }
    summary = state.summarize_earnings(history, now, days=14)
    assert summary.today_micro == 8
    assert summary.week_micro == 128
    assert summary.total_micro == 1_000
    assert len(summary.daily) == 14 and summary.daily[-1] == (now.date(), 8)
    assert dict(summary.daily)[datetime.date(2026, 12, 1)] == 120


def test_icon_states_and_headlines() -> None:
    running = state.RunState(running=True)
    connected = AgentStatus(coordinator="http://c", node_id="node_1", connected=True)
    job = JobStatus(job_id="job_1", lease_id="lease_1", attempt=1, max_attempts=3, phase="training")
    assert state.icon_state(None, state.RunState()) == "offline"
    assert state.headline(None, running) == "Connecting…"
    assert state.icon_state(connected, running) == "idle"
    assert (
        state.icon_state(AgentStatus(coordinator="http://c", connected=True, job=job), running) == "earning"
    )
    paused = AgentStatus(
        coordinator="http://c", connected=True, paused=True, pause_reason="hot", paused_by="guard"
    )
    assert state.headline(paused, running) == "Paused: hot"
    assert state.icon_state(connected, state.RunState(error="refused")) == "error"
    offline = AgentStatus(coordinator="http://c", problem="cannot reach")
    assert state.headline(offline, running) == "Offline: reconnecting…"


def test_job_lines_say_progress_and_time_left() -> None:
    job = JobStatus(
        job_id="job_1", lease_id="l", attempt=2, max_attempts=3, phase="training", step=5, total_steps=20,
        loss=1.23456, eta_seconds=3725,
    )  # fmt: skip
    assert state.describe_job(job) == "LoRA fine-tune · job job_1 · fine-tuning"
    assert state.job_details(job) == "5 of 20 steps · loss 1.235 · about 1 h 02 min left · attempt 2 of 3"
    batch = JobStatus(
        job_id="job_2", lease_id="l", attempt=1, max_attempts=3, phase="generating", step=1, total_steps=4
    )
    assert state.describe_job(batch).startswith("Batch inference")
    assert state.job_details(batch) == "1 of 4 prompts"


def test_notifications_for_finished_jobs_guard_pauses_and_lost_connections() -> None:
    base = AgentStatus(coordinator="http://c", node_id="node_1", connected=True, earnings=Earnings(
        pending_micro=0, available_micro=0, jobs_completed=0))  # fmt: skip
    finished = AgentStatus(
        coordinator="http://c", connected=True, last_job=JobOutcome("job_1", "completed", "3 steps in 20 s")
    )
    assert state.notifications(base, finished) == [("Job finished", "Job job_1 is done: 3 steps in 20 s")]
    assert state.notifications(finished, finished) == []
    hot = AgentStatus(
        coordinator="http://c", connected=True, paused=True, pause_reason="hot", paused_by="guard"
    )
    hotter = AgentStatus(
        coordinator="http://c", connected=True, paused=True, pause_reason="hotter", paused_by="guard"
    )
    assert state.notifications(base, hot) == [("Paused", "Work paused: hot")]
    assert state.notifications(hot, hotter) == []  # the same pause, a new temperature: said once
    assert state.notifications(hotter, base) == [("Earning again", "Work resumed")]
    seller = AgentStatus(
        coordinator="http://c", connected=True, paused=True, pause_reason="me", paused_by="seller"
    )
    assert state.notifications(base, seller) == []  # the seller knows
    dropped = AgentStatus(coordinator="http://c", connected=False)
    assert state.notifications(base, dropped) == [("Disconnected", "Lost the coordinator; reconnecting…")]
    assert state.notifications(base, AgentStatus(coordinator="http://c", stopped=True)) == []


def test_tooltip_has_temperature_and_today() -> None:
    assert state.tooltip(None, state.RunState(), None, None) == "compute-swarm — Not earning"
    assert state.tooltip(None, state.RunState(), None, 1_500_000).endswith("Today: 1.5 credits")


def test_the_operators_hold_is_said_plainly_instead_of_ready_or_earning() -> None:
    running = state.RunState(running=True)
    waiting = AgentStatus(
        coordinator="http://c",
        node_id="node_1",
        connected=True,
        standing=Standing(state="awaiting_approval", reason="ops approve each new computer"),
    )
    assert state.icon_state(waiting, running) == "waiting"
    assert state.headline_parts(waiting, running) == (
        "Waiting for approval",
        "waiting for the swarm operator to approve this computer",
    )
    assert (
        state.no_job_text(waiting) == "No jobs until approved. Nothing to do meanwhile: work starts by itself"
    )
    # Even while a guard pauses it: the operator's hold is what keeps work away for now.
    hot_and_waiting = replace(waiting, paused=True, pause_reason="hot", paused_by="guard")
    assert state.icon_state(hot_and_waiting, running) == "waiting"

    quarantined = replace(
        waiting, standing=Standing(state="quarantined", reason="results did not match trusted re-runs")
    )
    assert state.icon_state(quarantined, running) == "paused"
    assert state.headline(quarantined, running) == (
        "Paused by the swarm operator: results did not match trusted re-runs"
    )
    assert state.tooltip(quarantined, running, None, None) == (
        "compute-swarm — Paused by the swarm operator: results did not match trusted re-runs"
    )
    assert state.no_job_text(quarantined) == "No jobs while the swarm operator has paused this computer"

    active = replace(waiting, standing=Standing(state="active"))
    assert state.icon_state(active, running) == "idle" and state.no_job_text(active) == "No job right now"
    # Disconnected, the last standing is not shown as if it were live.
    assert state.icon_state(replace(waiting, connected=False), running) == "offline"


def test_standing_changes_and_invite_codes_are_notified() -> None:
    connected = AgentStatus(coordinator="http://c", node_id="node_1", connected=True)
    waiting = replace(connected, standing=Standing(state="awaiting_approval", reason="x"))
    approved = replace(connected, standing=Standing(state="active"))
    quarantined = replace(connected, standing=Standing(state="quarantined", reason="results did not match"))
    assert state.notifications(connected, waiting) == [
        ("Waiting for approval", "Waiting for the swarm operator to approve this computer")
    ]
    assert state.notifications(waiting, waiting) == []
    assert state.notifications(waiting, approved) == [
        ("Approved", "The swarm operator approved this computer: it takes jobs now")
    ]
    assert state.notifications(connected, approved) == []  # active from the start: nothing to say
    assert state.notifications(approved, quarantined) == [
        ("Paused by the swarm operator", "Results did not match")
    ]
    assert state.notifications(quarantined, approved)[0][0] == "Earning again"

    missing = AgentStatus(coordinator="http://c", invite_code_wanted="missing", problem="by invitation")
    refused = AgentStatus(coordinator="http://c", invite_code_wanted="refused", problem="the code is used up")
    assert state.notifications(None, missing)[0][0] == "Invite code needed"
    assert state.notifications(missing, refused) == [("Invite code refused", "The code is used up")]


def test_a_wanted_invite_code_is_asked_for_rather_than_shown_as_offline() -> None:
    running = state.RunState(running=True)
    missing = AgentStatus(coordinator="http://c", invite_code_wanted="missing", problem="by invitation only")
    assert state.icon_state(missing, running) == "waiting"
    title, detail = state.headline_parts(missing, running)
    assert title == "Invite code needed" and "type the invite code" in detail
    refused = AgentStatus(
        coordinator="http://c", invite_code_wanted="refused", problem="the invite code is unknown"
    )
    assert state.headline(refused, running) == "Invite code refused: the invite code is unknown"
    assert state.icon_state(missing, state.RunState()) == "offline"  # not running: nothing is waiting


def test_the_engine_fetch_says_what_is_done_of_what_and_the_time_left() -> None:
    megabyte = 1024**2
    assert (
        state.runtime_fetch_text(Progress("downloading", 110 * megabyte, 440 * megabyte, 95.0, "torch"))
        == "110 of 440 MB (25%), about 2 min left"
    )
    assert (
        state.runtime_fetch_text(Progress("downloading", 0, 440 * megabyte, None, "")) == "0 of 440 MB (0%)"
    )
    assert (
        state.runtime_fetch_text(Progress("looking up", 12, 69, None, ""))
        == "Finding the files: 12 of 69 packages"
    )


def test_the_update_line_says_when_the_swarm_offers_or_needs_a_newer_app() -> None:
    connected = AgentStatus(coordinator="http://127.0.0.1:8000", connected=True)
    running = state.RunState(running=True)
    assert state.update_notice(connected, running) is None
    offered = state.update_notice(replace(connected, newer_version="0.3.0"), running)
    assert offered == state.UpdateNotice(
        "Update available: version 0.3.0.", "Download it", "http://127.0.0.1:8000/sell"
    )
    needed = state.RunState(error="too old", download_page="http://127.0.0.1:8000/sell")
    notice = state.update_notice(None, needed)
    assert notice is not None and notice.url == "http://127.0.0.1:8000/sell"
    assert state.headline_parts(None, needed) == (
        "Update needed",
        "this swarm works with another version of the app",
    )
    assert state.icon_state(None, needed) == "error"
