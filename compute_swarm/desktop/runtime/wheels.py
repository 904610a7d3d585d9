"""A wheel unpacked into a runtime's site-packages, as pip would for a `--target` install, and the
check of installed files against the hashes the wheel's RECORD gave them."""

from __future__ import annotations

import base64
import contextlib
import csv
import hashlib
import io
import os
import stat
import zipfile
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from packaging.utils import parse_wheel_filename

# Inside a wheel, <name>-<version>.data/<scheme>/ holds files installed elsewhere than site-packages;
# a runtime is a site-packages folder, so only the library schemes are kept (no scripts, headers).
_LIBRARY_SCHEMES = ("purelib", "platlib")
CHUNK_BYTES = 1 << 20


class WheelError(Exception):
    """A wheel that cannot be installed safely: a bad path, a file its RECORD disagrees with."""


def _record_form(sha256: hashlib._Hash) -> str:
    """A hash as a wheel's RECORD writes it."""
    return "sha256=" + base64.urlsafe_b64encode(sha256.digest()).rstrip(b"=").decode()


def _hashed_copy(source: BinaryIO, sink: BinaryIO | None) -> str:
    """Copy `source` to `sink` (None: only read it) in chunks (a library can be hundreds of MB); returns
    its RECORD hash."""
    sha256 = hashlib.sha256()
    while chunk := source.read(CHUNK_BYTES):
        sha256.update(chunk)
        if sink is not None:
            sink.write(chunk)
    return _record_form(sha256)


def install(wheel: Path, site_packages: Path) -> dict[str, str]:
    """Unpack `wheel` into `site_packages`; returns each installed file (a path relative to
    site_packages) with its RECORD hash. Every file is checked against the wheel's RECORD, and a path
    that would leave site_packages is refused."""
    name, version, _, _ = parse_wheel_filename(wheel.name)
    installed: dict[str, str] = {}
    with zipfile.ZipFile(wheel) as archive:
        records = _read_record(archive)
        for info in archive.infolist():
            if info.is_dir():
                continue
            member = PurePosixPath(info.filename)
            if member.is_absolute() or ".." in member.parts:
                raise WheelError(f"{wheel.name}: {info.filename!r} would leave the runtime's folder")
            relative = _relocated(member)
            if relative is None:
                continue
            expected = records.get(info.filename)
            if not expected and not info.filename.endswith(".dist-info/RECORD"):
                raise WheelError(f"{wheel.name}: {info.filename} is not in its RECORD")
            destination = site_packages / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(info) as source, destination.open("wb") as sink:
                written = _hashed_copy(source, sink)
            if expected and written != expected:
                destination.unlink()
                raise WheelError(f"{wheel.name}: {info.filename} does not match its RECORD")
            if (info.external_attr >> 16) & stat.S_IXUSR:
                destination.chmod(destination.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
            installed[str(relative)] = written
    if not installed:
        raise WheelError(f"{wheel.name} ({name} {version}) holds no files for a runtime")
    return installed


def _read_record(archive: zipfile.ZipFile) -> dict[str, str]:
    names = [
        name for name in archive.namelist() if name.endswith(".dist-info/RECORD") and name.count("/") == 1
    ]
    if len(names) != 1:
        raise WheelError("the wheel has no single .dist-info/RECORD")
    text = archive.read(names[0]).decode("utf-8")
    return {row[0]: row[1] for row in csv.reader(io.StringIO(text)) if len(row) >= 2}


def _relocated(member: PurePosixPath) -> PurePosixPath | None:
    top = member.parts[0]
    if not top.endswith(".data"):
        return member
    if len(member.parts) > 2 and member.parts[1] in _LIBRARY_SCHEMES:
        return PurePosixPath(*member.parts[2:])
    return None


def damaged(site_packages: Path, files: dict[str, str]) -> list[str]:
    """The files (of `files`, as install returned them) that are missing or no longer match."""
    bad = []
    for relative, expected in files.items():
        try:
            with (site_packages / relative).open("rb") as installed:
                if _hashed_copy(installed, None) != expected:
                    bad.append(relative)
        except OSError:
            bad.append(relative)
    return bad


def remove(site_packages: Path, files: dict[str, str]) -> None:
    """Remove an installed distribution's files (and the folders it leaves empty)."""
    folders = set()
    for relative in files:
        path = site_packages / relative
        path.unlink(missing_ok=True)
        folders.update(path.parents)
    for folder in sorted(folders, key=lambda folder: len(folder.parts), reverse=True):
        if folder != site_packages and site_packages in folder.parents:
            with contextlib.suppress(OSError):  # not empty: another distribution's files are there
                os.rmdir(folder)
