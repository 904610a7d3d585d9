"""The engine runtime on disk: <data dir>/runtime/<build>-<digest>/site-packages, one folder for each
set of files (a lock and a build), and a `current` file naming the folder in use.

A fetch builds the folder beside the one in use (<name>.partial) and switches `current` only once
every file is in and checked, so an interrupted fetch leaves the old runtime working and the next fetch
goes on where this one stopped: installed distributions stay, a download resumes from its `.part`.
Distributions the runtime in use already holds at the same version are carried over, not fetched
again (torch alone is most of a runtime). A runtime whose files no longer match their hashes is
repaired: the damaged distributions are fetched again.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import filelock
import httpx
from packaging.tags import Tag

from compute_swarm.desktop.runtime import wheels
from compute_swarm.desktop.runtime.pins import digest
from compute_swarm.engine import package_index
from compute_swarm.engine.package_index import Cancelled, Candidate, Pin

RUNTIME_FORMAT = 1
MANIFEST = "runtime.json"  # written last: a folder with it is complete
CURRENT = "current"
PARTIAL_SUFFIX = ".partial"
DOWNLOADS = "downloads"
SITE_PACKAGES = "site-packages"


class Busy(Exception):
    """Another process (a second tray app, a `compute-swarm node`) is fetching this runtime now."""


@dataclass(frozen=True)
class Progress:
    """Where a fetch stands, for the window's progress bar."""

    stage: str  # looking up, downloading, installing, checking, ready
    done_bytes: int
    total_bytes: int
    seconds_left: float | None
    detail: str

    @property
    def fraction(self) -> float:
        return self.done_bytes / self.total_bytes if self.total_bytes else 0.0


OnProgress = Callable[[Progress], None]


