"""The scheduler: which queued job goes to which node, decided by a pure function over snapshots.

The lease loop builds QueuedJob and NodeSnapshot values from what it knows and calls plan(); nothing here
does I/O, so the rules are tested without sockets or a database.
"""

from __future__ import annotations

import functools
import heapq
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from compute_swarm.engine.jobs import CatalogueModel, LoraJobSpec
from compute_swarm.engine.memory import (
    ModelShape,
    base_quantization,
    catalogue_shape,
    estimate_inference,
    estimate_lora,
    free_bytes_needed,
)
from compute_swarm.protocol import Telemetry, crash_covering

ALL_BACKENDS: frozenset[str] = frozenset({"cuda", "rocm", "mps", "cpu"})
GPU_BACKENDS: frozenset[str] = frozenset({"cuda", "rocm", "mps"})
# The engine trains in bf16/fp16 on CUDA and ROCm, in fp32 on MPS and the CPU (engine.lora.choose_precision).
HALF_PRECISION_BACKENDS: frozenset[str] = frozenset({"cuda", "rocm"})


@dataclass(frozen=True)
class QueuedJob:
    job_id: str
    base_model: str
    # Free memory a node needs for this job (see required_memory_bytes): on every node, or only on
    # MPS and CPU nodes when required_memory_bytes_16bit is given.
    required_memory_bytes: int
    queued_at: float
    excluded_nodes: frozenset[str] = frozenset()  # nodes that already said it does not fit
    # Free memory a CUDA/ROCm node needs, which trains in 16 bits and so needs less; None: the above.
    required_memory_bytes_16bit: int | None = None
    # A batch inference job: only nodes that serve inference (llama.cpp installed) may take it.
    inference: bool = False
    # A verification re-run: only trusted nodes may take it.
    verification: bool = False
    # The size of its base model's file: a node without it fetches that much first.
    model_bytes: int = 0
    # The backends that can run it (lora_job_backends): a base quantized by bitsandbytes, without
    # the buyer's leave to fall back to 16 bits, runs only where bitsandbytes does.
    backends: frozenset[str] = ALL_BACKENDS


@dataclass(frozen=True)
class NodeSnapshot:
    node_id: str
    backends: tuple[str, ...]  # e.g. ("cuda", "cpu")
    memory_bytes: int  # free memory of its best training device (GPU VRAM, or RAM for cpu/mps)
    best_backend: str  # "cuda" | "rocm" | "mps" | "cpu"
    models: frozenset[str]  # catalogue models already on disk
    running_jobs: int
    capacity: int = 1
    accepting_jobs: bool = True
    # What its real transfers measured (protocol.NetworkReport); None: not measured yet.
    download_bytes_per_second: float | None = None

    @property
    def slow_link(self) -> bool:
        return (
            self.download_bytes_per_second is not None
            and self.download_bytes_per_second < SLOW_LINK_BYTES_PER_SECOND
        )


# A node whose measured downloads are slower than this (20 Mbit/s) is on a slow link, and a model of
# LARGE_MODEL_BYTES or more would take it ten minutes or longer to fetch: such a job goes to a node that
# holds its model or has a faster (or unmeasured) link, and to a slow one only when nothing else can
# take it.
SLOW_LINK_BYTES_PER_SECOND = 2.5e6
LARGE_MODEL_BYTES = 1.5e9


@dataclass(frozen=True)
class Assignment:
    job_id: str
    node_id: str


# ---- snapshots and estimates


