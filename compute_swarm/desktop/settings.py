"""The seller's settings, one versioned JSON file in the platform's config directory, shared by the tray
app and the headless `compute-swarm node`. A file that cannot be read is set aside, never overwritten.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from compute_swarm.desktop import token_store
from compute_swarm.desktop.electricity import ElectricitySettings, default_electricity
from compute_swarm.desktop.guards import GuardSettings
from compute_swarm.desktop.transfer import TransferSettings
from compute_swarm.invitation import MAX_INVITE_CODE_CHARACTERS

logger = logging.getLogger(__name__)

# 2: the invite code typed for the coordinator, kept until this computer has joined it.
# 3: where the engine runtime is fetched from (a mirror ops name), when not the build's own indexes.
# 4: electricity: its price and currency, the exchange rate to the swarm's currency, and the *only
#    profitable work* guard (a file without them takes the locale's typical price); the last payee.
SETTINGS_VERSION = 4
MAX_RUNTIME_SOURCES = 8
# The coordinator `make run` starts; a seller joining someone else's swarm types its address once.
DEFAULT_COORDINATOR = "http://127.0.0.1:8000"
CONFIG_ENVIRONMENT_VARIABLE = "SWARM_CONFIG_DIR"
# Runtime sources for computers whose settings name none (a fleet's image, a mirror ops hand out),
# separated by spaces.
RUNTIME_SOURCES_ENVIRONMENT_VARIABLE = "SWARM_RUNTIME_SOURCES"


class SettingsError(Exception):
    """The settings file cannot be used as it is; str() says why and what to do."""


class Settings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    version: int = SETTINGS_VERSION
    coordinator: str = Field(default_factory=lambda: default_coordinator())
    # The seller was earning when the app last closed: the next start (at login, say) goes on earning.
    earning: bool = False
    autostart: bool = True
    notifications: bool = True
    guards: GuardSettings = Field(default_factory=GuardSettings)
    # Swarm transfer: sharing with other nodes, the upload cap, the cache's size.
    sharing: TransferSettings = Field(default_factory=TransferSettings)
    # What the seller pays for electricity, for net profit and the *only profitable work* guard.
    electricity: ElectricitySettings = Field(default_factory=lambda: default_electricity())
    # Where the seller last asked to be paid, offered again in the payout dialog.
    payout_payee: str | None = Field(default=None, max_length=200)
    # Where the coordinator admits computers by invitation: the code its operators gave, for
    # `coordinator` only, kept until this computer has registered there (the first start, or a retry).
    invite_code: str | None = None
    # Package indexes (PyPI's simple API or a mirror of it) or folders of wheels to fetch the engine
    # runtime from, tried in order; empty: the torch build's PyTorch index, then PyPI. Every file is
    # checked against the app's locks, so a mirror can serve no other files.
    runtime_sources: tuple[str, ...] = Field(
        default_factory=lambda: default_runtime_sources(), max_length=MAX_RUNTIME_SOURCES
    )

    @field_validator("coordinator")
    @classmethod
    def _coordinator_url(cls, value: str) -> str:
        return token_store.normalize_coordinator_url(value)

    @field_validator("invite_code")
    @classmethod
    def _invite_code(cls, value: str | None) -> str | None:
        return None if value is None else normalize_invite_code(value)

    @field_validator("runtime_sources")
    @classmethod
    def _runtime_sources(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(normalize_runtime_source(source) for source in value)


def normalize_runtime_source(text: str) -> str:
    """A runtime source as typed: an http(s) index URL or an absolute folder; raises ValueError saying
    what is wrong."""
    source = text.strip()
    if source.startswith(("http://", "https://")):
        if any(character.isspace() for character in source) or len(source) > 2000:
            raise ValueError(
                f"{source[:100]!r} is not a URL: give a package index such as https://pypi.org/simple"
            )
        return source.rstrip("/")
    if Path(source).is_absolute():
        return source
    raise ValueError(
        f"{source[:100]!r}: a runtime source is a package index URL (https://...) or a folder's full path"
    )


def normalize_invite_code(text: str) -> str:
    """An invite code as typed or pasted, without the spaces around it; raises ValueError (saying what
    to do) for an empty one, an overlong one, or one with spaces or control characters inside."""
    code = text.strip()
    if not code:
        raise ValueError("type the invite code the swarm operator gave you")
    if len(code) > MAX_INVITE_CODE_CHARACTERS:
        raise ValueError(
            f"an invite code is at most {MAX_INVITE_CODE_CHARACTERS} characters, this is {len(code)}: "
            "paste only the code"
        )
    if not code.isprintable() or any(character.isspace() for character in code):
        raise ValueError("an invite code has no spaces or line breaks inside: paste only the code")
    return code


def default_coordinator() -> str:
    """$SWARM_COORDINATOR where it is a usable URL, else the local coordinator."""
    try:
        return token_store.normalize_coordinator_url(
            os.environ.get(token_store.COORDINATOR_ENVIRONMENT_VARIABLE) or ""
        )
    except ValueError:
        return DEFAULT_COORDINATOR


def default_runtime_sources() -> tuple[str, ...]:
    """$SWARM_RUNTIME_SOURCES's usable sources (a bad one is logged and left out), else none."""
    sources = []
    for text in os.environ.get(RUNTIME_SOURCES_ENVIRONMENT_VARIABLE, "").split()[:MAX_RUNTIME_SOURCES]:
        try:
            sources.append(normalize_runtime_source(text))
        except ValueError as error:
            logger.warning("%s: %s", RUNTIME_SOURCES_ENVIRONMENT_VARIABLE, error)
    return tuple(sources)


