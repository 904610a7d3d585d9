"""The scheduler's decisions, checked on snapshots: who gets which job, and how fast it decides."""

from __future__ import annotations

import dataclasses
import random
import subprocess
import sys
import time
from collections.abc import Sequence
from fractions import Fraction

import pytest

from compute_swarm.coordinator.domain.scheduler import (
    ALL_BACKENDS,
    LARGE_MODEL_BYTES,
    SLOW_LINK_BYTES_PER_SECOND,
    Assignment,
    InferenceCandidate,
    NodeSnapshot,
    QueuedJob,
    choose_inference_node,
    crash_without_alternative,
    inference_memory_bytes,
    node_snapshot,
    plan,
    queued_job,
    required_memory_bytes,
)
from compute_swarm.engine.jobs import CATALOGUE, DEFAULT_MODEL, CatalogueModel, LoraJobSpec
from compute_swarm.engine.memory import (
    PUBLISHED_SHAPES,
    catalogue_shape,
    estimate_inference,
    estimate_lora,
    free_bytes_needed,
)
from compute_swarm.protocol import CpuTelemetry, GpuTelemetry, Telemetry

GIB = 1024**3
DEMO_MODEL = CATALOGUE[DEFAULT_MODEL]


def node(
    node_id: str,
    memory_gib: float = 16,
    backend: str = "cuda",
    models: Sequence[str] = (),
    running_jobs: int = 0,
    capacity: int = 1,
    accepting_jobs: bool = True,
    download_bytes_per_second: float | None = None,
) -> NodeSnapshot:
    return NodeSnapshot(
        node_id=node_id,
        backends=(backend, "cpu") if backend != "cpu" else ("cpu",),
        memory_bytes=int(memory_gib * GIB),
        best_backend=backend,
        models=frozenset(models),
        running_jobs=running_jobs,
        capacity=capacity,
        accepting_jobs=accepting_jobs,
        download_bytes_per_second=download_bytes_per_second,
    )


def job(
    job_id: str,
    memory_gib: float = 4,
    queued_at: float = 0.0,
    base_model: str = DEFAULT_MODEL,
    excluded_nodes: Sequence[str] = (),
    memory_gib_16bit: float | None = None,
    model_bytes: int = 0,
) -> QueuedJob:
    return QueuedJob(
        job_id=job_id,
        base_model=base_model,
        required_memory_bytes=int(memory_gib * GIB),
        queued_at=queued_at,
        excluded_nodes=frozenset(excluded_nodes),
        required_memory_bytes_16bit=None if memory_gib_16bit is None else int(memory_gib_16bit * GIB),
        model_bytes=model_bytes,
    )


def placed(assignments: list[Assignment]) -> dict[str, str]:
    return {assignment.job_id: assignment.node_id for assignment in assignments}


# ---- the rules, one at a time


def test_a_job_goes_only_where_its_memory_fits() -> None:
    nodes = [node("small", memory_gib=4), node("large", memory_gib=16)]

    assert placed(plan([job("j", memory_gib=8)], nodes)) == {"j": "large"}
    assert plan([job("j", memory_gib=17)], nodes) == []
    assert placed(plan([job("j", memory_gib=16)], nodes)) == {"j": "large"}  # exactly enough is enough


def test_only_allowed_backends_are_used() -> None:
    nodes = [node("gpu", backend="cuda", memory_gib=8), node("cpu", backend="cpu", memory_gib=64)]

    assert placed(plan([job("j")], nodes, allowed_backends=frozenset({"cpu"}))) == {"j": "cpu"}
    assert plan([job("j")], nodes, allowed_backends=frozenset({"rocm", "mps"})) == []
    # A node whose best device is not allowed is not used through its other backends either.
    assert plan([job("j")], [node("gpu", backend="cuda")], allowed_backends=frozenset({"cpu"})) == []


def test_excluded_nodes_are_not_offered_the_job_again() -> None:
    nodes = [node("a", memory_gib=24), node("b", memory_gib=16), node("c", memory_gib=8)]

    assert placed(plan([job("j", excluded_nodes=["a"])], nodes)) == {"j": "b"}
    assert placed(plan([job("j", excluded_nodes=["a", "b"])], nodes)) == {"j": "c"}
    assert plan([job("j", excluded_nodes=["a", "b", "c"])], nodes) == []
    # The exclusion is the job's own: another job still gets the node.
    assignments = plan([job("old", queued_at=1, excluded_nodes=["a"]), job("new", queued_at=2)], nodes)
    assert placed(assignments) == {"old": "b", "new": "a"}