def node_snapshot(
    node_id: str,
    telemetry: Telemetry,
    models: Iterable[str],
    running_jobs: int,
    accepting_jobs: bool,
    capacity: int = 1,
    download_bytes_per_second: float | None = None,
) -> NodeSnapshot:
    """A node as the scheduler sees it, from its latest telemetry.

    Its best device is the GPU with the most free memory among those whose backend the node reports as
    usable (Apple GPUs share the system's memory, so an MPS GPU counts cpu.memory_available_bytes), else
    the CPU with its available memory when "cpu" is usable. A CUDA/ROCm GPU that does not report free
    memory counts its total (the node's own check before starting catches the difference). A node with
    no usable device is snapshotted as not accepting jobs.
    """
    usable = set(telemetry.backends)
    best: tuple[int, int, str] | None = None  # (memory, -index, backend): max wins, lower index on ties
    for gpu in telemetry.gpus:
        if gpu.backend not in usable:
            continue
        if gpu.backend == "mps":
            memory = telemetry.cpu.memory_available_bytes
        elif gpu.memory_free_bytes is not None:
            memory = gpu.memory_free_bytes
        elif gpu.memory_total_bytes is not None:
            memory = gpu.memory_total_bytes
        else:
            continue
        candidate = (memory, -gpu.index, gpu.backend)
        if best is None or candidate[:2] > best[:2]:
            best = candidate
    if best is not None:
        memory_bytes, best_backend = best[0], best[2]
    elif "cpu" in usable:
        memory_bytes, best_backend = telemetry.cpu.memory_available_bytes, "cpu"
    else:
        memory_bytes, best_backend, accepting_jobs = 0, telemetry.backends[0], False
    return NodeSnapshot(
        node_id=node_id,
        backends=tuple(telemetry.backends),
        memory_bytes=memory_bytes,
        best_backend=best_backend,
        models=frozenset(models),
        running_jobs=running_jobs,
        capacity=capacity,
        accepting_jobs=accepting_jobs,
        download_bytes_per_second=download_bytes_per_second,
    )


# The backends whose needs a figure covers: QueuedJob.required_memory_bytes serves CPU and MPS nodes
# alike, so it takes the larger of the two; torch names ROCm GPUs "cuda" (device kind).
_BACKENDS_OF_FIGURE: dict[str, tuple[str, ...]] = {
    "cuda": ("cuda",),
    "rocm": ("rocm",),
    "mps": ("cpu", "mps"),
    "cpu": ("cpu", "mps"),
}
_DEVICE_KIND_OF_BACKEND = {"cuda": "cuda", "rocm": "cuda", "mps": "mps", "cpu": "cpu"}


def lora_job_backends(spec: LoraJobSpec) -> frozenset[str]:
    """The backends that can run this LoRA job: all, unless its base is quantized and the buyer does
    not allow the 16-bit fallback (then those bitsandbytes runs on: engine.memory.QUANTIZATION_BACKENDS)."""
    return backends_for_quantization(spec.quantization, spec.allow_16bit_fallback)


def backends_for_quantization(quantization: str, allow_16bit_fallback: bool) -> frozenset[str]:
    """lora_job_backends from the two spec fields that decide it (a queued job's stored spec)."""
    return frozenset(
        backend
        for backend in ALL_BACKENDS
        if base_quantization(quantization, allow_16bit_fallback, backend) is not None
    )


def required_memory_bytes(spec: LoraJobSpec, model: CatalogueModel, *, backend: str = "cpu") -> int:
    """Free memory a node needs on its training device for this LoRA job: engine.memory's estimate,
    the one the node checks before it starts (engine.lora.check_memory), from the catalogue's record
    of the model's shape, divided by the share of its free memory a node lets a job use
    (engine.memory.free_bytes_needed).

    The default, backend "cpu", gives the figure for fp32 training on the CPU and on MPS (the larger
    of the two: MPS allows 100 MiB more for its runtime), which also bounds 16-bit training on
    CUDA/ROCm; backend "cuda" or "rocm" gives the smaller 16-bit figure. For the demo job
    (SmolLM2-135M, batch 4 × 512 tokens) it says 8.9 GiB in fp32 and 5.6 GiB in 16 bits.

    A quantized base counts as the node will hold it (engine.memory.base_quantization): quantized
    where bitsandbytes runs, unquantized where the buyer allows that fallback; a backend that cannot
    run the job at all is left out of the figure (lora_job_backends keeps it off such nodes), and a
    figure none of whose backends can run the job is 0. A 7B QLoRA job (Qwen2.5-7B, nf4, rank 16,
    batch 1 × 512 tokens, gradient checkpointing) needs about 9 GiB on CUDA. Raises ValueError for
    an unknown backend or a model whose shape is not recorded (engine.memory.CATALOGUE_SHAPES).
    """
    if backend not in ALL_BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: expected one of {', '.join(sorted(ALL_BACKENDS))}")
    # The figure depends on the spec's training settings and the model's shape only: a spec that
    # differs in its dataset alone asks the same question.
    return _required_memory_bytes(spec.model_copy(update={"dataset": ""}), catalogue_shape(model), backend)


