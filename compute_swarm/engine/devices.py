"""Probes this machine's GPUs and CPU for the node agent's telemetry, the tray and the trainer's checks.
Every vendor library is optional and may be broken: probing returns what it could read and never raises.
"""

from __future__ import annotations

import logging
import os
import platform
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

logger = logging.getLogger(__name__)

_MEBIBYTE = 1024 * 1024


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class GpuProcess(_Frozen):
    """A process holding a GPU: a game shows up here as a graphics process."""

    pid: int
    name: str  # "" where it could not be read (another user's process, or one that just exited)
    used_memory_bytes: int | None


class GpuInfo(_Frozen):
    """One GPU; a reading is None where the driver could not give it."""

    # The vendor's enumeration order. NVML counts in PCI bus order, CUDA fastest-first by default, so
    # whoever starts the trainer sets CUDA_DEVICE_ORDER=PCI_BUS_ID for "cuda:N" to mean this GPU.
    index: int
    vendor: Literal["nvidia", "amd", "apple"]
    name: str
    backend: Literal["cuda", "rocm", "mps"]
    memory_total_bytes: int | None
    memory_free_bytes: int | None
    temperature_celsius: float | None = None
    utilization_percent: float | None = None
    power_watts: float | None = None
    processes: tuple[GpuProcess, ...] = ()


class CpuInfo(_Frozen):
    name: str
    logical_cores: int
    memory_total_bytes: int
    memory_available_bytes: int
    # Instruction sets llama.cpp's portable build needs that this CPU lacks: inference cannot run here.
    missing_for_inference: tuple[str, ...] = ()


class DeviceInventory(_Frozen):
    """Everything probed at one moment; `backends` lists what torch can run on here, "cpu" last."""

    gpus: tuple[GpuInfo, ...]
    cpu: CpuInfo
    backends: tuple[str, ...]

    def best_device(self) -> str:
        """The torch device to train on: the usable GPU with most free memory, then MPS, then the CPU."""
        candidates = self._torch_cuda_gpus()
        if candidates:
            return f"cuda:{max(candidates, key=lambda gpu: gpu.memory_free_bytes or -1).index}"
        return "mps" if "mps" in self.backends else "cpu"

    def memory_available_bytes(self, device: str) -> int | None:
        """Free memory for a torch device string ("cpu", "mps", "cuda", "cuda:1"); None if it is not here."""
        if device == "cpu" or (device == "mps" and "mps" in self.backends):
            return self.cpu.memory_available_bytes  # Apple GPUs share the machine's RAM
        kind, _, number = device.partition(":")
        if kind != "cuda" or not (number or "0").isdigit():
            return None
        return next(
            (gpu.memory_free_bytes for gpu in self._torch_cuda_gpus() if gpu.index == int(number or 0)), None
        )

    def _torch_cuda_gpus(self) -> list[GpuInfo]:
        # torch addresses ROCm GPUs as "cuda:N" too.
        return [gpu for gpu in self.gpus if gpu.backend in self.backends and gpu.backend != "mps"]


def probe(*, check_torch: bool = True, torch_in_child: bool = False) -> DeviceInventory:
    """Read every device on this machine.

    With `check_torch` (slow: it imports torch) a GPU backend is listed only when the installed torch can
    use it; without it, a GPU the driver reports is taken as usable. With `torch_in_child` torch is asked
    in a child process, so a long-running process that never trains (the agent, the tray) does not
    carry torch's few hundred MB.
    """
    nvidia_gpus = _probe_nvidia()
    amd_gpus = _probe_amdsmi()
    if amd_gpus is None:
        amd_gpus = _probe_pyamdgpuinfo()
    if not check_torch:
        torch_backends = None
    else:
        torch_backends = _torch_backends_in_child() if torch_in_child else _torch_backends()
    apple_gpus = _probe_apple(torch_backends)
    found = (("cuda", nvidia_gpus), ("rocm", amd_gpus), ("mps", apple_gpus))
    backends = [name for name, gpus in found if gpus and (torch_backends is None or name in torch_backends)]
    return DeviceInventory(
        gpus=(*nvidia_gpus, *amd_gpus, *apple_gpus), cpu=_probe_cpu(), backends=(*backends, "cpu")
    )


