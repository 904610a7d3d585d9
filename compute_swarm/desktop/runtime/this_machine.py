"""The runtime this machine needs: the locks the app carries (requirements/), the torch build that fits
its GPU, the sources the settings name (or the build's own), under the platform's data folder."""

from __future__ import annotations

import platform
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from compute_swarm.desktop.runtime import builds
from compute_swarm.desktop.runtime.fetch import Runtimes
from compute_swarm.desktop.runtime.pins import LockError, read_locks
from compute_swarm.engine.devices import DeviceInventory

PYPI = "https://pypi.org/simple"
PYTORCH_INDEX = "https://download.pytorch.org/whl"
_OPERATING_SYSTEMS = {"Linux": "linux", "Windows": "windows", "Darwin": "macos"}


def locks_folder() -> Path:
    """requirements/: in a packaged app beside its code (installers/ puts it there), else the
    repository's."""
    bundle = getattr(sys, "_MEIPASS", None)
    if bundle is not None:
        return Path(bundle) / "requirements"
    return Path(__file__).resolve().parents[3] / "requirements"


def runtime_root() -> Path:
    import platformdirs

    return Path(platformdirs.user_data_dir("compute-swarm", appauthor=False)) / "runtime"


def available_builds(locks: Path, system: str) -> dict[str, Path]:
    """The torch builds this app has a lock for on `system` (platform.system()), by name."""
    operating_system = _OPERATING_SYSTEMS.get(system)
    if operating_system is None:
        return {}
    pattern = re.compile(rf"torch-(?P<build>[a-z0-9.]+)-{operating_system}\.txt")
    return {
        match["build"]: path
        for path in sorted(locks.glob("torch-*.txt"))
        if (match := pattern.fullmatch(path.name)) is not None
    }


def llama_lock(locks: Path, build: str, system: str) -> Path | None:
    """The lock of llama-cpp-python for this build (installers/build-app.sh writes it with the wheel it
    builds, for no public index has one), else its CPU build's: inference on the CPU beats none."""
    operating_system = _OPERATING_SYSTEMS.get(system)
    for name in (build, "cpu"):
        path = locks / f"llama-cpp-{name}-{operating_system}.txt"
        if path.is_file():
            return path
    return None


def swarm_wheels(coordinator: str) -> str:
    """The coordinator's own package index of the wheels it hands out with the app (its sell page)."""
    return coordinator.rstrip("/") + "/sell/wheels"


def default_sources(build: str) -> tuple[str, ...]:
    """Where a build's files are: torch (and CUDA's or ROCm's libraries) at its PyTorch index, the rest
    at PyPI. Any source serves: each file is checked against the lock."""
    if build == "mps":
        return (PYPI,)
    return (f"{PYTORCH_INDEX}/{build}", PYPI)


def engine_runtime(
    sources: Sequence[str] = (),
    *,
    coordinator: str | None = None,
    root: Path | None = None,
    locks: Path | None = None,
    inventory: DeviceInventory | None = None,
) -> tuple[Runtimes, builds.Choice]:
    """This machine's runtime and why its build was chosen: from `sources` (else the build's own
    indexes), then the coordinator's wheels. Raises LockError where the app carries no lock for this
    system."""
    from compute_swarm.engine import devices

    locks = locks or locks_folder()
    system = platform.system()
    here = available_builds(locks, system)
    if not here:
        raise LockError(f"this app carries no torch lock for {system} (requirements/torch-*.txt)")
    cuda_driver_version, driver_version = builds.read_cuda_driver()
    choice = builds.choose(
        inventory or devices.probe(check_torch=False),
        here,
        cuda_driver_version=cuda_driver_version,
        driver_version=driver_version,
        system=system,
    )
    if choice.build not in here:  # e.g. the CPU build, on a system whose locks are all for GPUs
        raise LockError(f"this app carries no torch lock for the build it needs here: {choice.reason}")
    llama = llama_lock(locks, choice.build, system)
    pins = read_locks([locks / "node.txt", here[choice.build], *([llama] if llama else [])])
    runtime = Runtimes(
        root or runtime_root(),
        choice.build,
        pins,
        [
            *(list(sources) or default_sources(choice.build)),
            *([swarm_wheels(coordinator)] if coordinator else []),
        ],
        reason=choice.reason,
    )
    return runtime, choice


def runtime_this_app_needs(sources: Sequence[str] = (), coordinator: str | None = None) -> Runtimes | None:
    """The runtime a packaged app fetches before its first job; None for an app run from a Python
    environment, whose engine is installed there. Raises LockError as engine_runtime does."""
    if not getattr(sys, "frozen", False):
        return None
    return engine_runtime(sources, coordinator=coordinator)[0]


def take_runtime_in_use(root: Path | None = None) -> Path | None:
    """Put the runtime in use (whichever lock it was fetched for) on this process's path and its
    children's, as a packaged app does when it starts; None where none has been fetched."""
    from compute_swarm.desktop.runtime.fetch import SITE_PACKAGES, in_use
    from compute_swarm.engine import child_process

    folder = in_use(root or runtime_root())
    if folder is None:
        return None
    child_process.use_runtime(folder / SITE_PACKAGES)
    return folder
