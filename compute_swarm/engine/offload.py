"""How many of a GGUF model's layers llama.cpp should put on the GPU, and what each side then holds.

llama.cpp's own tools fit `-ngl` to the free memory (`--fit`); its C API and llama-cpp-python take
a number, so the node works it out here. Only arithmetic: engine.resources reads the layout from the
file (read_gguf_layout), the pool measures what a loaded model really holds.

How llama.cpp counts (src/llama-model.cpp, load_tensors): n_gpu_layers counts the repeating blocks
and the output layer (output norm and head), n_layer + 1 in all. Since llama.cpp PR #18148
(December 2025) the output layer is offloaded first: i_gpu_start = max(n_layer + 1 - n_gpu_layers, 0),
and the output layer is index n_layer, so n_gpu_layers = 1 puts the output layer alone on the GPU,
k puts it and the last k - 1 blocks there. The input layer (token embedding) always stays on the
CPU. With tied embeddings the output layer on a GPU is a copy of the token embedding (llama.cpp's
TENSOR_DUPLICATED); on the CPU it reads the embedding in place. A block's KV cache lives where the
block does (offload_kqv, on by default).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from compute_swarm.engine.memory import MIB, format_bytes, usable_bytes
from compute_swarm.protocol import Offload

# llama.cpp keeps its KV cache in f16 unless told otherwise (type_k, type_v).
KV_CACHE_BYTES_PER_ELEMENT = 2
# The physical batch llama-cpp-python evaluates a prompt in (n_ubatch), which sizes the compute buffers.
BATCH_TOKENS = 512
# The CUDA/ROCm runtime of the process serving models: its context, cuBLAS workspaces and llama.cpp's
# pools (250-400 MiB on recent drivers). Paid once per process, on its first load with GPU layers.
GPU_RUNTIME_BYTES = 400 * MIB


@dataclass(frozen=True)
class GgufLayout:
    """What the offload plan needs of a GGUF model (and its LoRA adapter), read from file headers."""

    block_weight_bytes: tuple[int, ...]  # per repeating block, adapter tensors included
    block_kv_bytes_per_token: tuple[int, ...]  # K and V of one token, per block, in f16
    input_bytes: int  # token embedding and any tensor outside the blocks and output layer: always RAM
    output_gpu_bytes: int  # the output layer on a GPU (the embedding copied there when tied)
    output_cpu_bytes: int  # the output layer on the CPU (only its norm when tied: it reads the embedding)
    vocabulary_size: int
    embedding_length: int
    feed_forward_length: int
    attention_heads: int

    @property
    def block_count(self) -> int:
        return len(self.block_weight_bytes)


@dataclass(frozen=True)
class OffloadPlan:
    """An offload and the bytes it puts on each side."""

    offload: Offload
    gpu_bytes: int  # weights, KV cache and compute buffer on the GPU (0 when CPU only)
    ram_bytes: int  # the same in RAM, the mmapped weights counted as resident

    def describe(self) -> str:
        held = f"{format_bytes(self.ram_bytes)} in RAM"
        if self.gpu_bytes:
            held += f", {format_bytes(self.gpu_bytes)} on the GPU"
        return f"{self.offload.describe()} ({held})"


def compute_buffer_bytes(layout: GgufLayout, context_tokens: int, *, output: bool, blocks: bool) -> int:
    """One backend's compute buffer for a batch of BATCH_TOKENS: ggml reuses memory between graph
    nodes, so its size is the largest intermediate plus the residual stream, not their sum.

    output: the output layer runs here (logits, n_ubatch × vocabulary in f32); blocks: some blocks run
    here (attention scores n_heads × context × n_ubatch in f32, as flash attention is off; the MLP's
    gate and up activations). Measured against llama.cpp's own report for SmolLM2-135M on the CPU:
    98.25 MiB at 1024 tokens of context (this gives 99.25), 99.38 MiB at 4096 (102.25).
    """
    largest = 0
    if output:
        largest = BATCH_TOKENS * layout.vocabulary_size * 4
    if blocks:
        scores = layout.attention_heads * context_tokens * BATCH_TOKENS * 4
        mlp = 2 * BATCH_TOKENS * layout.feed_forward_length * 4
        largest = max(largest, scores, mlp)
    residual = 2 * BATCH_TOKENS * layout.embedding_length * 4
    mask = context_tokens * BATCH_TOKENS * 2  # the f16 attention mask
    return largest + residual + (mask if blocks else 0)


def split(layout: GgufLayout, gpu_layers: int, context_tokens: int) -> OffloadPlan:
    """The bytes each side holds with `gpu_layers` on the GPU (negative or too many: all of them)."""
    layers = layout.block_count + 1
    if gpu_layers < 0 or gpu_layers > layers:
        gpu_layers = layers
    gpu_blocks = max(0, gpu_layers - 1)
    cpu_blocks = layout.block_count - gpu_blocks

    def blocks_bytes(indexes: Sequence[int]) -> int:
        return sum(
            layout.block_weight_bytes[index] + layout.block_kv_bytes_per_token[index] * context_tokens
            for index in indexes
        )

    cpu_indexes = range(cpu_blocks)
    gpu_indexes = range(cpu_blocks, layout.block_count)
    gpu_bytes = 0
    if gpu_layers:
        gpu_bytes = (
            layout.output_gpu_bytes
            + blocks_bytes(gpu_indexes)
            + compute_buffer_bytes(layout, context_tokens, output=True, blocks=gpu_blocks > 0)
        )
    ram_bytes = (
        layout.input_bytes
        + (0 if gpu_layers else layout.output_cpu_bytes)
        + blocks_bytes(cpu_indexes)
        + compute_buffer_bytes(layout, context_tokens, output=gpu_layers == 0, blocks=cpu_blocks > 0)
    )
    return OffloadPlan(
        Offload(gpu_layers=gpu_layers, layers=layers), gpu_bytes=gpu_bytes, ram_bytes=ram_bytes
    )


def plan_offload(
    layout: GgufLayout,
    *,
    free_gpu_bytes: int,
    context_tokens: int,
    reserve_bytes: int = 0,
    gpu_layers: int | None = None,
) -> OffloadPlan:
    """The most layers whose bytes fit the usable share (USABLE_PERCENT) of `free_gpu_bytes`, less
    `reserve_bytes` (GPU_RUNTIME_BYTES before the process's first GPU load); 0 when not even the output
    layer fits. `gpu_layers`, when given (an owner's setting), is taken as it is (-1: all)."""
    if gpu_layers is not None:
        return split(layout, gpu_layers, context_tokens)
    budget = usable_bytes(max(0, free_gpu_bytes)) - reserve_bytes
    # The GPU's share only grows with the layer count: the first that fits, counting down, is the most.
    for count in range(layout.block_count + 1, 0, -1):
        plan = split(layout, count, context_tokens)
        if plan.gpu_bytes <= budget:
            return plan
    return split(layout, 0, context_tokens)


# Making room ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Footprint:
    """What a loaded model was measured to hold, with the offload it was loaded with."""

    gpu_layers: int
    ram_bytes: int
    gpu_bytes: int


@dataclass(frozen=True)
class Room:
    """The decision: evict the `evict` least recently used models, then load with `plan`."""

    evict: int
    plan: OffloadPlan
    ram_needed: int  # the plan's bytes, or what this model was measured to hold before
    gpu_needed: int


def make_room(
    layout: GgufLayout,
    *,
    context_tokens: int,
    free_ram_bytes: int,
    free_gpu_bytes: int | None,
    loaded: Sequence[Footprint],
    known: Footprint | None = None,
    reserve_bytes: int = 0,
    gpu_layers: int | None = None,
) -> Room | None:
    """How many of the `loaded` models (least recently used first) to evict, and the offload to load
    the new one with; None when it does not fit even with all of them gone.

    Evicting a model is counted as giving back what it was measured to hold (its Footprint), on each
    side. `free_gpu_bytes` is None where llama.cpp cannot offload: the model then runs on the CPU.
    `known`: this model's footprint from an earlier load in this process, used instead of the
    estimate when the offload is the same. A model that can go wholly on the GPU by evicting some
    others does; otherwise it takes the layers that fit without evicting more than RAM requires.
    """
    candidates: list[Room] = []
    for evict in range(len(loaded) + 1):
        credit_ram = sum(footprint.ram_bytes for footprint in loaded[:evict])
        credit_gpu = sum(footprint.gpu_bytes for footprint in loaded[:evict])
        if free_gpu_bytes is None:
            plan = split(layout, 0, context_tokens)
            gpu_free = 0
        else:
            gpu_free = free_gpu_bytes + credit_gpu
            plan = plan_offload(
                layout,
                free_gpu_bytes=gpu_free,
                context_tokens=context_tokens,
                reserve_bytes=reserve_bytes,
                gpu_layers=gpu_layers,
            )
        ram_needed, gpu_needed = plan.ram_bytes, plan.gpu_bytes
        if known is not None and known.gpu_layers == plan.offload.gpu_layers:
            ram_needed, gpu_needed = known.ram_bytes, known.gpu_bytes
        fits_gpu = gpu_needed == 0 or gpu_needed + reserve_bytes <= usable_bytes(gpu_free)
        if fits_gpu and ram_needed <= usable_bytes(free_ram_bytes + credit_ram):
            candidates.append(Room(evict, plan, ram_needed, gpu_needed))
    if not candidates:
        return None
    whole = [room for room in candidates if room.plan.offload.gpu_layers == room.plan.offload.layers]
    if free_gpu_bytes is not None and gpu_layers is None and whole:
        return whole[0]
    return candidates[0]
