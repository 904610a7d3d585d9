"""What the node says about itself in its hello and heartbeats: its machine (the protocol's copy of
engine.devices' probe), the catalogue models already in its cache, its software version and its
default name. Plain functions; desktop.machine_watch and desktop.connection send what they return.
"""

from __future__ import annotations

import socket
from importlib import metadata
from pathlib import Path

from compute_swarm import protocol
from compute_swarm.engine.devices import DeviceInventory
from compute_swarm.protocol import finite_or_none

_TELEMETRY_BACKENDS = ("cuda", "rocm", "mps", "cpu")


def agent_version() -> str:
    try:
        return metadata.version("compute-swarm")[:64]
    except metadata.PackageNotFoundError:
        return "0+unknown"


def default_node_name() -> str:
    return (socket.gethostname() or "node")[:64]


def telemetry_from_inventory(
    inventory: DeviceInventory, backends: tuple[str, ...] | None = None
) -> protocol.Telemetry:
    """The protocol's copy of engine.devices' probe. `backends` (from a probe that asked torch) replaces
    the inventory's own guess; "cpu" is always offered."""
    usable = [name for name in dict.fromkeys(backends or inventory.backends) if name in _TELEMETRY_BACKENDS]
    if "cpu" not in usable:
        usable.append("cpu")
    cpu = inventory.cpu
    return protocol.Telemetry(
        gpus=tuple(
            protocol.GpuTelemetry(
                index=gpu.index,
                vendor=gpu.vendor,
                name=gpu.name[:256],
                backend=gpu.backend,
                memory_total_bytes=gpu.memory_total_bytes,
                memory_free_bytes=gpu.memory_free_bytes,
                temperature_celsius=finite_or_none(gpu.temperature_celsius),
                utilization_percent=finite_or_none(gpu.utilization_percent),
                power_watts=finite_or_none(gpu.power_watts),
            )
            for gpu in inventory.gpus[:64]
        ),
        cpu=protocol.CpuTelemetry(
            name=(cpu.name or "unknown CPU")[:256],
            logical_cores=min(max(cpu.logical_cores, 1), 65536),
            memory_total_bytes=max(cpu.memory_total_bytes, 0),
            memory_available_bytes=max(cpu.memory_available_bytes, 0),
        ),
        backends=tuple(usable[:8]),
    )


def cached_catalogue_models(models_directory: Path | None = None) -> tuple[str, ...]:
    """Catalogue models already in engine.models' cache (looked up, never downloaded or hashed): those
    desktop.model_files fetched, and the built-in model where the engine's own command fetched it."""
    from compute_swarm.desktop import model_files

    return tuple(sorted(model_files.cached_models(models_directory)))
