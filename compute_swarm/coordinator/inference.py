"""Live inference: which models a buyer may use, what a request holds and is charged (the database
side), and the relay that routes a request to a node and carries its tokens back (the event-loop side).

A request holds its most possible price in escrow when it opens. It is charged, when it ends, for the
tokens the coordinator counts with the model's own tokenizer: the prompt as the chat template renders
it, and the answer the buyer got (at most max_tokens); the rest goes back. An answer's text is bounded
by its max_tokens on the way through, and a node that sends more is cut off and paid nothing. A request that fails is refunded
whole. If its node drops before the first token, another node takes it. If the model crashes its node's
llama.cpp process, another node takes it too; when none can, the buyer is told the crash at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session

from compute_swarm import protocol
from compute_swarm.coordinator import ledger, pricing
from compute_swarm.coordinator.database import Database
from compute_swarm.coordinator.lifecycle import SUCCEEDED_STATES
from compute_swarm.coordinator.scheduler import (
    InferenceCandidate,
    choose_inference_node,
    crash_without_alternative,
    inference_memory_bytes,
)
from compute_swarm.coordinator.settings import Settings
from compute_swarm.coordinator.tables import Artifact, InferenceRequest, Job
from compute_swarm.coordinator.tokens import ChatMessage, TokenCounters
from compute_swarm.engine.jobs import CATALOGUE, CatalogueModel

logger = logging.getLogger("compute_swarm.coordinator.inference")

FINE_TUNED_PREFIX = "ft:"
OPEN, DONE, FAILED = "open", "completed", "failed"
# An answer's text is bounded by its max_tokens: no token of a catalogue model's vocabulary is longer
# than this many bytes (the longest in SmolLM2's is 81, a newline and 80 spaces), and a node sends at
# most one piece of text per token, plus a few (a character split across tokens, the last piece).
MAX_BYTES_PER_TOKEN = 128
DELTA_SLACK = 8


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


def resolve_model(session: Session, buyer_id: str, model_id: str) -> ServedModel:
    """The model a buyer names: a catalogue model, or one of their own fine-tuned models that has a
    llama.cpp adapter. Raises InferenceError (404) for anything else, another buyer's model included."""
    if model_id in CATALOGUE:
        return ServedModel(model_id, CATALOGUE[model_id])
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
    if job.state not in SUCCEEDED_STATES:
        raise InferenceError(
            f"The model '{model_id}' is not ready: its fine-tuning job is {job.state}.",
            404,
            "model_not_found",
        )
    if job.result_gguf_sha256 is None or job.base_model not in CATALOGUE:
        raise InferenceError(
            f"The model '{model_id}' cannot be served: its adapter has no llama.cpp (GGUF) form.",
            404,
            "model_not_found",
        )
    artifact = session.get(Artifact, job.result_gguf_sha256)
    return ServedModel(
        model_id,
        CATALOGUE[job.base_model],
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

    def __init__(self, database: Database, settings: Settings, tokens: TokenCounters | None = None):
        self.database = database
        self.settings = settings
        # Each catalogue model's tokenizer, to count what requests are charged (None: bounds only).
        self.tokens = tokens

    def models(self, buyer_id: str) -> list[ServedModel]:
        """The catalogue, then the buyer's fine-tuned models that can be served, newest first."""
        with self.database.reading() as session:
            jobs = session.scalars(
                select(Job)
                .where(
                    Job.buyer_id == buyer_id,
                    Job.verifies_job_id.is_(None),
                    Job.state.in_(SUCCEEDED_STATES),
                    Job.result_gguf_sha256.is_not(None),
                )
                .order_by(Job.finished_at.desc())
            ).all()
        return [ServedModel(model.name, model) for model in CATALOGUE.values()] + [
            ServedModel(
                fine_tuned_model_id(job),
                CATALOGUE[job.base_model],
                job.result_gguf_sha256,
                0,
                job.finished_at or 0,
            )
            for job in jobs
            if job.base_model in CATALOGUE
        ]

    def resolve(self, buyer_id: str, model_id: str) -> ServedModel:
        with self.database.reading() as session:
            return resolve_model(session, buyer_id, model_id)

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

    def recover_after_restart(self) -> int:
        """Requests open when the coordinator stopped lost their connection with it: refund them."""
        with self.database.reading() as session:
            open_ids = session.scalars(
                select(InferenceRequest.id).where(InferenceRequest.state == OPEN)
            ).all()
        for request_id in open_ids:
            self.fail(request_id, "the coordinator restarted while the request was served")
        return len(open_ids)


# ---- the relay


@dataclass(frozen=True)
class RelayFailure:
    """The request ended without an answer; status_code and code are what the buyer is told."""

    message: str
    status_code: int = 502
    code: str = "node_failed"


Event = protocol.InferenceDelta | protocol.InferenceDone | RelayFailure


@dataclass(frozen=True)
class ModelCrashed:
    """What the hub must do when a node says a model crashed its llama.cpp process: route that model
    (and, for a base model, its adapters) elsewhere until the node's heartbeats stop reporting it."""

    node_id: str
    model_key: str
    message: str


@dataclass(eq=False)
class PendingRequest:
    """A request in flight, as the relay tracks it."""

    request_id: str
    model: ServedModel
    message: protocol.InferenceRequest
    prompt_bound: int
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    node_id: str | None = None
    tried: set[str] = field(default_factory=set)
    started: bool = False  # a token went to the buyer: no other node may take over now
    completion_tokens: int = 0
    texts: list[str] = field(default_factory=list)  # the answer as the buyer got it, to count
    text_bytes: int = 0
    deltas: int = 0
    flooded: bool = False  # the node sent more than max_tokens allows: the rest is dropped
    ended: bool = False

    @property
    def max_tokens(self) -> int:
        return self.message.sampling.max_tokens

    def too_much(self, delta: protocol.InferenceDelta) -> str | None:
        """Why this delta takes the answer past what max_tokens allows (its text, or its number of
        pieces), if it does: a node may not flood the coordinator or the buyer."""
        self.deltas += 1
        self.text_bytes += len(delta.text.encode())
        if self.text_bytes > self.max_tokens * MAX_BYTES_PER_TOKEN:
            return f"more than {self.max_tokens * MAX_BYTES_PER_TOKEN} bytes of text for max_tokens {self.max_tokens}"
        if self.deltas > self.max_tokens + DELTA_SLACK:
            return (
                f"more than {self.max_tokens + DELTA_SLACK} pieces of text for max_tokens {self.max_tokens}"
            )
        return None


class Relay:
    """Requests in flight on the hub's event loop: routing, failover, and the tokens coming back."""

    def __init__(
        self,
        service: InferenceService,
        settings: Settings,
        candidates: Callable[[], list[InferenceCandidate]],
        send: Callable[[str, protocol.CoordinatorMessage], Awaitable[bool]],
    ):
        self.service = service
        self.settings = settings
        self._candidates = candidates
        self._send = send  # (node id, message) -> whether it went out
        self.pending: dict[str, PendingRequest] = {}
        self._capacity_changed = asyncio.Event()
        self._tasks: set[asyncio.Future] = set()

    def in_flight_by_node(self) -> Counter[str]:
        return Counter(request.node_id for request in self.pending.values() if request.node_id is not None)

    def capacity_changed(self) -> None:
        self._capacity_changed.set()

    # ---- a request's life, as the HTTP handler drives it

    async def events(self, request: PendingRequest) -> AsyncIterator[Event]:
        """Route the request and yield its events until the end (a done or a failure). The caller must
        call `abandon` if it stops iterating before the end."""
        self.pending[request.request_id] = request
        failure = await self._route(request)
        if failure is not None:
            self._end(request)
            yield failure
            return
        while True:
            timeout = (
                self.settings.inference_idle_seconds
                if request.started
                else self.settings.inference_first_token_seconds
            )
            try:
                event = await asyncio.wait_for(request.events.get(), timeout)
            except TimeoutError:
                event = self._node_silent(request, timeout)
                if event is None:
                    continue  # handed to another node
            if isinstance(event, protocol.InferenceDelta):
                request.started = True
            else:
                self._end(request)
            yield event
            if request.ended:
                return

    def abandon(self, request: PendingRequest) -> None:
        """The buyer went away mid-answer: stop the node, and charge for the tokens already sent (and
        the prompt, where the coordinator counts it). Safe to call from a cancelled task."""
        if request.ended:
            return
        self._end(request)
        if request.node_id is None:
            self._spawn(asyncio.to_thread(self.service.fail, request.request_id, "the buyer went away"))
            return
        self._spawn(self._send(request.node_id, protocol.InferenceStop(request_id=request.request_id)))
        if request.started:
            self._spawn(asyncio.to_thread(self._settle, request, 0))
        else:
            self._spawn(asyncio.to_thread(self.service.fail, request.request_id, "the buyer went away"))

    async def settle(self, request: PendingRequest, done: protocol.InferenceDone) -> Usage:
        """Charge a request that ended with its answer."""
        return await asyncio.to_thread(self._settle, request, done.prompt_tokens)

    async def refund(self, request: PendingRequest, failure: RelayFailure) -> None:
        await asyncio.to_thread(self.service.fail, request.request_id, failure.message)

    def _settle(self, request: PendingRequest, reported_prompt_tokens: int) -> Usage:
        """Charge the tokens counted here with the model's tokenizer: the prompt as its template renders
        it, the answer as the buyer got it. Without a tokenizer, the node's counts, within the bounds
        the text allows. Never more than max_tokens for the answer. Runs in a worker thread."""
        assert request.node_id is not None
        counter = self.service.tokens.get(request.model.base.name) if self.service.tokens else None
        if counter is not None:
            message = request.message
            prompt_tokens = (
                counter.count_chat([ChatMessage(item.role, item.content) for item in message.messages])
                if message.messages
                else counter.count(message.prompt or "")
            )
            completion_tokens = counter.count("".join(request.texts))
        else:
            prompt_tokens, completion_tokens = reported_prompt_tokens, request.completion_tokens
        return self.service.settle(
            request.request_id,
            request.model,
            request.node_id,
            min(prompt_tokens, request.prompt_bound),
            min(completion_tokens, request.max_tokens),
        )

    # ---- routing

    async def _route(self, request: PendingRequest) -> RelayFailure | None:
        deadline = time.monotonic() + self.settings.inference_wait_seconds
        required_memory_bytes = inference_memory_bytes(request.model.base, request.model.adapter_size)
        while True:
            candidates = self._candidates()
            tried_enough = len(request.tried) >= self.settings.inference_max_tries
            node_id = (
                None
                if tried_enough
                else choose_inference_node(
                    candidates,
                    model_key=request.model.key,
                    base_model=request.model.base.name,
                    required_memory_bytes=required_memory_bytes,
                    excluded=frozenset(request.tried),
                )
            )
            if node_id is not None:
                request.node_id = node_id
                request.tried.add(node_id)
                if await self._send(node_id, request.message):
                    return None
                request.node_id = None
                continue
            # Waiting for capacity cannot help when the only nodes that could serve the model are
            # those it crashed: the buyer hears why now, not "no capacity" after the wait.
            crash = crash_without_alternative(
                candidates,
                model_key=request.model.key,
                required_memory_bytes=required_memory_bytes,
                excluded=frozenset(request.tried),
            )
            if crash is not None:
                return RelayFailure(
                    f"{crash}; no other node can serve {request.model.id} now, try again later",
                    502,
                    "node_crashed",
                )
            if tried_enough:
                return RelayFailure(
                    f"{len(request.tried)} nodes failed to serve the request; try again later",
                    502,
                    "node_failed",
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return RelayFailure(
                    f"no node can serve {request.model.id} right now; try again in a minute",
                    503,
                    "no_capacity",
                )
            self._capacity_changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._capacity_changed.wait(), min(remaining, 1.0))

    def _reroute_later(self, request: PendingRequest, why: str) -> None:
        logger.info("request %s: node %s %s; trying another node", request.request_id, request.node_id, why)
        request.node_id = None
        self._spawn(self._reroute(request))

    async def _reroute(self, request: PendingRequest) -> None:
        failure = await self._route(request)
        if failure is not None:
            request.events.put_nowait(failure)

    def _node_silent(self, request: PendingRequest, timeout: float) -> RelayFailure | None:
        node_id = request.node_id
        if node_id is not None:
            self._spawn(self._send(node_id, protocol.InferenceStop(request_id=request.request_id)))
        if not request.started:
            self._reroute_later(request, f"sent nothing in {timeout:.0f} s")
            return None
        return RelayFailure(
            f"the node serving the request went silent for {timeout:.0f} s", 504, "node_timeout"
        )

    # ---- what nodes say

    def on_message(
        self,
        node_id: str,
        message: protocol.InferenceDelta | protocol.InferenceDone | protocol.InferenceFailed,
    ) -> ModelCrashed | None:
        """Carry a node's words to the request they answer; a crash comes back for the hub to note
        before the request is routed again."""
        request = self.pending.get(message.request_id)
        if request is None or request.node_id != node_id or request.ended or request.flooded:
            return None  # a request that ended (the buyer left, another node took it): late words are dropped
        if isinstance(message, protocol.InferenceDelta):
            flood = request.too_much(message)
            if flood is not None:
                # Nothing more of it reaches the buyer, who pays nothing for it; the node is stopped.
                logger.warning("request %s: node %s sent %s", request.request_id, node_id, flood)
                request.flooded = True
                self._spawn(self._send(node_id, protocol.InferenceStop(request_id=request.request_id)))
                request.events.put_nowait(RelayFailure(f"the node sent {flood}; nothing was charged"))
                return None
            # A node is paid for the tokens counted here, not for what it claims: at least one byte of
            # text per token, beyond the request's max_tokens nothing.
            tokens = min(message.tokens, len(message.text.encode()) + 1)
            if request.completion_tokens >= request.max_tokens:
                return None
            request.completion_tokens += tokens
            request.texts.append(message.text)
            request.events.put_nowait(message)
        elif isinstance(message, protocol.InferenceDone):
            request.events.put_nowait(message)
        elif message.kind == "invalid":
            request.events.put_nowait(RelayFailure(message.message, 400, "invalid_request"))
        elif message.kind == "crashed":
            if not request.started:
                self._reroute_later(request, f"crashed ({message.message})")
            else:
                request.events.put_nowait(
                    RelayFailure(f"the node failed while answering: {message.message}", 502, "node_crashed")
                )
            return ModelCrashed(node_id, request.model.key, message.message)
        elif not request.started:
            self._reroute_later(request, f"could not serve it ({message.kind}: {message.message})")
        else:
            request.events.put_nowait(RelayFailure(f"the node failed while answering: {message.message}"))
        return None

    def node_left(self, node_id: str) -> None:
        for request in list(self.pending.values()):
            if request.node_id != node_id or request.ended:
                continue
            if request.started:
                request.events.put_nowait(
                    RelayFailure(
                        "the node serving the request disconnected while answering; nothing was charged"
                    )
                )
            else:
                self._reroute_later(request, "disconnected before the first token")

    # ---- helpers

    def _end(self, request: PendingRequest) -> None:
        request.ended = True
        self.pending.pop(request.request_id, None)
        self._capacity_changed.set()

    def _spawn(self, awaitable) -> None:
        task = asyncio.ensure_future(awaitable)
        self._tasks.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_log_failure)