def test_nodes_holding_the_model_come_first_then_gpus() -> None:
    holder_cpu = node("holder-cpu", backend="cpu", memory_gib=8, models=[DEFAULT_MODEL])
    other_gpu = node("other-gpu", backend="cuda", memory_gib=80)
    other_cpu = node("other-cpu", backend="cpu", memory_gib=512)
    holder_gpu = node("holder-gpu", backend="rocm", memory_gib=6, models=[DEFAULT_MODEL, "other"])

    assert placed(plan([job("j")], [holder_cpu, other_gpu, other_cpu, holder_gpu])) == {"j": "holder-gpu"}
    assert placed(plan([job("j")], [holder_cpu, other_gpu, other_cpu])) == {"j": "holder-cpu"}
    assert placed(plan([job("j")], [other_gpu, other_cpu])) == {"j": "other-gpu"}
    mac = node("mac", backend="mps", memory_gib=32)
    assert placed(plan([job("j")], [other_cpu, mac])) == {"j": "mac"}  # an Apple GPU is a GPU
    # Holding some other model is no reason to prefer a node.
    assert placed(plan([job("j", base_model="other")], [holder_gpu, other_gpu])) == {"j": "holder-gpu"}
    assert placed(plan([job("j", base_model="third")], [holder_gpu, other_gpu])) == {"j": "other-gpu"}


def test_a_large_model_stays_off_slow_links_unless_nothing_else_can_take_it() -> None:
    large, small = int(LARGE_MODEL_BYTES), 100_000_000
    slow = SLOW_LINK_BYTES_PER_SECOND / 10
    slow_gpu = node("slow-gpu", backend="cuda", memory_gib=80, download_bytes_per_second=slow)
    fast_cpu = node("fast-cpu", backend="cpu", memory_gib=64, download_bytes_per_second=50e6)
    unmeasured_cpu = node("unmeasured-cpu", backend="cpu", memory_gib=32)
    # A large model: a CPU on a fast (or not yet measured) link before a GPU that would fetch it for
    # an hour; the slow GPU only when it is the last one left.
    assert placed(plan([job("j", model_bytes=large)], [slow_gpu, fast_cpu])) == {"j": "fast-cpu"}
    assert placed(plan([job("j", model_bytes=large)], [slow_gpu, unmeasured_cpu])) == {"j": "unmeasured-cpu"}
    assert placed(plan([job("j", model_bytes=large)], [slow_gpu])) == {"j": "slow-gpu"}
    # Holding the model, the slow link does not matter: nothing is fetched.
    slow_holder = node("slow-holder", backend="cuda", models=[DEFAULT_MODEL], download_bytes_per_second=slow)
    assert placed(plan([job("j", model_bytes=large)], [slow_holder, fast_cpu])) == {"j": "slow-holder"}
    # A small model costs little to fetch even on a slow link: the GPU wins as usual.
    assert placed(plan([job("j", model_bytes=small)], [slow_gpu, fast_cpu])) == {"j": "slow-gpu"}


def test_load_is_spread_across_nodes() -> None:
    nodes = [node("a", capacity=4, memory_gib=24), node("b", capacity=4, memory_gib=16)]
    jobs = [job(f"j{number}", queued_at=number, memory_gib=1) for number in range(4)]

    assignments = plan(jobs, nodes)

    # Each job goes to the least-loaded node; between equal loads, to the most free memory.
    assert [assignment.node_id for assignment in assignments] == ["a", "b", "a", "b"]


def test_load_is_measured_relative_to_capacity() -> None:
    quarter_busy = node("quarter", running_jobs=1, capacity=4, memory_gib=8)
    half_busy = node("half", running_jobs=1, capacity=2, memory_gib=64)
    idle = node("idle", running_jobs=0, capacity=1, memory_gib=4)

    assert placed(plan([job("j", memory_gib=2)], [quarter_busy, half_busy])) == {"j": "quarter"}
    assert placed(plan([job("j", memory_gib=2)], [quarter_busy, half_busy, idle])) == {"j": "idle"}


