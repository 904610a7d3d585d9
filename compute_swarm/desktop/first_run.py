"""A downloaded app's first start: it joins the swarm whose sell page it came from.

The sell page makes each download carry the coordinator's address and any invite code
(compute_swarm.invitation): a `join.json` beside the app's executable (the Linux package), or the name
of the installer or disk image in the Downloads folder (Windows, macOS, whose signed files cannot
change). Found on the first start, before any settings exist, it becomes the settings' coordinator and
invite code, so the seller presses one button: Start earning.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import platformdirs
from pydantic import ValidationError

from compute_swarm.desktop.settings import Settings, SettingsStore
from compute_swarm.invitation import (
    JOIN_FILE,
    MAX_TEXT_BYTES,
    Invitation,
    InvitationError,
    from_file_name,
    from_json,
)

logger = logging.getLogger(__name__)

# The newest few downloads are looked at, not a Downloads folder's whole history.
MAX_DOWNLOADS_LOOKED_AT = 20


def app_folder() -> Path | None:
    """Where a packaged app's executable is (None when this is not a packaged app)."""
    return Path(sys.executable).parent if getattr(sys, "frozen", False) else None


def downloads_folder() -> Path | None:
    try:
        return Path(platformdirs.user_downloads_dir())
    except Exception:  # no home, or a platform without one: nothing to look at
        return None


def find_invitation(app_folder: Path | None, downloads: Path | None) -> Invitation | None:
    """The invitation beside the app, else in the newest tagged download; None when there is none. One
    that cannot be read is logged and passed over: the seller can still type an address."""
    if app_folder is not None:
        path = app_folder / JOIN_FILE
        try:
            with path.open("rb") as file:
                return from_json(file.read(MAX_TEXT_BYTES + 1))
        except FileNotFoundError:
            pass
        except (OSError, InvitationError) as error:
            logger.warning("could not use %s: %s", path, error)
    if downloads is None:
        return None
    try:
        tagged = sorted(
            (path for path in downloads.glob("compute-swarm-*.join-*") if path.is_file()),
            key=lambda path: path.stat().st_mtime,
            reverse=True,
        )
    except OSError:
        return None
    for path in tagged[:MAX_DOWNLOADS_LOOKED_AT]:
        try:
            invitation = from_file_name(path.name)
        except InvitationError as error:
            logger.warning("could not use the download %s: %s", path.name, error)
            continue
        if invitation is not None:
            return invitation
    return None


def join_offered_swarm(
    store: SettingsStore, *, app_folder: Path | None = None, downloads: Path | None = None
) -> Invitation | None:
    """On the first start (no settings file yet), save the settings the download's invitation names.
    Returns the invitation used, or None."""
    invitation = find_invitation(app_folder, downloads)
    if invitation is None:
        return None
    try:
        settings = Settings(coordinator=invitation.coordinator, invite_code=invitation.invite_code)
    except ValidationError as error:
        logger.warning("the download's invitation cannot be used: %s", error.errors()[0]["msg"])
        return None
    store.save(settings)
    logger.info("joining the swarm at %s, as the download said", invitation.coordinator)
    return invitation
