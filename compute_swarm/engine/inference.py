"""Text generation with llama-cpp-python: models kept loaded between requests, streamed deltas, token
counts, and batch inference jobs (a JSONL of prompts in, a JSONL of completions out).

A request names local files (a base .gguf and optionally a llama.cpp LoRA adapter .gguf); the node
agent resolves catalogue names and artifacts to those files before asking. Greedy decoding
(temperature 0) is reproducible on one machine: every request starts from an empty context.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from compute_swarm.engine.artifacts import COMPLETIONS_FILE
from compute_swarm.engine.jobs import (
    ChatMessage,
    InferenceJobSpec,
    InvalidJobError,
    Sampling,
    parse_prompt_line,
)
from compute_swarm.engine.memory import DEFAULT_CONTEXT_TOKENS, USABLE_PERCENT, format_bytes
from compute_swarm.engine.offload import (
    GPU_RUNTIME_BYTES,
    Footprint,
    GgufLayout,
    Offload,
    make_room,
    plan_offload,
)
from compute_swarm.engine.records import Completed, Log, Progress, Record, Started

if TYPE_CHECKING:
    from llama_cpp import Llama

logger = logging.getLogger(__name__)

DEFAULT_MAX_LOADED_MODELS = 2


class _Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class GenerationRequest(_Message):
    """One chat (messages) or one text to continue (prompt), with local model files."""

    request_id: str = Field(min_length=1, max_length=64)
    model: str  # a base model .gguf on this machine
    adapter: str | None = None  # a llama.cpp LoRA adapter .gguf on this machine
    messages: tuple[ChatMessage, ...] | None = None
    prompt: str | None = None
    sampling: Sampling = Sampling()


class TextDelta(_Message):
    type: Literal["delta"] = "delta"
    request_id: str
    text: str
    tokens: int  # tokens generated since the previous delta


FinishReason = Literal["stop", "length"]


class GenerationDone(_Message):
    type: Literal["done"] = "done"
    request_id: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    offload: Offload | None = None  # where the model that answered has its layers


class GenerationFailed(_Message):
    type: Literal["failed"] = "failed"
    request_id: str
    # invalid: the request cannot be served as asked (too long for the context, a broken adapter);
    # unavailable: this machine cannot serve it now (the model does not load here); crashed: the process
    # serving it died while it was being served (a native crash, an out-of-memory kill); error: anything else.
    kind: Literal["invalid", "unavailable", "crashed", "error"]
    message: str


GenerationEvent = Annotated[TextDelta | GenerationDone | GenerationFailed, Field(discriminator="type")]
generation_event_adapter: TypeAdapter[GenerationEvent] = TypeAdapter(GenerationEvent)


class GenerationError(Exception):
    def __init__(self, kind: Literal["invalid", "unavailable", "error"], message: str):
        super().__init__(message)
        self.kind = kind


def gpu_offload_available() -> bool:
    """Whether this llama.cpp build can put layers on a GPU (CUDA, ROCm, Metal, Vulkan)."""
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


def default_threads() -> int:
    # llama.cpp runs fastest with one thread per physical core; hyperthreads only contend.
    try:
        import psutil

        return max(1, psutil.cpu_count(logical=False) or os.cpu_count() or 1)
    except ImportError:
        return max(1, os.cpu_count() or 1)


def free_memory_bytes(on_gpu: bool) -> int:
    """Memory free now where llama.cpp puts a model: the roomiest GPU's when it offloads, else RAM.

    RAM counts what the kernel could give without taking this process's own pages: the available
    figure (MemAvailable) counts page cache as free, and a loaded model's weights are page cache (it
    is mmapped); a new model planned on them would push the loaded one's weights out to be read
    back from disk at every token. On Linux this process's file-backed resident pages are taken off.
    """
    from compute_swarm.engine import devices

    inventory = devices.probe(check_torch=False)
    if on_gpu:
        free = [gpu.memory_free_bytes for gpu in inventory.gpus if gpu.memory_free_bytes is not None]
        if free:
            return max(free)
    available = inventory.cpu.memory_available_bytes
    try:
        import psutil

        # Linux's "shared" is RssFile + RssShmem; other systems have no such field.
        available -= getattr(psutil.Process().memory_info(), "shared", 0)
    except ImportError:
        pass
    return max(0, available)


@dataclass(frozen=True)
class MemoryInUse:
    ram_bytes: int  # this process's resident set
    gpu_bytes: int  # used on all GPUs together, by every process; 0 where no GPU reports it


def memory_in_use(on_gpu: bool) -> MemoryInUse:
    """What this process holds in RAM and, when `on_gpu`, what the GPUs hold (NVML, amdsmi). Apple's
    GPUs share RAM and report no use of their own: their models count in RAM only."""
    import psutil

    from compute_swarm.engine import devices

    gpu_bytes = 0
    if on_gpu:
        gpu_bytes = sum(
            gpu.memory_total_bytes - gpu.memory_free_bytes
            for gpu in devices.probe(check_torch=False).gpus
            if gpu.vendor != "apple"
            and gpu.memory_total_bytes is not None
            and gpu.memory_free_bytes is not None
        )
    return MemoryInUse(ram_bytes=psutil.Process().memory_info().rss, gpu_bytes=gpu_bytes)


ModelKey = tuple[str, str | None]  # (base model file, adapter file)


@dataclass
class _Loaded:
    llm: Llama
    offload: Offload
    footprint: Footprint


class ModelPool:
    """Loaded models, keyed by (base file, adapter file), least recently used evicted first: when
    there are max_models of them, and when the next one would not fit the memory free.

    Where llama.cpp can offload, a model gets as many layers on the GPU as fit the roomiest GPU's
    free memory (engine.offload.plan_offload), the rest on the CPU; an owner's `gpu_layers` wins.
    After each load the pool measures what the model holds (RSS growth, and the GPUs' used memory
    where it offloads) and counts evicting a model as giving that back; a model loaded before in
    this process is planned with what it was measured to hold rather than the estimate.

    llama.cpp applies a LoRA adapter when the model loads, so a fine-tuned model is its own entry.
    A Llama object is not safe to use from two threads: callers serialize generation (the inference
    server answers one request at a time).
    """

    def __init__(
        self,
        *,
        max_models: int = DEFAULT_MAX_LOADED_MODELS,
        context_tokens: int = DEFAULT_CONTEXT_TOKENS,
        gpu_layers: int | None = None,
        threads: int | None = None,
        free_memory: Callable[[bool], int] = free_memory_bytes,
        measure: Callable[[bool], MemoryInUse] = memory_in_use,
        gpu_offload: Callable[[], bool] = gpu_offload_available,
    ):
        self.max_models = max(1, max_models)
        self.context_tokens = context_tokens
        self._gpu_layers = gpu_layers  # None: as many as fit
        self.threads = threads or default_threads()
        self._free_memory = free_memory
        self._measure = measure
        self._gpu_offload = gpu_offload
        self._offload_possible: bool | None = None
        self._models: OrderedDict[ModelKey, _Loaded] = OrderedDict()
        # What each model held when last loaded (and grew to while serving), kept after eviction.
        self._footprints: dict[ModelKey, Footprint] = {}
        # Parsed GGUF headers by file, size and modification time: gguf's reader takes seconds on a
        # large vocabulary, and a model is planned again at every load.
        self._layouts: dict[tuple, GgufLayout] = {}
        self._gpu_runtime_started = False
        self._resident_mark = 0  # RSS after the last load, eviction or generation

    @property
    def loaded(self) -> list[ModelKey]:
        return list(self._models)

    @property
    def offload_possible(self) -> bool:
        if self._offload_possible is None:
            self._offload_possible = self._gpu_offload()
        return self._offload_possible

    def offload(self, model: str, adapter: str | None = None) -> Offload | None:
        """The offload a loaded model was loaded with; None when it is not loaded."""
        entry = self._models.get(_key(model, adapter))
        return entry.offload if entry is not None else None

    def footprint(self, model: str, adapter: str | None = None) -> Footprint | None:
        """What the model was measured to hold, loaded now or earlier in this process."""
        entry = self._models.get(_key(model, adapter))
        return entry.footprint if entry is not None else self._footprints.get(_key(model, adapter))

    def get(self, model: str, adapter: str | None = None) -> Llama:
        key = _key(model, adapter)
        entry = self._models.get(key)
        if entry is not None:
            self._models.move_to_end(key)
            return entry.llm
        for path, what in ((model, "model"), (adapter, "adapter")):
            if path is not None and not Path(path).is_file():
                raise GenerationError("unavailable", f"the {what} file {path} is not on this machine")
        while len(self._models) >= self.max_models:
            self._evict_oldest()
        offload = self._make_room(key)
        entry = self._load(key, offload)
        self._models[key] = entry
        return entry.llm

    def settle(self, model: str, adapter: str | None = None) -> None:
        """After a generation: what RAM the process grew by since the last mark belongs to the model
        that generated (llama.cpp's compute buffers and the KV cache become resident as they are
        first written, mmapped weights as they are first read)."""
        key = _key(model, adapter)
        entry = self._models.get(key)
        if entry is None:
            return
        resident = self._measure(False).ram_bytes
        if resident > self._resident_mark:
            grown = resident - self._resident_mark
            entry.footprint = replace(entry.footprint, ram_bytes=entry.footprint.ram_bytes + grown)
            self._footprints[key] = entry.footprint
            self._resident_mark = resident

    def _evict_oldest(self) -> None:
        (model, adapter), evicted = self._models.popitem(last=False)
        evicted.llm.close()
        self._resident_mark = self._measure(False).ram_bytes
        logger.info(
            "unloaded %s%s", Path(model).name, f" with adapter {Path(adapter).name}" if adapter else ""
        )

    def _make_room(self, key: ModelKey) -> Offload:
        """Evict what must go for the model to fit and say how to load it. Measured footprints are
        lower bounds of what evicting gives back (a model keeps growing into its buffers while it
        serves): when they say it cannot fit, every model goes and the free memory is read again."""
        from compute_swarm.engine.resources import ResourceError, read_gguf_layout

        model, adapter = key
        try:
            version = tuple((os.stat(path).st_size, os.stat(path).st_mtime_ns) for path in key if path)
            layout = self._layouts.get((key, version))
            if layout is None:
                layout = self._layouts[(key, version)] = read_gguf_layout(model, adapter)
        except (ResourceError, OSError) as error:
            raise GenerationError("unavailable", f"could not read {Path(model).name}: {error}") from None
        on_gpu = self.offload_possible
        gpu_layers = self._gpu_layers if on_gpu else 0
        reserve = 0 if self._gpu_runtime_started or not on_gpu else GPU_RUNTIME_BYTES

        def decide(loaded: list[Footprint]):
            free_ram = self._free_memory(False)
            free_gpu = self._free_memory(True) if on_gpu else None
            room = make_room(
                layout,
                context_tokens=self.context_tokens,
                free_ram_bytes=free_ram,
                free_gpu_bytes=free_gpu,
                loaded=loaded,
                known=self._footprints.get(key),
                reserve_bytes=reserve,
                gpu_layers=gpu_layers,
            )
            return room, free_ram, free_gpu

        room, free_ram, free_gpu = decide([entry.footprint for entry in self._models.values()])
        if room is None and self._models:
            while self._models:
                self._evict_oldest()
            room, free_ram, free_gpu = decide([])
        if room is None:
            plan = plan_offload(
                layout,
                free_gpu_bytes=free_gpu or 0,
                context_tokens=self.context_tokens,
                reserve_bytes=reserve,
                gpu_layers=gpu_layers,
            )
            where = f"{format_bytes(free_ram)} of RAM"
            if free_gpu is not None:
                where += f" and {format_bytes(free_gpu)} of GPU memory"
            raise GenerationError(
                "unavailable",
                f"{Path(model).name} needs about {format_bytes(plan.ram_bytes)} of RAM"
                + (f" and {format_bytes(plan.gpu_bytes)} of GPU memory" if plan.gpu_bytes else "")
                + f" ({plan.offload.describe()}) and {where} is free here "
                f"({USABLE_PERCENT}% of it usable)",
            )
        for _ in range(room.evict):
            self._evict_oldest()
        return room.plan.offload

    def _load(self, key: ModelKey, offload: Offload) -> _Loaded:
        from llama_cpp import Llama

        model, adapter = key
        on_gpu = offload.gpu_layers > 0
        before = self._measure(on_gpu)
        started = time.monotonic()
        try:
            llm = Llama(
                model_path=model,
                lora_path=adapter,
                n_ctx=self.context_tokens,
                n_gpu_layers=offload.gpu_layers,
                n_threads=self.threads,
                verbose=False,
            )
            # One token through every layer: the weights llama.cpp reads through its memory map
            # become resident, so they are in what is measured below.
            token = llm.token_bos()
            llm.eval([token if token >= 0 else 0])
            llm.reset()
        except (ValueError, RuntimeError) as error:
            kind = "invalid" if adapter else "unavailable"
            raise GenerationError(kind, f"could not load {Path(model).name}: {error}") from None
        after = self._measure(on_gpu)
        # RSS counts the weights' mmapped pages as well as llama.cpp's own buffers (KV cache, compute
        # buffers): unmapped on eviction, the pages stay in the page cache, which free_memory_bytes
        # does not count against this process any more, so evicting gives back about all of it. The
        # GPU figure is the devices' whole used memory, so another program's use in the meantime
        # counts too; the first load with GPU layers also holds the GPU runtime (GPU_RUNTIME_BYTES),
        # which stays after its model goes.
        footprint = Footprint(
            gpu_layers=offload.gpu_layers,
            ram_bytes=max(0, after.ram_bytes - before.ram_bytes),
            gpu_bytes=max(0, after.gpu_bytes - before.gpu_bytes),
        )
        self._footprints[key] = footprint
        self._resident_mark = after.ram_bytes
        self._gpu_runtime_started |= on_gpu
        logger.info(
            "loaded %s%s in %.1f s (%s); it holds %s in RAM%s",
            Path(model).name,
            f" with adapter {Path(adapter).name}" if adapter else "",
            time.monotonic() - started,
            offload.describe(),
            format_bytes(footprint.ram_bytes),
            f" and {format_bytes(footprint.gpu_bytes)} on the GPU" if on_gpu else "",
        )
        return _Loaded(llm, offload, footprint)

    def close(self) -> None:
        while self._models:
            _, entry = self._models.popitem()
            entry.llm.close()


def _key(model: str, adapter: str | None) -> ModelKey:
    return (str(model), str(adapter) if adapter else None)


class _TokenCounter:
    """A logits processor that only counts: llama.cpp calls it once per generated token, with the
    whole context so far, so it also learns the prompt's length."""

    def __init__(self) -> None:
        self.prompt_tokens: int | None = None
        self.generated = 0

    def __call__(self, input_ids, scores):
        if self.prompt_tokens is None:
            self.prompt_tokens = len(input_ids)
        self.generated += 1
        return scores


