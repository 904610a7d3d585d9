"""The coordinator's database tables (SQLAlchemy 2). Alembic migrations in coordinator/migrations
create them; the same schema runs on SQLite and PostgreSQL.

Times are UTC epoch seconds (floats) so both databases store and compare them the same way.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from compute_swarm.engine.jobs import FileId, InferenceJobSpec, LoraJobSpec, parse_stored_buyer_spec

# Stable constraint names, so migrations can alter them on every database.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Buyer(Base):
    __tablename__ = "buyers"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    created_at: Mapped[float] = mapped_column(Float)


class ApiKey(Base):
    """One of a buyer's API keys: a buyer may hold several (one per tool) and revoke each."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    buyer_id: Mapped[str] = mapped_column(ForeignKey("buyers.id"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 of a random key
    # The key's last characters, so its owner can tell their keys apart.
    hint: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[float] = mapped_column(Float)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class WebSession(Base):
    """A signed-in browser: the cookie holds a random secret whose sha256 is the id. A buyer's session
    lives only as long as the API key it was opened with; an ops session needs the admin token."""

    __tablename__ = "web_sessions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(8))  # buyer or ops
    buyer_id: Mapped[str | None] = mapped_column(ForeignKey("buyers.id"), nullable=True, index=True)
    api_key_id: Mapped[str | None] = mapped_column(ForeignKey("api_keys.id"), nullable=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    # An ops session: a fingerprint of the admin token it was opened with (sessions.py), so that a
    # new token signs out every browser the old one signed in.
    admin_token_fingerprint: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float] = mapped_column(Float, index=True)


