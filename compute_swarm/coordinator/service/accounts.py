"""Buyers and nodes: creating them, and recognising them by their secret.

Secrets are 256-bit random strings shown once; only their sha256 is stored. A plain hash is enough
(no password stretching) because the secrets are random, not chosen by people.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from compute_swarm.coordinator.store import ledger
from compute_swarm.coordinator.store.database import Database
from compute_swarm.coordinator.store.tables import ApiKey, Buyer, Node

BUYER_KEY_PREFIX = "swarm-buyer-"
NODE_TOKEN_PREFIX = "swarm-node-"


class AccountError(ValueError):
    pass


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(8)}"


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


MAX_KEYS_PER_BUYER = 50


def create_buyer(session: Session, name: str, credits_micro: int = 0) -> tuple[Buyer, str]:
    """Returns the buyer and their first API key, which is not stored anywhere."""
    name = name.strip()
    if not name or len(name) > 100:
        raise AccountError("a buyer name is 1 to 100 characters")
    if session.scalar(select(Buyer.id).where(Buyer.name == name)) is not None:
        raise AccountError(f"a buyer named {name!r} exists already")
    buyer = Buyer(id=new_id("buyer"), name=name, created_at=time.time())
    session.add(buyer)
    session.flush()
    _key, api_key = create_api_key(session, buyer.id, "first key")
    if credits_micro:
        ledger.grant(
            session, buyer.id, credits_micro, idempotency_key=f"grant:{buyer.id}:initial", memo="initial"
        )
    return buyer, api_key


def create_api_key(session: Session, buyer_id: str, name: str) -> tuple[ApiKey, str]:
    """A new key for a buyer: the row, and the key itself, shown once and not stored."""
    name = name.strip()
    if not name or len(name) > 100:
        raise AccountError("a key's name is 1 to 100 characters")
    live = session.scalars(
        select(ApiKey.id).where(ApiKey.buyer_id == buyer_id, ApiKey.revoked_at.is_(None))
    ).all()
    if len(live) >= MAX_KEYS_PER_BUYER:
        raise AccountError(f"a buyer holds at most {MAX_KEYS_PER_BUYER} keys: revoke one first")
    api_key = BUYER_KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(
        id=new_id("key"),
        buyer_id=buyer_id,
        name=name,
        key_hash=hash_secret(api_key),
        hint=api_key[-4:],
        created_at=time.time(),
    )
    session.add(key)
    session.flush()
    return key, api_key


def revoke_api_key(session: Session, buyer_id: str, key_id: str) -> ApiKey:
    key = session.get(ApiKey, key_id)
    if key is None or key.buyer_id != buyer_id:
        raise AccountError(f"no API key {key_id!r}")
    if key.revoked_at is None:
        key.revoked_at = time.time()
    return key


def api_key_for_secret(session: Session, api_key: str) -> ApiKey | None:
    """The live key row a secret belongs to (None for a wrong or revoked key)."""
    if not api_key.startswith(BUYER_KEY_PREFIX):
        return None
    key = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_secret(api_key)))
    return key if key is not None and key.revoked_at is None else None


def buyer_by_name(session: Session, name: str) -> Buyer:
    buyer = session.scalar(select(Buyer).where(Buyer.name == name))
    if buyer is None:
        raise AccountError(f"no buyer named {name!r}")
    return buyer


def buyer_for_key(session: Session, api_key: str) -> Buyer | None:
    key = api_key_for_secret(session, api_key)
    return session.get(Buyer, key.buyer_id) if key is not None else None


def register_node(session: Session, name: str) -> tuple[Node, str]:
    name = name.strip()
    if not name or len(name) > 100:
        raise AccountError("a node name is 1 to 100 characters")
    token = NODE_TOKEN_PREFIX + secrets.token_urlsafe(32)
    node = Node(id=new_id("node"), name=name, token_hash=hash_secret(token), created_at=time.time())
    session.add(node)
    return node, token


def node_for_token(session: Session, token: str) -> Node | None:
    """The node a token belongs to, unless it was revoked."""
    if not token.startswith(NODE_TOKEN_PREFIX):
        return None
    node = session.scalar(_NODE_BY_TOKEN, {"token_hash": hash_secret(token)})
    return node if node is not None and node.revoked_at is None else None


# Built once: every node's connection and request asks it (a reconnect storm, thousands at once).
_NODE_BY_TOKEN = select(Node).where(Node.token_hash == bindparam("token_hash"))


def revoke_node(session: Session, node_id: str) -> Node:
    node = session.get(Node, node_id)
    if node is None:
        raise AccountError(f"no node {node_id!r}")
    if node.revoked_at is None:
        node.revoked_at = time.time()
    return node


class BuyerKeys:
    """Buyers by API key, each answer remembered for at most KEPT_SECONDS: a busy buyer's requests skip
    the database (each asks twice: before its body is read and again as the route's dependency), and
    a key revoked on any replica stops working within that time. One revoked here stops at once."""

    KEPT_SECONDS = 1.0
    MOST_KEPT = 10_000  # keys; a buyer's request with a key not kept is one indexed read

    def __init__(self, database: Database, clock: Callable[[], float] = time.monotonic):
        self.database = database
        self._clock = clock
        self._lock = threading.Lock()
        self._kept: OrderedDict[str, tuple[Buyer, float]] = OrderedDict()  # key hash → (buyer, until)

    def buyer(self, api_key: str) -> Buyer | None:
        """The buyer whose live key this is (None for a wrong or revoked key, which is never kept)."""
        digest, now = hash_secret(api_key), self._clock()
        kept = self._kept_buyer(digest, now)
        if kept is not None:
            return kept
        with self.database.reading() as session:
            buyer = buyer_for_key(session, api_key)
        with self._lock:
            if buyer is None:
                self._kept.pop(digest, None)
                return None
            self._kept[digest] = (buyer, now + self.KEPT_SECONDS)
            self._kept.move_to_end(digest)
            while len(self._kept) > self.MOST_KEPT:
                self._kept.popitem(last=False)
        return buyer

    def kept(self, api_key: str) -> Buyer | None:
        """The buyer of a key looked up within KEPT_SECONDS, from memory alone (None: not kept, ask
        `buyer`). It never blocks, so the event loop may ask."""
        return self._kept_buyer(hash_secret(api_key), self._clock())

    def _kept_buyer(self, digest: str, now: float) -> Buyer | None:
        with self._lock:
            kept = self._kept.get(digest)
        return kept[0] if kept is not None and kept[1] > now else None

    def revoke(self, buyer_id: str, key_id: str) -> ApiKey:
        """Revoke one of the buyer's keys; on this replica it stops working at once."""
        with self.database.transaction() as session:
            key = revoke_api_key(session, buyer_id, key_id)
        with self._lock:
            self._kept.pop(key.key_hash, None)
        return key
