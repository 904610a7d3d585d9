"""The files a runtime is made of: the lock's pins that apply to this machine, each with the sha256 of
every file the lock allows, and the torch build that fits its GPU."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from pathlib import Path

from packaging.markers import InvalidMarker, Marker
from packaging.utils import NormalizedName, canonicalize_name
from packaging.version import InvalidVersion, Version

from compute_swarm.engine.package_index import Pin

_PIN = re.compile(r"(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[^\s;\\]+)")
_HASH = re.compile(r"--hash=sha256:(?P<digest>[0-9a-f]{64})")


class LockError(Exception):
    """A lock file that cannot be read as pins with hashes; str() names the file and the line."""


def read_locks(paths: Iterable[Path], *, environment: dict[str, str] | None = None) -> list[Pin]:
    """The pins of several locks together (node.txt and a torch build's), which must agree: a
    distribution both pin is at one version, and either's files are accepted."""
    merged: dict[NormalizedName, Pin] = {}
    for path in paths:
        for pin in read_lock(path, environment=environment):
            known = merged.get(pin.name)
            if known is not None and known.version != pin.version:
                raise LockError(f"{path.name} pins {pin}, another lock {known}: run `make lock`")
            merged[pin.name] = pin if known is None else Pin(pin.name, pin.version, known.hashes | pin.hashes)
    return sorted(merged.values(), key=lambda pin: pin.name)


def read_lock(path: Path, *, environment: dict[str, str] | None = None) -> list[Pin]:
    """The pins of a lock written by `make lock` (uv's requirements format: `name==version ; marker`,
    then `--hash=sha256:` lines) whose marker holds on this interpreter (or in `environment`)."""
    text = path.read_text(encoding="utf-8")
    # A requirement continues over lines ending in a backslash; comments stand on their own lines.
    logical = re.sub(r"\\\n", " ", text)
    pins: dict[NormalizedName, Pin] = {}
    for number, line in enumerate(logical.splitlines(), start=1):
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        pin = _parse_line(path, number, line, environment)
        if pin is None:
            continue
        if pin.name in pins and pins[pin.name] != pin:
            raise LockError(
                f"{path.name}: {pin.name} is pinned twice for this machine ({pins[pin.name]}, {pin})"
            )
        pins[pin.name] = pin
    return sorted(pins.values(), key=lambda pin: pin.name)


def _parse_line(path: Path, number: int, line: str, environment: dict[str, str] | None) -> Pin | None:
    requirement = line.partition(" --hash=")[0]
    requirement, _, marker_text = requirement.partition(";")
    match = _PIN.fullmatch(requirement.strip())
    if match is None:
        raise LockError(f"{path.name}, requirement {number}: {line[:120]!r} is not `name==version`")
    if marker_text.strip():
        try:
            if not Marker(marker_text.strip()).evaluate(environment):
                return None
        except InvalidMarker as error:
            raise LockError(f"{path.name}, requirement {number}: {error}") from None
    hashes = frozenset(_HASH.findall(line))
    if not hashes:
        raise LockError(f"{path.name}, requirement {number}: {match['name']} has no --hash=sha256: lines")
    try:
        version = Version(match["version"])
    except InvalidVersion:
        raise LockError(f"{path.name}, requirement {number}: {match['version']!r} is not a version") from None
    return Pin(canonicalize_name(match["name"]), version, hashes)


def digest(pins: Iterable[Pin]) -> str:
    """A name for exactly this set of files: two runtimes with the same digest hold the same files."""
    lines = sorted(f"{pin}:{','.join(sorted(pin.hashes))}" for pin in pins)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()