# Remembered: every submission asks twice, each estimate costs about 0.1 ms, and buyers send the same
# recipe again and again (the spec and the shape are frozen, so they can be the key).
@functools.lru_cache(maxsize=4096)
def _required_memory_bytes(spec: LoraJobSpec, shape: ModelShape, backend: str) -> int:
    weight_bytes = 2 if backend in HALF_PRECISION_BACKENDS else 4
    held_bytes = 0
    for figure_backend in _BACKENDS_OF_FIGURE[backend]:
        quantization = base_quantization(spec.quantization, spec.allow_16bit_fallback, figure_backend)
        if quantization is None:
            continue
        held_bytes = max(
            held_bytes,
            estimate_lora(
                spec
                if quantization == spec.quantization
                else spec.model_copy(update={"quantization": quantization}),
                shape,
                device_kind=_DEVICE_KIND_OF_BACKEND[figure_backend],
                compute_dtype_bytes=weight_bytes,
            ).total_bytes,
        )
    return free_bytes_needed(held_bytes)


def queued_job(
    job_id: str,
    spec: LoraJobSpec,
    model: CatalogueModel,
    queued_at: float,
    excluded_nodes: frozenset[str] = frozenset(),
) -> QueuedJob:
    """A QueuedJob with both memory figures (fp32 for MPS/CPU nodes, 16-bit for CUDA/ROCm nodes) and
    the backends that can run it."""
    return QueuedJob(
        job_id=job_id,
        base_model=model.name,
        required_memory_bytes=required_memory_bytes(spec, model, backend="cpu"),
        queued_at=queued_at,
        excluded_nodes=excluded_nodes,
        required_memory_bytes_16bit=required_memory_bytes(spec, model, backend="cuda"),
        model_bytes=download_bytes(model, lora=True),
        backends=lora_job_backends(spec),
    )


def download_bytes(model: CatalogueModel | None, *, lora: bool) -> int:
    """What a node without the model downloads first: its GGUF, and for a fine-tune its weights."""
    if model is None:
        return 0
    return sum(file.size for file in (model.files if lora else (model.gguf,)))


# ---- planning