class Runtimes:
    """The runtimes under `root` for one lock and build."""

    def __init__(
        self,
        root: Path,
        build: str,
        pins: Sequence[Pin],
        sources_in_order: Sequence[str],
        *,
        tags: Sequence[Tag] | None = None,
        client: httpx.Client | None = None,
        reason: str = "",
    ):
        self.root = root
        self.build = build
        self.pins = list(pins)
        self.sources = list(sources_in_order)
        self.tags = list(tags) if tags is not None else package_index.compatible_tags()
        self.client = client
        self.reason = reason  # why this build, for the window
        self.name = f"{build}-{digest(self.pins)[:16]}"
        self.folder = root / self.name

    # ---- what is here

    def in_use(self) -> Path | None:
        """The complete runtime `current` names (perhaps an older lock's, until this one is fetched)."""
        return in_use(self.root)

    def ready(self) -> bool:
        """This lock's runtime is complete and in use (its files are checked by fetch)."""
        return self.in_use() == self.folder

    def site_packages(self) -> Path:
        return self.folder / SITE_PACKAGES

    # ---- fetching

    def fetch(self, on_progress: OnProgress, cancel: threading.Event | None = None) -> Path:
        """This lock's runtime, complete and checked, fetched or repaired as needed, and in use.
        Raises Cancelled (what is done stays), SourceError or wheels.WheelError."""
        cancel = cancel or threading.Event()
        self.root.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(self.root / "fetch.lock")
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout:
            raise Busy(f"another program is fetching the engine runtime into {self.root}") from None
        client = self.client or httpx.Client(follow_redirects=True, timeout=httpx.Timeout(30.0))
        try:
            if (self.folder / MANIFEST).is_file():
                self._repair(client, on_progress, cancel)
            else:
                self._build(client, on_progress, cancel)
            self._switch()
        finally:
            if self.client is None:
                client.close()
            lock.release()
        on_progress(Progress("ready", 1, 1, 0.0, f"engine runtime {self.name} is ready"))
        return self.folder

    def _build(self, client: httpx.Client, on_progress: OnProgress, cancel: threading.Event) -> None:
        staging = self.root / (self.name + PARTIAL_SUFFIX)
        site = staging / SITE_PACKAGES
        site.mkdir(parents=True, exist_ok=True)
        state_path = staging / "installed.json"
        installed: dict[str, Any] = _read_json(state_path) or {}
        # Carried over from the runtime in use, or left installed by an interrupted fetch.
        previous = self.in_use()
        previous_manifest = _read_json(previous / MANIFEST) if previous else None
        needed = []
        for pin in self.pins:
            entry = installed.get(pin.name)
            if entry and entry["version"] == str(pin.version) and entry["wheel_sha256"] in pin.hashes:
                continue
            carried = (previous_manifest or {}).get("distributions", {}).get(pin.name)
            if (
                previous is not None
                and carried
                and carried["version"] == str(pin.version)
                and carried["wheel_sha256"] in pin.hashes
                and not wheels.damaged(previous / SITE_PACKAGES, carried["files"])
            ):
                _link_files(previous / SITE_PACKAGES, site, carried["files"])
                installed[pin.name] = carried
                _write_json(state_path, installed)
                continue
            needed.append(pin)
        self._fetch_and_install(client, needed, site, installed, state_path, on_progress, cancel)
        _write_json(staging / MANIFEST, self._manifest(installed))
        state_path.unlink()
        if self.folder.exists():  # an incomplete folder of this name (no manifest): not ours to keep
            shutil.rmtree(self.folder)
        os.replace(staging, self.folder)

    def _repair(self, client: httpx.Client, on_progress: OnProgress, cancel: threading.Event) -> None:
        manifest = _read_json(self.folder / MANIFEST) or {}
        installed = manifest.get("distributions", {})
        site = self.site_packages()
        total = sum(len(entry["files"]) for entry in installed.values())
        checked = 0
        broken = []
        for pin in self.pins:
            entry = installed.get(pin.name)
            if cancel.is_set():
                raise Cancelled()
            if entry is None or wheels.damaged(site, entry["files"]):
                broken.append(pin)
            checked += len(entry["files"]) if entry else 0
            on_progress(Progress("checking", checked, total, None, f"checking {pin}"))
        if not broken:
            return
        for pin in broken:
            if pin.name in installed:
                wheels.remove(site, installed.pop(pin.name)["files"])
        state_path = self.folder / "repair.json"
        self._fetch_and_install(client, broken, site, installed, state_path, on_progress, cancel)
        _write_json(self.folder / MANIFEST, self._manifest(installed))
        state_path.unlink(missing_ok=True)

    def _fetch_and_install(
        self,
        client: httpx.Client,
        pins: Sequence[Pin],
        site: Path,
        installed: dict[str, Any],
        state_path: Path,
        on_progress: OnProgress,
        cancel: threading.Event,
    ) -> None:
        if not pins:
            return
        found: list[tuple[Pin, Candidate]] = []
        for position, pin in enumerate(pins, start=1):
            if cancel.is_set():
                raise Cancelled()
            on_progress(Progress("looking up", position, len(pins), None, f"looking up {pin}"))
            found.append((pin, package_index.find_wheel(client, self.sources, pin, self.tags)))
        downloads = self.root / DOWNLOADS
        meter = _Meter(sum(candidate.size or 0 for _, candidate in found), on_progress)
        for pin, candidate in found:
            meter.detail = f"downloading {candidate.filename}"
            wheel = downloads / candidate.filename
            wheel_sha256 = package_index.download(
                client, candidate, pin, wheel, progress=meter.add, cancel=cancel
            )
            meter.report("installing", f"installing {pin}")
            files = wheels.install(wheel, site)
            installed[pin.name] = {"version": str(pin.version), "wheel_sha256": wheel_sha256, "files": files}
            _write_json(state_path, installed)
            wheel.unlink()

    def _switch(self) -> None:
        """Make this lock's runtime the one in use, then remove the others (and their downloads)."""
        _write_text_atomically(self.root / CURRENT, self.name)
        for other in self.root.iterdir():
            if other.is_dir() and other.name not in (self.name, DOWNLOADS):
                shutil.rmtree(other, ignore_errors=True)

    def _manifest(self, installed: dict[str, Any]) -> dict[str, Any]:
        return {"format": RUNTIME_FORMAT, "build": self.build, "name": self.name, "distributions": installed}


def in_use(root: Path) -> Path | None:
    """The complete runtime under `root` that `current` names, if any."""
    try:
        name = (root / CURRENT).read_text(encoding="utf-8").strip()
    except OSError:
        return None
    folder = root / name
    return folder if name and os.sep not in name and (folder / MANIFEST).is_file() else None


class _Meter:
    """Bytes done of the bytes to fetch, and the time left at the rate seen so far."""

    def __init__(self, total: int, on_progress: OnProgress):
        self.total = total
        self.done = 0
        self.on_progress = on_progress
        self.started = time.monotonic()
        self.detail = ""
        self._last_report = 0.0

    def add(self, count: int) -> None:
        self.done += count
        now = time.monotonic()
        if now - self._last_report >= 0.2:  # a progress bar needs no more; the window stays light
            self._last_report = now
            self.report("downloading", self.detail)

    def report(self, stage: str, detail: str) -> None:
        elapsed = time.monotonic() - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.done) / rate if rate > 0 and self.total >= self.done else None
        self.on_progress(Progress(stage, self.done, max(self.total, self.done), left, detail))


def _link_files(source: Path, target: Path, files: dict[str, str]) -> None:
    for relative in files:
        destination = target / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        destination.unlink(missing_ok=True)
        try:
            os.link(source / relative, destination)
        except OSError:
            shutil.copy2(source / relative, destination)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_json(path: Path, data: Any) -> None:
    _write_text_atomically(path, json.dumps(data, indent=1, sort_keys=True))


def _write_text_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)
