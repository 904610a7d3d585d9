"""Live inference in the database: which models a buyer may use, what a request holds and is charged.
The relay that routes a request to a node and carries its tokens back is the transport's
(coordinator.transport.relay).

A request holds its most possible price in escrow when it opens. It is charged, when it ends, for the
tokens the coordinator counts with the model's own tokenizer: the prompt as the chat template renders
it, and the answer the buyer got (at most max_tokens); the rest goes back. An answer's text is bounded
by its max_tokens on the way through, and a node that sends more is cut off and paid nothing. A request that fails is refunded
whole. If its node drops before the first token, another node takes it. If the model crashes its node's
llama.cpp process, another node takes it too; when none can, the buyer is told the crash at once.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from compute_swarm import protocol
from compute_swarm.coordinator.domain import pricing
from compute_swarm.coordinator.service import buyer_reads
from compute_swarm.coordinator.service.catalogue import Catalogue
from compute_swarm.coordinator.service.tokens import TokenCounters
from compute_swarm.coordinator.settings import Settings
from compute_swarm.coordinator.store import ledger
from compute_swarm.coordinator.store.database import Database
from compute_swarm.coordinator.store.tables import Artifact, InferenceRequest, Job
from compute_swarm.engine.jobs import CatalogueModel
from compute_swarm.protocol import SUCCEEDED_JOB_STATES

logger = logging.getLogger("compute_swarm.coordinator.service.inference")

FINE_TUNED_PREFIX = "ft:"
OPEN, DONE, FAILED = "open", "completed", "failed"


class InferenceError(Exception):
    """A request that cannot be served; `status_code` and `code` are what the buyer is told."""

    def __init__(self, message: str, status_code: int, code: str):
        super().__init__(message)
        self.status_code = status_code
        self.code = code


@dataclass(frozen=True)
class ServedModel:
    """A model as a buyer names it, and what a node needs to serve it."""

    id: str
    base: CatalogueModel
    adapter_sha256: str | None = None
    adapter_size: int = 0
    created_at: float = 0.0

    @property
    def key(self) -> str:
        return protocol.model_key(self.base.name, self.adapter_sha256)


def fine_tuned_model_id(job: Job) -> str:
    """ft:<base model>:<suffix>:<job id>, in the shape OpenAI gives fine-tuned models."""
    return f"{FINE_TUNED_PREFIX}{job.base_model}:{job.model_suffix or 'swarm'}:{job.id}"


def resolve_model(session: Session, buyer_id: str, model_id: str, catalogue: Catalogue) -> ServedModel:
    """The model a buyer names: a catalogue model (listed or deprecated), or one of their own
    fine-tuned models that has a llama.cpp adapter and a base still in the catalogue. Raises
    InferenceError (404) for anything else, another buyer's model included."""
    base = catalogue.for_inference(model_id)
    if base is not None:
        return ServedModel(model_id, base)
    unknown = InferenceError(
        f"The model '{model_id}' does not exist or you do not have access to it.", 404, "model_not_found"
    )
    if not model_id.startswith(FINE_TUNED_PREFIX):
        raise unknown
    job = session.get(Job, model_id.rsplit(":", 1)[-1])
    if (
        job is None
        or job.buyer_id != buyer_id
        or job.kind != "lora"
        or job.verifies_job_id is not None
        or fine_tuned_model_id(job) != model_id
    ):
        raise unknown
    if job.state not in SUCCEEDED_JOB_STATES:
        raise InferenceError(
            f"The model '{model_id}' is not ready: its fine-tuning job is {job.state}.",
            404,
            "model_not_found",
        )
    base = catalogue.for_inference(job.base_model)
    if base is None:
        raise InferenceError(
            f"The model '{model_id}' cannot be served: its base model {job.base_model} was removed.",
            404,
            "model_not_found",
        )
    if job.result_gguf_sha256 is None:
        raise InferenceError(
            f"The model '{model_id}' cannot be served: its adapter has no llama.cpp (GGUF) form.",
            404,
            "model_not_found",
        )
    artifact = session.get(Artifact, job.result_gguf_sha256)
    return ServedModel(
        model_id,
        base,
        job.result_gguf_sha256,
        artifact.size if artifact is not None else 0,
        job.finished_at or 0,
    )


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    price_micro: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class InferenceService:
    """The database side of live inference."""

    def __init__(
        self,
        database: Database,
        settings: Settings,
        tokens: TokenCounters | None = None,
        catalogue: Catalogue | None = None,
        *,
        replica: str = "",
    ):
        self.database = database
        self.settings = settings
        self.catalogue = catalogue or Catalogue(database)
        # This coordinator's instance id (transport.replicas), kept with each request it relays.
        self.replica = replica
        # Each catalogue model's tokenizer, to count what requests are charged (None: bounds only).
        self.tokens = tokens

    def models(self, buyer_id: str) -> list[ServedModel]:
        """The catalogue, then the buyer's fine-tuned models that can be served, newest first."""
        with self.database.reading() as session:
            jobs = session.scalars(buyer_reads.servable_models(buyer_id)).all()
        served = [ServedModel(model.name, model) for model in self.catalogue.models()]
        for job in jobs:
            base = self.catalogue.for_inference(job.base_model)
            if base is not None:
                served.append(
                    ServedModel(
                        fine_tuned_model_id(job), base, job.result_gguf_sha256, 0, job.finished_at or 0
                    )
                )
        return served

    def resolve(self, buyer_id: str, model_id: str) -> ServedModel:
        with self.database.reading() as session:
            return resolve_model(session, buyer_id, model_id, self.catalogue)

    def open(self, buyer_id: str, model: ServedModel, *, max_tokens: int, prompt_bound: int) -> str:
        """Record the request and hold its highest price; raises InferenceError (402) without credit."""
        request_id = f"req_{secrets.token_hex(8)}"
        held = pricing.inference_price_micro(model.base, prompt_bound + max_tokens)
        with self.database.transaction() as session:
            session.add(
                InferenceRequest(
                    id=request_id,
                    buyer_id=buyer_id,
                    model=model.id[:200],
                    state=OPEN,
                    replica=self.replica,
                    held_micro=held,
                    price_micro=0,
                    prompt_tokens=0,
                    completion_tokens=0,
                    created_at=time.time(),
                )
            )
            session.flush()
            try:
                ledger.hold_in_escrow(session, buyer_id, request_id, held, what="this request may cost up to")
            except ledger.InsufficientCredits as error:
                raise InferenceError(
                    f"{error}. Add credits or lower max_tokens.", 402, "insufficient_quota"
                ) from None
        return request_id

    def settle(
        self, request_id: str, model: ServedModel, node_id: str, prompt_tokens: int, completion_tokens: int
    ) -> Usage:
        price = pricing.inference_price_micro(model.base, prompt_tokens + completion_tokens)
        with self.database.transaction() as session:
            request = session.get(InferenceRequest, request_id, with_for_update=True)
            if request is None or request.state != OPEN:
                return (
                    Usage(request.prompt_tokens, request.completion_tokens, request.price_micro)
                    if request
                    else Usage(0, 0, 0)
                )
            price = min(price, request.held_micro)
            node_share, fee = pricing.split_payment(price, self.settings.platform_fee_basis_points)
            ledger.charge(
                session,
                request_id,
                node_id,
                node_share,
                fee,
                buyer_id=request.buyer_id,
                memo=f"{model.id}: {prompt_tokens} + {completion_tokens} tokens"[:500],
            )
            request.state, request.node_id, request.finished_at = DONE, node_id, time.time()
            request.price_micro, request.prompt_tokens, request.completion_tokens = (
                price,
                prompt_tokens,
                completion_tokens,
            )
        return Usage(prompt_tokens, completion_tokens, price)

    def fail(self, request_id: str, message: str) -> None:
        with self.database.transaction() as session:
            request = session.get(InferenceRequest, request_id, with_for_update=True)
            if request is None or request.state != OPEN:
                return
            ledger.refund(session, request_id, request.buyer_id, memo=f"request failed: {message}"[:500])
            request.state, request.error, request.finished_at = FAILED, message[:2000], time.time()

    def fail_orphaned(self, alive: Callable[[str], bool]) -> int:
        """Refund the open requests whose coordinator is gone (stopped, restarted, killed): their
        buyers' streams ended with it. `alive` says whether another replica's instance still runs."""
        with self.database.reading() as session:
            rows = session.execute(
                select(InferenceRequest.id, InferenceRequest.replica).where(
                    InferenceRequest.state == OPEN,
                    InferenceRequest.replica.is_(None) | (InferenceRequest.replica != self.replica),
                )
            ).all()
        replicas = {row.replica for row in rows}
        gone = {replica for replica in replicas if replica is None or not alive(replica)}
        orphans = [row.id for row in rows if row.replica in gone]
        for request_id in orphans:
            self.fail(request_id, "the coordinator relaying the request stopped while it was served")
        return len(orphans)