# Nodes are grouped by the memory figure that applies to them and by preference: 16-bit GPUs
# (CUDA/ROCm), MPS GPUs, CPUs.
_HALF_GPU, _FULL_GPU, _CPU = 0, 1, 2
_GROUP_OF_BACKEND = {"cuda": _HALF_GPU, "rocm": _HALF_GPU, "mps": _FULL_GPU, "cpu": _CPU}
# A job goes to a group's nodes only when it can run on every backend of the group (QueuedJob.backends
# are unions of groups: engine.memory.QUANTIZATION_BACKENDS holds both or neither of cuda and rocm).
_BACKENDS_OF_GROUP = {
    group: frozenset(backend for backend, of in _GROUP_OF_BACKEND.items() if of == group)
    for group in (_HALF_GPU, _FULL_GPU, _CPU)
}
# A bucket holds the nodes of one group that hold one model (under the model's name), or all the
# group's nodes on fast (or unmeasured) links (under None) or on slow links (under _SLOW). For a job,
# the buckets are searched tier by tier: model holders on a GPU, model holders on a CPU, any GPU, any
# CPU; for a large model, nodes on slow links only after every other. Within a tier the best node is
# the least loaded, then the one with the most free memory, then the smallest node_id.
_SLOW = ""  # no model is named by the empty string
_HOLDERS = ((("model", _HALF_GPU), ("model", _FULL_GPU)), (("model", _CPU),))
_TIERS = (
    *_HOLDERS,
    ((None, _HALF_GPU), (None, _FULL_GPU), (_SLOW, _HALF_GPU), (_SLOW, _FULL_GPU)),
    ((None, _CPU), (_SLOW, _CPU)),
)
_TIERS_OF_A_LARGE_MODEL = (
    *_HOLDERS,
    ((None, _HALF_GPU), (None, _FULL_GPU)),
    ((None, _CPU),),
    ((_SLOW, _HALF_GPU), (_SLOW, _FULL_GPU)),
    ((_SLOW, _CPU),),
)

# A heap entry: (-free memory, node_id, node index, version). An entry whose version is not the node's
# current one is stale (the node took a job since) and is dropped when it reaches the top.
_Entry = tuple[int, str, int, int]
# A candidate: (load rank, -free memory, node_id, node index); the smallest is the best.
_Candidate = tuple[int, int, str, int]
_NO_MEMORY = float("-inf")


def _load_levels(nodes: Sequence[NodeSnapshot], job_count: int) -> list[float]:
    """Every load (running / capacity) a node can have during a plan of job_count jobs, ascending.

    Loads are floats, which hash and compare far faster than Fractions and are as exact for capacities
    below 2**26: two different fractions of such denominators differ by more than 2**-52, more than the
    rounding of either, so they stay different and in order; equal fractions give equal floats. There
    are at most the sum, over the distinct capacities c, of min(c, J + 1 + the spread of running_jobs):
    one when every node has capacity 1, a few dozen for capacities up to 8.
    """
    running_by_capacity: dict[int, tuple[int, int]] = {}
    for capacity, running in {(node.capacity, node.running_jobs) for node in nodes}:
        lowest, highest = running_by_capacity.get(capacity, (running, running))
        running_by_capacity[capacity] = (min(lowest, running), max(highest, running))
    return sorted(
        {
            running / capacity
            for capacity, (lowest, highest) in running_by_capacity.items()
            for running in range(lowest, min(capacity, highest + job_count + 1))
        }
    )