def _read(what: str, query: Callable[..., Any], *arguments: Any) -> Any:
    # One unsupported query (a laptop GPU without power readings, a VM without sensors) must cost that
    # reading only, not the whole GPU.
    try:
        return query(*arguments)
    except Exception as error:
        logger.debug("could not read %s: %r", what, error)
        return None


def _field(record: Any, key: str) -> Any:
    # NVML answers structs, amdsmi dictionaries whose keys have moved between versions.
    return record.get(key) if isinstance(record, dict) else getattr(record, key, None)


def _number(value: Any, scale: float = 1.0) -> float | None:
    # amdsmi answers "N/A" for a reading it does not have.
    try:
        return float(value) * scale
    except (TypeError, ValueError):
        return None


def _whole(value: Any, scale: int = 1) -> int | None:
    number = _number(value, scale)
    return None if number is None else int(number)


def _first(*readings: float | None) -> float | None:
    return next((reading for reading in readings if reading is not None), None)


def _free(total: int | None, used: int | None) -> int | None:
    return None if total is None or used is None else max(total - used, 0)


def _probe_nvidia() -> tuple[GpuInfo, ...]:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as error:
        logger.debug("no NVIDIA GPUs: %r", error)
        return ()
    try:
        count = pynvml.nvmlDeviceGetCount()
        return tuple(gpu for index in range(count) if (gpu := _nvidia_gpu(pynvml, index)) is not None)
    except Exception as error:
        logger.debug("NVML probe failed: %r", error)
        return ()
    finally:
        _read("NVML shutdown", pynvml.nvmlShutdown)


def _nvidia_gpu(nvml: Any, index: int) -> GpuInfo | None:
    handle = _read(f"NVML handle {index}", nvml.nvmlDeviceGetHandleByIndex, index)
    if handle is None:
        return None
    memory = _read("NVML memory", nvml.nvmlDeviceGetMemoryInfo, handle)
    sensor = getattr(nvml, "NVML_TEMPERATURE_GPU", 0)
    return GpuInfo(
        index=index,
        vendor="nvidia",
        name=str(_read("NVML name", nvml.nvmlDeviceGetName, handle) or "NVIDIA GPU"),
        backend="cuda",
        memory_total_bytes=_whole(_field(memory, "total")),
        memory_free_bytes=_whole(_field(memory, "free")),
        temperature_celsius=_number(_read("NVML temperature", nvml.nvmlDeviceGetTemperature, handle, sensor)),
        utilization_percent=_number(
            _field(_read("NVML use", nvml.nvmlDeviceGetUtilizationRates, handle), "gpu")
        ),
        power_watts=_number(_read("NVML power", nvml.nvmlDeviceGetPowerUsage, handle), scale=1e-3),
        processes=_read("NVML processes", _nvidia_processes, nvml, handle) or (),
    )


def _nvidia_processes(nvml: Any, handle: Any) -> tuple[GpuProcess, ...]:
    # A game is a graphics process, a trainer a compute one, and one process can be in both lists.
    memory_by_pid: dict[int, int | None] = {}
    for listing in (nvml.nvmlDeviceGetComputeRunningProcesses, nvml.nvmlDeviceGetGraphicsRunningProcesses):
        for process in _read("NVML process list", listing, handle) or ():
            pid, used = int(process.pid), _field(process, "usedGpuMemory")  # used is None under Windows WDDM
            known = [int(memory) for memory in (memory_by_pid.get(pid), used) if memory is not None]
            memory_by_pid[pid] = max(known, default=None)
    return tuple(
        GpuProcess(pid=pid, name=_process_name(pid), used_memory_bytes=memory)
        for pid, memory in sorted(memory_by_pid.items())
    )


def _process_name(pid: int) -> str:
    return str(_read(f"name of process {pid}", lambda: _psutil().Process(pid).name()) or "")