def _log_failure(task: asyncio.Future) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("relay task failed", exc_info=task.exception())


class RequestLimiter:
    """Each buyer's requests per minute (a token bucket) and requests at once; thread-safe."""

    def __init__(self, per_minute: int, concurrent: int, clock: Callable[[], float] = time.monotonic):
        self.per_minute = per_minute
        self.concurrent = concurrent
        self._clock = clock
        self._lock = threading.Lock()
        self._allowance: dict[str, tuple[float, float]] = {}  # buyer → (allowance, when)
        self._running: Counter[str] = Counter()

    def admit(self, buyer_id: str) -> None:
        """Count one request in; raises InferenceError (429) when the buyer is over a limit."""
        with self._lock:
            now = self._clock()
            allowance, since = self._allowance.get(buyer_id, (float(self.per_minute), now))
            allowance = min(float(self.per_minute), allowance + (now - since) * self.per_minute / 60)
            if allowance < 1:
                raise InferenceError(
                    f"Rate limit reached: {self.per_minute} requests per minute. Try again in a few seconds.",
                    429,
                    "rate_limit_exceeded",
                )
            if self._running[buyer_id] >= self.concurrent:
                raise InferenceError(
                    f"Rate limit reached: {self.concurrent} requests at once. Wait for one to finish.",
                    429,
                    "rate_limit_exceeded",
                )
            self._allowance[buyer_id] = (allowance - 1, now)
            self._running[buyer_id] += 1

    def release(self, buyer_id: str) -> None:
        with self._lock:
            self._running[buyer_id] -= 1
            if self._running[buyer_id] <= 0:
                del self._running[buyer_id]