class _Bucket:
    """Nodes by load level, each level a heap with the most free memory on top, and over the levels a
    segment tree of each heap's top memory, so that the least-loaded level holding a node with at least
    R free is found in O(log L) for L levels.

    A tree leaf is the memory of its heap's top entry, stale or not: never less than the true best, so
    the search can only land on a level that, once its stale entries are dropped, turns out not to fit;
    it then corrects the leaf and goes on to the next level.
    """

    __slots__ = ("heaps", "size", "tree")

    def __init__(self, level_count: int, heaps: dict[int, list[_Entry]]):
        self.size = 1 << max(0, level_count - 1).bit_length()
        self.heaps = heaps
        tree: list[float] = [_NO_MEMORY] * (2 * self.size)
        for rank, heap in heaps.items():
            heapq.heapify(heap)
            tree[self.size + rank] = -heap[0][0]
        for position in range(self.size - 1, 0, -1):
            tree[position] = max(tree[2 * position], tree[2 * position + 1])
        self.tree = tree

    def _set_leaf(self, rank: int, memory: float) -> None:
        tree = self.tree
        position = self.size + rank
        tree[position] = memory
        position >>= 1
        while position:
            tree[position] = max(tree[2 * position], tree[2 * position + 1])
            position >>= 1

    def _first_level_with(self, start: int, required: int) -> int | None:
        """The lowest rank ≥ start whose leaf is at least `required`, or None."""
        tree, size = self.tree, self.size
        if start >= size:
            return None
        position = start + size
        while tree[position] < required:
            while position & 1:  # a right child: its parent's range is done, go up
                position >>= 1
            if position == 0:
                return None
            position += 1  # the next range to the right
        while position < size:  # down to the leftmost leaf that fits
            position = 2 * position if tree[2 * position] >= required else 2 * position + 1
        return position - size

    def add(self, rank: int, entry: _Entry) -> None:
        heap = self.heaps.get(rank)
        if heap is None:
            heap = self.heaps[rank] = []
        heapq.heappush(heap, entry)
        if heap[0] is entry:
            self._set_leaf(rank, -entry[0])

    def best(self, required: int, excluded: frozenset[str], versions: list[int]) -> _Candidate | None:
        rank = self._first_level_with(0, required)
        while rank is not None:
            heap = self.heaps[rank]
            set_aside: list[_Entry] = []
            found: _Candidate | None = None
            dropped_stale = False
            while heap:
                negative_memory, node_id, index, version = heap[0]
                if version != versions[index]:
                    heapq.heappop(heap)
                    dropped_stale = True
                elif -negative_memory < required:
                    break  # nothing below the top has more memory
                elif node_id in excluded:
                    set_aside.append(heapq.heappop(heap))
                else:
                    found = (rank, negative_memory, node_id, index)
                    break
            for entry in set_aside:
                heapq.heappush(heap, entry)
            if dropped_stale:
                self._set_leaf(rank, -heap[0][0] if heap else _NO_MEMORY)
            if found is not None:
                return found
            rank = self._first_level_with(rank + 1, required)
        return None


