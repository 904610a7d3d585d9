"""Inference on this node: requests from the coordinator go to engine.inference_server's child process,
and the text it generates goes back as InferenceDelta messages, then one InferenceDone or
InferenceFailed. desktop.agent owns one `InferenceServing` and feeds it the coordinator's messages.

A model that crashes the child (a llama.cpp built for another CPU, a native bug) is not served again
until a fresh child has served it: requests for it are refused at once, the agent reports it in its
heartbeats, and a probe (a one-token generation) tries it again with back-off (desktop.crashes).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from compute_swarm import protocol
from compute_swarm.desktop import crashes, model_files
from compute_swarm.desktop.crashes import ModelCrash, ProbeBackoff
from compute_swarm.desktop.failures import describe_error
from compute_swarm.desktop.workspace import Workspace
from compute_swarm.sdk.client import SwarmError

logger = logging.getLogger(__name__)

# A probe loads the model and generates one token; more than this, and the child is stuck.
PROBE_TIMEOUT_SECONDS = 300.0
PROBE_PROMPT = "Hello"


def inference_available() -> bool:
    """Whether llama-cpp-python is installed here (the node extra installs it)."""
    return importlib.util.find_spec("llama_cpp") is not None


class InferenceServing:
    """Runs on the agent's event loop; the child's events arrive on a reader thread and are handed over."""

    def __init__(
        self,
        workspace: Workspace,
        post: Callable[[protocol.NodeMessage], None],
        *,
        client: Callable[[], Any],  # the agent's current NodeClient (for adapter downloads)
        process: Any = None,  # an engine.inference_server.InferenceProcess; made on first use
        # (model name, its GGUF or None for one already here) → the GGUF's path on this machine.
        resolve_base_model: Callable[[str, protocol.ModelFile | None], Path] | None = None,
        slots: int | None = None,
        # Called when the models this node advertises change (a crash, a model serving again): the
        # agent tells the coordinator at once instead of at its next heartbeat.
        advertisement_changed: Callable[[], None] = lambda: None,
        may_probe: Callable[[], bool] = lambda: True,  # False while paused: a game wants the GPU
        probe_backoff: ProbeBackoff | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.workspace = workspace
        self._post = post
        self._client = client
        self._process = process
        self._resolve_base_model = resolve_base_model or self._base_model_file
        self.slots = (1 if inference_available() else 0) if slots is None else slots
        self._advertisement_changed = advertisement_changed
        self._may_probe = may_probe
        self._probe_backoff = probe_backoff or ProbeBackoff()
        self._clock = clock
        self._loop: asyncio.AbstractEventLoop | None = None
        self._active: set[str] = set()  # request ids being served here
        self._serving_keys: dict[str, str] = {}  # request id → its model key (protocol.model_key)
        self._crashes: dict[str, ModelCrash] = {}  # model key → its crash, until a probe serves it
        self._probe_wanted = asyncio.Event()  # a crash was recorded: the prober looks again
        self._prober: asyncio.Task | None = None
        self._buffers: dict[str, tuple[list[str], int]] = {}  # request id → (texts, tokens) not yet sent
        self._flush_scheduled = False
        # What the child most likely keeps loaded (it evicts the least recently used the same way).
        self._recent: OrderedDict[str, None] = OrderedDict()
        self._tasks: set[asyncio.Task] = set()

    @property
    def loaded_models(self) -> tuple[str, ...]:
        return tuple(key for key in self._recent if protocol.crash_covering(self._crashes, key) is None)

    @property
    def crashed_models(self) -> tuple[protocol.CrashedModel, ...]:
        """What the heartbeats report: the models not served here until a probe serves them."""
        # Past the wire's bound, the ones probed last are left out (they are still refused here).
        soonest = sorted(self._crashes.items(), key=lambda item: item[1].next_probe_at)
        return tuple(
            protocol.CrashedModel(model=key, message=crash.message[: protocol.MAX_CRASH_REPORT_CHARACTERS])
            for key, crash in soonest[: protocol.MAX_CRASHED_MODELS]
        )

    def handle(self, request: protocol.InferenceRequest) -> None:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        if self.slots == 0:
            self._fail(request.request_id, "unavailable", "this node does not serve inference")
            return
        if request.request_id in self._active:
            return  # the same request again
        key = protocol.model_key(request.model, request.adapter_sha256)
        crash = protocol.crash_covering(self._crashes, key)
        if crash is not None:
            # Refused without a child: starting one would crash it again, and the coordinator, told
            # of the crash, routes the model elsewhere (this request reached us before it knew).
            self._fail(request.request_id, "crashed", crash.message)
            return
        self._active.add(request.request_id)
        self._serving_keys[request.request_id] = key
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
        """Cancel what runs on the loop and end the child; may be called from another thread."""
        tasks = [*self._tasks, *([self._prober] if self._prober is not None else [])]
        loop = self._loop
        for task in tasks:
            if loop is None or loop.is_closed() or _running_loop() is loop:
                task.cancel()
            else:
                loop.call_soon_threadsafe(task.cancel)
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

    def _base_model_file(self, name: str, file: protocol.ModelFile | None) -> Path:
        """Thread: the model's GGUF, fetched from the coordinator (or its peers) when it is not here;
        a probe (no file named) uses the copy already here."""
        if file is None:
            cached = model_files.cached_gguf(name)
            if cached is None:
                raise OSError(f"model {name} is not on this node")
            return cached
        files = protocol.ModelFiles(name=name, gguf=file)
        client = self._client()
        return model_files.fetch_model(
            files,
            lambda sha256, destination, size: self.workspace.download(client, sha256, destination, size),
            with_weights=False,
        ).gguf

    # ---- a request

    async def _start(self, request: protocol.InferenceRequest) -> None:
        from compute_swarm.engine.inference import GenerationRequest

        try:
            model = await asyncio.to_thread(self._resolve_base_model, request.model, request.model_file)
            adapter = (
                # adapter_size 0: the coordinator has no record of the file's size.
                await self._adapter(request.adapter_sha256, request.adapter_size or None)
                if request.adapter_sha256
                else None
            )
        except (SwarmError, OSError, ValueError) as error:
            self._fail(
                request.request_id, "unavailable", f"could not fetch the model: {describe_error(error)}"
            )
            return
        key = protocol.model_key(request.model, request.adapter_sha256)
        self._remember_loaded(key)
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

    def _remember_loaded(self, key: str) -> None:
        self._recent[key] = None
        self._recent.move_to_end(key)
        while len(self._recent) > self._process_handle().options.max_models:
            self._recent.popitem(last=False)

    async def _adapter(self, sha256: str, size: int | None) -> Path:
        """The request's adapter, downloaded (no more than the `size` the request states) when it is
        not cached."""
        client = self._client()
        if client is None:
            raise OSError("not registered with the coordinator yet")

        def download(digest: str, destination: Path) -> Path:
            return self.workspace.download(client, digest, destination, size)

        return await asyncio.to_thread(self.workspace.fetch_artifact, sha256, download, [sha256])

    def _process_handle(self) -> Any:
        if self._process is None:
            from compute_swarm.engine.inference_server import InferenceProcess

            self._process = InferenceProcess(log_directory=self.workspace.data_dir / "logs")
        return self._process

    # ---- the child's events, on the event loop

    def _on_event(self, event: Any) -> None:
        from compute_swarm.engine.inference import GenerationDone, TextDelta

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
        key = self._serving_keys.pop(request_id, None)
        if isinstance(event, GenerationDone):
            self._post(
                protocol.InferenceDone(
                    request_id=request_id,
                    finish_reason=event.finish_reason,
                    prompt_tokens=event.prompt_tokens,
                    completion_tokens=event.completion_tokens,
                    offload=event.offload,
                )
            )
        elif event.kind == "crashed" and key is not None:
            message = _crash_message(event.message, key)
            self._recent.clear()  # a new child starts with nothing loaded
            self._crash_recorded(key, message)
            self._fail(request_id, "crashed", message)
            self._advertisement_changed()
        else:
            self._fail(request_id, event.kind, event.message)

    # ---- crashed models: refused, reported, and probed until a fresh child serves them

    def _crash_recorded(self, key: str, message: str) -> None:
        crash = crashes.after_crash(self._crashes.get(key), message, self._clock(), self._probe_backoff)
        self._crashes[key] = crash
        logger.error(
            "%s; not serving it until a fresh llama.cpp process does (next try in %.0f s)",
            message,
            crash.next_probe_at - self._clock(),
        )
        self._probe_wanted.set()
        if self._prober is None or self._prober.done():
            self._prober = asyncio.create_task(self._probe_crashed_models(), name="inference-prober")

    async def _probe_crashed_models(self) -> None:
        while self._crashes:
            wait = crashes.seconds_until_probe(self._crashes, self._clock())
            if wait:
                self._probe_wanted.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._probe_wanted.wait(), wait)
                continue
            for key in crashes.due_probes(self._crashes, self._clock()):
                if key not in self._crashes:
                    continue
                if not self._may_probe():
                    self._crashes[key] = crashes.put_off(
                        self._crashes[key], self._clock(), self._probe_backoff
                    )
                    continue
                await self._probe(key)

    async def _probe(self, key: str) -> None:
        """Generate one token of the model in a fresh child (the crash ended the last one); it serves
        again if that works."""
        from compute_swarm.engine.inference import GenerationRequest, TextDelta
        from compute_swarm.engine.jobs import Sampling

        model_name, _, adapter_sha256 = key.partition("+")
        request_id = f"probe-{secrets.token_hex(6)}"
        loop = asyncio.get_running_loop()
        ended: asyncio.Future = loop.create_future()

        def on_event(event: Any) -> None:
            if not isinstance(event, TextDelta):
                loop.call_soon_threadsafe(lambda: ended.done() or ended.set_result(event))

        event: Any = None
        try:
            model = await asyncio.to_thread(self._resolve_base_model, model_name, None)
            adapter = await self._adapter(adapter_sha256) if adapter_sha256 else None
            self._process_handle().submit(
                GenerationRequest(
                    request_id=request_id,
                    model=str(model),
                    adapter=str(adapter) if adapter else None,
                    prompt=PROBE_PROMPT,
                    sampling=Sampling(max_tokens=1, temperature=0.0),
                ),
                on_event,
            )
            event = await asyncio.wait_for(ended, PROBE_TIMEOUT_SECONDS)
        except TimeoutError:
            if self._process is not None:
                self._process.stop(request_id)
            logger.warning("the probe of %s did not end in %.0f s", key, PROBE_TIMEOUT_SECONDS)
        except (SwarmError, OSError, ValueError, RuntimeError) as error:
            logger.warning("could not probe %s: %s", key, describe_error(error))
        if key not in self._crashes:
            return
        now = self._clock()
        if event is not None and event.type == "done":
            del self._crashes[key]
            self._remember_loaded(key)  # the probe left it loaded
            logger.info("%s serves again: a fresh llama.cpp process generated with it", key)
            self._advertisement_changed()
        elif event is not None and event.kind == "crashed":
            self._recent.clear()
            message = _crash_message(event.message, key)
            self._crashes[key] = crashes.after_crash(self._crashes[key], message, now, self._probe_backoff)
            logger.error("the probe crashed too: %s", message)
        else:
            self._crashes[key] = crashes.after_failed_probe(self._crashes[key], now, self._probe_backoff)

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
        self._serving_keys.pop(request_id, None)
        logger.warning("inference request %s failed (%s): %s", request_id, kind, message)
        self._post(protocol.InferenceFailed(request_id=request_id, kind=kind, message=message[:4000]))


def _crash_message(engine_message: str, key: str) -> str:
    """What the buyer is told: "the node's llama.cpp crashed (killed by SIGSEGV) while serving ..."."""
    model, _, adapter_sha256 = key.partition("+")
    what = f"{model} with adapter {adapter_sha256[:12]}" if adapter_sha256 else model
    return f"the node's {engine_message} while serving {what}"


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
