"""When a seller's machine should not work for the swarm: the GPU is hot, a game holds it, the seller is
at the keyboard, or it is outside the seller's hours. `evaluate` decides, as a pure function of the
settings, one reading of the machine and the previous decision (for the temperature's hysteresis).
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from compute_swarm.engine.devices import DeviceInventory

_MEBIBYTE = 1024 * 1024

# Processes that hold a GPU on every desktop (compositors, window servers): never taken for a game,
# however much memory a multi-monitor setup gives them.
DESKTOP_PROCESSES = (
    "Xorg",
    "Xwayland",
    "gnome-shell",
    "kwin_x11",
    "kwin_wayland",
    "plasmashell",
    "sway",
    "Hyprland",
    "dwm.exe",
    "explorer.exe",
    "WindowServer",
)


class GuardSettings(BaseModel):
    """Each guard is one setting with a default a gamer can leave alone."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    temperature_limit_celsius: float = Field(default=83.0, ge=40, le=110)
    # Work resumes only below limit − hysteresis, so a GPU at the limit does not flap between states
    # (the bounds keep that at 10 °C or more).
    temperature_hysteresis_celsius: float = Field(default=8.0, ge=1, le=30)
    pause_for_games: bool = True
    # Another process holding this much GPU memory is a game or other heavy work: a game holds
    # gigabytes, a browser or desktop shell a few hundred MiB.
    heavy_process_mebibytes: int = Field(default=1024, ge=64, le=1024 * 1024)
    pause_when_full_screen: bool = True
    only_when_idle: bool = False
    idle_minutes: int = Field(default=10, ge=1, le=24 * 60)
    schedule_enabled: bool = False
    # Hours of the day (local time) when work may run: from start up to end, wrapping past midnight
    # when end <= start (22 → 8 is the night); start == end is the whole day.
    schedule_start_hour: int = Field(default=22, ge=0, le=23)
    schedule_end_hour: int = Field(default=8, ge=0, le=23)

    @property
    def resume_below_celsius(self) -> float:
        return self.temperature_limit_celsius - self.temperature_hysteresis_celsius


@dataclass(frozen=True)
class MachineReading:
    """What the guards look at, read at one moment."""

    inventory: DeviceInventory
    now: datetime.datetime  # local time
    own_process_ids: frozenset[int] = frozenset()  # the agent and its children: never a "game"
    user_idle_seconds: float | None = None  # None: the OS does not say (a headless server)
    full_screen_application: str | None = None


@dataclass(frozen=True)
class GuardDecision:
    """Why work must pause now, first reason first; empty when it may run."""

    reasons: tuple[str, ...] = ()
    temperature_tripped: bool = False  # kept between readings for the hysteresis

    @property
    def paused(self) -> bool:
        return bool(self.reasons)


def evaluate(settings: GuardSettings, reading: MachineReading, previous: GuardDecision) -> GuardDecision:
    reasons: list[str] = []
    tripped = _temperature_tripped(settings, reading.inventory, previous.temperature_tripped)
    if tripped:
        reasons.append(_temperature_reason(settings, reading.inventory))
    if settings.pause_for_games:
        reasons.extend(_heavy_process_reasons(settings, reading))
    if settings.pause_when_full_screen and reading.full_screen_application:
        reasons.append(f"{reading.full_screen_application} is running full screen")
    if (
        settings.only_when_idle
        and reading.user_idle_seconds is not None
        and reading.user_idle_seconds < settings.idle_minutes * 60
    ):
        reasons.append(f"you are using the computer (work starts after {settings.idle_minutes} min idle)")
    if settings.schedule_enabled and not within_schedule(settings, reading.now):
        reasons.append(f"outside your hours ({schedule_text(settings)})")
    return GuardDecision(reasons=tuple(reasons), temperature_tripped=tripped)


def _temperatures(inventory: DeviceInventory) -> list[tuple[int, float]]:
    return [
        (gpu.index, gpu.temperature_celsius) for gpu in inventory.gpus if gpu.temperature_celsius is not None
    ]


def _temperature_tripped(settings: GuardSettings, inventory: DeviceInventory, was_tripped: bool) -> bool:
    temperatures = [temperature for _, temperature in _temperatures(inventory)]
    if not temperatures:
        return False  # no sensor: nothing to judge by (and a GPU without one is not kept paused)
    hottest = max(temperatures)
    if was_tripped:
        return hottest >= settings.resume_below_celsius
    return hottest >= settings.temperature_limit_celsius


def _temperature_reason(settings: GuardSettings, inventory: DeviceInventory) -> str:
    index, hottest = max(_temperatures(inventory), key=lambda pair: pair[1])
    name = f"GPU {index}" if len(inventory.gpus) > 1 else "the GPU"
    return (
        f"{name} is at {hottest:.0f} °C (limit {settings.temperature_limit_celsius:.0f} °C; "
        f"resumes below {settings.resume_below_celsius:.0f} °C)"
    )


def _heavy_process_reasons(settings: GuardSettings, reading: MachineReading) -> Iterable[str]:
    threshold = settings.heavy_process_mebibytes * _MEBIBYTE
    seen: set[int] = set()
    for gpu in reading.inventory.gpus:
        for process in gpu.processes:
            if process.pid in reading.own_process_ids or process.pid in seen:
                continue
            if process.name in DESKTOP_PROCESSES:
                continue
            # Windows (WDDM) gives no per-process memory; full-screen detection covers games there.
            if process.used_memory_bytes is None or process.used_memory_bytes < threshold:
                continue
            seen.add(process.pid)
            name = process.name or f"process {process.pid}"
            gibibytes = process.used_memory_bytes / (1024 * _MEBIBYTE)
            yield f"{name} is using the GPU ({gibibytes:.1f} GiB)"


def within_schedule(settings: GuardSettings, now: datetime.datetime) -> bool:
    start, end, hour = settings.schedule_start_hour, settings.schedule_end_hour, now.hour
    if start == end:
        return True
    if start < end:
        return start <= hour < end
    return hour >= start or hour < end


def schedule_text(settings: GuardSettings) -> str:
    if settings.schedule_start_hour == settings.schedule_end_hour:
        return "all day"
    return f"{settings.schedule_start_hour:02d}:00–{settings.schedule_end_hour:02d}:00"
