"""Browser sessions: signing in with an API key (buyers) or the admin token (ops), and the checks
every cookie-carrying request that changes something must pass (its Origin, and a CSRF token).

The cookie holds a random secret; only its sha256 is stored, as with API keys. A buyer's session is
tied to the key it was opened with: revoking that key signs the browser out. An ops session is tied to
the admin token it was opened with: starting the coordinator with another token signs it out.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from sqlalchemy import delete
from sqlalchemy.orm import Session

from compute_swarm.coordinator.service import accounts
from compute_swarm.coordinator.store.tables import ApiKey, Buyer, WebSession

BUYER, OPS = "buyer", "ops"
# Separate cookies, so one browser can be signed in as a buyer and as ops at once.
COOKIES = {BUYER: "swarm_session", OPS: "swarm_ops_session"}
# Before sign-in there is no session to hold a CSRF token: this cookie holds one (double submit).
ANONYMOUS_CSRF_COOKIE = "swarm_csrf"
CSRF_HEADER = "x-csrf-token"
CSRF_FIELD = "csrf_token"
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class SessionRefused(Exception):
    """Why a request with a cookie may not do what it asks (answered as 403)."""


@dataclass(frozen=True)
class SignedIn:
    session: WebSession
    buyer: Buyer | None


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def open_session(
    session: Session,
    kind: str,
    hours: float,
    *,
    buyer_id: str | None = None,
    api_key_id: str | None = None,
    admin_token: str | None = None,
) -> tuple[WebSession, str]:
    """A new session row and the cookie value that names it (not stored). An ops session records the
    admin token it was opened with (`admin_token`, as a fingerprint); without one it is never found."""
    now = time.time()
    # Expired sessions are swept here, as sign-ins are rare next to requests.
    session.execute(delete(WebSession).where(WebSession.expires_at < now))
    cookie = new_secret()
    row = WebSession(
        id=accounts.hash_secret(cookie),
        kind=kind,
        buyer_id=buyer_id,
        api_key_id=api_key_id,
        csrf_token=new_secret(),
        admin_token_fingerprint=(
            admin_token_fingerprint(admin_token) if kind == OPS and admin_token is not None else None
        ),
        created_at=now,
        expires_at=now + hours * 3600,
    )
    session.add(row)
    return row, cookie


def find_session(
    session: Session, cookie: str | None, kind: str, *, admin_token: str | None = None
) -> SignedIn | None:
    """The live session a cookie names: not expired, of this kind, its API key not revoked, or (ops)
    opened with `admin_token`, the admin token in force now."""
    if not cookie or len(cookie) > 100:
        return None
    row = session.get(WebSession, accounts.hash_secret(cookie))
    if row is None or row.kind != kind or row.expires_at < time.time():
        return None
    if kind == OPS:
        opened_with = row.admin_token_fingerprint
        if admin_token is None or opened_with is None:
            return None
        if not hmac.compare_digest(opened_with.encode(), admin_token_fingerprint(admin_token).encode()):
            return None
        return SignedIn(row, None)
    key = session.get(ApiKey, row.api_key_id) if row.api_key_id else None
    if key is None or key.revoked_at is not None:
        return None
    buyer = session.get(Buyer, row.buyer_id)
    return SignedIn(row, buyer) if buyer is not None else None


def close_session(session: Session, cookie: str | None) -> None:
    if cookie:
        session.execute(delete(WebSession).where(WebSession.id == accounts.hash_secret(cookie)))


def admin_token_fingerprint(admin_token: str) -> str:
    """What an ops session keeps of the admin token: a keyed hash, no use as the token itself nor
    equal to its plain sha256 (which is how API keys are stored)."""
    return hmac.new(admin_token.encode(), b"compute-swarm ops session", hashlib.sha256).hexdigest()


def admin_token_matches(expected: str | None, given: str) -> bool:
    return expected is not None and hmac.compare_digest(expected.encode(), given.strip().encode())


def expected_origin(public_origin: str, scheme: str, host: str) -> str:
    return public_origin.rstrip("/") if public_origin else f"{scheme}://{host}"


def check_origin(origin: str | None, referer: str | None, expected: str) -> None:
    """A state-changing request must come from our own page (browsers send Origin on every POST)."""
    if origin and origin != "null":
        if origin.rstrip("/") != expected:
            raise SessionRefused(f"this request came from {origin}, not from this coordinator's page")
        return
    if referer:
        parts = urlsplit(referer)
        if f"{parts.scheme}://{parts.netloc}" != expected:
            raise SessionRefused("this request came from another site")
        return
    raise SessionRefused("this request names no Origin: send it from the coordinator's page")


def check_csrf(expected: str, given: str | None) -> None:
    if not given or not hmac.compare_digest(expected.encode(), given.encode()):
        raise SessionRefused("this form has expired or did not come from this page: reload it and try again")
