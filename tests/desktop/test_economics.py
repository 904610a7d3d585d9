"""The seller's economics: a job's energy read from real energy counters (Linux's sysfs files, written
by the test where this machine has none), power readings integrated, an estimate said as one; the
electricity and net profit arithmetic in integer micro-units; the work journal; and the *only
profitable work* guard in a real agent, declining an unprofitable lease and taking a profitable one."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from websockets.asyncio.server import serve

from compute_swarm import money, protocol
from compute_swarm.desktop.electricity import (
    Conversion,
    ElectricitySettings,
    default_electricity,
    electricity_cost_micro,
    expected_cost_micro,
)
from compute_swarm.desktop.energy import CounterMeter, EstimatedMeter, PowerMeter, energy_meter
from compute_swarm.desktop.node_description import telemetry_from_inventory
from compute_swarm.desktop.work_journal import JobEntry, WorkJournal
from compute_swarm.engine.devices import CpuInfo, DeviceInventory, GpuInfo
from compute_swarm.engine.jobs import DEFAULT_MODEL
from tests.desktop.test_agent import FakeCoordinator, FakeRunner, ack, make_agent
from tests.desktop.test_messages import make_lease

CPU = CpuInfo(name="", logical_cores=8, memory_total_bytes=16 << 30, memory_available_bytes=8 << 30)


def telemetry(*gpus: GpuInfo) -> protocol.Telemetry:
    return telemetry_from_inventory(DeviceInventory(gpus=gpus, cpu=CPU, backends=("cpu",)))


def amd_gpu(power_watts: float | None = None) -> GpuInfo:
    return GpuInfo(
        index=0,
        vendor="amd",
        name="AMD Radeon RX 7900 XTX",
        backend="rocm",
        memory_total_bytes=24 << 30,
        memory_free_bytes=20 << 30,
        power_watts=power_watts,
    )


def write(path: Path, value: int | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{value}\n")


# ---- energy


def test_energy_is_read_from_the_gpu_and_cpu_counters_and_survives_a_wrap(tmp_path: Path) -> None:
    rapl = tmp_path / "class/powercap/intel-rapl:0"
    write(rapl / "energy_uj", 262_143_000_000)
    write(rapl / "max_energy_range_uj", 262_143_328_850)
    write(tmp_path / "class/powercap/intel-rapl:0:0/energy_uj", 5)  # a part of package 0: not added
    gpu = tmp_path / "class/drm/card0/device/hwmon/hwmon2/energy1_input"
    write(gpu, 1_000_000)

    meter = energy_meter(telemetry(amd_gpu()), 100.0, sysfs_root=tmp_path, use_nvml=False)
    assert isinstance(meter, CounterMeter) and not meter.estimated
    assert (
        "GPU energy counter hwmon2" in meter.source
        and "CPU package energy counter intel-rapl:0" in meter.source
    )
    start = meter.read(100.0)

    # 60 s of work: the GPU counts 18 kJ (300 W); the CPU package 3.6 kJ (60 W), wrapping on the way.
    write(gpu, 1_000_000 + 18_000_000_000)
    write(rapl / "energy_uj", 3_600_000_000 - (262_143_328_850 - 262_143_000_000))
    assert meter.read(160.0) - start == 18_000_000 + 3_600_000
    assert meter.watts() == pytest.approx(360.0)

    # A counter that cannot be read any more costs its own reading only.
    gpu.unlink()
    gpu.mkdir()
    assert meter.read(170.0) - start == 18_000_000 + 3_600_000


def test_without_counters_power_readings_are_integrated_and_else_estimated(tmp_path: Path) -> None:
    meter = energy_meter(telemetry(amd_gpu(power_watts=200.0)), 0.0, sysfs_root=tmp_path, use_nvml=False)
    assert isinstance(meter, PowerMeter) and "power readings" in meter.source
    meter.sample(telemetry(amd_gpu(power_watts=300.0)), 10.0)  # 200 W held for 10 s, then 300 W
    assert meter.read(20.0) == 200 * 10 * 1000 + 300 * 10 * 1000

    cpu_only = energy_meter(telemetry(), 0.0, sysfs_root=tmp_path, use_nvml=False)
    assert isinstance(cpu_only, EstimatedMeter) and cpu_only.estimated
    assert cpu_only.source == "estimate: about 48 W for a 8-thread CPU (no power reading here)"
    assert cpu_only.read(3600.0) == 48 * 3600 * 1000


# ---- money


def test_electricity_and_net_profit_are_whole_micro_units() -> None:
    euro = ElectricitySettings(price_per_kwh="0.40", currency="EUR", exchange_rate="0.92")
    # 250 W for two hours is half a kWh: 0.20 EUR.
    assert electricity_cost_micro(250 * 7200 * 1000, euro) == 200_000
    assert expected_cost_micro(250.0, 7200.0, euro) == 200_000
    # A millijoule at 0.40/kWh is 0.000111 micro-euro: rounded half up, a kWh's 3.6e9 mJ cost exactly 0.40.
    assert electricity_cost_micro(1, euro) == 0
    assert electricity_cost_micro(money.MILLIJOULES_PER_KILOWATT_HOUR, euro) == 400_000

    swarm_dollars = protocol.CreditValue(currency="USD", micro_per_credit=500)  # $0.0005 a credit
    conversion = Conversion(swarm_dollars, euro)
    # 790 credits are $0.395, which is 0.3634 EUR at 0.92.
    assert conversion.local_micro(790_000_000) == 363_400
    net = conversion.local_micro(790_000_000) - electricity_cost_micro(250 * 3600 * 1000, euro)
    assert net == 363_400 - 100_000
    assert money.format_money(net, "EUR") == "€0.26" and money.format_money(-1_500_000, "USD") == "-$1.50"

    no_rate = Conversion(swarm_dollars, ElectricitySettings(price_per_kwh="0.40", currency="EUR"))
    assert not no_rate.possible and no_rate.local_micro(1_000_000) is None
    assert "set how much 1 USD is in EUR" in no_rate.missing()
    assert Conversion(swarm_dollars, ElectricitySettings()).local_micro(3_000_000) == 1_500


def test_the_default_price_comes_from_the_locale_and_bad_settings_are_refused() -> None:
    german = default_electricity({"LANG": "de_DE.UTF-8"})
    assert (german.currency, german.price_per_kwh) == ("EUR", "0.40")
    assert default_electricity({"LC_ALL": "ja_JP.UTF-8"}).currency == "JPY"
    assert default_electricity({"LANG": "C.UTF-8"}).currency == "USD"  # no country: the fallback
    for bad in (
        {"price_per_kwh": "-0.3"},
        {"price_per_kwh": "abc"},
        {"currency": "euro"},
        {"exchange_rate": "0"},
    ):
        with pytest.raises(ValueError):
            ElectricitySettings(**bad)


# ---- the journal


def entry(
    job_id: str, *, seconds: float = 100.0, joules: float = 10_000.0, outcome: str = "completed", **changes
) -> JobEntry:
    values = dict(
        job_id=job_id,
        kind="lora",
        base_model=DEFAULT_MODEL,
        started_at=1_000_000.0,
        ended_at=1_000_000.0 + seconds,
        outcome=outcome,
        energy_millijoules=int(joules * 1000),
        energy_source="measured",
        energy_estimated=False,
        electricity_micro=1_111,
        currency="USD",
        pay_micro=50_000,
        work_tokens=10_000,
    )
    values.update(changes)
    return JobEntry(**values)


def test_the_journal_keeps_speed_and_power_and_survives_a_torn_line(tmp_path: Path) -> None:
    journal = WorkJournal(tmp_path / "work-journal.jsonl")
    journal.add(entry("job_1", seconds=100.0, joules=10_000.0))
    journal.add(entry("job_2", seconds=300.0, joules=60_000.0, work_tokens=20_000))
    journal.add(entry("job_3", seconds=2.0, outcome="cancelled"))
    with (tmp_path / "work-journal.jsonl").open("a") as file:
        file.write('{"job_id": "job_4", "kind"')  # the computer lost power mid-write
    again = WorkJournal(tmp_path / "work-journal.jsonl")
    assert [item.job_id for item in again.entries] == ["job_1", "job_2", "job_3"]
    assert again.seconds_per_work_token("lora", DEFAULT_MODEL) == pytest.approx((0.01 + 0.015) / 2)
    assert again.working_watts("lora", DEFAULT_MODEL) == pytest.approx((100 + 200) / 2)
    assert again.seconds_per_work_token("inference", DEFAULT_MODEL) is None
    assert sum(again.electricity_by_day().values()) == 3 * 1_111


def test_the_journal_folds_old_entries_into_daily_totals(tmp_path: Path, monkeypatch) -> None:
    from compute_swarm.desktop import work_journal

    monkeypatch.setattr(work_journal, "MAX_ENTRIES", 10)
    monkeypatch.setattr(work_journal, "KEEP_ENTRIES", 4)
    journal = WorkJournal(tmp_path / "work-journal.jsonl")
    for number in range(11):
        journal.add(entry(f"job_{number}", ended_at=1_000_000.0 + number * 86_400))
    lines = (tmp_path / "work-journal.jsonl").read_text().splitlines()
    assert len(lines) == 5 and "carried" in json.loads(lines[0])
    reread = WorkJournal(tmp_path / "work-journal.jsonl")
    assert reread.carried.jobs == 7 and len(reread.entries) == 4
    assert sum(reread.electricity_by_day().values()) == 11 * 1_111


# ---- the guard, in a real agent


def test_only_profitable_work_declines_a_job_that_pays_less_than_its_electricity(tmp_path: Path) -> None:
    # This computer once fine-tuned the model: 10,000 tokens of priced work in 100 s at 400 W.
    WorkJournal(tmp_path / "node" / "work-journal.jsonl").add(entry("job_0", seconds=100.0, joules=40_000.0))
    settings = ElectricitySettings(price_per_kwh="0.40", currency="USD", only_profitable=True)

    async def scenario() -> None:
        coordinator = FakeCoordinator(credit_value=protocol.CreditValue(currency="USD", micro_per_credit=500))
        server = await serve(coordinator.handle, "127.0.0.1", 0)
        agent = make_agent(tmp_path, server.sockets[0].getsockname()[1], electricity=settings)
        running = asyncio.create_task(agent.run())
        try:
            await coordinator.expect(protocol.Heartbeat)
            websocket = await coordinator.connections.get()
            # 40,000 tokens: about 400 s at 400 W, 0.044 kWh, $0.0178 of electricity. 20 credits pay $0.01.
            cheap = make_lease("job_cheap", "lease_cheap").model_copy(
                update={"pay_micro": 20_000_000, "work_tokens": 40_000}
            )
            await websocket.send(cheap.model_dump_json())
            declined = await coordinator.expect(protocol.JobFailure, job_id="job_cheap")
            assert declined.kind == "declined"
            await websocket.send(ack(declined, state="queued"))
            assert "unprofitable here: it pays about $0.0100" in declined.message
            assert "$0.0178 of electricity" in declined.message
            assert agent.status.last_declined.startswith("job job_cheap: unprofitable")
            # 100 credits pay $0.05: more than the electricity, so it runs.
            fair = make_lease("job_fair", "lease_fair").model_copy(
                update={"pay_micro": 100_000_000, "work_tokens": 40_000}
            )
            await websocket.send(fair.model_dump_json())
            progress = await coordinator.expect(protocol.JobProgress)
            assert progress.job_id == "job_fair"
            checkpoint = await coordinator.expect(protocol.CheckpointUploaded)
            FakeRunner.instances[-1].checkpoint_reported.set()
            await websocket.send(ack(checkpoint))
            result = await coordinator.expect(protocol.JobResult, job_id="job_fair")
            await websocket.send(ack(result, state="completed"))
        finally:
            agent.stop()
            await asyncio.wait_for(running, 10)
            server.close()
        # The job it ran is in the journal with what it paid and the energy it used (the fake probe's
        # GPU reads 120.5 W, integrated over the job) and what that cost.
        recorded = WorkJournal(tmp_path / "node" / "work-journal.jsonl").entries
        assert [item.job_id for item in recorded] == ["job_0", "job_fair"]
        fair_entry = recorded[-1]
        assert (fair_entry.outcome, fair_entry.pay_micro, fair_entry.work_tokens) == (
            "completed",
            100_000_000,
            40_000,
        )
        assert "power readings" in fair_entry.energy_source and not fair_entry.energy_estimated
        assert fair_entry.energy_millijoules == pytest.approx(
            120.5 * fair_entry.seconds * 1000, rel=0.05, abs=2000
        )
        assert fair_entry.electricity_micro == electricity_cost_micro(fair_entry.energy_millijoules, settings)
        assert agent.status.electricity == settings and agent.status.recent_jobs[-1].job_id == "job_fair"

    asyncio.run(scenario())


def test_the_guard_takes_a_job_it_cannot_judge_yet(tmp_path: Path) -> None:
    settings = ElectricitySettings(price_per_kwh="5", currency="USD", only_profitable=True)

    async def scenario() -> None:
        coordinator = FakeCoordinator(credit_value=protocol.CreditValue(currency="USD", micro_per_credit=500))
        server = await serve(coordinator.handle, "127.0.0.1", 0)
        agent = make_agent(tmp_path, server.sockets[0].getsockname()[1], electricity=settings)
        running = asyncio.create_task(agent.run())
        try:
            await coordinator.expect(protocol.Heartbeat)
            websocket = await coordinator.connections.get()
            lease = make_lease().model_copy(update={"pay_micro": 1, "work_tokens": 40_000})
            await websocket.send(lease.model_dump_json())  # never measured here: taken, to measure
            assert (await coordinator.expect(protocol.JobProgress)).job_id == "job_1"
        finally:
            agent.stop()
            agent.stop()
            await asyncio.wait_for(running, 10)
            server.close()

    asyncio.run(scenario())
