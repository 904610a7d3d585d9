"""Where a node keeps its coordinator credentials: the OS keyring when one works, else a 0600 file.

One entry per coordinator URL. `SWARM_TOKEN_STORE=file` forces the file (tests, CI, servers without a
keyring daemon); `SWARM_TOKEN_STORE=keyring` forces the keyring and lets its errors through.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

logger = logging.getLogger(__name__)

KEYRING_SERVICE = "compute-swarm-node"
CREDENTIALS_FILE = "node-credentials.json"
STORE_ENVIRONMENT_VARIABLE = "SWARM_TOKEN_STORE"
COORDINATOR_ENVIRONMENT_VARIABLE = "SWARM_COORDINATOR"  # the coordinator a node joins by default
_FILE_FORMAT = 1


@dataclass(frozen=True)
class Credentials:
    coordinator: str  # normalized, see normalize_coordinator_url
    node_id: str
    token: str = field(repr=False)  # never in logs or tracebacks


def normalize_coordinator_url(url: str) -> str:
    """The key a coordinator's credentials are stored under: scheme and host lower-cased, no trailing
    slash, default ports dropped. Raises ValueError for anything but an http(s) URL with a host."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not an http:// or https:// coordinator URL")
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"  # an IPv6 address
    default_port = 80 if scheme == "http" else 443
    port = parts.port
    netloc = host if port in (None, default_port) else f"{host}:{port}"
    return urlunsplit((scheme, netloc, parts.path.rstrip("/"), "", ""))


def load(coordinator: str, data_dir: Path) -> Credentials | None:
    """The stored credentials for this coordinator, or None when this machine has never registered."""
    key = normalize_coordinator_url(coordinator)
    if _keyring_wanted():
        try:
            found = _keyring_load(key)
        except Exception as error:
            if _forced() == "keyring":
                raise
            logger.warning("could not read the OS keyring (%s); using the credentials file", _describe(error))
        else:
            if found is not None:
                return found
    return _file_load(key, Path(data_dir))


def save(credentials: Credentials, data_dir: Path) -> None:
    key = normalize_coordinator_url(credentials.coordinator)
    credentials = Credentials(key, credentials.node_id, credentials.token)
    if _keyring_wanted():
        try:
            _keyring_save(credentials)
        except Exception as error:
            if _forced() == "keyring":
                raise
            logger.warning(
                "could not write to the OS keyring (%s); keeping the token in %s instead",
                _describe(error),
                Path(data_dir) / CREDENTIALS_FILE,
            )
        else:
            # The keyring now holds it: no plaintext copy should outlive the move.
            _file_remove(key, Path(data_dir))
            return
    _file_save(credentials, Path(data_dir))


def forget(coordinator: str, data_dir: Path) -> bool:
    """Remove this coordinator's credentials from every store; True if there were any."""
    key = normalize_coordinator_url(coordinator)
    removed = False
    if _keyring_wanted():
        try:
            removed = _keyring_forget(key)
        except Exception as error:
            if _forced() == "keyring":
                raise
            logger.warning("could not remove the token from the OS keyring: %s", _describe(error))
    return _file_remove(key, Path(data_dir)) or removed


# ---- the keyring


def _forced() -> str:
    return os.environ.get(STORE_ENVIRONMENT_VARIABLE, "").strip().lower()


def _keyring_wanted() -> bool:
    forced = _forced()
    if forced == "file":
        return False
    return forced == "keyring" or keyring_usable()


def keyring_usable() -> bool:
    """Whether a real keyring backend (not keyring's fail/null stand-ins) is available."""
    try:
        import keyring
        from keyring.backends import chainer, fail, null

        backend = keyring.get_keyring()
        if isinstance(backend, fail.Keyring | null.Keyring):
            return False
        if isinstance(backend, chainer.ChainerBackend) and not backend.backends:
            return False
        # Below 1 are stand-ins such as keyrings.alt's plaintext file, no safer than our own 0600 file.
        return float(backend.priority) >= 1
    except Exception as error:
        logger.debug("no usable keyring: %r", error)
        return False


def _keyring_load(key: str) -> Credentials | None:
    import keyring

    secret = keyring.get_password(KEYRING_SERVICE, key)
    if secret is None:
        return None
    return _credentials_from(json.loads(secret), key)


def _keyring_save(credentials: Credentials) -> None:
    import keyring

    secret = json.dumps({"node_id": credentials.node_id, "token": credentials.token})
    keyring.set_password(KEYRING_SERVICE, credentials.coordinator, secret)


def _keyring_forget(key: str) -> bool:
    import keyring
    from keyring.errors import PasswordDeleteError

    try:
        keyring.delete_password(KEYRING_SERVICE, key)
    except PasswordDeleteError:
        return False
    return True


# ---- the file fallback


def credentials_path(data_dir: Path) -> Path:
    return Path(data_dir) / CREDENTIALS_FILE


def _file_load(key: str, data_dir: Path) -> Credentials | None:
    entries = _read_file(credentials_path(data_dir))
    entry = entries.get(key)
    if not isinstance(entry, dict):
        return None
    try:
        return _credentials_from(entry, key)
    except ValueError as error:
        logger.warning(
            "ignoring damaged credentials for %s in %s: %s", key, credentials_path(data_dir), error
        )
        return None


def _file_save(credentials: Credentials, data_dir: Path) -> None:
    path = credentials_path(data_dir)
    entries = _read_file(path)
    entries[credentials.coordinator] = {
        "coordinator": credentials.coordinator,
        "node_id": credentials.node_id,
        "token": credentials.token,
    }
    _write_file(path, entries)


def _file_remove(key: str, data_dir: Path) -> bool:
    path = credentials_path(data_dir)
    entries = _read_file(path)
    if key not in entries:
        return False
    del entries[key]
    if entries:
        _write_file(path, entries)
    else:
        path.unlink(missing_ok=True)
    return True


def _read_file(path: Path) -> dict[str, Any]:
    try:
        status = path.stat()
    except FileNotFoundError:
        return {}
    if sys.platform != "win32" and stat.S_IMODE(status.st_mode) & 0o077:
        # Someone loosened it (a backup restore, a copy): the token may have been readable by others.
        logger.warning(
            "%s was readable by other users (mode %o); restricting it to you. If others share this "
            "machine, forget this node's token and register again.",
            path,
            stat.S_IMODE(status.st_mode),
        )
        os.chmod(path, 0o600)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        logger.warning("cannot read %s (%s); treating it as empty", path, error)
        return {}
    nodes = document.get("nodes") if isinstance(document, dict) else None
    return dict(nodes) if isinstance(nodes, dict) else {}


def _write_file(path: Path, entries: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    text = json.dumps({"format": _FILE_FORMAT, "nodes": entries}, indent=2, sort_keys=True) + "\n"
    scratch = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    scratch.unlink(missing_ok=True)
    # Created 0600 from the start: no moment at which another user could open it.
    descriptor = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(scratch, path)
    except BaseException:
        scratch.unlink(missing_ok=True)
        raise


def _credentials_from(entry: dict[str, Any], key: str) -> Credentials:
    node_id, token = entry.get("node_id"), entry.get("token")
    if not isinstance(node_id, str) or not isinstance(token, str) or not node_id or not token:
        raise ValueError("node_id or token missing")
    return Credentials(coordinator=key, node_id=node_id, token=token)


def _describe(error: Exception) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
