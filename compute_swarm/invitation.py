"""What a downloaded app carries to join its swarm: the coordinator's address and, where the coordinator
admits computers by invitation, an invite code. The sell page writes it (coordinator.service.
app_downloads), the app reads it on its first start (desktop.first_run). Light, for both to share.

It travels as `join.json` in the Linux package's app folder, or in the name of a Windows installer or
macOS disk image, whose bytes a signature seals: `compute-swarm-0.1.0-windows-x86_64-setup.join-<tag>.exe`,
the tag being the same JSON in URL-safe base64.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

JOIN_FILE = "join.json"
MAX_TEXT_BYTES = 4096  # a join.json is about 150 bytes: anything much larger is not one
MAX_COORDINATOR_CHARACTERS = 512
# The longest invite code a coordinator takes (desktop.settings too); its own are about 37 characters.
MAX_INVITE_CODE_CHARACTERS = 100
INVITE_CODE = re.compile(rf"^[A-Za-z0-9_-]{{1,{MAX_INVITE_CODE_CHARACTERS}}}$")
# A browser may add " (1)" before the extension of a second download of the same name.
TAG = re.compile(r"\.join-([A-Za-z0-9_-]{8,2048})(?: ?\(\d+\))?\.[A-Za-z0-9.]+$")


class InvitationError(ValueError):
    """Not a usable invitation; str() says why."""


@dataclass(frozen=True)
class Invitation:
    coordinator: str  # http(s)://host[:port][/prefix]
    invite_code: str | None = None

    def __post_init__(self) -> None:
        parts = urlsplit(self.coordinator)
        if (
            len(self.coordinator) > MAX_COORDINATOR_CHARACTERS
            or parts.scheme not in ("http", "https")
            or not parts.hostname
            or parts.query
            or parts.fragment
        ):
            raise InvitationError(f"not a coordinator address: {self.coordinator[:80]!r}")
        if self.invite_code is not None and not INVITE_CODE.match(self.invite_code):
            raise InvitationError("the invite code holds characters an invite code never has")


def to_json(invitation: Invitation) -> str:
    document = {"coordinator": invitation.coordinator}
    if invitation.invite_code is not None:
        document["invite_code"] = invitation.invite_code
    return json.dumps(document, separators=(",", ":"))


def from_json(text: str | bytes) -> Invitation:
    """Raises InvitationError for anything but a join.json as to_json writes it."""
    if len(text) > MAX_TEXT_BYTES:
        raise InvitationError(f"longer than {MAX_TEXT_BYTES} bytes")
    try:
        document = json.loads(text)
    except ValueError as error:
        raise InvitationError(f"not JSON ({error})") from None
    if not isinstance(document, dict) or set(document) - {"coordinator", "invite_code"}:
        raise InvitationError('expected {"coordinator": ..., "invite_code": ...}')
    coordinator, invite_code = document.get("coordinator"), document.get("invite_code")
    if not isinstance(coordinator, str) or not isinstance(invite_code, (str, type(None))):
        raise InvitationError("the coordinator and the invite code must be text")
    return Invitation(coordinator, invite_code)


def tagged_file_name(name: str, invitation: Invitation) -> str:
    """compute-swarm-0.1.0-windows-x86_64-setup.exe → …-setup.join-<tag>.exe"""
    stem, dot, extension = name.rpartition(".")
    tag = base64.urlsafe_b64encode(to_json(invitation).encode()).decode().rstrip("=")
    return f"{stem}.join-{tag}{dot}{extension}"


def from_file_name(name: str) -> Invitation | None:
    """The invitation in a tagged file name; None for a name without one. Raises InvitationError for a
    tag that does not decode to one."""
    match = TAG.search(name)
    if match is None:
        return None
    tag = match[1]
    try:
        text = base64.urlsafe_b64decode(tag + "=" * (-len(tag) % 4))
    except (binascii.Error, ValueError):
        raise InvitationError("the file name's join tag is not base64") from None
    return from_json(text)