def generate(
    pool: ModelPool, request: GenerationRequest, *, should_stop: Callable[[], bool] = lambda: False
) -> Iterator[TextDelta | GenerationDone]:
    """Stream a request's text as deltas, then one GenerationDone; raises GenerationError."""
    from llama_cpp import LogitsProcessorList

    if (request.messages is None) == (request.prompt is None):
        raise GenerationError("invalid", "give exactly one of messages and prompt")
    llm = pool.get(request.model, request.adapter)
    llm.reset()  # no state from an earlier request: greedy answers repeat exactly
    sampling = request.sampling
    counter = _TokenCounter()
    options = dict(
        max_tokens=sampling.max_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        seed=sampling.seed,
        stop=list(sampling.stop) or None,
        stream=True,
        logits_processor=LogitsProcessorList([counter]),
    )
    try:
        if request.messages is not None:
            chunks = llm.create_chat_completion(
                messages=[message.model_dump() for message in request.messages], **options
            )
        else:
            chunks = llm.create_completion(request.prompt, **options)
        finish_reason: FinishReason = "stop"
        reported = 0
        for chunk in chunks:
            choice = chunk["choices"][0]
            text = choice["delta"].get("content") or "" if "delta" in choice else choice.get("text") or ""
            if text:
                yield TextDelta(request_id=request.request_id, text=text, tokens=counter.generated - reported)
                reported = counter.generated
            if choice.get("finish_reason"):
                finish_reason = "length" if choice["finish_reason"] == "length" else "stop"
            if should_stop():
                break
    except ValueError as error:  # llama-cpp-python's word for a prompt longer than the context
        raise GenerationError("invalid", str(error)) from None
    prompt_tokens = counter.prompt_tokens
    if prompt_tokens is None:  # nothing was generated: count the prompt the model was given
        prompt_tokens = llm.n_tokens
    pool.settle(request.model, request.adapter)
    yield GenerationDone(
        request_id=request.request_id,
        finish_reason=finish_reason,
        prompt_tokens=prompt_tokens,
        completion_tokens=counter.generated,
        offload=pool.offload(request.model, request.adapter),
    )


