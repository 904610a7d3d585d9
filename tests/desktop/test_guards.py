"""The guards' decisions, as pure functions of the settings and one reading of the machine."""

from __future__ import annotations

import datetime

import pytest
from pydantic import ValidationError

from compute_swarm.desktop.guards import (
    GuardDecision,
    GuardSettings,
    MachineReading,
    evaluate,
    within_schedule,
)
from compute_swarm.engine.devices import CpuInfo, DeviceInventory, GpuInfo, GpuProcess

GIBIBYTE = 1024**3
NOON = datetime.datetime(2026, 12, 1, 12, 0)


def inventory(*temperatures: float | None, processes: tuple[GpuProcess, ...] = ()) -> DeviceInventory:
    gpus = tuple(
        GpuInfo(
            index=index,
            vendor="nvidia",
            name="NVIDIA GeForce RTX 4070",
            backend="cuda",
            memory_total_bytes=12 * GIBIBYTE,
            memory_free_bytes=10 * GIBIBYTE,
            temperature_celsius=temperature,
            processes=processes if index == 0 else (),
        )
        for index, temperature in enumerate(temperatures)
    )
    cpu = CpuInfo(name="cpu", logical_cores=8, memory_total_bytes=GIBIBYTE, memory_available_bytes=GIBIBYTE)
    return DeviceInventory(gpus=gpus, cpu=cpu, backends=("cuda", "cpu"))


def reading(machine: DeviceInventory, **fields) -> MachineReading:
    return MachineReading(inventory=machine, now=fields.pop("now", NOON), **fields)


def run(settings: GuardSettings, temperatures: list[float]) -> list[bool]:
    decision, paused = GuardDecision(), []
    for temperature in temperatures:
        decision = evaluate(settings, reading(inventory(temperature)), decision)
        paused.append(decision.paused)
    return paused


def test_temperature_pauses_at_the_limit_and_resumes_only_below_the_hysteresis() -> None:
    settings = GuardSettings(temperature_limit_celsius=83, temperature_hysteresis_celsius=8)
    assert run(settings, [70, 82, 83, 80, 76, 75, 74.9, 80, 82.9, 83]) == [
        False, False, True, True, True, True, False, False, False, True,
    ]  # fmt: skip


def test_the_hottest_gpu_decides_and_the_reason_names_it() -> None:
    settings = GuardSettings(temperature_limit_celsius=80)
    decision = evaluate(settings, reading(inventory(60, 91, None)), GuardDecision())
    assert decision.reasons == ("GPU 1 is at 91 °C (limit 80 °C; resumes below 72 °C)",)


def test_a_gpu_without_a_temperature_sensor_never_pauses() -> None:
    decision = evaluate(GuardSettings(), reading(inventory(None)), GuardDecision(temperature_tripped=True))
    assert not decision.paused


def test_a_game_on_the_gpu_pauses_but_our_own_children_and_the_desktop_do_not() -> None:
    processes = (
        GpuProcess(pid=10, name="Xorg", used_memory_bytes=2 * GIBIBYTE),
        GpuProcess(pid=11, name="firefox", used_memory_bytes=300 * 1024**2),
        GpuProcess(pid=12, name="python3", used_memory_bytes=6 * GIBIBYTE),  # our trainer
        GpuProcess(pid=13, name="Cyberpunk2077.exe", used_memory_bytes=int(5.5 * GIBIBYTE)),
        GpuProcess(pid=14, name="steamwebhelper", used_memory_bytes=None),  # Windows: memory unknown
    )
    machine = inventory(60, processes=processes)
    decision = evaluate(GuardSettings(), reading(machine, own_process_ids=frozenset({12})), GuardDecision())
    assert decision.reasons == ("Cyberpunk2077.exe is using the GPU (5.5 GiB)",)
    assert not evaluate(GuardSettings(pause_for_games=False), reading(machine), GuardDecision()).paused
    smaller = evaluate(
        GuardSettings(heavy_process_mebibytes=256),
        reading(machine, own_process_ids=frozenset({12})),
        GuardDecision(),
    )
    assert [reason.split()[0] for reason in smaller.reasons] == ["firefox", "Cyberpunk2077.exe"]


def test_full_screen_and_user_activity() -> None:
    machine = inventory(50)
    full_screen = evaluate(
        GuardSettings(), reading(machine, full_screen_application="Elden Ring"), GuardDecision()
    )
    assert full_screen.reasons == ("Elden Ring is running full screen",)
    assert not evaluate(
        GuardSettings(pause_when_full_screen=False),
        reading(machine, full_screen_application="Elden Ring"),
        GuardDecision(),
    ).paused

    idle_only = GuardSettings(only_when_idle=True, idle_minutes=10)
    busy = evaluate(idle_only, reading(machine, user_idle_seconds=30), GuardDecision())
    assert busy.reasons == ("you are using the computer (work starts after 10 min idle)",)
    assert not evaluate(idle_only, reading(machine, user_idle_seconds=601), GuardDecision()).paused
    # A headless server cannot say how long the seller has been away: the guard does not hold it.
    assert not evaluate(idle_only, reading(machine, user_idle_seconds=None), GuardDecision()).paused
    assert not evaluate(GuardSettings(), reading(machine, user_idle_seconds=1), GuardDecision()).paused


@pytest.mark.parametrize(
    ("start", "end", "open_hours"),
    [(22, 8, {22, 23, 0, 1, 2, 3, 4, 5, 6, 7}), (9, 17, set(range(9, 17))), (5, 5, set(range(24)))],
)
def test_schedule_hours_wrap_past_midnight(start: int, end: int, open_hours: set[int]) -> None:
    settings = GuardSettings(schedule_enabled=True, schedule_start_hour=start, schedule_end_hour=end)
    for hour in range(24):
        decision = evaluate(settings, reading(inventory(40), now=NOON.replace(hour=hour)), GuardDecision())
        assert within_schedule(settings, NOON.replace(hour=hour)) == (hour in open_hours), hour
        assert decision.paused == (hour not in open_hours), hour
    if start != end:
        outside = next(hour for hour in range(24) if hour not in open_hours)
        decision = evaluate(settings, reading(inventory(40), now=NOON.replace(hour=outside)), GuardDecision())
        assert decision.reasons == (f"outside your hours ({start:02d}:00–{end:02d}:00)",)


def test_several_reasons_are_all_kept_in_order() -> None:
    settings = GuardSettings(schedule_enabled=True, schedule_start_hour=22, schedule_end_hour=8)
    decision = evaluate(settings, reading(inventory(95), full_screen_application="Doom"), GuardDecision())
    assert [reason.split()[0] for reason in decision.reasons] == ["the", "Doom", "outside"]


def test_settings_refuse_nonsense() -> None:
    with pytest.raises(ValidationError):
        GuardSettings(temperature_hysteresis_celsius=0)
    with pytest.raises(ValidationError):
        GuardSettings(schedule_start_hour=24)
    with pytest.raises(ValidationError):
        GuardSettings(temperature_limit_celsius=200)
    with pytest.raises(ValidationError):
        GuardSettings(surprise=True)
