"""engine.offload: how many layers go on the GPU, read from real GGUF headers, and how the pool makes
room by what models were measured to hold. The expected figures come from the tensors' sizes, read
here independently of engine.resources."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

gguf = pytest.importorskip("gguf")

from compute_swarm.engine.memory import MIB, usable_bytes  # noqa: E402
from compute_swarm.engine.offload import (  # noqa: E402
    KV_CACHE_BYTES_PER_ELEMENT,
    Footprint,
    Offload,
    compute_buffer_bytes,
    make_room,
    plan_offload,
    split,
)
from compute_swarm.engine.resources import read_gguf_layout  # noqa: E402

CONTEXT = 1024


@pytest.fixture(scope="module")
def demo_gguf() -> Path:
    from compute_swarm.engine.catalogue import fetch_catalogue_model

    return fetch_catalogue_model("smollm2-135m-instruct")


@functools.cache
def tensor_sizes(path: Path) -> tuple[dict[str, int], dict[str, list[int]]]:
    reader = gguf.GGUFReader(path, "r")
    return (
        {tensor.name: int(tensor.n_bytes) for tensor in reader.tensors},
        {tensor.name: [int(size) for size in tensor.shape.tolist()] for tensor in reader.tensors},
    )


cached_layout = functools.cache(read_gguf_layout)


def expected_gpu_bytes(path: Path, gpu_layers: int, context: int) -> int:
    """llama.cpp's count: the output layer first, then the blocks from the last one down."""
    sizes, shapes = tensor_sizes(path)
    blocks = 1 + max(int(name.split(".")[1]) for name in sizes if name.startswith("blk."))
    if gpu_layers == 0:
        return 0
    # Tied embeddings: the output layer on the GPU is a copy of token_embd.
    head = sizes.get("output.weight", sizes["token_embd.weight"])
    total = head + sizes["output_norm.weight"] + sizes.get("output_norm.bias", 0)
    for block in range(blocks - (gpu_layers - 1), blocks):
        total += sum(size for name, size in sizes.items() if name.startswith(f"blk.{block}."))
        # The KV cache of the block: attn_k's and attn_v's output widths (innermost dimension first).
        width = shapes[f"blk.{block}.attn_k.weight"][1] + shapes[f"blk.{block}.attn_v.weight"][1]
        total += width * KV_CACHE_BYTES_PER_ELEMENT * context
    layout = cached_layout(path)
    return total + compute_buffer_bytes(layout, context, output=True, blocks=gpu_layers > 1)


def test_offload_describes_itself():
    assert Offload(gpu_layers=0, layers=31).describe() == "CPU only"
    assert Offload(gpu_layers=20, layers=31).describe() == "20 of 31 layers on the GPU"
    assert Offload(gpu_layers=31, layers=31).describe() == "all 31 layers on the GPU"