def _probe_amdsmi() -> tuple[GpuInfo, ...] | None:
    """AMD GPUs through amdsmi; None when amdsmi cannot be used, so the older library gets a chance."""
    try:
        import amdsmi

        amdsmi.amdsmi_init()
    except Exception as error:
        logger.debug("amdsmi unavailable: %r", error)
        return None
    try:
        handles = amdsmi.amdsmi_get_processor_handles()
        return tuple(_amdsmi_gpu(amdsmi, index, handle) for index, handle in enumerate(handles))
    except Exception as error:
        logger.debug("amdsmi probe failed: %r", error)
        return ()
    finally:
        _read("amdsmi shutdown", amdsmi.amdsmi_shut_down)


def _amdsmi_gpu(amdsmi: Any, index: int, handle: Any) -> GpuInfo:
    # amdsmi reports VRAM in MiB, power in W and temperature in °C.
    vram = _read("amdsmi VRAM", amdsmi.amdsmi_get_gpu_vram_usage, handle)
    total = _whole(_field(vram, "vram_total"), _MEBIBYTE)
    power = _read("amdsmi power", amdsmi.amdsmi_get_power_info, handle)
    asic = _read("amdsmi ASIC", amdsmi.amdsmi_get_gpu_asic_info, handle)
    activity = _read("amdsmi activity", amdsmi.amdsmi_get_gpu_activity, handle)
    return GpuInfo(
        index=index,
        vendor="amd",
        name=str(_field(asic, "market_name") or "AMD GPU"),
        backend="rocm",
        memory_total_bytes=total,
        memory_free_bytes=_free(total, _whole(_field(vram, "vram_used"), _MEBIBYTE)),
        # Consumer cards have an edge sensor; datacentre parts (MI300) only a hotspot one.
        temperature_celsius=_first(
            _amdsmi_temperature(amdsmi, handle, "EDGE"), _amdsmi_temperature(amdsmi, handle, "HOTSPOT")
        ),
        utilization_percent=_number(_field(activity, "gfx_activity")),
        power_watts=_first(
            _number(_field(power, "current_socket_power")), _number(_field(power, "average_socket_power"))
        ),
    )


def _amdsmi_temperature(amdsmi: Any, handle: Any, sensor: str) -> float | None:
    def query() -> Any:
        sensor_type = getattr(amdsmi.AmdSmiTemperatureType, sensor)
        return amdsmi.amdsmi_get_temp_metric(handle, sensor_type, amdsmi.AmdSmiTemperatureMetric.CURRENT)

    return _number(_read(f"amdsmi {sensor} temperature", query))


def _probe_pyamdgpuinfo() -> tuple[GpuInfo, ...]:
    try:
        import pyamdgpuinfo

        return tuple(
            _pyamdgpuinfo_gpu(pyamdgpuinfo.get_gpu(index), index)
            for index in range(pyamdgpuinfo.detect_gpus())
        )
    except Exception as error:
        logger.debug("no AMD GPUs through pyamdgpuinfo: %r", error)
        return ()


def _pyamdgpuinfo_gpu(gpu: Any, index: int) -> GpuInfo:
    total = _whole(_field(_field(gpu, "memory_info"), "vram_size"))
    return GpuInfo(
        index=index,
        vendor="amd",
        name=str(_field(gpu, "name") or "AMD GPU"),
        backend="rocm",
        memory_total_bytes=total,
        memory_free_bytes=_free(total, _whole(_read("pyamdgpuinfo VRAM", gpu.query_vram_usage))),
        temperature_celsius=_number(_read("pyamdgpuinfo temperature", gpu.query_temperature)),
        utilization_percent=_number(_read("pyamdgpuinfo load", gpu.query_load), scale=100),  # a fraction
        power_watts=_number(_read("pyamdgpuinfo power", gpu.query_power)),
    )


def _torch_backends() -> frozenset[str]:
    try:
        import torch

        found = set()
        if torch.cuda.is_available():
            found.add("rocm" if getattr(torch.version, "hip", None) else "cuda")
        if torch.backends.mps.is_available():
            found.add("mps")
        return frozenset(found)
    except Exception as error:
        logger.debug("torch cannot use any GPU: %r", error)
        return frozenset()


