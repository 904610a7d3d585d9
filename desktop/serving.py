"""Inference on this node: requests from the coordinator go to engine.inference_server's child process,
and the text it generates goes back as InferenceDelta messages, then one InferenceDone or
InferenceFailed. desktop.agent owns one `InferenceServing` and feeds it the coordinator's messages.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from coordinator import protocol
from coordinator.client import SwarmError
from desktop.messages import describe_error
from desktop.workspace import Workspace

logger = logging.getLogger(__name__)


def inference_available() -> bool:
    """Whether llama-cpp-python is installed here (the node extra installs it)."""
    return importlib.util.find_spec("llama_cpp") is not None


def _resolve_base_model(name: str) -> Path:
    from engine.models import fetch_catalogue_model

    return fetch_catalogue_model(name)


class InferenceServing:
    """Runs on the agent's event loop; the child's events arrive on a reader thread and are handed over."""

    def __init__(
        self,
        workspace: Workspace,
        post: Callable[[protocol.NodeMessage], None],
        *,
        client: Callable[[], Any],  # the agent's current NodeClient (for adapter downloads)
        process: Any = None,  # an engine.inference_server.InferenceProcess; made on first use
        resolve_base_model: Callable[[str], Path] = _resolve_base_model,
        slots: int | None = None,
    ):
        self.workspace = workspace
        self._post = post
        self._client = client
        self._process = process
        self._resolve_base_model = resolve_base_model
        self.slots = (1 if inference_available() else 0) if slots is None else slots
        self._loop: asyncio.AbstractEventLoop | None = None
        self._active: set[str] = set()  # request ids being served here
        self._buffers: dict[str, tuple[list[str], int]] = {}  # request id → (texts, tokens) not yet sent
        self._flush_scheduled = False
        # What the child most likely keeps loaded (it evicts the least recently used the same way).
        self._recent: OrderedDict[str, None] = OrderedDict()
        self._tasks: set[asyncio.Task] = set()

    @property
    def loaded_models(self) -> tuple[str, ...]:
        return tuple(self._recent)

    def handle(self, request: protocol.InferenceRequest) -> None:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        if self.slots == 0:
            self._fail(request.request_id, "unavailable", "this node does not serve inference")
            return
        if request.request_id in self._active:
            return  # the same request again
        self._active.add(request.request_id)
        task = asyncio.create_task(self._start(request), name=f"inference-{request.request_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def stop(self, request_id: str) -> None:
        if request_id in self._active and self._process is not None:
            self._process.stop(request_id)

    def stop_all(self) -> None:
        for request_id in list(self._active):
            self.stop(request_id)

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._process is not None:
            self._process.close()

    def release(self) -> None:
        """End every request and the child, freeing the memory its models hold (a game wants the
        GPU); the next request starts a fresh child. Blocks while the child exits: call it in a thread."""
        self.stop_all()
        process, self._process = self._process, None
        self._recent.clear()
        if process is not None:
            process.close()

    # ---- a request

    async def _start(self, request: protocol.InferenceRequest) -> None:
        from engine.inference import GenerationRequest

        try:
            model = await asyncio.to_thread(self._resolve_base_model, request.model)
            adapter = await self._adapter(request) if request.adapter_sha256 else None
        except (SwarmError, OSError, ValueError) as error:
            self._fail(
                request.request_id, "unavailable", f"could not fetch the model: {describe_error(error)}"
            )
            return
        key = protocol.model_key(request.model, request.adapter_sha256)
        self._recent[key] = None
        self._recent.move_to_end(key)
        while len(self._recent) > self._process_handle().options.max_models:
            self._recent.popitem(last=False)
        generation = GenerationRequest(
            request_id=request.request_id,
            model=str(model),
            adapter=str(adapter) if adapter else None,
            messages=request.messages,
            prompt=request.prompt,
            sampling=request.sampling,
        )
        loop = asyncio.get_running_loop()
        try:
            self._process_handle().submit(
                generation, lambda event: loop.call_soon_threadsafe(self._on_event, event)
            )
        except (RuntimeError, ValueError, OSError) as error:
            self._fail(
                request.request_id, "unavailable", f"could not start generating: {describe_error(error)}"
            )

    async def _adapter(self, request: protocol.InferenceRequest) -> Path:
        sha256 = request.adapter_sha256
        assert sha256 is not None
        client = self._client()
        if client is None:
            raise OSError("not registered with the coordinator yet")
        return await asyncio.to_thread(
            self.workspace.fetch_artifact, sha256, client.download_artifact, [sha256]
        )

    def _process_handle(self) -> Any:
        if self._process is None:
            from engine.inference_server import InferenceProcess

            self._process = InferenceProcess(log_directory=self.workspace.data_dir / "logs")
        return self._process

    # ---- the child's events, on the event loop

    def _on_event(self, event: Any) -> None:
        from engine.inference import GenerationDone, TextDelta

        request_id = event.request_id
        if isinstance(event, TextDelta):
            texts, tokens = self._buffers.get(request_id, ([], 0))
            texts.append(event.text)
            self._buffers[request_id] = (texts, tokens + event.tokens)
            # Everything generated while the loop was busy leaves in one message, so a fast GPU
            # sends fewer, larger frames instead of one per token.
            if not self._flush_scheduled:
                self._flush_scheduled = True
                asyncio.get_running_loop().call_soon(self._flush)
            return
        self._flush()
        self._active.discard(request_id)
        if isinstance(event, GenerationDone):
            self._post(
                protocol.InferenceDone(
                    request_id=request_id,
                    finish_reason=event.finish_reason,
                    prompt_tokens=event.prompt_tokens,
                    completion_tokens=event.completion_tokens,
                )
            )
        else:
            if "process ended" in event.message:
                self._recent.clear()  # a new child starts with nothing loaded
            self._fail(request_id, event.kind, event.message)

    def _flush(self) -> None:
        self._flush_scheduled = False
        buffers, self._buffers = self._buffers, {}
        for request_id, (texts, tokens) in buffers.items():
            text = "".join(texts)
            limit = protocol.MAX_DELTA_CHARACTERS
            pieces = [text[start : start + limit] for start in range(0, len(text), limit)] or [""]
            for number, piece in enumerate(pieces):
                self._post(
                    protocol.InferenceDelta(
                        request_id=request_id, text=piece, tokens=tokens if number == len(pieces) - 1 else 0
                    )
                )

    def _fail(self, request_id: str, kind: str, message: str) -> None:
        self._active.discard(request_id)
        logger.warning("inference request %s failed (%s): %s", request_id, kind, message)
        self._post(protocol.InferenceFailed(request_id=request_id, kind=kind, message=message[:4000]))
