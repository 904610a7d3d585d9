"""The energy this computer uses while it works, from the best source it lets us read:

1. energy counters, which the hardware keeps itself: NVIDIA's (NVML, Volta and newer), AMD GPUs' and
   CPUs' in Linux's sysfs (hwmon `energy*_input`, powercap/RAPL `energy_uj`), added together;
2. else power readings (watts) the telemetry already takes every few seconds, integrated over time;
3. else an estimate from the hardware's class, said as one.

A meter counts millijoules from when it was made; a job's energy is the difference between two
readings. Counters wrap around (RAPL's at `max_energy_range_uj`), which the meter handles.
"""

from __future__ import annotations

import logging
import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from compute_swarm.protocol import Telemetry

logger = logging.getLogger(__name__)

# Power under a training load, when nothing can be read: gaming GPUs by memory (a proxy for their class:
# 24 GB cards draw 350–450 W, 8 GB ones 120–200 W), Apple's GPUs (the whole chip), and a desktop CPU.
ESTIMATED_GPU_WATTS_BY_MEMORY_GIB = ((20, 350), (12, 250), (8, 180), (0, 120))
ESTIMATED_APPLE_WATTS = 30
ESTIMATED_CPU_WATTS_PER_CORE = 6
ESTIMATED_CPU_WATTS_RANGE = (15, 150)


class EnergyMeter(ABC):
    """Millijoules used since the meter was made (`read`), and where they come from (`source`, in words;
    `estimated` when nothing was measured)."""

    source: str = ""
    estimated: bool = False

    @abstractmethod
    def read(self, now: float) -> int: ...

    def sample(self, telemetry: Telemetry | None, now: float) -> None:  # noqa: B027 (most meters ignore it)
        """A new telemetry reading: what a meter built on power readings integrates."""

    def watts(self) -> float | None:
        """The power it last saw (an estimate's constant), for the forecast; None before a reading."""
        return None


@dataclass(frozen=True)
class Counter:
    """One hardware energy counter: its raw value, and how many millijoules one unit is."""

    name: str
    read_raw: Callable[[], int]
    millijoules_per_unit: float
    wraps_at: int | None
    counts_gpu: bool  # a GPU's energy (else a CPU package's)


class CounterMeter(EnergyMeter):
    def __init__(self, counters: list[Counter], source: str):
        self.counters = counters
        self.source = source
        self._last = [counter.read_raw() for counter in counters]
        self._total_units = [0.0] * len(counters)
        self._last_read: tuple[float, int] | None = None
        self._watts: float | None = None

    def read(self, now: float) -> int:
        for index, counter in enumerate(self.counters):
            try:
                raw = counter.read_raw()
            except (OSError, ValueError) as error:
                logger.debug("could not read %s: %r", counter.name, error)
                continue
            step = raw - self._last[index]
            if step < 0:  # wrapped around (or the driver restarted: then only what came since counts)
                step = raw + (counter.wraps_at - self._last[index]) if counter.wraps_at else raw
            self._total_units[index] += step * counter.millijoules_per_unit
            self._last[index] = raw
        total = int(sum(self._total_units))
        if self._last_read is not None and now > self._last_read[0]:
            self._watts = (total - self._last_read[1]) / 1000 / (now - self._last_read[0])
        self._last_read = (now, total)
        return total

    def watts(self) -> float | None:
        return self._watts


class PowerMeter(EnergyMeter):
    """Power readings (the GPUs' watts, summed) integrated over time, each held until the next."""

    def __init__(self, source: str):
        self.source = source
        self._total_millijoules = 0.0
        self._last: tuple[float, float] | None = None  # (when, watts)

    def sample(self, telemetry: Telemetry | None, now: float) -> None:
        readings = (
            [gpu.power_watts for gpu in telemetry.gpus if gpu.power_watts is not None] if telemetry else []
        )
        if not readings:
            return
        self._advance(now)
        self._last = (now, sum(readings))

    def read(self, now: float) -> int:
        self._advance(now)
        return int(self._total_millijoules)

    def watts(self) -> float | None:
        return self._last[1] if self._last else None

    def _advance(self, now: float) -> None:
        if self._last is not None and now > self._last[0]:
            self._total_millijoules += self._last[1] * (now - self._last[0]) * 1000
            self._last = (now, self._last[1])


class EstimatedMeter(EnergyMeter):
    estimated = True

    def __init__(self, watts: float, source: str, started: float):
        self._watts = watts
        self.source = source
        self._started = started

    def read(self, now: float) -> int:
        return int(self._watts * max(now - self._started, 0) * 1000)

    def watts(self) -> float | None:
        return self._watts