def test_capacity_is_respected() -> None:
    jobs = [job(f"j{number}", queued_at=number, memory_gib=1) for number in range(5)]

    assert len(plan(jobs, [node("single")])) == 1
    assert len(plan(jobs, [node("triple", capacity=3)])) == 3
    assert len(plan(jobs, [node("busy", running_jobs=2, capacity=3)])) == 1
    assert plan(jobs, [node("full", running_jobs=1, capacity=1)]) == []
    assert plan(jobs, [node("overfull", running_jobs=3, capacity=2)]) == []
    assert plan(jobs, [node("none", capacity=0)]) == []
    assert plan(jobs, [node("paused", accepting_jobs=False, capacity=8)]) == []


def test_jobs_placed_on_one_node_share_its_memory() -> None:
    nodes = [node("a", capacity=4, memory_gib=10)]
    jobs = [job(f"j{number}", queued_at=number, memory_gib=4) for number in range(3)]

    assert placed(plan(jobs, nodes)) == {"j0": "a", "j1": "a"}  # the third no longer fits in what is left


def test_oldest_job_goes_first() -> None:
    nodes = [node("only")]
    jobs = [job("young", queued_at=20.0), job("old", queued_at=10.0), job("middle", queued_at=15.0)]

    assert placed(plan(jobs, nodes)) == {"old": "only"}
    # Same age: job_id decides, so the order of the input does not.
    twins = [job("b", queued_at=1.0), job("a", queued_at=1.0)]
    assert placed(plan(twins, nodes)) == placed(plan(twins[::-1], nodes)) == {"a": "only"}


def test_a_job_that_fits_nowhere_does_not_block_younger_ones() -> None:
    nodes = [node("a", memory_gib=8), node("b", memory_gib=8, backend="cpu")]
    jobs = [
        job("huge", queued_at=1, memory_gib=100),
        job("excluded", queued_at=2, excluded_nodes=["a", "b"]),
        job("foreign", queued_at=3, memory_gib=4),
        job("later", queued_at=4, memory_gib=4),
    ]

    assert placed(plan(jobs, nodes)) == {"foreign": "a", "later": "b"}


def test_16bit_requirement_applies_to_cuda_and_rocm_only() -> None:
    # 10 GiB in fp32, 6 GiB in 16 bits: an 8 GiB CUDA card fits, an 8 GiB Mac or CPU does not.
    big = job("j", memory_gib=10, memory_gib_16bit=6)

    assert placed(plan([big], [node("cuda", memory_gib=8)])) == {"j": "cuda"}
    assert placed(plan([big], [node("rocm", memory_gib=8, backend="rocm")])) == {"j": "rocm"}
    assert (
        plan([big], [node("mac", memory_gib=8, backend="mps"), node("cpu", memory_gib=8, backend="cpu")])
        == []
    )
    # Without the 16-bit figure the single one applies everywhere.
    assert plan([job("j", memory_gib=10)], [node("cuda", memory_gib=8)]) == []


def test_plan_is_deterministic_and_ignores_input_order() -> None:
    generator = random.Random(5)
    nodes = [
        node(f"n{number:03}", memory_gib=generator.choice([8, 16]), capacity=generator.choice([1, 2]))
        for number in range(50)
    ]
    jobs = [
        job(f"j{number:03}", queued_at=generator.choice([1.0, 2.0]), memory_gib=2) for number in range(60)
    ]

    first = plan(jobs, nodes)
    for _ in range(5):
        generator.shuffle(nodes)
        generator.shuffle(jobs)
        assert plan(jobs, nodes) == first
    # Among equals, the smallest node_id wins.
    assert placed(plan([job("j")], [node("b"), node("c"), node("a")])) == {"j": "a"}


def test_duplicate_ids_are_refused() -> None:
    with pytest.raises(ValueError, match="job_id"):
        plan([job("j"), job("j")], [node("a")])
    with pytest.raises(ValueError, match="node_id"):
        plan([job("j")], [node("a"), node("a")])


def test_nothing_to_do() -> None:
    assert plan([], []) == []
    assert plan([], [node("a")]) == []
    assert plan([job("j")], []) == []


# ---- against a plain reading of the rules


