"""Buyers and nodes: creating them, and recognising them by their secret.

Secrets are 256-bit random strings shown once; only their sha256 is stored. A plain hash is enough
(no password stretching) because the secrets are random, not chosen by people.
"""

from __future__ import annotations

import hashlib
import secrets
import time

from sqlalchemy import select
from sqlalchemy.orm import Session

from coordinator import ledger
from coordinator.tables import Buyer, Node

BUYER_KEY_PREFIX = "swarm-buyer-"
NODE_TOKEN_PREFIX = "swarm-node-"


class AccountError(ValueError):
    pass


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(8)}"


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_buyer(session: Session, name: str, credits_micro: int = 0) -> tuple[Buyer, str]:
    """Returns the buyer and their API key, which is not stored anywhere."""
    name = name.strip()
    if not name or len(name) > 100:
        raise AccountError("a buyer name is 1 to 100 characters")
    if session.scalar(select(Buyer.id).where(Buyer.name == name)) is not None:
        raise AccountError(f"a buyer named {name!r} exists already")
    api_key = BUYER_KEY_PREFIX + secrets.token_urlsafe(32)
    buyer = Buyer(id=new_id("buyer"), name=name, api_key_hash=hash_secret(api_key), created_at=time.time())
    session.add(buyer)
    session.flush()
    if credits_micro:
        ledger.grant(
            session, buyer.id, credits_micro, idempotency_key=f"grant:{buyer.id}:initial", memo="initial"
        )
    return buyer, api_key


def buyer_by_name(session: Session, name: str) -> Buyer:
    buyer = session.scalar(select(Buyer).where(Buyer.name == name))
    if buyer is None:
        raise AccountError(f"no buyer named {name!r}")
    return buyer


def buyer_for_key(session: Session, api_key: str) -> Buyer | None:
    if not api_key.startswith(BUYER_KEY_PREFIX):
        return None
    return session.scalar(select(Buyer).where(Buyer.api_key_hash == hash_secret(api_key)))


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
    node = session.scalar(select(Node).where(Node.token_hash == hash_secret(token)))
    return node if node is not None and node.revoked_at is None else None


def revoke_node(session: Session, node_id: str) -> Node:
    node = session.get(Node, node_id)
    if node is None:
        raise AccountError(f"no node {node_id!r}")
    if node.revoked_at is None:
        node.revoked_at = time.time()
    return node
