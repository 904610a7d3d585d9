"""How a machine joins the swarm (Settings.node_admission): open, by an invite code from ops, or by
ops' approval; and how often one address may register.

A node that waits for approval connects like any other, but gets no job and serves no request until
ops approve it: the hub bars it, as it bars a quarantined node.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import deque

from sqlalchemy.orm import Session

from compute_swarm.coordinator.service import accounts
from compute_swarm.coordinator.store.tables import Node, NodeInvite

OPEN, INVITE, APPROVAL = "open", "invite", "approval"
INVITE_PREFIX = "swarm-invite-"
# The limiter sweeps its memory of quiet addresses once it holds this many.
MAXIMUM_TRACKED_ADDRESSES = 10_000


class AdmissionRefused(Exception):
    def __init__(self, message: str, status_code: int):
        super().__init__(message)
        self.status_code = status_code


def invite_usable(session: Session, invite_code: str) -> bool:
    """Whether a registration with this code would be let in now (nothing is spent)."""
    invite = session.get(NodeInvite, accounts.hash_secret(invite_code))
    return invite is not None and _still_good(invite, time.time())


def _still_good(invite: NodeInvite, now: float) -> bool:
    return invite.uses_left > 0 and (invite.expires_at is None or invite.expires_at >= now)


def register(session: Session, name: str, admission: str, invite_code: str | None) -> tuple[Node, str]:
    """A new node and its token (shown once); let in now unless ops approve nodes. Raises
    AdmissionRefused (403) for a missing or spent invite code, AccountError for a bad name."""
    now = time.time()
    if admission == INVITE:
        invite = (
            session.get(NodeInvite, accounts.hash_secret(invite_code), with_for_update=True)
            if invite_code
            else None
        )
        if invite is None or not _still_good(invite, now):
            raise AdmissionRefused(
                "this coordinator admits nodes by invitation: ask its operators for an invite code"
                if not invite_code
                else "the invite code is unknown, used up or expired: ask the coordinator's operators for a new one",
                403,
            )
        invite.uses_left -= 1
    node, token = accounts.register_node(session, name)
    node.approved_at = None if admission == APPROVAL else now
    return node, token


def create_invite(session: Session, uses: int, hours: float | None, note: str = "") -> str:
    """A new invite code (shown once) good for `uses` registrations, for `hours` (None: no expiry)."""
    if not 1 <= uses <= 100_000:
        raise ValueError("an invite is good for 1 to 100000 registrations")
    if hours is not None and hours <= 0:
        raise ValueError("an invite's lifetime must be positive")
    code = INVITE_PREFIX + secrets.token_urlsafe(18)
    now = time.time()
    session.add(
        NodeInvite(
            code_hash=accounts.hash_secret(code),
            uses_left=uses,
            expires_at=now + hours * 3600 if hours is not None else None,
            created_at=now,
            note=note[:200],
        )
    )
    return code


def approve(node: Node, policy: object = None) -> None:
    """Let a waiting node in (a standing change, as ops' API and CLI apply them: `policy` unused)."""
    if node.approved_at is None:
        node.approved_at = time.time()


class RegistrationLimiter:
    """At most `per_hour` registrations from one address in any hour (0: no limit). Thread-safe; the
    addresses seen in the last hour are all it keeps."""

    def __init__(self, per_hour: int, clock=time.monotonic):
        self.per_hour = per_hour
        self._clock = clock
        self._times: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def admit(self, address: str) -> None:
        if self.per_hour == 0:
            return
        now = self._clock()
        with self._lock:
            if len(self._times) > MAXIMUM_TRACKED_ADDRESSES:  # forget the addresses quiet for an hour
                for quiet in [key for key, times in self._times.items() if times[-1] < now - 3600]:
                    del self._times[quiet]
            times = self._times.setdefault(address, deque())
            while times and times[0] < now - 3600:
                times.popleft()
            if len(times) >= self.per_hour:
                wait = int(times[0] + 3600 - now) + 1
                raise AdmissionRefused(
                    f"more than {self.per_hour} node registrations from this address in an hour; "
                    f"try again in {wait} s",
                    429,
                )
            times.append(now)