def reference_plan(
    jobs: Sequence[QueuedJob], nodes: Sequence[NodeSnapshot], allowed_backends: frozenset[str]
) -> list[Assignment]:
    """The rules as written, scanning every node for every job."""
    running = {snapshot.node_id: snapshot.running_jobs for snapshot in nodes}
    memory = {snapshot.node_id: snapshot.memory_bytes for snapshot in nodes}
    assignments = []
    for queued in sorted(jobs, key=lambda queued: (queued.queued_at, queued.job_id)):
        best = None
        for snapshot in nodes:
            node_id = snapshot.node_id
            half_precision = snapshot.best_backend in ("cuda", "rocm")
            needed = queued.required_memory_bytes
            if half_precision and queued.required_memory_bytes_16bit is not None:
                needed = queued.required_memory_bytes_16bit
            if (
                not snapshot.accepting_jobs
                or running[node_id] >= snapshot.capacity
                or snapshot.best_backend not in allowed_backends
                or node_id in queued.excluded_nodes
                or memory[node_id] < needed
            ):
                continue
            holds_model = queued.base_model in snapshot.models
            key = (
                not holds_model,
                queued.model_bytes >= LARGE_MODEL_BYTES and snapshot.slow_link and not holds_model,
                snapshot.best_backend == "cpu",
                Fraction(running[node_id], snapshot.capacity),
                -memory[node_id],
                node_id,
            )
            if best is None or key < best[0]:
                best = (key, node_id, needed)
        if best is not None:
            _, node_id, needed = best
            running[node_id] += 1
            memory[node_id] -= needed
            assignments.append(Assignment(job_id=queued.job_id, node_id=node_id))
    return assignments


def random_case(generator: random.Random) -> tuple[list[QueuedJob], list[NodeSnapshot], frozenset[str]]:
    backends = ["cuda", "rocm", "mps", "cpu"]
    node_ids = [f"n{number}" for number in range(generator.randint(0, 12))]
    nodes = [
        node(
            node_id,
            memory_gib=generator.choice([2, 4, 4, 8, 16]),
            backend=generator.choice(backends),
            models=generator.sample(["a", "b", "c"], generator.randint(0, 2)),
            running_jobs=generator.randint(0, 3),
            capacity=generator.choice([0, 1, 1, 2, 3, 4, 7, 12]),
            accepting_jobs=generator.random() < 0.9,
            download_bytes_per_second=generator.choice([None, 1e5, 1e6, 1e7, 1e8]),
        )
        for node_id in node_ids
    ]
    jobs = [
        job(
            f"j{number}",
            memory_gib=generator.choice([1, 2, 4, 8, 20]),
            memory_gib_16bit=generator.choice([None, 1, 2]),
            queued_at=generator.choice([1.0, 2.0, 3.0]),
            base_model=generator.choice(["a", "b", "c", "d"]),
            excluded_nodes=generator.sample(node_ids, min(len(node_ids), generator.randint(0, 3))),
            model_bytes=generator.choice([0, 10**8, 2 * 10**9, 20 * 10**9]),
        )
        for number in range(generator.randint(0, 15))
    ]
    allowed = frozenset(backend for backend in backends if generator.random() < 0.8) or ALL_BACKENDS
    return jobs, nodes, allowed


def test_plan_agrees_with_the_rules_as_written() -> None:
    generator = random.Random(1)
    for _ in range(3000):
        jobs, nodes, allowed = random_case(generator)
        assert plan(jobs, nodes, allowed_backends=allowed) == reference_plan(jobs, nodes, allowed)


# ---- scale


def large_swarm(
    node_count: int, job_count: int, largest_capacity: int = 4
) -> tuple[list[QueuedJob], list[NodeSnapshot]]:
    """Gaming PCs mostly (one job each), some multi-GPU machines; jobs of all sizes, some too big."""
    generator = random.Random(42)
    models = [DEFAULT_MODEL, "model-b", "model-c", "model-d"]
    nodes = []
    for number in range(node_count):
        capacity = 1 if generator.random() < 0.85 else generator.randint(1, largest_capacity)
        nodes.append(
            NodeSnapshot(
                node_id=f"node-{number:05}",
                backends=("cuda", "cpu"),
                memory_bytes=generator.randint(2 * GIB, 24 * GIB),
                best_backend=generator.choices(["cuda", "rocm", "mps", "cpu"], weights=[70, 5, 5, 20])[0],
                models=frozenset(generator.sample(models, generator.randint(0, 2))),
                running_jobs=generator.randrange(capacity + 1),
                capacity=capacity,
                accepting_jobs=generator.random() < 0.95,
            )
        )
    jobs = [
        QueuedJob(
            job_id=f"job-{number:05}",
            base_model=generator.choice(models),
            required_memory_bytes=generator.randint(1 * GIB, 30 * GIB),
            queued_at=generator.uniform(0, 3600),
            excluded_nodes=frozenset(
                f"node-{generator.randrange(node_count):05}" for _ in range(generator.choice([0, 0, 0, 1, 3]))
            ),
            required_memory_bytes_16bit=generator.choice([None, 2 * GIB]),
        )
        for number in range(job_count)
    ]
    return jobs, nodes


