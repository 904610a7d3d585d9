"""Which torch build fits this machine, from what its GPU driver can run and the builds this app has a
lock for (requirements/torch-<build>-<os>.txt: cpu, cu126, cu128, cu130, rocm6.4, mps...). The choice
comes with its reason in plain words, for the window: a seller whose GPU cannot be used is told why."""

from __future__ import annotations

import contextlib
import platform
import re
from collections.abc import Iterable
from dataclasses import dataclass

from compute_swarm.engine.devices import DeviceInventory

CPU = "cpu"
MPS = "mps"  # PyPI's torch for macOS (installers/torch-locks.sh writes torch-mps-macos.txt)
_CUDA = re.compile(r"cu(?P<major>\d+?)(?P<minor>\d)")
_ROCM = re.compile(r"rocm(?P<version>[\d.]+)")


@dataclass(frozen=True)
class Choice:
    build: str
    reason: str


def cuda_build_version(build: str) -> tuple[int, int] | None:
    """(12, 8) for "cu128"; None for a build that is not CUDA's."""
    match = _CUDA.fullmatch(build)
    return (int(match["major"]), int(match["minor"])) if match else None


def choose(
    inventory: DeviceInventory,
    available: Iterable[str],
    *,
    cuda_driver_version: tuple[int, int] | None,
    driver_version: str | None,
    system: str | None = None,
    machine: str | None = None,
) -> Choice:
    """The build to fetch, from the GPUs probed, the CUDA version the NVIDIA driver supports (NVML's
    nvmlSystemGetCudaDriverVersion) and the builds this app has locks for."""
    system = system or platform.system()
    machine = (machine or platform.machine()).lower()
    builds = set(available)
    vendors = {gpu.vendor for gpu in inventory.gpus}
    if system == "Darwin":
        if MPS in builds:
            gpu = "Apple GPU (Metal)" if machine == "arm64" else "no GPU torch can use on an Intel Mac"
            return Choice(MPS, f"macOS build of torch: {gpu}")
        return Choice(CPU, "this app has no lock for macOS's torch build")
    if "nvidia" in vendors:
        fits = sorted(
            (version, build)
            for build in builds
            if (version := cuda_build_version(build)) is not None
            and cuda_driver_version is not None
            and version <= cuda_driver_version
        )
        driver = f"NVIDIA driver {driver_version or 'of unknown version'}"
        if fits:
            version, build = fits[-1]
            supported = ".".join(map(str, cuda_driver_version or ()))
            return Choice(
                build, f"{driver} runs CUDA up to {supported}: torch's CUDA {version[0]}.{version[1]} build"
            )
        oldest = min((version for build in builds if (version := cuda_build_version(build))), default=None)
        if oldest is None:
            return Choice(CPU, f"{driver}, but this app has no lock for a CUDA build of torch: CPU only")
        return Choice(
            CPU,
            f"{driver} runs CUDA up to {'.'.join(map(str, cuda_driver_version or (0, 0)))}; the oldest CUDA "
            f"build here needs {oldest[0]}.{oldest[1]}: update the driver to use the GPU (CPU only until then)",
        )
    if "amd" in vendors:
        rocm = sorted(build for build in builds if _ROCM.fullmatch(build))
        if system == "Linux" and rocm:
            return Choice(rocm[-1], f"AMD GPU on Linux: torch's ROCm build ({rocm[-1]})")
        if system == "Linux":
            return Choice(CPU, "AMD GPU, but this app has no lock for a ROCm build of torch: CPU only")
        return Choice(
            CPU, f"AMD GPU on {system}: torch has ROCm builds for Linux only, so this PC works on its CPU"
        )
    return Choice(CPU, "no GPU that torch can use was found: CPU build")


def read_cuda_driver() -> tuple[tuple[int, int] | None, str | None]:
    """(the CUDA version the NVIDIA driver supports, the driver's version), through NVML; (None, None)
    where there is no NVIDIA driver."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no NVML library, no driver: no NVIDIA GPU to use
        return None, None
    try:
        encoded = pynvml.nvmlSystemGetCudaDriverVersion()  # 12080 for CUDA 12.8
        driver = pynvml.nvmlSystemGetDriverVersion()
        driver = driver.decode() if isinstance(driver, bytes) else str(driver)
        return (encoded // 1000, (encoded % 1000) // 10), driver
    except Exception:
        return None, None
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()