class Node(Base):
    __tablename__ = "nodes"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[float] = mapped_column(Float)
    last_seen_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    jobs_completed: Mapped[int] = mapped_column(Integer, default=0)
    # The latest hello (telemetry, agent version), for ops.
    description: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # Its verification record (coordinator.domain.verification.NodeRecord); error_rate None: a new node's.
    trusted: Mapped[bool] = mapped_column(Boolean, default=False)  # ops trust it to verify others
    error_rate: Mapped[float | None] = mapped_column(Float, nullable=True)
    clean_streak: Mapped[int] = mapped_column(Integer, default=0)
    mismatches: Mapped[int] = mapped_column(Integer, default=0)
    verifications: Mapped[int] = mapped_column(Integer, default=0)  # of its jobs, ever
    quarantined_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    # When it was let in (at registration, or by ops where they approve nodes); None: waiting, no work.
    approved_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Swarm transfer: whether the coordinator reached its transfer port from outside ("reachable",
    # "tunnelled", "unreachable"; None: it shares nothing), where its peers connect, and when it was tested.
    reachability: Mapped[str | None] = mapped_column(String(16), nullable=True)
    peer_address: Mapped[str | None] = mapped_column(String(300), nullable=True)
    reachability_checked_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class NodeInvite(Base):
    """An invite code ops handed out: a node registers with it while uses remain (only its sha256 is
    kept, as with tokens)."""

    __tablename__ = "node_invites"

    code_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    uses_left: Mapped[int] = mapped_column(Integer)
    expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    note: Mapped[str] = mapped_column(String(200), default="")


class Artifact(Base):
    """A verified blob in the content-addressed store."""

    __tablename__ = "artifacts"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[float] = mapped_column(Float)


class ArtifactHolder(Base):
    """Who uploaded a blob (`buyer:<id>` or `node:<id>`): a node may only report blobs it uploaded."""

    __tablename__ = "artifact_holders"

    sha256: Mapped[str] = mapped_column(ForeignKey("artifacts.sha256"), primary_key=True)
    holder: Mapped[str] = mapped_column(String(48), primary_key=True)


class Upload(Base):
    """A chunked upload in progress; its bytes sit in the store's scratch directory until verified."""

    __tablename__ = "uploads"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    holder: Mapped[str] = mapped_column(String(48), index=True)
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    received: Mapped[int] = mapped_column(BigInteger, default=0)
    purpose: Mapped[str] = mapped_column(String(16))
    filename: Mapped[str | None] = mapped_column(String(255), nullable=True)
    job_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    lease_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    completed_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    file_id: Mapped[str | None] = mapped_column(String(32), nullable=True)


class File(Base):
    """A buyer's file (a dataset): a name for one of their artifacts."""

    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    buyer_id: Mapped[str] = mapped_column(ForeignKey("buyers.id"), index=True)
    sha256: Mapped[str] = mapped_column(ForeignKey("artifacts.sha256"))
    filename: Mapped[str] = mapped_column(String(255))
    size: Mapped[int] = mapped_column(BigInteger)
    purpose: Mapped[str] = mapped_column(String(16))
    lines: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[float] = mapped_column(Float)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_state_queued_at", "state", "queued_at"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    buyer_id: Mapped[str] = mapped_column(ForeignKey("buyers.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)  # as the buyer gave it; dataset is a file id
    base_model: Mapped[str] = mapped_column(String(100))
    dataset_sha256: Mapped[str] = mapped_column(String(64))
    dataset_size: Mapped[int] = mapped_column(BigInteger)
    # Its examples or prompts, counted at upload: a batch must deliver one answer for each.
    dataset_lines: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # Free memory a node needs: training in fp32 (CPU, Apple) and in 16 bits (CUDA/ROCm).
    required_memory_bytes: Mapped[int] = mapped_column(BigInteger)
    required_memory_bytes_16bit: Mapped[int] = mapped_column(BigInteger)
    price_micro: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[str] = mapped_column(String(16))
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer)
    queued_at: Mapped[float] = mapped_column(Float)
    node_id: Mapped[str | None] = mapped_column(String(32), nullable=True, index=True)
    lease_id: Mapped[str | None] = mapped_column(String(32), nullable=True, unique=True)
    lease_expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Nodes that said the job does not fit them: the scheduler skips them for this job.
    excluded_nodes: Mapped[list[str]] = mapped_column(JSON, default=list)
    progress: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    checkpoint_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    checkpoint_step: Mapped[int] = mapped_column(Integer, default=0)
    # The checkpoint the latest lease started from (None: step 0); who made it is in `checkpoints`.
    resumed_from_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    result_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # A LoRA job's adapter as a llama.cpp LoRA file, which serves its fine-tuned model.
    result_gguf_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # The adapter an inference job runs with (a fine-tuned model's result_gguf_sha256).
    input_adapter_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # The buyer's words in the fine-tuned model's name: ft:<base model>:<suffix>:<job id>.
    model_suffix: Mapped[str | None] = mapped_column(String(64), nullable=True)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # Verification. A re-run on a trusted node names the job it checks, and the result delivered for
    # it (which the trusted node evaluates too); the checked job records the outcome.
    verifies_job_id: Mapped[str | None] = mapped_column(String(32), nullable=True, index=True)
    # A sweep's trial: the sweep, and the settings this trial tries.
    sweep_id: Mapped[str | None] = mapped_column(String(32), nullable=True, index=True)
    sweep_parameters: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    delivered_result_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # A re-run that looks for the node that introduced a bad state (coordinator.service.provenance): the
    # checkpoint it checks, its step, its author, and the node whose work followed it.
    checks_checkpoint: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # pending (a re-run is queued), passed, mismatch, skipped (not sampled), unavailable (no trusted
    # node could take it in time); None before completion.
    verification: Mapped[str | None] = mapped_column(String(16), nullable=True)
    verification_detail: Mapped[str | None] = mapped_column(Text, nullable=True)
    # When the node's pending credit for this job is released if no verification decides sooner.
    credit_release_at: Mapped[float | None] = mapped_column(Float, nullable=True, index=True)
    error_kind: Mapped[str | None] = mapped_column(String(32), nullable=True)
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)

    @property
    def submitted_spec(self) -> LoraJobSpec[FileId] | InferenceJobSpec[FileId]:
        """`spec` read back typed: validated when it was submitted, its data named by file id. Parsed
        once per loaded row (a trial's reports read it several times each), again only if `spec` is
        replaced."""
        parsed = self.__dict__.get("_submitted_spec")
        if parsed is None or parsed[0] is not self.spec:
            parsed = (self.spec, parse_stored_buyer_spec(self.spec))
            self.__dict__["_submitted_spec"] = parsed
        return parsed[1]

    @property
    def max_steps(self) -> int | None:
        """A LoRA job's fixed length in optimizer steps (None: by epochs, or not a fine-tune)."""
        spec = self.submitted_spec
        return spec.max_steps if isinstance(spec, LoraJobSpec) else None