@pytest.mark.parametrize("largest_capacity", [4, 64])
def test_plan_places_2000_jobs_on_10000_nodes_quickly(largest_capacity: int) -> None:
    jobs, nodes = large_swarm(10_000, 2_000, largest_capacity)

    timings = []
    for _ in range(3):
        started = time.perf_counter()
        assignments = plan(jobs, nodes)
        timings.append(time.perf_counter() - started)

    print(
        f"plan(): 2,000 jobs × 10,000 nodes (capacities up to {largest_capacity}) "
        f"in {min(timings) * 1000:.1f} ms (best of 3)"
    )
    assert min(timings) < 1.0
    assert 1_000 < len(assignments) < 2_000  # most fit; the largest fit nowhere
    assert len({assignment.job_id for assignment in assignments}) == len(assignments)
    # The fast plan makes the decisions the rules say, on a slice small enough to check by scanning.
    small_jobs, small_nodes = jobs[:300], nodes[:1_500]
    assert plan(small_jobs, small_nodes) == reference_plan(small_jobs, small_nodes, ALL_BACKENDS)


# ---- snapshots and estimates


def telemetry(gpus: Sequence[GpuTelemetry] = (), backends: Sequence[str] = ("cpu",)) -> Telemetry:
    return Telemetry(
        gpus=tuple(gpus),
        cpu=CpuTelemetry(
            name="cpu", logical_cores=8, memory_total_bytes=64 * GIB, memory_available_bytes=40 * GIB
        ),
        backends=tuple(backends),  # type: ignore[arg-type]
    )


def gpu(
    index: int, free_gib: float | None, backend: str = "cuda", total_gib: float | None = 24
) -> GpuTelemetry:
    return GpuTelemetry(
        index=index,
        vendor={"cuda": "nvidia", "rocm": "amd", "mps": "apple"}[backend],  # type: ignore[arg-type]
        name=f"gpu {index}",
        backend=backend,  # type: ignore[arg-type]
        memory_total_bytes=None if total_gib is None else int(total_gib * GIB),
        memory_free_bytes=None if free_gib is None else int(free_gib * GIB),
    )


def test_snapshot_takes_the_gpu_with_most_free_memory() -> None:
    snapshot = node_snapshot(
        "n",
        telemetry([gpu(0, 4), gpu(1, 10), gpu(2, 10)], backends=("cuda", "cpu")),
        [DEFAULT_MODEL],
        1,
        True,
        2,
    )

    assert snapshot == NodeSnapshot(
        node_id="n",
        backends=("cuda", "cpu"),
        memory_bytes=10 * GIB,
        best_backend="cuda",
        models=frozenset({DEFAULT_MODEL}),
        running_jobs=1,
        capacity=2,
        accepting_jobs=True,
    )


def test_snapshot_falls_back_as_the_node_reports() -> None:
    # A GPU whose backend is not usable (no CUDA torch) leaves the CPU.
    on_cpu = node_snapshot("n", telemetry([gpu(0, 10)], backends=("cpu",)), [], 0, True)
    assert (on_cpu.best_backend, on_cpu.memory_bytes) == ("cpu", 40 * GIB)
    # Apple GPUs share the system memory.
    mac = node_snapshot("n", telemetry([gpu(0, None, "mps", None)], backends=("mps", "cpu")), [], 0, True)
    assert (mac.best_backend, mac.memory_bytes) == ("mps", 40 * GIB)
    # No free figure: the total stands in; no figure at all: the GPU is not counted.
    unknown_free = node_snapshot(
        "n", telemetry([gpu(0, None, "rocm", 16)], backends=("rocm", "cpu")), [], 0, True
    )
    assert (unknown_free.best_backend, unknown_free.memory_bytes) == ("rocm", 16 * GIB)
    unknown = node_snapshot(
        "n", telemetry([gpu(0, None, total_gib=None)], backends=("cuda", "cpu")), [], 0, True
    )
    assert (unknown.best_backend, unknown.memory_bytes) == ("cpu", 40 * GIB)
    # Nothing usable: the node takes no jobs.
    stranded = node_snapshot("n", telemetry([], backends=("cuda",)), [], 0, True)
    assert stranded.accepting_jobs is False
    assert plan([job("j", memory_gib=0)], [stranded]) == []
    # A paused node stays paused.
    assert node_snapshot("n", telemetry(), [], 0, False).accepting_jobs is False


