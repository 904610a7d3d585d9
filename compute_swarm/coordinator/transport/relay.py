"""The relay: live inference requests in flight on the hub's event loop. It routes a request to a node,
carries its tokens back to the buyer, fails over to another node when one drops before the first
token or its model crashes, and bounds what a node may send (coordinator.service.inference keeps the
money side: holds, charges, refunds).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from compute_swarm import protocol
from compute_swarm.coordinator.domain.scheduler import (
    InferenceCandidate,
    choose_inference_node,
    crash_without_alternative,
    inference_memory_bytes,
)
from compute_swarm.coordinator.service.inference import InferenceService, ServedModel, Usage
from compute_swarm.coordinator.service.tokens import ChatMessage
from compute_swarm.coordinator.settings import Settings

logger = logging.getLogger("compute_swarm.coordinator.transport.relay")

# An answer's text is bounded by its max_tokens: no token of a catalogue model's vocabulary is longer
# than this many bytes (the longest in SmolLM2's is 81, a newline and 80 spaces), and a node sends at
# most one piece of text per token, plus a few (a character split across tokens, the last piece).
MAX_BYTES_PER_TOKEN = 128
DELTA_SLACK = 8


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
        # (node id, adapter sha256) of each request a node serves: replaced whole, never changed in
        # place, so a worker thread (the adapter download's check) may read it while the loop runs.
        self.adapters_in_use: frozenset[tuple[str, str]] = frozenset()
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
                self._assign(request, node_id)
                request.tried.add(node_id)
                if await self._send(node_id, request.message):
                    return None
                self._assign(request, None)
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
        self._assign(request, None)
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
        self._note_adapters()
        self._capacity_changed.set()

    def _assign(self, request: PendingRequest, node_id: str | None) -> None:
        request.node_id = node_id
        self._note_adapters()

    def _note_adapters(self) -> None:
        self.adapters_in_use = frozenset(
            (pending.node_id, pending.model.adapter_sha256)
            for pending in self.pending.values()
            if pending.node_id is not None and pending.model.adapter_sha256 is not None
        )

    def _spawn(self, awaitable) -> None:
        task = asyncio.ensure_future(awaitable)
        self._tasks.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_log_failure)


def _log_failure(task: asyncio.Future) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("relay task failed", exc_info=task.exception())