def plan(
    jobs: Sequence[QueuedJob],
    nodes: Sequence[NodeSnapshot],
    *,
    allowed_backends: frozenset[str] = ALL_BACKENDS,
) -> list[Assignment]:
    """Assign queued jobs to nodes, oldest job first (ties by job_id); returns the assignments made.

    A job may go only to a node that accepts jobs, has a free slot (running_jobs < capacity), whose
    best_backend is in allowed_backends and in the job's backends, that is not in the job's excluded_nodes and whose free memory
    is at least the job's requirement (required_memory_bytes_16bit on CUDA/ROCm when given, else
    required_memory_bytes). Among those it prefers a node that already holds the job's base model,
    then a GPU over a CPU, then the least loaded (running / capacity), then the most free memory, then
    the smallest node_id; a job whose model is large (LARGE_MODEL_BYTES) goes to a node on a slow link
    (NodeSnapshot.slow_link) that lacks the model only when no other node can take it. Each assignment takes a slot and the job's memory from its node for the rest
    of the plan. A job that fits no node is skipped and stays queued; younger jobs are still placed.

    Cost: O(N + L) to group the nodes (L load levels, see _load_levels), then per job
    O(B·log L + (s + k + M)·log N) for B ≤ 6 buckets searched, s stale entries dropped (each once
    over the plan), k of its excluded nodes met on the way and M models on the chosen node.
    Raises ValueError for duplicate job or node ids.
    """
    if len({job.job_id for job in jobs}) != len(jobs):
        raise ValueError("plan() was given two queued jobs with the same job_id")
    if len({node.node_id for node in nodes}) != len(nodes):
        raise ValueError("plan() was given two nodes with the same node_id")

    eligible = [
        node
        for node in nodes
        if node.accepting_jobs
        and node.running_jobs < node.capacity
        and node.best_backend in allowed_backends
        and node.best_backend in _GROUP_OF_BACKEND
    ]
    if not jobs or not eligible:
        return []
    levels = _load_levels(eligible, len(jobs))
    rank_of_level = {level: rank for rank, level in enumerate(levels)}
    wanted_models = {job.base_model for job in jobs}

    # Per eligible node, under its index in `eligible`: what changes as jobs are placed.
    node_ids = [node.node_id for node in eligible]
    free_memory = [node.memory_bytes for node in eligible]
    running = [node.running_jobs for node in eligible]
    capacity = [node.capacity for node in eligible]
    groups = [_GROUP_OF_BACKEND[node.best_backend] for node in eligible]
    versions = [0] * len(eligible)
    # The buckets each node is in: its group's (fast or slow link), and per model it holds that some
    # job wants.
    plain_keys: dict[tuple[str | None, int], list[tuple[str | None, int]]] = {
        (link, group): [(link, group)] for link in (None, _SLOW) for group in (_HALF_GPU, _FULL_GPU, _CPU)
    }
    bucket_keys = [
        [
            (_SLOW if node.slow_link else None, group),
            *((model, group) for model in node.models & wanted_models),
        ]
        if node.models & wanted_models
        else plain_keys[_SLOW if node.slow_link else None, group]
        for node, group in zip(eligible, groups, strict=True)
    ]
    # Every bucket's heaps are gathered as plain lists first, then heapified once each: O(N).
    gathered: dict[tuple[tuple[str | None, int], int], list[_Entry]] = {}
    for index, node in enumerate(eligible):
        rank = rank_of_level[node.running_jobs / node.capacity]
        entry = (-node.memory_bytes, node.node_id, index, 0)
        for key in bucket_keys[index]:
            heap = gathered.get((key, rank))
            if heap is None:
                gathered[key, rank] = [entry]
            else:
                heap.append(entry)
    heaps_by_bucket: dict[tuple[str | None, int], dict[int, list[_Entry]]] = {}
    for (key, rank), heap in gathered.items():
        heaps_by_bucket.setdefault(key, {})[rank] = heap
    buckets = {key: _Bucket(len(levels), heaps) for key, heaps in heaps_by_bucket.items()}

    assignments: list[Assignment] = []
    for job in sorted(jobs, key=lambda job: (job.queued_at, job.job_id)):
        required_16bit = job.required_memory_bytes_16bit
        if required_16bit is None:
            required_16bit = job.required_memory_bytes
        chosen: _Candidate | None = None
        for tier in _TIERS_OF_A_LARGE_MODEL if job.model_bytes >= LARGE_MODEL_BYTES else _TIERS:
            for key, group in tier:
                if not _BACKENDS_OF_GROUP[group] <= job.backends:
                    continue
                bucket = buckets.get((job.base_model if key == "model" else key, group))
                required = required_16bit if group == _HALF_GPU else job.required_memory_bytes
                if bucket is None or bucket.tree[1] < required:  # the root: no node there has enough
                    continue
                candidate = bucket.best(required, job.excluded_nodes, versions)
                if candidate is not None and (chosen is None or candidate < chosen):
                    chosen = candidate
            if chosen is not None:
                break
        if chosen is None:
            continue

        index = chosen[3]
        assignments.append(Assignment(job_id=job.job_id, node_id=node_ids[index]))
        free_memory[index] -= required_16bit if groups[index] == _HALF_GPU else job.required_memory_bytes
        running[index] += 1
        versions[index] += 1  # its entries in every bucket are now stale
        if running[index] < capacity[index]:
            rank = rank_of_level[running[index] / capacity[index]]
            entry = (-free_memory[index], node_ids[index], index, versions[index])
            for key in bucket_keys[index]:
                buckets[key].add(rank, entry)
    return assignments


# ---- inference routing


@dataclass(frozen=True)
class InferenceCandidate:
    """A connected node as inference routing sees it."""

    snapshot: NodeSnapshot
    slots: int  # requests it serves at once; 0: none
    in_flight: int
    loaded_models: frozenset[str]  # protocol.model_key values it keeps loaded
    # Model keys that crashed its llama.cpp process, with its report (a crashed base stands for its
    # adapters): not routed there until the node says a fresh process served them.
    crashed_models: Mapping[str, str] = field(default_factory=dict)
    # Its round trip to the coordinator as the coordinator timed it (None: not timed yet).
    round_trip_seconds: float | None = None