def demo_spec(**fields: object) -> LoraJobSpec:
    return LoraJobSpec(base_model=DEFAULT_MODEL, dataset="data.jsonl", max_steps=30, **fields)


def test_memory_estimate_is_the_one_the_node_checks() -> None:
    fp32 = required_memory_bytes(demo_spec(), DEMO_MODEL)
    half = required_memory_bytes(demo_spec(), DEMO_MODEL, backend="cuda")

    # The node's figure (engine.memory, which engine.lora.check_memory uses) for the same shape, over
    # the share of free memory a node lets a job use; on fp32, MPS's, which allows 100 MiB more than
    # the CPU's for its runtime.
    shape = catalogue_shape(DEMO_MODEL)
    on_mps = estimate_lora(demo_spec(), shape, device_kind="mps", compute_dtype_bytes=4)
    on_cuda = estimate_lora(demo_spec(), shape, device_kind="cuda", compute_dtype_bytes=2)
    assert fp32 == free_bytes_needed(on_mps.total_bytes)
    assert half == free_bytes_needed(on_cuda.total_bytes)
    # About 8.0 GiB and 5.1 GiB held, so 8.9 and 5.6 GiB free.
    assert 8.8 * GIB <= fp32 <= 8.9 * GIB
    assert 5.6 * GIB <= half <= 5.7 * GIB
    assert required_memory_bytes(demo_spec(), DEMO_MODEL, backend="mps") == fp32
    assert required_memory_bytes(demo_spec(), DEMO_MODEL, backend="rocm") == half


@pytest.mark.parametrize("backend", ["cpu", "cuda"])
def test_memory_estimate_grows_with_batch_and_length(backend: str) -> None:
    by_batch = [
        required_memory_bytes(demo_spec(batch_size=size), DEMO_MODEL, backend=backend)
        for size in [1, 2, 3, 8, 64]
    ]
    by_length = [
        required_memory_bytes(demo_spec(max_sequence_length=length), DEMO_MODEL, backend=backend)
        for length in [8, 9, 128, 513, 4096]
    ]

    for estimates in (by_batch, by_length):
        assert estimates == sorted(set(estimates))  # strictly increasing


def test_memory_estimate_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="unknown backend"):
        required_memory_bytes(demo_spec(), DEMO_MODEL, backend="tpu")
    # A model whose shape the catalogue does not record, or whose record describes another model.
    with pytest.raises(ValueError, match="no shape is recorded"):
        required_memory_bytes(demo_spec(), dataclasses.replace(DEMO_MODEL, name="unknown"))
    with pytest.raises(ValueError, match="0 parameters"):
        required_memory_bytes(demo_spec(), dataclasses.replace(DEMO_MODEL, parameters=0))
    with pytest.raises(ValueError, match="no shape is recorded"):
        inference_memory_bytes(dataclasses.replace(DEMO_MODEL, name="unknown"))


def test_queued_job_carries_both_memory_figures() -> None:
    queued = queued_job("j", demo_spec(), DEMO_MODEL, queued_at=5.0, excluded_nodes=frozenset({"x"}))

    assert queued == QueuedJob(
        job_id="j",
        base_model=DEFAULT_MODEL,
        required_memory_bytes=required_memory_bytes(demo_spec(), DEMO_MODEL),
        queued_at=5.0,
        excluded_nodes=frozenset({"x"}),
        required_memory_bytes_16bit=required_memory_bytes(demo_spec(), DEMO_MODEL, backend="cuda"),
        model_bytes=sum(file.size for file in DEMO_MODEL.files),
    )
    # The demo job fits an 8 GiB gaming card (about 7 GiB free) but not a laptop with 8 GiB of RAM.
    card = node("card", memory_gib=7, backend="cuda")
    laptop = node("laptop", memory_gib=7, backend="cpu")
    assert placed(plan([queued], [laptop, card])) == {"j": "card"}
    assert plan([queued], [laptop]) == []