def coalesce(
    events: Iterator[TextDelta | GenerationDone],
    interval_seconds: float,
    *,
    clock: Callable[[], float] = time.monotonic,
) -> Iterator[TextDelta | GenerationDone]:
    """The same text in fewer deltas: the first at once (time to first token), then what was generated
    in each `interval_seconds`, the rest just before the end. Every delta downstream costs a pipe line,
    a websocket frame and a server-sent event; on a machine whose cores also generate, fewer of them
    leave more time to generating."""
    texts: list[str] = []
    tokens = 0
    sent_at: float | None = None
    for event in events:
        if isinstance(event, TextDelta):
            texts.append(event.text)
            tokens += event.tokens
            now = clock()
            if sent_at is None or now - sent_at >= interval_seconds:
                yield TextDelta(request_id=event.request_id, text="".join(texts), tokens=tokens)
                texts, tokens, sent_at = [], 0, now
            continue
        if texts:
            yield TextDelta(request_id=event.request_id, text="".join(texts), tokens=tokens)
        yield event


def complete(pool: ModelPool, request: GenerationRequest) -> tuple[str, GenerationDone]:
    """The whole text of a request and its counts."""
    parts: list[str] = []
    done: GenerationDone | None = None
    for event in generate(pool, request):
        if isinstance(event, TextDelta):
            parts.append(event.text)
        else:
            done = event
    assert done is not None
    return "".join(parts), done


