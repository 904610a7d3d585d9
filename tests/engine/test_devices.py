"""Device probing: the real probe on this machine, and vendor libraries that are missing or misbehave."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import psutil
import pytest
from pydantic import ValidationError

from compute_swarm.engine import devices
from compute_swarm.engine.devices import CpuInfo, DeviceInventory, GpuInfo, GpuProcess, probe

GIBIBYTE = 1024**3
REPOSITORY_ROOT = Path(__file__).resolve().parents[2]


def _machine_has_a_gpu() -> bool:
    return (
        platform.system() == "Darwin"
        or Path("/dev/nvidia0").exists()
        or Path("/dev/kfd").exists()
        or shutil.which("nvidia-smi") is not None
    )


# --- fake vendor libraries, injected through sys.modules -------------------------------------------


class FakeNvmlError(Exception):
    pass


class FakeNvmlNotSupported(FakeNvmlError):
    """Stands in for pynvml.NVMLError_NotSupported."""


def _answer(value: Any) -> Any:
    if isinstance(value, BaseException):
        raise value
    return value


def fake_nvml(
    gpus: list[dict[str, Any]], *, init_error: Exception | None = None, count_error: Exception | None = None
) -> types.ModuleType:
    """A pynvml stand-in; a GPU's reading given as an exception is raised by its query."""
    nvml = types.ModuleType("pynvml")
    nvml.NVML_TEMPERATURE_GPU = 0
    nvml.NVMLError_NotSupported = FakeNvmlNotSupported
    nvml.calls = []

    def init() -> None:
        nvml.calls.append("init")
        _answer(init_error)

    def shutdown() -> None:
        nvml.calls.append("shutdown")

    def temperature(handle: dict[str, Any], sensor: int) -> Any:
        assert sensor == nvml.NVML_TEMPERATURE_GPU
        return _answer(handle["temperature"])

    nvml.nvmlInit = init
    nvml.nvmlShutdown = shutdown
    nvml.nvmlDeviceGetCount = lambda: _answer(count_error) or len(gpus)
    nvml.nvmlDeviceGetHandleByIndex = lambda index: gpus[index]
    nvml.nvmlDeviceGetName = lambda handle: _answer(handle["name"])
    nvml.nvmlDeviceGetMemoryInfo = lambda handle: _answer(handle["memory"])
    nvml.nvmlDeviceGetTemperature = temperature
    nvml.nvmlDeviceGetUtilizationRates = lambda handle: _answer(handle["utilization"])
    nvml.nvmlDeviceGetPowerUsage = lambda handle: _answer(handle["power_milliwatts"])
    nvml.nvmlDeviceGetComputeRunningProcesses = lambda handle: _answer(handle["compute"])
    nvml.nvmlDeviceGetGraphicsRunningProcesses = lambda handle: _answer(handle["graphics"])
    return nvml


def nvml_gpu(**readings: Any) -> dict[str, Any]:
    gpu = {
        "name": "NVIDIA GeForce RTX 4090",
        "memory": types.SimpleNamespace(total=24 * GIBIBYTE, free=20 * GIBIBYTE, used=4 * GIBIBYTE),
        "temperature": 61,
        "utilization": types.SimpleNamespace(gpu=37, memory=12),
        "power_milliwatts": 250_000,
        "compute": [],
        "graphics": [],
    }
    gpu.update(readings)
    return gpu


def nvml_process(pid: int, used_memory: int | None) -> types.SimpleNamespace:
    return types.SimpleNamespace(pid=pid, usedGpuMemory=used_memory)


def fake_torch(*, cuda: bool = False, hip: str | None = None, mps: bool = False) -> types.ModuleType:
    torch = types.ModuleType("torch")
    torch.cuda = types.SimpleNamespace(is_available=lambda: cuda)
    torch.version = types.SimpleNamespace(hip=hip, cuda=None if hip else "12.4")
    torch.backends = types.SimpleNamespace(mps=types.SimpleNamespace(is_available=lambda: mps))
    torch.mps = types.SimpleNamespace(recommended_max_memory=lambda: 12 * GIBIBYTE)
    return torch