def _torch_backends_in_child(timeout_seconds: float = 120.0) -> frozenset[str]:
    import subprocess

    from compute_swarm.engine import child_process

    try:
        answer = subprocess.run(
            child_process.command("compute_swarm.engine.devices", "--torch-backends"),
            env=child_process.environment(),
            capture_output=True,
            text=True,
            timeout=timeout_seconds,
            check=True,
        )
    except (OSError, subprocess.SubprocessError) as error:
        logger.warning("could not ask torch which GPUs it can use: %r", error)
        return frozenset()
    return frozenset(name for name in answer.stdout.split() if name in ("cuda", "rocm", "mps"))


def _probe_apple(torch_backends: frozenset[str] | None) -> tuple[GpuInfo, ...]:
    # Without torch to ask, Apple silicon is the sign of a Metal GPU that MPS can use.
    usable = platform.machine() == "arm64" if torch_backends is None else "mps" in torch_backends
    if platform.system() != "Darwin" or not usable:
        return ()
    ram_total, ram_available = _memory()
    recommended = (
        _read("MPS memory", lambda: int(_torch().mps.recommended_max_memory())) if torch_backends else None
    )
    total = recommended or ram_total or None
    free = min(ram_available, total) if total else None
    return (
        GpuInfo(
            index=0,
            vendor="apple",
            name="Apple GPU",
            backend="mps",
            memory_total_bytes=total,
            memory_free_bytes=free,
        ),
    )


# What installers/llama-cpp.sh builds llama.cpp for on x86-64 (GGML_NATIVE=OFF: AVX2, FMA, F16C, as
# any x86-64 CPU since about 2015 has). On a CPU without them the first eval dies with SIGILL.
LLAMA_X86_INSTRUCTIONS = ("avx2", "fma", "f16c")


def missing_llama_instructions(machine: str, cpu_flags: frozenset[str] | None) -> tuple[str, ...]:
    """The instruction sets the portable llama.cpp build needs that a CPU lacks; () when it has them,
    when it is not x86-64 (Apple and ARM builds need nothing extra), or when its flags are unknown."""
    if machine.lower() not in ("x86_64", "amd64") or cpu_flags is None:
        return ()
    return tuple(flag for flag in LLAMA_X86_INSTRUCTIONS if flag not in cpu_flags)


def _probe_cpu() -> CpuInfo:
    total, available = _memory()
    cpuinfo = _read("/proc/cpuinfo", lambda: _proc_fields("/proc/cpuinfo")) or {}
    flags = frozenset(cpuinfo["flags"].split()) if "flags" in cpuinfo else None
    # platform.processor() says only "x86_64" on Linux, so /proc/cpuinfo's marketing name comes first.
    name = cpuinfo.get("model name")
    return CpuInfo(
        name=name or platform.processor() or platform.machine() or "unknown CPU",
        logical_cores=_read("psutil core count", lambda: int(_psutil().cpu_count())) or os.cpu_count() or 1,
        memory_total_bytes=total,
        memory_available_bytes=available,
        missing_for_inference=missing_llama_instructions(platform.machine(), flags),
    )


def _memory() -> tuple[int, int]:
    """(total, available) RAM in bytes; zeros when neither psutil nor /proc/meminfo can say."""

    def from_psutil() -> tuple[int, int]:
        memory = _psutil().virtual_memory()
        return int(memory.total), int(memory.available)

    def from_proc() -> tuple[int, int]:
        fields = _proc_fields("/proc/meminfo")  # in kB
        return int(fields["MemTotal"].split()[0]) * 1024, int(fields["MemAvailable"].split()[0]) * 1024

    return _read("psutil memory", from_psutil) or _read("/proc/meminfo", from_proc) or (0, 0)


def _proc_fields(path: str) -> dict[str, str]:
    """The "key: value" lines of a Linux /proc file; the first wins (cpuinfo repeats them per core)."""
    fields: dict[str, str] = {}
    with open(path, encoding="utf-8", errors="replace") as lines:
        for line in lines:
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    return fields


def _psutil() -> Any:
    import psutil

    return psutil


def _torch() -> Any:
    import torch

    return torch


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--torch-backends"]:
        print(" ".join(sorted(_torch_backends())))
    else:
        print(probe().model_dump_json(indent=2))