def default_config_directory() -> Path:
    override = os.environ.get(CONFIG_ENVIRONMENT_VARIABLE)
    if override:
        return Path(override)
    import platformdirs

    return Path(platformdirs.user_config_dir("compute-swarm", appauthor=False))


@dataclass(frozen=True)
class Loaded:
    settings: Settings
    problem: str | None = None  # set when the file was unusable and the defaults were taken instead


class SettingsStore:
    def __init__(self, path: Path | None = None):
        self.path = path or default_config_directory() / "settings.json"

    def load(self) -> Loaded:
        """The saved settings, or the defaults when there are none. An unreadable or invalid file is
        renamed aside (its text kept for the seller) and the defaults are used; a file from a newer
        version of compute-swarm raises SettingsError rather than be lost by an older one."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return Loaded(Settings())
        except OSError as error:
            raise SettingsError(f"cannot read the settings file {self.path}: {error.strerror}") from None
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                raise ValueError("the file does not hold a JSON object")
            version = data.get("version", SETTINGS_VERSION)
            if isinstance(version, int) and version > SETTINGS_VERSION:
                raise SettingsError(
                    f"the settings file {self.path} was written by a newer compute-swarm (settings version "
                    f"{version}, this one knows {SETTINGS_VERSION}): update compute-swarm"
                )
            return Loaded(Settings.model_validate(_migrate(data)))
        except (ValueError, ValidationError) as error:
            aside = self._set_aside()
            problem = (
                f"the settings file could not be used ({_first_error(error)}); the defaults are in use "
                f"and the old file was kept as {aside}"
            )
            logger.warning("%s", problem)
            return Loaded(Settings(), problem)

    def save(self, settings: Settings) -> None:
        """Write atomically (a crash mid-write leaves the previous file)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(
                "w", encoding="utf-8", dir=self.path.parent, prefix=".settings-", delete=False
            ) as temporary:
                temporary.write(settings.model_dump_json(indent=2) + "\n")
            os.replace(temporary.name, self.path)
        except OSError as error:
            raise SettingsError(f"cannot save the settings to {self.path}: {error.strerror}") from None

    def _set_aside(self) -> Path:
        aside = self.path.with_name(f"{self.path.name}.invalid-{time.strftime('%Y%m%d-%H%M%S')}")
        try:
            os.replace(self.path, aside)
        except OSError:
            logger.warning("could not rename the unusable settings file %s", self.path)
            return self.path
        return aside


def _migrate(data: dict[str, Any]) -> dict[str, Any]:
    """Bring an older file up to SETTINGS_VERSION. Version 1 is the first (a file without a version is
    one); 2 only added the invite code and 3 the runtime sources, which older files do not have."""
    return {**data, "version": SETTINGS_VERSION}


def _first_error(error: Exception) -> str:
    if isinstance(error, ValidationError):
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "the file"
        return f"{where}: {first['msg']}"
    return str(error)