class Checkpoint(Base):
    """A checkpoint a node uploaded for a job, with who made it and what it was built on: checkpoints
    are untrusted input, and a bad one is charged to its author (coordinator.service.provenance)."""

    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("job_id", "sha256"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    sha256: Mapped[str] = mapped_column(String(64))
    step: Mapped[int] = mapped_column(Integer)
    node_id: Mapped[str] = mapped_column(String(32))
    lease_id: Mapped[str] = mapped_column(String(32))
    # The checkpoint the uploading lease started from (None: step 0).
    resumed_from_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    uploaded_at: Mapped[float] = mapped_column(Float)


class Sweep(Base):
    """A buyer's hyperparameter sweep (compute_swarm.sweeps.SweepSpec): its trials are jobs naming it."""

    __tablename__ = "sweeps"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    buyer_id: Mapped[str] = mapped_column(ForeignKey("buyers.id"), index=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Float)


class JobEvent(Base):
    """What happened to a job, in order: for the buyer's timeline and for ops."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    at: Mapped[float] = mapped_column(Float)
    state: Mapped[str] = mapped_column(String(16))
    attempt: Mapped[int] = mapped_column(Integer)
    node_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    message: Mapped[str] = mapped_column(Text, default="")


class JobProgressPoint(Base):
    """One reported training step's losses, for the job page's chart (the job row keeps only the last)."""

    __tablename__ = "job_progress"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    step: Mapped[int] = mapped_column(Integer)
    loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    eval_loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    at: Mapped[float] = mapped_column(Float)


class LedgerTransaction(Base):
    """A set of entries that sum to zero. Never updated or deleted: corrections are new transactions."""

    __tablename__ = "ledger_transactions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(16))  # grant, escrow, charge, refund
    # One transaction per key, ever: a retried grant or a second settlement of a job is refused.
    idempotency_key: Mapped[str] = mapped_column(String(128), unique=True)
    job_id: Mapped[str | None] = mapped_column(String(32), nullable=True, index=True)
    memo: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[float] = mapped_column(Float)


class LedgerEntry(Base):
    __tablename__ = "ledger_entries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    transaction_id: Mapped[int] = mapped_column(ForeignKey("ledger_transactions.id"), index=True)
    account: Mapped[str] = mapped_column(String(64), index=True)
    amount_micro: Mapped[int] = mapped_column(BigInteger)


class AccountBalance(Base):
    """Each account's balance, kept in the same transaction as its entries, so reading a balance does
    not grow with the account's history. The entries stay the record: balances must equal their sums."""

    __tablename__ = "account_balances"

    account: Mapped[str] = mapped_column(String(64), primary_key=True)
    balance_micro: Mapped[int] = mapped_column(BigInteger)


class InferenceRequest(Base):
    """One chat or completion request served live: what it held in escrow and what it was charged."""

    __tablename__ = "inference_requests"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    buyer_id: Mapped[str] = mapped_column(ForeignKey("buyers.id"), index=True)
    model: Mapped[str] = mapped_column(String(200))
    state: Mapped[str] = mapped_column(String(16), index=True)  # open, completed, failed
    node_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    # The coordinator process that relays it (transport.replicas: an instance id): when that one is
    # gone, so is the buyer's stream, and the request is refunded.
    replica: Mapped[str | None] = mapped_column(String(16), nullable=True)
    held_micro: Mapped[int] = mapped_column(BigInteger)
    price_micro: Mapped[int] = mapped_column(BigInteger, default=0)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class PayoutBatch(Base):
    """Payouts ops exported together, to pay outside the swarm: the rate and currency they were
    converted at are kept, so the batch's file reads the same every time it is downloaded."""

    __tablename__ = "payout_batches"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    currency: Mapped[str] = mapped_column(String(3))
    rate: Mapped[str] = mapped_column(String(32))  # currency per credit, exact decimal text
    created_at: Mapped[float] = mapped_column(Float)


class Payout(Base):
    """A seller's request to be paid their available credit: requested → exported (in a batch) → paid,
    or rejected (the credit goes back). Its money moves in the ledger (ledger.payout_key)."""

    __tablename__ = "payouts"
    __table_args__ = (UniqueConstraint("node_id", "request_key"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    node_id: Mapped[str] = mapped_column(ForeignKey("nodes.id"), index=True)
    # The node's own key for the request: sent again after a lost answer, it finds this payout.
    request_key: Mapped[str] = mapped_column(String(100))
    amount_micro: Mapped[int] = mapped_column(BigInteger)
    payee: Mapped[str] = mapped_column(String(200))  # where the seller asked to be paid, for ops
    state: Mapped[str] = mapped_column(String(16), index=True)  # requested, exported, paid, rejected
    requested_at: Mapped[float] = mapped_column(Float)
    batch_id: Mapped[str | None] = mapped_column(ForeignKey("payout_batches.id"), nullable=True, index=True)
    amount_minor: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # in the batch's currency
    reference: Mapped[str | None] = mapped_column(String(200), nullable=True)  # the payment's, from ops
    reason: Mapped[str | None] = mapped_column(String(500), nullable=True)  # why ops rejected it
    decided_at: Mapped[float | None] = mapped_column(Float, nullable=True)  # paid or rejected


class CatalogueEntry(Base):
    """A model ops added to the catalogue (service/catalogue.py); the built-in demo model has no row.
    A row is never deleted: a removed model's jobs keep naming it."""

    __tablename__ = "catalogue_models"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    state: Mapped[str] = mapped_column(String(16))  # listed, deprecated, removed
    source: Mapped[str] = mapped_column(String(300))  # "files", or "hub:<repo>@<revision>"
    architecture: Mapped[str] = mapped_column(String(32))
    parameters: Mapped[int] = mapped_column(BigInteger)
    context_length: Mapped[int] = mapped_column(Integer)
    gguf_name: Mapped[str] = mapped_column(String(128))
    gguf_sha256: Mapped[str] = mapped_column(String(64))
    gguf_size: Mapped[int] = mapped_column(BigInteger)
    # The Hugging Face directory's files, [{"name", "sha256", "size"}]; [] when trained from the GGUF.
    weights: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    shape: Mapped[dict[str, Any]] = mapped_column(JSON)  # engine.model_facts.shape_record
    chat_template: Mapped[str | None] = mapped_column(Text, nullable=True)
    licence: Mapped[str] = mapped_column(String(100))  # its SPDX identifier or title
    licence_sha256: Mapped[str] = mapped_column(String(64))  # the licence text, an artifact
    added_at: Mapped[float] = mapped_column(Float)
    changed_at: Mapped[float] = mapped_column(Float)


class CoordinatorSecret(Base):
    """A secret the coordinator makes up once and every replica shares (the swarm-transfer tickets'
    key, unless ops configured one): kept in the database they all read, so a ticket one replica
    signed is good at the others, and after a restart."""

    __tablename__ = "coordinator_secrets"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[float] = mapped_column(Float)