# ---- batch inference jobs


def run_batch(
    spec: InferenceJobSpec,
    output_dir: str | Path,
    *,
    pool: ModelPool,
    report: Callable[[Record], None] = lambda record: None,
    should_stop: Callable[[], bool] = lambda: False,
) -> Completed:
    """Answer every line of spec.dataset into output_dir/completions.jsonl, in order.

    spec.base_model and spec.adapter are local .gguf files here (the caller resolved them). A stop
    request ends the job with InterruptedError; it is short enough to start again from the top.
    """
    from compute_swarm.engine import datasets

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    lines = datasets.read_jsonl(spec.dataset, parse_prompt_line)
    try:
        pool.get(spec.base_model, spec.adapter)  # loaded before the clock starts: tokens/s is generating
    except GenerationError as error:
        if error.kind == "invalid":
            raise InvalidJobError(str(error)) from None
        raise
    offload = pool.offload(spec.base_model, spec.adapter)
    assert offload is not None
    started_at = time.monotonic()
    report(
        Started(
            process_id=os.getpid(),
            device="gpu" if offload.gpu_layers else "cpu",
            total_steps=len(lines),
            train_examples=len(lines),
            eval_examples=0,
        )
    )
    report(Log(level="info", message=f"{Path(spec.base_model).name}: {offload.describe()}"))
    generated = 0
    scratch = output_dir / (COMPLETIONS_FILE + ".partial")
    with open(scratch, "w", encoding="utf-8") as output:
        for number, line in enumerate(lines, start=1):
            if should_stop():
                raise InterruptedError(f"stopped after {number - 1} of {len(lines)} prompts")
            request = GenerationRequest(
                request_id=f"line-{number}",
                model=spec.base_model,
                adapter=spec.adapter,
                messages=line.messages,
                prompt=line.prompt,
                # Each line gets its own seed, so sampled answers do not depend on the batch's order.
                sampling=spec.sampling.model_copy(update={"seed": (spec.sampling.seed + number) % 2**32}),
            )
            try:
                text, done = complete(pool, request)
            except GenerationError as error:
                if error.kind == "invalid":
                    raise InvalidJobError(f"line {number}: {error}") from None
                raise
            generated += done.completion_tokens
            answer = {
                "line": number,
                **({"id": line.id} if line.id is not None else {}),
                ("message" if line.messages is not None else "text"): (
                    {"role": "assistant", "content": text} if line.messages is not None else text
                ),
                "finish_reason": done.finish_reason,
                "prompt_tokens": done.prompt_tokens,
                "completion_tokens": done.completion_tokens,
            }
            output.write(json.dumps(answer, ensure_ascii=False) + "\n")
            elapsed = time.monotonic() - started_at
            report(
                Progress(
                    step=number,
                    total_steps=len(lines),
                    loss=float("nan"),
                    learning_rate=0.0,
                    tokens_per_second=generated / elapsed if elapsed > 0 else 0.0,
                    elapsed_seconds=elapsed,
                    eta_seconds=elapsed / number * (len(lines) - number),
                )
            )
    os.replace(scratch, output_dir / COMPLETIONS_FILE)
    return Completed(
        output_dir=str(output_dir),
        steps=len(lines),
        final_loss=None,
        eval_loss=None,
        train_tokens=generated,
        seconds=time.monotonic() - started_at,
        offload=offload,
    )
