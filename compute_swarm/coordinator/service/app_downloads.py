"""The seller's app as the sell page hands it out: the newest package for each OS in the downloads folder
(named as `make installer` names them), each made to join this swarm with no typing; and the wheels
in its `wheels/` folder that no public index has (llama-cpp-python built for every CPU), which the
app's engine runtime fetches from here (desktop/runtime), each checked against the app's own lock.

A download carries the coordinator's address and, where ops admit computers by invitation, the invite
code the visitor came with (compute_swarm.invitation; the app reads it on its first start):
- the Linux `.tar.gz` gets a `join.json` inside its app folder: a gzip member holding that one tar
  entry is sent before the package's own bytes (gzip members concatenate, and tar takes the entry
  like any other), so the package file is never rewritten or recompressed;
- a signed Windows installer or macOS disk image cannot change without breaking its signature: the
  same details travel in its file name instead (`….join-<base64>.exe`).
"""

from __future__ import annotations

import gzip
import io
import os
import re
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from compute_swarm.invitation import JOIN_FILE, Invitation, tagged_file_name, to_json

PLATFORMS = ("windows", "macos", "linux")
PLATFORM_NAMES = {"windows": "Windows", "macos": "macOS", "linux": "Linux"}
# installers/<os>/package.sh's names: compute-swarm-0.1.0-linux-x86_64.tar.gz,
# compute-swarm-0.1.0-windows-x86_64-setup.exe, compute-swarm-0.1.0-macos-arm64.dmg.
PACKAGE_NAME = re.compile(
    r"^compute-swarm-(?P<version>[0-9][0-9A-Za-z.+!]*)-(?P<platform>linux|windows|macos)-"
    r"(?P<machine>[A-Za-z0-9_]+)(?P<suffix>\.tar\.gz|-setup\.exe|\.dmg)$"
)
CHUNK_BYTES = 1024 * 1024
MAX_FILE_NAME = 255  # bytes, on NTFS, APFS and ext4 alike
WHEELS_FOLDER = "wheels"
# A project name as PEP 503 normalizes it, and a wheel's file name (PEP 427), nothing else.
PROJECT_NAME = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")
WHEEL_NAME = re.compile(r"^[A-Za-z0-9_.+!-]+\.whl$")


@dataclass(frozen=True)
class Package:
    platform: str
    version: str
    machine: str
    path: Path
    size: int

    @property
    def name(self) -> str:
        return self.path.name


def offered(folder: Path) -> dict[str, Package]:
    """The newest package for each OS in `folder` (none: the folder is missing or empty)."""
    newest: dict[str, tuple[Version, Package]] = {}
    try:
        entries = list(folder.iterdir())
    except OSError:
        return {}
    for path in entries:
        match = PACKAGE_NAME.match(path.name)
        if match is None or not path.is_file():
            continue
        try:
            version = Version(match["version"])
        except InvalidVersion:
            continue
        package = Package(match["platform"], match["version"], match["machine"], path, path.stat().st_size)
        kept = newest.get(package.platform)
        if kept is None or version > kept[0]:
            newest[package.platform] = (version, package)
    return {platform: package for platform, (_, package) in newest.items()}


def platform_of(user_agent: str) -> str | None:
    """The visitor's OS, from the browser's User-Agent (None: a phone, or not said)."""
    if "Windows" in user_agent:
        return "windows"
    if "Android" in user_agent or "iPhone" in user_agent or "iPad" in user_agent:
        return None
    if "Macintosh" in user_agent or "Mac OS X" in user_agent:
        return "macos"
    if "Linux" in user_agent or "X11" in user_agent:
        return "linux"
    return None


@dataclass(frozen=True)
class Download:
    file_name: str  # what the browser saves it as
    size: int
    chunks: Iterator[bytes]


def download(package: Package, invitation: Invitation) -> Download:
    """The package, made to join the swarm `invitation` names. Raises OSError when its file is gone:
    opened here, before any byte is sent."""
    file = package.path.open("rb")
    size = os.fstat(file.fileno()).st_size
    if package.platform != "linux":
        name = tagged_file_name(package.name, invitation)
        # Longer than file systems take (a very long address): the seller types the address instead.
        return Download(name if len(name) <= MAX_FILE_NAME else package.name, size, _read(file))
    head = _tar_entry_member(f"{_app_folder_of(package)}/{JOIN_FILE}", to_json(invitation))
    return Download(package.name, len(head) + size, _chain(head, _read(file)))


def _app_folder_of(package: Package) -> str:
    # installers/linux/package.sh packs <name>/compute-swarm-app/; install.sh copies that folder whole.
    return package.name.removesuffix(".tar.gz") + "/compute-swarm-app"


def _tar_entry_member(path: str, text: str) -> bytes:
    """One gzip member holding one tar entry and no end-of-archive blocks: put before a .tar.gz, it
    becomes that archive's first file."""
    data = text.encode()
    entry = tarfile.TarInfo(path)
    entry.size, entry.mode, entry.mtime = len(data), 0o644, int(time.time())
    block = tarfile.BLOCKSIZE
    padding = (block - len(data) % block) % block
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as member:
        member.write(entry.tobuf(format=tarfile.PAX_FORMAT) + data + b"\0" * padding)
    return buffer.getvalue()


def _read(file: BinaryIO) -> Iterator[bytes]:
    with file:
        while chunk := file.read(CHUNK_BYTES):
            yield chunk


def _chain(head: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    yield head
    yield from rest


def wheels(folder: Path, project: str) -> list[Path]:
    """The wheels of a project (its normalized name) in `folder`/wheels, by name."""
    if not PROJECT_NAME.match(project):
        return []
    try:
        paths = sorted((folder / WHEELS_FOLDER).glob("*.whl"))
    except OSError:
        return []
    return [
        path
        for path in paths
        if WHEEL_NAME.match(path.name) and canonicalize_name(path.name.split("-", 1)[0]) == project
    ]