def test_a_node_serves_a_model_with_the_memory_its_own_check_asks_for() -> None:
    needed = inference_memory_bytes(DEMO_MODEL, adapter_size=5_000_000)
    held = estimate_inference(
        model_file_bytes=DEMO_MODEL.file_size_bytes,
        adapter_file_bytes=5_000_000,
        key_value_width=catalogue_shape(DEMO_MODEL).key_value_width,
    )
    assert needed == free_bytes_needed(held)

    def candidate(free_bytes: int) -> InferenceCandidate:
        snapshot = dataclasses.replace(node("n"), memory_bytes=free_bytes)
        return InferenceCandidate(snapshot=snapshot, slots=1, in_flight=0, loaded_models=frozenset())

    def chosen(free_bytes: int) -> str | None:
        return choose_inference_node(
            [candidate(free_bytes)],
            model_key=DEFAULT_MODEL,
            base_model=DEFAULT_MODEL,
            required_memory_bytes=needed,
        )

    assert chosen(needed) == "n"
    assert chosen(needed - 1) is None


def test_decisions_import_nothing_heavy() -> None:
    # The coordinator runs on a small VM without torch: these modules must not pull it in.
    code = (
        "import sys, compute_swarm.coordinator.domain.scheduler, compute_swarm.coordinator.domain.pricing; "
        "print(','.join(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'peft'})))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )

    assert result.stdout.strip() == ""


# ---- inference routing around crashed models

CRASH = "the node's llama.cpp crashed (killed by SIGSEGV) while serving smollm2-135m-instruct"
ADAPTER_KEY = f"{DEFAULT_MODEL}+{'a' * 64}"


def server(
    node_id: str,
    *,
    loaded: Sequence[str] = (),
    crashed: dict[str, str] | None = None,
    in_flight: int = 0,
    accepting_jobs: bool = True,
    memory_gib: float = 16,
) -> InferenceCandidate:
    return InferenceCandidate(
        snapshot=node(node_id, memory_gib=memory_gib, accepting_jobs=accepting_jobs),
        slots=1,
        in_flight=in_flight,
        loaded_models=frozenset(loaded),
        crashed_models=crashed or {},
    )


def route(candidates: Sequence[InferenceCandidate], key: str = DEFAULT_MODEL, excluded: Sequence[str] = ()):
    """(the node chosen, the crash to answer with at once when none is)."""
    memory = inference_memory_bytes(DEMO_MODEL)
    chosen = choose_inference_node(
        candidates,
        model_key=key,
        base_model=DEFAULT_MODEL,
        required_memory_bytes=memory,
        excluded=frozenset(excluded),
    )
    crash = crash_without_alternative(
        candidates, model_key=key, required_memory_bytes=memory, excluded=frozenset(excluded)
    )
    return chosen, crash


def test_a_node_whose_llama_cpp_the_model_crashed_is_passed_over_for_that_model_only() -> None:
    # It has the model loaded and the most memory, which would make it first: the crash rules it out.
    crashed = server("crashed", loaded=[DEFAULT_MODEL], crashed={DEFAULT_MODEL: CRASH}, memory_gib=64)
    healthy = server("healthy")
    assert route([crashed, healthy]) == ("healthy", None)
    # A crashed base model takes its adapters along; a crashed adapter leaves its base alone.
    assert route([crashed, healthy], key=ADAPTER_KEY) == ("healthy", None)
    adapter_crashed = server("adapter-crashed", loaded=[DEFAULT_MODEL], crashed={ADAPTER_KEY: CRASH})
    assert route([adapter_crashed, healthy]) == ("adapter-crashed", None)
    assert route([adapter_crashed, healthy], key=ADAPTER_KEY) == ("healthy", None)


def test_the_crash_is_the_answer_only_when_no_other_node_could_take_the_request() -> None:
    crashed = server("crashed", crashed={DEFAULT_MODEL: CRASH})
    # Alone, or beside nodes that cannot serve it (paused, too small, already tried): told at once.
    assert route([crashed]) == (None, CRASH)
    paused = server("paused", accepting_jobs=False)
    small = server("small", memory_gib=0.1)
    tried = server("tried")
    assert route([crashed, paused, small, tried], excluded=["crashed", "tried"]) == (None, CRASH)
    # A node that is only busy could take it once its request ends: the request waits for it.
    busy = server("busy", in_flight=1)
    assert route([crashed, busy]) == (None, None)
    # Nothing crashed and no node free: waiting, as before (no crash to tell).
    assert route([busy]) == (None, None)
    assert route([]) == (None, None)


# ---- inference routing by round trip


def test_a_chat_goes_to_the_nearer_of_otherwise_equal_nodes() -> None:
    def timed(node_id: str, round_trip: float | None, **options) -> InferenceCandidate:
        return dataclasses.replace(server(node_id, **options), round_trip_seconds=round_trip)

    near, far = timed("near", 0.012), timed("far", 0.180)
    assert route([far, near])[0] == "near"
    # Not timed yet counts last; jitter within one step does not outweigh the load.
    assert route([timed("new", None), far])[0] == "far"
    same_step = [timed("a", 0.001, in_flight=0), dataclasses.replace(timed("b", 0.002), slots=2, in_flight=1)]
    assert route(same_step)[0] == "a"  # same step: the one with fewer requests in flight
    # A model already loaded, or on disk, outweighs a round trip: loading or fetching costs seconds.
    loaded_far = timed("loaded-far", 0.300, loaded=[DEFAULT_MODEL])
    assert route([near, loaded_far])[0] == "loaded-far"


# ---- quantized bases (QLoRA)


def qwen_7b_model() -> CatalogueModel:
    shape, parameters = PUBLISHED_SHAPES["Qwen2.5-7B"]
    return dataclasses.replace(DEMO_MODEL, name="qwen2.5-7b", parameters=parameters, shape=shape)


def qlora_spec(**fields: object) -> LoraJobSpec:
    settings: dict[str, object] = dict(
        base_model="qwen2.5-7b",
        dataset="data.jsonl",
        max_steps=30,
        rank=16,
        target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
        batch_size=1,
        max_sequence_length=512,
        gradient_checkpointing=True,
        quantization="nf4",
    )
    return LoraJobSpec(**{**settings, **fields})


# A card's free memory as its node reports it: its VRAM (a "12 GB" card has 12 GiB) less 1 GiB that the
# desktop (compositor, browser) holds.
TWELVE_GB_CARD_GIB = 11
EIGHT_GB_CARD_GIB = 7


def test_a_7b_qlora_job_goes_to_a_12_gb_card_and_not_to_an_8_gb_one() -> None:
    queued = queued_job("7b", qlora_spec(), qwen_7b_model(), queued_at=0.0)

    assert plan([queued], [node("eight", EIGHT_GB_CARD_GIB)]) == []
    assert plan([queued], [node("eight", EIGHT_GB_CARD_GIB), node("twelve", TWELVE_GB_CARD_GIB)]) == [
        Assignment("7b", "twelve")
    ]
    # Unquantized, the same job fits neither.
    unquantized = queued_job("7b", qlora_spec(quantization="none"), qwen_7b_model(), queued_at=0.0)
    assert plan([unquantized], [node("twelve", TWELVE_GB_CARD_GIB)]) == []


def test_a_quantized_job_goes_only_where_bitsandbytes_runs_unless_the_buyer_allows_16_bits() -> None:
    model = qwen_7b_model()
    strict = queued_job("strict", qlora_spec(), model, queued_at=0.0)
    lenient = queued_job("lenient", qlora_spec(allow_16bit_fallback=True), model, queued_at=1.0)
    assert strict.backends == frozenset({"cuda", "rocm", "cpu"})
    assert lenient.backends == ALL_BACKENDS

    apple = node("apple", 64, backend="mps")
    assert plan([strict], [apple]) == []
    assert plan([lenient], [apple]) == [Assignment("lenient", "apple")]
    # On the Mac it runs unquantized in fp32, so it needs the fp32 figure there.
    fp32 = required_memory_bytes(qlora_spec(quantization="none"), model, backend="mps")
    assert lenient.required_memory_bytes == fp32
    assert plan([lenient], [node("small-apple", fp32 / GIB - 0.01, backend="mps")]) == []
    # bitsandbytes' CPU backend runs it quantized, with the smaller figure.
    assert strict.required_memory_bytes < fp32
    assert plan([strict], [node("cpu", 40, backend="cpu")]) == [Assignment("strict", "cpu")]


def test_a_quantized_jobs_figure_is_the_one_the_node_checks() -> None:
    model = qwen_7b_model()
    spec = qlora_spec()
    estimate = estimate_lora(spec, catalogue_shape(model), device_kind="cuda", compute_dtype_bytes=2)
    assert required_memory_bytes(spec, model, backend="cuda") == free_bytes_needed(estimate.total_bytes)
    assert estimate.quantization == "nf4"