@dataclass(frozen=True)
class Hardware:
    """What the estimate goes by: the GPUs (vendor, name, memory) and the CPU's logical cores."""

    gpus: tuple[tuple[str, str, int | None], ...]
    logical_cores: int

    @classmethod
    def of(cls, telemetry: Telemetry) -> Hardware:
        return cls(
            tuple((gpu.vendor, gpu.name, gpu.memory_total_bytes) for gpu in telemetry.gpus),
            telemetry.cpu.logical_cores,
        )


def estimated_watts(hardware: Hardware) -> tuple[float, str]:
    """Power under load for this class of hardware, and the words that say so."""
    if hardware.gpus:
        total, names = 0.0, []
        for vendor, name, memory in hardware.gpus:
            if vendor == "apple":
                total += ESTIMATED_APPLE_WATTS
            else:
                gib = (memory or 0) / 1024**3
                total += next(watts for floor, watts in ESTIMATED_GPU_WATTS_BY_MEMORY_GIB if gib >= floor)
            names.append(name)
        return total, f"estimate: about {total:.0f} W for {', '.join(names)} (no power reading here)"
    low, high = ESTIMATED_CPU_WATTS_RANGE
    watts = float(min(max(hardware.logical_cores * ESTIMATED_CPU_WATTS_PER_CORE, low), high))
    return (
        watts,
        f"estimate: about {watts:.0f} W for a {hardware.logical_cores}-thread CPU (no power reading here)",
    )


def sysfs_counters(root: Path = Path("/sys")) -> list[Counter]:
    """The energy counters Linux shows that this user may read: AMD GPUs' hwmon `energy*_input`
    (microjoules) and the CPU packages' powercap zones (`intel-rapl:N`, Intel's and AMD's; microjoules,
    wrapping at `max_energy_range_uj`). Sub-zones (`intel-rapl:0:0`) are parts of a package, not added."""
    counters = []
    for energy in sorted(root.glob("class/drm/card*/device/hwmon/hwmon*/energy*_input")):
        counter = _sysfs_counter(energy, f"GPU energy counter {energy.parent.name}", None, counts_gpu=True)
        if counter is not None:
            counters.append(counter)
    for zone in sorted(root.glob("class/powercap/*")):
        if not re.fullmatch(r"[a-z_]+-rapl:\d+", zone.name):
            continue
        wraps_at = _read_integer(zone / "max_energy_range_uj")
        name = f"CPU package energy counter {zone.name}"
        counter = _sysfs_counter(zone / "energy_uj", name, wraps_at, counts_gpu=False)
        if counter is not None:
            counters.append(counter)
    return counters


def _sysfs_counter(path: Path, name: str, wraps_at: int | None, *, counts_gpu: bool) -> Counter | None:
    if _read_integer(path) is None:
        return None  # absent, or readable only by root (RAPL on most systems since 2020)
    return Counter(name, lambda: _read_integer(path, raising=True), 0.001, wraps_at, counts_gpu)


def _read_integer(path: Path, raising: bool = False) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        if raising:
            raise
        return None


def nvml_counters() -> list[Counter]:
    """NVIDIA GPUs' total-energy counters (millijoules since the driver loaded), where NVML has them."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(index) for index in range(pynvml.nvmlDeviceGetCount())]
    except Exception as error:
        logger.debug("no NVML energy counters: %r", error)
        return []
    counters = []
    for index, handle in enumerate(handles):
        try:
            pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
        except Exception as error:  # older than Volta, or not supported on this board
            logger.debug("NVIDIA GPU %d has no energy counter: %r", index, error)
            continue
        counters.append(
            Counter(
                f"NVIDIA GPU {index} energy counter",
                lambda handle=handle: int(pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)),
                1.0,
                None,
                counts_gpu=True,
            )
        )
    return counters


def energy_meter(
    telemetry: Telemetry, now: float, *, sysfs_root: Path = Path("/sys"), use_nvml: bool = True
) -> EnergyMeter:
    """The best meter this computer allows (see the module's docstring)."""
    counters = nvml_counters() if use_nvml and any(gpu.vendor == "nvidia" for gpu in telemetry.gpus) else []
    counters += sysfs_counters(sysfs_root)
    # A CPU package's counter alone would miss a GPU's energy: the GPUs' power readings do better then.
    if counters and (any(counter.counts_gpu for counter in counters) or not telemetry.gpus):
        names = ", ".join(counter.name for counter in counters)
        return CounterMeter(counters, f"measured: {names}")
    if any(gpu.power_watts is not None for gpu in telemetry.gpus):
        meter = PowerMeter("measured: the GPUs' power readings, every few seconds")
        meter.sample(telemetry, now)
        return meter
    watts, source = estimated_watts(Hardware.of(telemetry))
    return EstimatedMeter(watts, source, now)