def inference_memory_bytes(model: CatalogueModel, adapter_size: int = 0) -> int:
    """Free memory a node needs to serve the model with an adapter of adapter_size bytes: engine.memory's
    estimate, the one the node checks before it loads a model (engine.inference.ModelPool), for the
    default context, divided by the share of its free memory a node lets it use. Raises ValueError for
    a model whose shape is not recorded (engine.memory.CATALOGUE_SHAPES)."""
    held_bytes = estimate_inference(
        model_file_bytes=model.file_size_bytes,
        adapter_file_bytes=adapter_size,
        key_value_width=catalogue_shape(model).key_value_width,
    )
    return free_bytes_needed(held_bytes)


# Round trips within one step count as equal for routing (a chat's tokens each cross the link once).
LATENCY_STEP_SECONDS = 0.025


def latency_step(round_trip_seconds: float | None) -> float:
    if round_trip_seconds is None:
        return math.inf
    return math.floor(round_trip_seconds / LATENCY_STEP_SECONDS)


def choose_inference_node(
    candidates: Iterable[InferenceCandidate],
    *,
    model_key: str,
    base_model: str,
    required_memory_bytes: int,
    excluded: frozenset[str] = frozenset(),
) -> str | None:
    """The node to serve one request, or None when no node can now.

    A node qualifies with a free slot, while it takes work (a paused node is playing a game), where the
    model has not crashed it, and with required_memory_bytes free (inference_memory_bytes) to load the
    model unless it has it loaded. Preferred, in order: the model loaded, the base model on disk, a GPU,
    a shorter round trip (in steps of LATENCY_STEP_SECONDS, so jitter does not outweigh the load; not
    timed yet counts last), fewer requests in flight, more free memory. Loading a model or fetching it
    costs seconds, and a GPU generates many times faster than a CPU: each outweighs a round trip.
    """
    best: tuple | None = None
    chosen: str | None = None
    for candidate in candidates:
        snapshot = candidate.snapshot
        if candidate.in_flight >= candidate.slots or not _may_serve(
            candidate, model_key, required_memory_bytes, excluded
        ):
            continue
        loaded = model_key in candidate.loaded_models
        rank = (
            loaded,
            base_model in snapshot.models,
            snapshot.best_backend in GPU_BACKENDS,
            -latency_step(candidate.round_trip_seconds),
            -candidate.in_flight,
            snapshot.memory_bytes,
        )
        if best is None or rank > best:
            best, chosen = rank, snapshot.node_id
    return chosen


def crash_without_alternative(
    candidates: Iterable[InferenceCandidate],
    *,
    model_key: str,
    required_memory_bytes: int,
    excluded: frozenset[str] = frozenset(),
) -> str | None:
    """When no node can serve a request now: the crash report to answer it with at once, if the model
    crashed a node's llama.cpp process and no other node could take the request even once one of its
    slots frees. None when such a node exists (waiting for it may help) or nothing crashed."""
    report: str | None = None
    for candidate in candidates:
        crash = crash_covering(candidate.crashed_models, model_key)
        if crash is not None:
            report = report or crash
        elif candidate.slots > 0 and _may_serve(candidate, model_key, required_memory_bytes, excluded):
            return None
    return report


def _may_serve(
    candidate: InferenceCandidate, model_key: str, required_memory_bytes: int, excluded: frozenset[str]
) -> bool:
    """Whether the node may serve the request, busy or not."""
    snapshot = candidate.snapshot
    if (
        snapshot.node_id in excluded
        or not snapshot.accepting_jobs
        or crash_covering(candidate.crashed_models, model_key) is not None
    ):
        return False
    return model_key in candidate.loaded_models or snapshot.memory_bytes >= required_memory_bytes