@pytest.fixture
def isolated(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No vendor library, a CPU-only torch and a Linux host, whatever machine runs the tests."""
    for name in ("pynvml", "amdsmi", "pyamdgpuinfo"):
        monkeypatch.setitem(sys.modules, name, None)  # `import name` now raises ImportError
    monkeypatch.setitem(sys.modules, "torch", fake_torch())
    monkeypatch.setattr(platform, "system", lambda: "Linux")
    return monkeypatch


# --- the real machine --------------------------------------------------------------------------------


@pytest.mark.skipif(_machine_has_a_gpu(), reason="asserts the CPU-only inventory of a machine with no GPU")
def test_probe_on_this_machine_without_a_gpu_reports_only_the_cpu() -> None:
    inventory = probe()

    assert inventory.gpus == ()
    assert inventory.backends == ("cpu",)
    assert inventory.best_device() == "cpu"
    assert inventory.memory_available_bytes("cpu") > 0
    assert inventory.memory_available_bytes("cuda:0") is None
    assert inventory.memory_available_bytes("mps") is None


def test_probe_reads_the_cpu_like_psutil_does() -> None:
    cpu = probe(check_torch=False).cpu
    memory = psutil.virtual_memory()

    assert cpu.logical_cores >= 1
    assert cpu.logical_cores == psutil.cpu_count()
    assert cpu.name.strip()
    assert cpu.memory_total_bytes == memory.total
    assert 0 < cpu.memory_available_bytes <= cpu.memory_total_bytes
    assert abs(cpu.memory_available_bytes - memory.available) < 0.1 * memory.total


def test_cpu_is_still_read_without_psutil(monkeypatch: pytest.MonkeyPatch) -> None:
    total = psutil.virtual_memory().total
    monkeypatch.setitem(sys.modules, "psutil", None)

    cpu = probe(check_torch=False).cpu

    assert cpu.logical_cores == os.cpu_count()
    if Path("/proc/meminfo").exists():
        assert cpu.memory_total_bytes == total
        assert 0 < cpu.memory_available_bytes <= cpu.memory_total_bytes
    else:
        assert cpu.memory_total_bytes >= 0


def test_importing_the_module_loads_no_vendor_library_or_torch() -> None:
    # The agent imports this module on start; torch alone takes seconds to import.
    check = (
        "import sys, compute_swarm.engine.devices\n"
        "heavy = {'torch', 'pynvml', 'amdsmi', 'pyamdgpuinfo', 'psutil'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", check], cwd=REPOSITORY_ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


# --- missing and misbehaving vendor libraries ----------------------------------------------------------


def test_no_vendor_library_gives_a_cpu_only_inventory(isolated: pytest.MonkeyPatch) -> None:
    inventory = probe()

    assert inventory.gpus == ()
    assert inventory.backends == ("cpu",)
    assert inventory.best_device() == "cpu"


def test_nvml_that_cannot_start_gives_no_gpus_and_no_error(isolated: pytest.MonkeyPatch) -> None:
    nvml = fake_nvml([nvml_gpu()], init_error=FakeNvmlError("Driver Not Loaded"))
    isolated.setitem(sys.modules, "pynvml", nvml)

    inventory = probe(check_torch=False)

    assert inventory.gpus == ()
    assert inventory.backends == ("cpu",)
    assert nvml.calls == ["init"]  # nothing to shut down


def test_nvml_failing_after_start_is_still_shut_down(isolated: pytest.MonkeyPatch) -> None:
    nvml = fake_nvml([nvml_gpu()], count_error=FakeNvmlError("GPU is lost"))
    isolated.setitem(sys.modules, "pynvml", nvml)

    inventory = probe(check_torch=False)

    assert inventory.gpus == ()
    assert nvml.calls == ["init", "shutdown"]


def test_an_unsupported_nvml_reading_leaves_only_that_field_empty(isolated: pytest.MonkeyPatch) -> None:
    game_pid = 999_999_999  # no such process, so its name cannot be read
    gpu = nvml_gpu(
        temperature=FakeNvmlNotSupported("Not Supported"),
        compute=[nvml_process(os.getpid(), 1 * GIBIBYTE)],
        # This process also draws (both lists); the game's memory is unknown under Windows WDDM.
        graphics=[nvml_process(os.getpid(), None), nvml_process(game_pid, None)],
    )
    nvml = fake_nvml([gpu])
    isolated.setitem(sys.modules, "pynvml", nvml)

    inventory = probe(check_torch=False)

    assert inventory.gpus == (
        GpuInfo(
            index=0,
            vendor="nvidia",
            name="NVIDIA GeForce RTX 4090",
            backend="cuda",
            memory_total_bytes=24 * GIBIBYTE,
            memory_free_bytes=20 * GIBIBYTE,
            temperature_celsius=None,
            utilization_percent=37.0,
            power_watts=250.0,
            processes=(
                GpuProcess(pid=os.getpid(), name=psutil.Process().name(), used_memory_bytes=1 * GIBIBYTE),
                GpuProcess(pid=game_pid, name="", used_memory_bytes=None),
            ),
        ),
    )
    assert inventory.backends == ("cuda", "cpu")
    assert inventory.best_device() == "cuda:0"
    assert inventory.memory_available_bytes("cuda:0") == 20 * GIBIBYTE
    assert inventory.memory_available_bytes("cuda") == 20 * GIBIBYTE
    assert nvml.calls == ["init", "shutdown"]


def test_a_gpu_whose_every_reading_fails_is_still_listed(isolated: pytest.MonkeyPatch) -> None:
    failure = FakeNvmlError("Unknown Error")
    gpu = nvml_gpu(
        name=failure,
        memory=failure,
        temperature=failure,
        utilization=failure,
        power_milliwatts=failure,
        compute=failure,
        graphics=failure,
    )
    isolated.setitem(sys.modules, "pynvml", fake_nvml([gpu]))

    (found,) = probe(check_torch=False).gpus

    assert found.vendor == "nvidia"
    assert found.name == "NVIDIA GPU"
    assert found.memory_total_bytes is None
    assert found.memory_free_bytes is None
    assert found.temperature_celsius is None
    assert found.utilization_percent is None
    assert found.power_watts is None
    assert found.processes == ()


def test_cuda_is_a_backend_only_when_torch_can_use_it(isolated: pytest.MonkeyPatch) -> None:
    isolated.setitem(sys.modules, "pynvml", fake_nvml([nvml_gpu()]))

    cpu_only_torch = probe()  # the fixture's torch was built without CUDA
    assert len(cpu_only_torch.gpus) == 1
    assert cpu_only_torch.backends == ("cpu",)
    assert cpu_only_torch.best_device() == "cpu"
    assert cpu_only_torch.memory_available_bytes("cuda:0") is None

    isolated.setitem(sys.modules, "torch", fake_torch(cuda=True))
    assert probe().backends == ("cuda", "cpu")


def test_amdsmi_gpu_with_unreadable_sensors(isolated: pytest.MonkeyPatch) -> None:
    amdsmi = types.ModuleType("amdsmi")
    amdsmi.AmdSmiTemperatureType = types.SimpleNamespace(EDGE="edge", HOTSPOT="hotspot")
    amdsmi.AmdSmiTemperatureMetric = types.SimpleNamespace(CURRENT="current")
    amdsmi.calls = []

    def temperature(handle: str, sensor: str, metric: str) -> int:
        if sensor == "edge":  # a datacentre part: only the hotspot sensor answers
            raise RuntimeError("AMDSMI_STATUS_NOT_SUPPORTED")
        return 71

    amdsmi.amdsmi_init = lambda *flags: amdsmi.calls.append("init")
    amdsmi.amdsmi_shut_down = lambda: amdsmi.calls.append("shutdown")
    amdsmi.amdsmi_get_processor_handles = lambda: ["gpu-handle"]
    amdsmi.amdsmi_get_gpu_asic_info = lambda handle: {"market_name": "AMD Radeon RX 7900 XTX"}
    amdsmi.amdsmi_get_gpu_vram_usage = lambda handle: {"vram_total": 24_560, "vram_used": 560}  # MiB
    amdsmi.amdsmi_get_temp_metric = temperature
    amdsmi.amdsmi_get_gpu_activity = lambda handle: {"gfx_activity": "N/A", "umc_activity": 3}
    amdsmi.amdsmi_get_power_info = lambda handle: {"current_socket_power": "N/A", "average_socket_power": 180}
    isolated.setitem(sys.modules, "amdsmi", amdsmi)
    isolated.setitem(sys.modules, "torch", fake_torch(cuda=True, hip="6.2"))

    inventory = probe()

    assert inventory.gpus == (
        GpuInfo(
            index=0,
            vendor="amd",
            name="AMD Radeon RX 7900 XTX",
            backend="rocm",
            memory_total_bytes=24_560 * 1024**2,
            memory_free_bytes=24_000 * 1024**2,
            temperature_celsius=71.0,
            utilization_percent=None,
            power_watts=180.0,
        ),
    )
    assert inventory.backends == ("rocm", "cpu")
    assert inventory.best_device() == "cuda:0"  # torch addresses ROCm GPUs as CUDA devices
    assert amdsmi.calls == ["init", "shutdown"]


def test_pyamdgpuinfo_is_used_when_amdsmi_cannot_start(isolated: pytest.MonkeyPatch) -> None:
    amdsmi = types.ModuleType("amdsmi")
    amdsmi.amdsmi_init = lambda *flags: (_ for _ in ()).throw(OSError("libamd_smi.so: cannot open"))
    card = types.SimpleNamespace(
        name="AMD Radeon RX 6800",
        memory_info={"vram_size": 16 * GIBIBYTE, "gtt_size": 8 * GIBIBYTE},
        query_vram_usage=lambda: 2 * GIBIBYTE,
        query_temperature=lambda: 55.0,
        query_load=lambda: 0.5,
        query_power=lambda: (_ for _ in ()).throw(RuntimeError("no power sensor")),
    )
    pyamdgpuinfo = types.ModuleType("pyamdgpuinfo")
    pyamdgpuinfo.detect_gpus = lambda: 1
    pyamdgpuinfo.get_gpu = lambda index: card
    isolated.setitem(sys.modules, "amdsmi", amdsmi)
    isolated.setitem(sys.modules, "pyamdgpuinfo", pyamdgpuinfo)

    (found,) = probe(check_torch=False).gpus

    assert found.vendor == "amd"
    assert found.name == "AMD Radeon RX 6800"
    assert found.memory_total_bytes == 16 * GIBIBYTE
    assert found.memory_free_bytes == 14 * GIBIBYTE
    assert found.temperature_celsius == 55.0
    assert found.utilization_percent == 50.0
    assert found.power_watts is None


def test_apple_silicon_trains_on_mps(isolated: pytest.MonkeyPatch) -> None:
    isolated.setattr(platform, "system", lambda: "Darwin")
    isolated.setattr(platform, "machine", lambda: "arm64")
    isolated.setitem(sys.modules, "torch", fake_torch(mps=True))

    inventory = probe()

    (apple,) = inventory.gpus
    assert (apple.vendor, apple.backend, apple.memory_total_bytes) == ("apple", "mps", 12 * GIBIBYTE)
    assert inventory.backends == ("mps", "cpu")
    assert inventory.best_device() == "mps"
    assert inventory.memory_available_bytes("mps") == inventory.cpu.memory_available_bytes


def test_probing_logs_failures_at_debug_level_only(
    isolated: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    isolated.setitem(sys.modules, "pynvml", fake_nvml([nvml_gpu(temperature=FakeNvmlNotSupported("no"))]))
    caplog.set_level("DEBUG", logger=devices.__name__)

    probe(check_torch=False)

    assert any("temperature" in record.getMessage() for record in caplog.records)
    assert {record.levelname for record in caplog.records} == {"DEBUG"}


# --- choosing a device -------------------------------------------------------------------------------

CPU = CpuInfo(
    name="test CPU", logical_cores=8, memory_total_bytes=32 * GIBIBYTE, memory_available_bytes=GIBIBYTE
)


def cuda_gpu(index: int, free: int | None) -> GpuInfo:
    return GpuInfo(
        index=index,
        vendor="nvidia",
        name=f"GPU {index}",
        backend="cuda",
        memory_total_bytes=24 * GIBIBYTE,
        memory_free_bytes=free,
    )


def test_best_device_is_the_gpu_with_most_free_memory() -> None:
    gpus = (cuda_gpu(0, 2 * GIBIBYTE), cuda_gpu(1, 10 * GIBIBYTE), cuda_gpu(2, None))

    assert DeviceInventory(gpus=gpus, cpu=CPU, backends=("cuda", "cpu")).best_device() == "cuda:1"
    assert DeviceInventory(gpus=gpus, cpu=CPU, backends=("cpu",)).best_device() == "cpu"


def test_memory_available_for_each_device_string() -> None:
    inventory = DeviceInventory(
        gpus=(cuda_gpu(0, 2 * GIBIBYTE), cuda_gpu(1, 10 * GIBIBYTE)), cpu=CPU, backends=("cuda", "cpu")
    )

    assert inventory.memory_available_bytes("cpu") == GIBIBYTE
    assert inventory.memory_available_bytes("cuda") == 2 * GIBIBYTE
    assert inventory.memory_available_bytes("cuda:1") == 10 * GIBIBYTE
    assert inventory.memory_available_bytes("cuda:2") is None
    assert inventory.memory_available_bytes("cuda:first") is None
    assert inventory.memory_available_bytes("mps") is None
    assert inventory.memory_available_bytes("xpu:0") is None


# --- the models --------------------------------------------------------------------------------------


def test_inventory_round_trips_through_json_and_is_frozen() -> None:
    gpu = cuda_gpu(0, 20 * GIBIBYTE).model_copy(
        update={
            "temperature_celsius": 64.0,
            "processes": (GpuProcess(pid=42, name="game.exe", used_memory_bytes=None),),
        }
    )
    inventory = DeviceInventory(gpus=(gpu,), cpu=CPU, backends=("cuda", "cpu"))

    assert DeviceInventory.model_validate_json(inventory.model_dump_json()) == inventory
    with pytest.raises(ValidationError):
        inventory.cpu.logical_cores = 1  # type: ignore[misc]
    with pytest.raises(ValidationError):
        GpuProcess(pid=1, name="x", used_memory_bytes=None, priority=5)  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        GpuInfo.model_validate({**gpu.model_dump(), "vendor": "intel"})


def test_inference_needs_avx2_fma_and_f16c_on_x86_64_only() -> None:
    from compute_swarm.engine.devices import missing_llama_instructions

    haswell = frozenset({"sse4_2", "avx", "avx2", "fma", "f16c", "bmi2"})
    sandy_bridge = frozenset({"sse4_2", "avx"})
    assert missing_llama_instructions("x86_64", haswell) == ()
    assert missing_llama_instructions("AMD64", sandy_bridge) == ("avx2", "fma", "f16c")
    assert missing_llama_instructions("aarch64", frozenset()) == ()  # ARM builds need nothing extra
    assert missing_llama_instructions("x86_64", None) == ()  # unknown flags: not refused


def test_this_machine_s_cpu_is_probed_for_inference() -> None:
    from compute_swarm.engine.devices import probe

    # This machine runs llama.cpp's portable build (the suite's inference tests prove it).
    assert probe(check_torch=False).cpu.missing_for_inference == ()