def test_the_demo_model_gets_the_layers_its_tensor_sizes_allow(demo_gguf):
    layout = read_gguf_layout(demo_gguf)
    sizes, _ = tensor_sizes(demo_gguf)
    assert layout.block_count == 30
    # Every tensor is counted once in RAM when nothing is offloaded.
    cpu_only = split(layout, 0, CONTEXT)
    kv = sum(layout.block_kv_bytes_per_token) * CONTEXT
    compute = compute_buffer_bytes(layout, CONTEXT, output=True, blocks=True)
    assert cpu_only.ram_bytes == sum(sizes.values()) + kv + compute and cpu_only.gpu_bytes == 0
    # llama.cpp reports a KV cache of 22.50 MiB for this model at 1024 tokens.
    assert kv == 22.5 * MIB

    assert plan_offload(layout, free_gpu_bytes=0, context_tokens=CONTEXT).offload == Offload(
        gpu_layers=0, layers=31
    )
    everything = plan_offload(layout, free_gpu_bytes=1 << 40, context_tokens=CONTEXT)
    assert everything.offload.describe() == "all 31 layers on the GPU"
    assert everything.ram_bytes < cpu_only.ram_bytes and everything.gpu_bytes > 0
    for count in (1, 2, 12, 30):
        needed = expected_gpu_bytes(demo_gguf, count, CONTEXT)
        assert split(layout, count, CONTEXT).gpu_bytes == needed
        # Free memory whose usable share holds exactly `count` layers, and one byte short of it.
        free = -(-needed * 100 // 90)
        assert usable_bytes(free) >= needed
        assert plan_offload(layout, free_gpu_bytes=free, context_tokens=CONTEXT).offload.gpu_layers == count
        short = plan_offload(layout, free_gpu_bytes=free - 2, context_tokens=CONTEXT)
        assert short.offload.gpu_layers == count - 1
    # The runtime reserve and an owner's setting.
    reserved = plan_offload(layout, free_gpu_bytes=free, context_tokens=CONTEXT, reserve_bytes=MIB)
    assert reserved.offload.gpu_layers < 30
    assert (
        plan_offload(layout, free_gpu_bytes=0, context_tokens=CONTEXT, gpu_layers=-1).offload.gpu_layers == 31
    )


def test_tiny_models_split_their_tensors_between_ram_and_gpu(tiny_model):
    path = tiny_model.gguf_path
    layout = read_gguf_layout(path)
    sizes, shapes = tensor_sizes(path)
    tied = "output.weight" not in sizes
    assert layout.block_count == 2
    for block in range(2):
        width = shapes[f"blk.{block}.attn_k.weight"][1] + shapes[f"blk.{block}.attn_v.weight"][1]
        assert layout.block_kv_bytes_per_token[block] == width * KV_CACHE_BYTES_PER_ELEMENT
    kv = sum(layout.block_kv_bytes_per_token) * CONTEXT
    weights = sum(sizes.values())
    for count in range(4):
        plan = split(layout, count, CONTEXT)
        compute_ram = compute_buffer_bytes(layout, CONTEXT, output=count == 0, blocks=count < 3)
        compute_gpu = compute_buffer_bytes(layout, CONTEXT, output=True, blocks=count > 1) if count else 0
        copy = sizes["token_embd.weight"] if tied and count else 0
        assert plan.ram_bytes + plan.gpu_bytes == weights + copy + kv + compute_ram + compute_gpu
        assert plan.gpu_bytes == expected_gpu_bytes(path, count, CONTEXT)
        free = -(-plan.gpu_bytes * 100 // 90)
        assert plan_offload(layout, free_gpu_bytes=free, context_tokens=CONTEXT).offload.gpu_layers == count


# Making room --------------------------------------------------------------------------------------


def test_eviction_gives_back_what_models_were_measured_to_hold(demo_gguf):
    layout = read_gguf_layout(demo_gguf)
    need = split(layout, 0, CONTEXT).ram_bytes
    free = usable_bytes(need) - 50 * MIB  # short of the estimate by about 50 MiB

    def room(*footprints: Footprint, known: Footprint | None = None):
        return make_room(
            layout,
            context_tokens=CONTEXT,
            free_ram_bytes=free,
            free_gpu_bytes=None,
            loaded=footprints,
            known=known,
        )

    small, large = Footprint(0, 10 * MIB, 0), Footprint(0, 400 * MIB, 0)
    assert room(large, small).evict == 1  # the oldest alone gives back enough
    assert room(small, large).evict == 2  # the oldest gives back 10 MiB: the next must go too
    assert room(small, small) is None  # all of them would not make room
    # Loaded before in this process and measured at 30 MiB: it fits as it is.
    assert room(small, known=Footprint(0, 30 * MIB, 0)).evict == 0
    # A measurement with another offload says nothing about this one.
    assert room(small, large, known=Footprint(5, 30 * MIB, 0)).evict == 2


def test_a_model_goes_wholly_on_the_gpu_when_evicting_makes_room_else_takes_what_fits(demo_gguf):
    layout = read_gguf_layout(demo_gguf)
    whole = split(layout, 31, CONTEXT).gpu_bytes
    plenty = 1 << 40

    def room(free_gpu: int, *footprints: Footprint, gpu_layers: int | None = None):
        return make_room(
            layout,
            context_tokens=CONTEXT,
            free_ram_bytes=plenty,
            free_gpu_bytes=free_gpu,
            loaded=footprints,
            gpu_layers=gpu_layers,
        )

    on_gpu = Footprint(31, 50 * MIB, whole)
    partial = room(usable_bytes(whole) // 2, on_gpu)
    assert (partial.evict, partial.plan.offload.gpu_layers) == (1, 31)
    # Nothing to gain from evicting a CPU model: the layers that fit, without evicting.
    ten_layers = -(-split(layout, 10, CONTEXT).gpu_bytes * 100 // 90)
    kept = room(ten_layers, Footprint(0, 50 * MIB, 0))
    assert (kept.evict, kept.plan.offload.gpu_layers) == (0, 10)
    # An owner's count that the GPU cannot hold is refused.
    assert room(ten_layers, gpu_layers=-1) is None
    assert room(0, gpu_layers=0).plan.offload.gpu_layers == 0
