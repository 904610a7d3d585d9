"""The OpenAI-compatible generation API: /v1/models, /v1/chat/completions and /v1/completions, streamed
(server-sent events) or not, served by the swarm's nodes through the hub's relay.

A buyer points the official `openai` client here by changing only base_url and api_key.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from compute_swarm import protocol
from compute_swarm.coordinator.domain import pricing
from compute_swarm.coordinator.service.inference import InferenceError, ServedModel, Usage
from compute_swarm.coordinator.transport.api.deps import CurrentBuyer, ServicesDep
from compute_swarm.coordinator.transport.api.openai_errors import OpenAIError, error_body
from compute_swarm.coordinator.transport.relay import PendingRequest, RelayFailure
from compute_swarm.engine.jobs import ChatMessage, Sampling

router = APIRouter(prefix="/v1", tags=["openai"])

# A generation answers JSON, or with "stream": true server-sent events.
GENERATION_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/json": {}, "text/event-stream": {}}}
}

# What an inference request may take on the node websocket, leaving room for the message around it.
MAX_PROMPT_BYTES = protocol.MAX_FRAME_BYTES - 16 * 1024


# ---- requests


class _Request(BaseModel):
    # The official client sends only what the caller set; fields of OpenAI's API that change nothing
    # here (user, metadata, store, ...) are accepted and ignored, ones that would change the answer
    # and are not supported are refused by name below.
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, max_length=200)
    max_tokens: int | None = Field(default=None, ge=1, le=32_768)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None

    def sampling(self, default_max_tokens: int, max_tokens: int | None = None) -> Sampling:
        unsupported = [
            name
            for name in (
                "tools",
                "functions",
                "tool_choice",
                "logprobs",
                "top_logprobs",
                "logit_bias",
                "best_of",
                "echo",
                "suffix",
            )
            if (self.model_extra or {}).get(name) not in (None, False, [], {})
        ]
        if self.n not in (None, 1):
            unsupported.append("n")
        response_format = (self.model_extra or {}).get("response_format")
        if response_format not in (None, {"type": "text"}):
            unsupported.append("response_format")
        if unsupported:
            raise OpenAIError(
                400, f"Unsupported parameter(s): {', '.join(unsupported)}.", param=unsupported[0]
            )
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        try:
            return Sampling(
                max_tokens=max_tokens or self.max_tokens or default_max_tokens,
                temperature=1.0 if self.temperature is None else self.temperature,
                top_p=1.0 if self.top_p is None else self.top_p,
                seed=(self.seed or 0) % 2**32,
                stop=tuple(stop),
            )
        except ValidationError as error:
            problem = error.errors()[0]
            field = ".".join(str(part) for part in problem["loc"])
            raise OpenAIError(400, f"{field}: {problem['msg']}", param=field) from None

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class _TextPart(BaseModel):
    type: Literal["text"]
    text: str


class _ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_TextPart] | None = None
    name: str | None = None

    def plain(self) -> ChatMessage:
        content = (
            self.content
            if isinstance(self.content, str)
            else "".join(part.text for part in self.content or [])
        )
        return ChatMessage(role="system" if self.role == "developer" else self.role, content=content)


class ChatCompletionIn(_Request):
    messages: Annotated[list[_ChatMessageIn], Field(min_length=1, max_length=1024)]
    max_completion_tokens: int | None = Field(default=None, ge=1, le=32_768)


class CompletionIn(_Request):
    prompt: str | list[str]


# ---- endpoints


@router.get("/models")
async def list_models(buyer: CurrentBuyer, services: ServicesDep) -> dict:
    models = await asyncio.to_thread(services.inference.models, buyer.id)
    return {"object": "list", "data": [_model_object(model) for model in models]}


@router.get("/models/{model_id:path}")
async def get_model(model_id: str, buyer: CurrentBuyer, services: ServicesDep) -> dict:
    return _model_object(await _resolve(services, buyer.id, model_id))


@router.post("/chat/completions", responses=GENERATION_RESPONSES)
async def chat_completions(body: ChatCompletionIn, buyer: CurrentBuyer, services: ServicesDep):
    sampling = body.sampling(services.settings.inference_default_max_tokens, body.max_completion_tokens)
    messages = tuple(message.plain() for message in body.messages)
    return await _serve(services, buyer.id, body, sampling, messages=messages, chat=True)


@router.post("/completions", responses=GENERATION_RESPONSES)
async def completions(body: CompletionIn, buyer: CurrentBuyer, services: ServicesDep):
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise OpenAIError(
                400, "Send one prompt per request (a list of several is not supported).", param="prompt"
            )
        prompt = prompt[0]
    sampling = body.sampling(services.settings.inference_default_max_tokens)
    return await _serve(services, buyer.id, body, sampling, prompt=prompt, chat=False)


# ---- serving one request


async def _resolve(services: ServicesDep, buyer_id: str, model_id: str) -> ServedModel:
    try:
        return await asyncio.to_thread(services.inference.resolve, buyer_id, model_id)
    except InferenceError as error:
        raise OpenAIError(error.status_code, str(error), code=error.code, param="model") from None


async def _serve(
    services: ServicesDep,
    buyer_id: str,
    body: _Request,
    sampling: Sampling,
    *,
    chat: bool,
    messages: tuple[ChatMessage, ...] | None = None,
    prompt: str | None = None,
):
    relay = services.hub.relay
    if relay is None:
        raise OpenAIError(503, "The coordinator is starting; try again in a moment.")
    model = await _resolve(services, buyer_id, body.model)
    text_bytes = (
        sum(len(message.content.encode()) for message in messages)
        if messages
        else len((prompt or "").encode())
    )
    if text_bytes > MAX_PROMPT_BYTES:
        raise OpenAIError(
            400,
            f"The prompt is {text_bytes} bytes; at most {MAX_PROMPT_BYTES} are accepted.",
            code="context_length_exceeded",
        )
    try:
        services.limiter.admit(buyer_id)
    except InferenceError as error:
        raise OpenAIError(error.status_code, str(error), code=error.code) from None
    released = False

    def release() -> None:
        nonlocal released
        if not released:
            released = True
            services.limiter.release(buyer_id)

    try:
        prompt_bound = pricing.prompt_token_bound(text_bytes, len(messages or ()))
        try:
            request_id = await asyncio.to_thread(
                services.inference.open,
                buyer_id,
                model,
                max_tokens=sampling.max_tokens,
                prompt_bound=prompt_bound,
            )
        except InferenceError as error:
            raise OpenAIError(error.status_code, str(error), code=error.code) from None
        pending = PendingRequest(
            request_id=request_id,
            model=model,
            prompt_bound=prompt_bound,
            message=protocol.InferenceRequest(
                request_id=request_id,
                model=model.base.name,
                model_file=services.catalogue.files(model.base.name, with_weights=False).gguf,
                adapter_sha256=model.adapter_sha256,
                adapter_size=model.adapter_size,
                messages=messages,
                prompt=prompt,
                sampling=sampling,
            ),
        )
        events = relay.events(pending)
        # The first event decides the answer's status: a failure before any token is a plain error.
        first = await anext(events)
        if isinstance(first, RelayFailure):
            await relay.refund(pending, first)
            raise OpenAIError(first.status_code, first.message, code=first.code)
        shape = _Shape(request_id, model.id, chat)
        if body.stream:
            stream = _stream(services, pending, events, first, shape, body.include_usage, release)
            released = True  # the stream releases it when it ends
            return StreamingResponse(
                stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        parts: list[str] = []
        event: Any = first
        while True:
            if isinstance(event, protocol.InferenceDelta):
                parts.append(event.text)
            elif isinstance(event, protocol.InferenceDone):
                usage = await relay.settle(pending, event)
                return JSONResponse(shape.whole("".join(parts), event, usage))
            else:
                await relay.refund(pending, event)
                raise OpenAIError(event.status_code, event.message, code=event.code)
            event = await anext(events)
    finally:
        if not released:
            release()


async def _stream(
    services: ServicesDep,
    pending: PendingRequest,
    events: AsyncIterator[Any],
    first: Any,
    shape: _Shape,
    include_usage: bool,
    release,
) -> AsyncIterator[str]:
    relay = services.hub.relay
    assert relay is not None
    finished = False
    try:
        if shape.chat:
            yield _sse(shape.chunk({"role": "assistant", "content": ""}, None))
        event = first
        while True:
            if isinstance(event, protocol.InferenceDelta):
                yield _sse(shape.chunk(event.text, None))
            elif isinstance(event, protocol.InferenceDone):
                finished = True
                usage = await relay.settle(pending, event)
                yield _sse(shape.last_chunk(event))
                if include_usage:
                    yield _sse(shape.usage_chunk(usage))
                break
            else:
                finished = True
                await relay.refund(pending, event)
                # The official client raises APIError on a data line that holds an "error".
                yield _sse(error_body(event.status_code, event.message, code=event.code))
                break
            event = await anext(events)
        yield "data: [DONE]\n\n"
    finally:
        release()
        if not finished:
            relay.abandon(pending)  # the buyer went away: may not await here (the task is cancelled)


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


class _Shape:
    """The JSON objects OpenAI's API answers with, for a chat or a text completion."""

    def __init__(self, request_id: str, model: str, chat: bool):
        self.id = ("chatcmpl-" if chat else "cmpl-") + request_id.removeprefix("req_")
        self.model = model
        self.chat = chat
        self.created = int(time.time())

    def _head(self, suffix: str = "") -> dict:
        kind = "chat.completion" if self.chat else "text_completion"
        return {"id": self.id, "object": kind + suffix, "created": self.created, "model": self.model}

    def whole(self, text: str, done: protocol.InferenceDone, usage: Usage) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None}
        else:
            choice = {"index": 0, "text": text, "logprobs": None}
        return {
            **self._head(),
            "choices": [{**choice, "finish_reason": done.finish_reason}],
            "usage": _usage(usage),
            **_offload(done),
        }

    def last_chunk(self, done: protocol.InferenceDone) -> dict:
        return {**self.chunk("" if not self.chat else {}, done.finish_reason), **_offload(done)}

    def chunk(self, content: str | dict, finish_reason: str | None) -> dict:
        if self.chat:
            delta = content if isinstance(content, dict) else {"content": content}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return {**self._head(".chunk"), "choices": [choice]}
        choice = {"index": 0, "text": content, "logprobs": None, "finish_reason": finish_reason}
        return {**self._head(), "choices": [choice]}

    def usage_chunk(self, usage: Usage) -> dict:
        return {**self._head(".chunk" if self.chat else ""), "choices": [], "usage": _usage(usage)}


def _offload(done: protocol.InferenceDone) -> dict:
    """Beside OpenAI's fields: where the node that answered had the model's layers, as it reports."""
    if done.offload is None:
        return {}
    return {"offload": done.offload.model_dump() | {"description": done.offload.describe()}}


def _usage(usage: Usage) -> dict:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def _model_object(model: ServedModel) -> dict:
    """OpenAI's model object, with the catalogue's facts beside its four fields (the openai client
    keeps extra fields: `model.context_length`)."""
    return {
        "id": model.id,
        "object": "model",
        "created": int(model.created_at),
        "owned_by": "you" if model.adapter_sha256 else "compute-swarm",
        "base_model": model.base.name,
        "context_length": model.base.context_length,
        "parameters": model.base.parameters,
        "licence": model.base.licence,
        "deprecated": model.base.state == "deprecated",
        "inference_per_million_tokens_micro": pricing.inference_price_micro(model.base, 1_000_000),
    }
