"""FlashAttention-2 in Triton: a tiled forward with an online softmax that saves each row's log-sum-exp,
and a backward that recomputes the probabilities block by block for dQ, dK and dV. Causal (aligned to
the bottom right) or not, any sequence lengths, head dims up to 256, grouped-query attention, an
optional key padding mask; fp16, bf16 (and fp32) on CUDA/ROCm, fp16/fp32 on the CPU through
TRITON_INTERPRET=1. Learnt from Triton's fused-attention tutorial and Dao's FlashAttention-2 paper.

Layers, from the bottom: jit helpers (one key block of the forward), the autotuned kernels, their
launchers (shape checks, allocation, grid), `FlashAttention` (the autograd Function), and the one
public function `flash_attention`. The pure-torch reference is kernels.reference.attention_reference.

Shapes: q (B, H, Nq, D); k, v (B, Hkv, Nk, D) with H % Hkv == 0; any strides. Inside the kernels the
softmax runs in base 2: logits are scaled by softmax_scale * log2(e) so that exp2 replaces exp, and
the saved log-sum-exp `lse` (B, H, Nq) fp32 is in that base.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from compute_swarm.kernels.reference import check_shapes, resolve_scale

LOG2_E = 1.4426950408889634
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def interpreting() -> bool:
    """Triton runs kernels on the CPU, through numpy, when TRITON_INTERPRET=1 (tests on machines with no GPU)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


# ---- autotune configurations


def _configs(kind: str) -> list[triton.Config]:
    """The tile sizes tried for a kernel. The interpreter gets one small tile: it runs every config it
    is given, in numpy, and 16 is tl.dot's smallest side."""
    if interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
    if kind == "forward":
        tiles = [(128, 64), (128, 128), (128, 32), (64, 64), (64, 32)]
    else:  # the backward kernels hold more tiles at once (q, k, v, dO and two accumulators)
        tiles = [(64, 64), (128, 64), (64, 128), (32, 64), (64, 32), (32, 32)]
    return [
        triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)
        for block_m, block_n in tiles
        for warps in (4, 8)
        for stages in (2, 3, 4)
    ]


@functools.cache
def _shared_memory_limit(device_index: int) -> int:
    properties = triton.runtime.driver.active.utils.get_device_properties(device_index)
    return int(properties["max_shared_mem"])


def _fits_device(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop tiles whose pipelined loads would not fit the GPU's shared memory (a 4090 has 99 KiB per
    block, an H100 227 KiB): each stage buffers one key and one value tile, the query tile stays."""
    if interpreting():
        return configs
    head_dim = named_args["HEAD_DIM_PADDED"] if "HEAD_DIM_PADDED" in named_args else kwargs["HEAD_DIM_PADDED"]
    element = named_args["Q"].element_size()
    limit = _shared_memory_limit(named_args["Q"].device.index or 0)
    kept = [
        config
        for config in configs
        if element
        * head_dim
        * (config.kwargs["BLOCK_M"] * 2 + 2 * config.kwargs["BLOCK_N"] * config.num_stages)
        <= limit
    ]
    if head_dim > 128:  # wide heads: large query tiles spill registers
        kept = [config for config in kept if config.kwargs["BLOCK_M"] <= 64] or kept
    return kept or configs[-1:]


# Tuned once per power-of-two length, not per length: training batches vary in length, and each new
# key would benchmark every config again.
_AUTOTUNE_KEY = ["LENGTH_BUCKET", "HEAD_DIM_PADDED", "CAUSAL", "HAS_PADDING", "GROUP"]


# ---- jit helpers


@triton.jit
def _load_tile(head, offsets_rows, offsets_d, stride_row, stride_d, LENGTH, HEAD_DIM):
    """(rows, HEAD_DIM_PADDED) of one head's (length, head_dim) matrix; zeros past LENGTH and HEAD_DIM."""
    mask = (offsets_rows[:, None] < LENGTH) & (offsets_d[None, :] < HEAD_DIM)
    return tl.load(
        head + offsets_rows[:, None] * stride_row + offsets_d[None, :] * stride_d, mask=mask, other=0.0
    )


@triton.jit
def _load_tile_transposed(head, offsets_rows, offsets_d, stride_row, stride_d, LENGTH, HEAD_DIM):
    """The same tile read as (HEAD_DIM_PADDED, rows): keys as the right operand of q kᵀ."""
    mask = (offsets_rows[None, :] < LENGTH) & (offsets_d[:, None] < HEAD_DIM)
    return tl.load(
        head + offsets_rows[None, :] * stride_row + offsets_d[:, None] * stride_d, mask=mask, other=0.0
    )


@triton.jit
def _store_tile(head, tile, offsets_rows, offsets_d, stride_row, stride_d, LENGTH, HEAD_DIM):
    mask = (offsets_rows[:, None] < LENGTH) & (offsets_d[None, :] < HEAD_DIM)
    pointers = head + offsets_rows[:, None] * stride_row + offsets_d[None, :] * stride_d
    tl.store(pointers, tile.to(head.dtype.element_ty), mask=mask)


@triton.jit
def _load_row_values(values, batch_head, offsets_m, QUERY_LENGTH):
    """One fp32 value per query row (log-sum-exp, delta) of a (batch * heads, query_length) array."""
    return tl.load(values + batch_head * QUERY_LENGTH + offsets_m, mask=offsets_m < QUERY_LENGTH, other=0.0)


@triton.jit
def _logits(
    q,
    k_block,
    scale_log2,
    offsets_m,
    offsets_n,
    padding_row,
    QUERY_LENGTH,
    KEY_LENGTH,
    CAUSAL: tl.constexpr,
    HAS_PADDING: tl.constexpr,
    MASKED: tl.constexpr,
):
    """(BLOCK_M, BLOCK_N) base-2 logits of q (BLOCK_M, D) against a key tile (D, BLOCK_N); keys a query may
    not see are -inf. MASKED is False for tiles known to be wholly visible (no bounds or causal test)."""
    logits = tl.dot(q, k_block) * scale_log2
    if MASKED:
        visible = offsets_n[None, :] < KEY_LENGTH
        if CAUSAL:
            visible = visible & (offsets_m[:, None] + (KEY_LENGTH - QUERY_LENGTH) >= offsets_n[None, :])
        logits = tl.where(visible, logits, float("-inf"))
    if HAS_PADDING:
        keep = tl.load(padding_row + offsets_n, mask=offsets_n < KEY_LENGTH, other=0)
        logits = tl.where(keep[None, :] != 0, logits, float("-inf"))
    return logits


@triton.jit
def _forward_block(
    accumulator,
    row_sum,
    row_max,
    q,
    K_head,
    V_head,
    padding_row,
    start_n,
    stride_kn,
    stride_kd,
    stride_vn,
    stride_vd,
    scale_log2,
    offsets_m,
    offsets_d,
    QUERY_LENGTH,
    KEY_LENGTH,
    HEAD_DIM,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_PADDING: tl.constexpr,
    MASKED: tl.constexpr,
):
    """One key/value tile of the online softmax: rescale what was accumulated by exp2(old max - new max),
    add this tile's probabilities times its values."""
    offsets_n = start_n + tl.arange(0, BLOCK_N)
    k_block = _load_tile_transposed(K_head, offsets_n, offsets_d, stride_kn, stride_kd, KEY_LENGTH, HEAD_DIM)
    logits = _logits(
        q,
        k_block,
        scale_log2,
        offsets_m,
        offsets_n,
        padding_row,
        QUERY_LENGTH,
        KEY_LENGTH,
        CAUSAL,
        HAS_PADDING,
        MASKED,
    )
    new_max = tl.maximum(row_max, tl.max(logits, 1))
    # A row that has seen only masked keys keeps a max of -inf; subtracting 0 keeps exp2 at 0, not NaN.
    safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
    probabilities = tl.math.exp2(logits - safe_max[:, None])
    rescale = tl.math.exp2(row_max - safe_max)
    row_sum = row_sum * rescale + tl.sum(probabilities, 1)
    v_block = _load_tile(V_head, offsets_n, offsets_d, stride_vn, stride_vd, KEY_LENGTH, HEAD_DIM)
    accumulator = accumulator * rescale[:, None]
    accumulator = tl.dot(probabilities.to(v_block.dtype), v_block, accumulator)
    return accumulator, row_sum, new_max


@triton.jit
def _visible_keys(start_m, QUERY_LENGTH, KEY_LENGTH, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    """The keys a query tile can see: [0, end). A causal tile sees up to its last row's diagonal."""
    if CAUSAL:
        return tl.minimum(KEY_LENGTH, start_m + BLOCK_M + (KEY_LENGTH - QUERY_LENGTH))
    return KEY_LENGTH


# ---- kernels


# fmt: off
@triton.autotune(
    configs=_configs("forward"), key=_AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _fits_device}
)
@triton.jit
def _forward_kernel(
    Q, K, V, Padding, Out, LSE,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pb,
    stride_ob, stride_oh, stride_om, stride_od,
    scale_log2,
    HEADS, QUERY_LENGTH, KEY_LENGTH, HEAD_DIM, LENGTH_BUCKET,
    HEAD_DIM_PADDED: tl.constexpr, GROUP: tl.constexpr, CAUSAL: tl.constexpr, HAS_PADDING: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # fmt: on
    # Grid: (query tiles, batch * heads). One program: BLOCK_M rows of one head.
    start_m = tl.program_id(0) * BLOCK_M
    batch_head = tl.program_id(1)
    batch, head = batch_head // HEADS, batch_head % HEADS
    kv_head = head // GROUP
    offsets_m = start_m + tl.arange(0, BLOCK_M)
    offsets_d = tl.arange(0, HEAD_DIM_PADDED)
    q = _load_tile(
        Q + batch * stride_qb + head * stride_qh, offsets_m, offsets_d, stride_qm, stride_qd, QUERY_LENGTH, HEAD_DIM
    )
    K_head = K + batch * stride_kb + kv_head * stride_kh
    V_head = V + batch * stride_vb + kv_head * stride_vh
    padding_row = Padding + batch * stride_pb

    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    accumulator = tl.zeros([BLOCK_M, HEAD_DIM_PADDED], dtype=tl.float32)

    end = _visible_keys(start_m, QUERY_LENGTH, KEY_LENGTH, BLOCK_M, CAUSAL)
    # Key tiles every row of this tile sees in full need no mask: those before the first row's
    # diagonal (causal) and before the last partial tile.
    unmasked_end = KEY_LENGTH // BLOCK_N * BLOCK_N
    if CAUSAL:
        unmasked_end = tl.minimum(
            unmasked_end, tl.maximum(0, start_m + 1 + (KEY_LENGTH - QUERY_LENGTH)) // BLOCK_N * BLOCK_N
        )
    unmasked_end = tl.minimum(unmasked_end, end)
    for start_n in range(0, unmasked_end, BLOCK_N):
        accumulator, row_sum, row_max = _forward_block(
            accumulator, row_sum, row_max, q, K_head, V_head, padding_row, start_n,
            stride_kn, stride_kd, stride_vn, stride_vd, scale_log2, offsets_m, offsets_d,
            QUERY_LENGTH, KEY_LENGTH, HEAD_DIM, BLOCK_N, CAUSAL, HAS_PADDING, False,
        )  # fmt: skip
    for start_n in range(unmasked_end, end, BLOCK_N):
        accumulator, row_sum, row_max = _forward_block(
            accumulator, row_sum, row_max, q, K_head, V_head, padding_row, start_n,
            stride_kn, stride_kd, stride_vn, stride_vd, scale_log2, offsets_m, offsets_d,
            QUERY_LENGTH, KEY_LENGTH, HEAD_DIM, BLOCK_N, CAUSAL, HAS_PADDING, True,
        )  # fmt: skip

    # A row that saw no key (all masked) gets zeros and a log-sum-exp of 0, which keeps its backward
    # probabilities at exp2(-inf - 0) = 0.
    seen = row_sum > 0
    output = accumulator / tl.where(seen, row_sum, 1.0)[:, None]
    lse = tl.where(seen, row_max + tl.math.log2(tl.where(seen, row_sum, 1.0)), 0.0)
    tl.store(LSE + batch_head * QUERY_LENGTH + offsets_m, lse, mask=offsets_m < QUERY_LENGTH)
    Out_head = Out + batch * stride_ob + head * stride_oh
    _store_tile(Out_head, output, offsets_m, offsets_d, stride_om, stride_od, QUERY_LENGTH, HEAD_DIM)


# fmt: off
@triton.jit
def _backward_preprocess_kernel(
    Out, DOut, Delta,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_db, stride_dh, stride_dm, stride_dd,
    HEADS, QUERY_LENGTH, HEAD_DIM,
    HEAD_DIM_PADDED: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # fmt: on
    # Grid: (query tiles, batch * heads). delta_i = sum_d O_id dO_id, the row term of softmax's backward.
    offsets_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    batch_head = tl.program_id(1)
    batch, head = batch_head // HEADS, batch_head % HEADS
    offsets_d = tl.arange(0, HEAD_DIM_PADDED)
    Out_head = Out + batch * stride_ob + head * stride_oh
    output = _load_tile(Out_head, offsets_m, offsets_d, stride_om, stride_od, QUERY_LENGTH, HEAD_DIM).to(tl.float32)
    DOut_head = DOut + batch * stride_db + head * stride_dh
    gradient = _load_tile(DOut_head, offsets_m, offsets_d, stride_dm, stride_dd, QUERY_LENGTH, HEAD_DIM)
    gradient = gradient.to(tl.float32)
    tl.store(
        Delta + batch_head * QUERY_LENGTH + offsets_m,
        tl.sum(output * gradient, 1),
        mask=offsets_m < QUERY_LENGTH,
    )


# fmt: off
@triton.autotune(
    configs=_configs("backward"), key=_AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _fits_device}
)
@triton.jit
def _backward_key_value_kernel(
    Q, K, V, Padding, DOut, LSE, Delta, DK, DV,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pb,
    stride_db, stride_dh, stride_dm, stride_dd,
    softmax_scale, scale_log2,
    HEADS, QUERY_LENGTH, KEY_LENGTH, HEAD_DIM, LENGTH_BUCKET,
    HEAD_DIM_PADDED: tl.constexpr, GROUP: tl.constexpr, CAUSAL: tl.constexpr, HAS_PADDING: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # fmt: on
    # Grid: (key tiles, batch * kv_heads). One program: dK and dV of BLOCK_N keys of one kv head, summed
    # over the GROUP query heads that share it (no atomics: each program owns its tile).
    start_n = tl.program_id(0) * BLOCK_N
    batch_kv_head = tl.program_id(1)
    kv_heads = HEADS // GROUP
    batch, kv_head = batch_kv_head // kv_heads, batch_kv_head % kv_heads
    offsets_n = start_n + tl.arange(0, BLOCK_N)
    offsets_d = tl.arange(0, HEAD_DIM_PADDED)
    K_head = K + batch * stride_kb + kv_head * stride_kh
    V_head = V + batch * stride_vb + kv_head * stride_vh
    k_block = _load_tile(K_head, offsets_n, offsets_d, stride_kn, stride_kd, KEY_LENGTH, HEAD_DIM)  # (BLOCK_N, D)
    v_block = _load_tile(V_head, offsets_n, offsets_d, stride_vn, stride_vd, KEY_LENGTH, HEAD_DIM)
    padding_row = Padding + batch * stride_pb
    dk = tl.zeros([BLOCK_N, HEAD_DIM_PADDED], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM_PADDED], dtype=tl.float32)
    # Causal: the first query that sees key start_n is start_n - (Nk - Nq).
    start = 0
    if CAUSAL:
        start = tl.maximum(0, start_n - (KEY_LENGTH - QUERY_LENGTH)) // BLOCK_M * BLOCK_M
    for group_member in range(GROUP):
        head = kv_head * GROUP + group_member
        batch_head = batch * HEADS + head
        Q_head = Q + batch * stride_qb + head * stride_qh
        DOut_head = DOut + batch * stride_db + head * stride_dh
        for start_m in range(start, QUERY_LENGTH, BLOCK_M):
            offsets_m = start_m + tl.arange(0, BLOCK_M)
            q = _load_tile(Q_head, offsets_m, offsets_d, stride_qm, stride_qd, QUERY_LENGTH, HEAD_DIM)
            gradient = _load_tile(DOut_head, offsets_m, offsets_d, stride_dm, stride_dd, QUERY_LENGTH, HEAD_DIM)
            lse = _load_row_values(LSE, batch_head, offsets_m, QUERY_LENGTH)
            delta = _load_row_values(Delta, batch_head, offsets_m, QUERY_LENGTH)
            logits = _logits(
                q, tl.trans(k_block), scale_log2, offsets_m, offsets_n, padding_row,
                QUERY_LENGTH, KEY_LENGTH, CAUSAL, HAS_PADDING, True,
            )  # fmt: skip
            probabilities = tl.math.exp2(logits - lse[:, None])  # (BLOCK_M, BLOCK_N); rows past Nq: dO is 0
            dv += tl.dot(tl.trans(probabilities.to(gradient.dtype)), gradient)
            dp = tl.dot(gradient, tl.trans(v_block))
            ds = probabilities * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
    dk *= softmax_scale
    DK_head = DK + batch * stride_kb + kv_head * stride_kh
    _store_tile(DK_head, dk, offsets_n, offsets_d, stride_kn, stride_kd, KEY_LENGTH, HEAD_DIM)
    DV_head = DV + batch * stride_vb + kv_head * stride_vh
    _store_tile(DV_head, dv, offsets_n, offsets_d, stride_vn, stride_vd, KEY_LENGTH, HEAD_DIM)


# fmt: off
@triton.autotune(
    configs=_configs("backward"), key=_AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _fits_device}
)
@triton.jit
def _backward_query_kernel(
    Q, K, V, Padding, DOut, LSE, Delta, DQ,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pb,
    stride_db, stride_dh, stride_dm, stride_dd,
    softmax_scale, scale_log2,
    HEADS, QUERY_LENGTH, KEY_LENGTH, HEAD_DIM, LENGTH_BUCKET,
    HEAD_DIM_PADDED: tl.constexpr, GROUP: tl.constexpr, CAUSAL: tl.constexpr, HAS_PADDING: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # fmt: on
    # Grid: (query tiles, batch * heads). One program: dQ of BLOCK_M rows of one head.
    start_m = tl.program_id(0) * BLOCK_M
    batch_head = tl.program_id(1)
    batch, head = batch_head // HEADS, batch_head % HEADS
    kv_head = head // GROUP
    offsets_m = start_m + tl.arange(0, BLOCK_M)
    offsets_d = tl.arange(0, HEAD_DIM_PADDED)
    Q_head = Q + batch * stride_qb + head * stride_qh
    q = _load_tile(Q_head, offsets_m, offsets_d, stride_qm, stride_qd, QUERY_LENGTH, HEAD_DIM)
    DOut_head = DOut + batch * stride_db + head * stride_dh
    gradient = _load_tile(DOut_head, offsets_m, offsets_d, stride_dm, stride_dd, QUERY_LENGTH, HEAD_DIM)
    lse = _load_row_values(LSE, batch_head, offsets_m, QUERY_LENGTH)
    delta = _load_row_values(Delta, batch_head, offsets_m, QUERY_LENGTH)
    K_head = K + batch * stride_kb + kv_head * stride_kh
    V_head = V + batch * stride_vb + kv_head * stride_vh
    padding_row = Padding + batch * stride_pb
    dq = tl.zeros([BLOCK_M, HEAD_DIM_PADDED], dtype=tl.float32)
    end = _visible_keys(start_m, QUERY_LENGTH, KEY_LENGTH, BLOCK_M, CAUSAL)
    for start_n in range(0, end, BLOCK_N):
        offsets_n = start_n + tl.arange(0, BLOCK_N)
        k_transposed = _load_tile_transposed(K_head, offsets_n, offsets_d, stride_kn, stride_kd, KEY_LENGTH, HEAD_DIM)
        v_transposed = _load_tile_transposed(V_head, offsets_n, offsets_d, stride_vn, stride_vd, KEY_LENGTH, HEAD_DIM)
        logits = _logits(
            q, k_transposed, scale_log2, offsets_m, offsets_n, padding_row,
            QUERY_LENGTH, KEY_LENGTH, CAUSAL, HAS_PADDING, True,
        )  # fmt: skip
        probabilities = tl.math.exp2(logits - lse[:, None])
        dp = tl.dot(gradient, v_transposed)
        ds = probabilities * (dp - delta[:, None])
        dq += tl.dot(ds.to(k_transposed.dtype), tl.trans(k_transposed))
    dq *= softmax_scale
    DQ_head = DQ + batch * stride_qb + head * stride_qh
    _store_tile(DQ_head, dq, offsets_m, offsets_d, stride_qm, stride_qd, QUERY_LENGTH, HEAD_DIM)


# ---- launchers


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, padding_mask: torch.Tensor | None) -> None:
    check_shapes(q, k, v, padding_mask)
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"q, k and v must share one dtype of {SUPPORTED_DTYPES}; got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"head_dim {q.shape[-1]} is above the {MAX_HEAD_DIM} this kernel supports")
    if not interpreting() and q.device.type != "cuda":
        raise ValueError(
            f"the Triton kernel runs on CUDA/ROCm GPUs (or with TRITON_INTERPRET=1), not on {q.device}"
        )
    if len({q.device, k.device, v.device}) != 1:
        raise ValueError("q, k and v must be on one device")


def _padding_arguments(padding_mask: torch.Tensor | None, like: torch.Tensor) -> tuple[torch.Tensor, int]:
    if padding_mask is None:
        return like, 0  # never read: HAS_PADDING is False
    padding = padding_mask.to(device=like.device, dtype=torch.int8).contiguous()
    return padding, padding.stride(0)


def _common(q: torch.Tensor, k: torch.Tensor) -> dict:
    return {
        "HEADS": q.shape[1],
        "QUERY_LENGTH": q.shape[2],
        "KEY_LENGTH": k.shape[2],
        "HEAD_DIM": q.shape[3],
        "LENGTH_BUCKET": triton.next_power_of_2(max(q.shape[2], k.shape[2])),
        "HEAD_DIM_PADDED": max(16, triton.next_power_of_2(q.shape[3])),
        "GROUP": q.shape[1] // k.shape[1],
    }


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    softmax_scale: float,
    padding_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(output (B, H, Nq, D) in q's dtype, lse (B, H, Nq) fp32 in base 2)."""
    _check(q, k, v, padding_mask)
    batch, heads, query_length, _ = q.shape
    output = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((batch, heads, query_length), device=q.device, dtype=torch.float32)
    padding, stride_padding = _padding_arguments(padding_mask, q)

    def grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(query_length, meta["BLOCK_M"]), batch * heads)

    _forward_kernel[grid](
        q, k, v, padding, output, lse,
        *q.stride(), *k.stride(), *v.stride(), stride_padding, *output.stride(),
        softmax_scale * LOG2_E,
        CAUSAL=causal, HAS_PADDING=padding_mask is not None, **_common(q, k),
    )  # fmt: skip
    return output, lse


def backward(
    gradient: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    output: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
    softmax_scale: float,
    padding_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv), each in its input's dtype and shape."""
    batch, heads, query_length, _ = q.shape
    common = _common(q, k)
    delta = torch.empty_like(lse)
    preprocess_block = 16 if interpreting() else 64
    _backward_preprocess_kernel[(triton.cdiv(query_length, preprocess_block), batch * heads)](
        output, gradient, delta, *output.stride(), *gradient.stride(),
        heads, query_length, q.shape[3], common["HEAD_DIM_PADDED"], preprocess_block,
    )  # fmt: skip
    # Each gradient takes its input's strides: the kernels index both with one set.
    dq, dk, dv = (torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device) for t in (q, k, v))
    padding, stride_padding = _padding_arguments(padding_mask, q)
    arguments = (
        *q.stride(), *k.stride(), *v.stride(), stride_padding, *gradient.stride(),
        softmax_scale, softmax_scale * LOG2_E,
    )  # fmt: skip
    flags = {"CAUSAL": causal, "HAS_PADDING": padding_mask is not None, **common}
    _backward_key_value_kernel[lambda meta: (triton.cdiv(k.shape[2], meta["BLOCK_N"]), batch * k.shape[1])](
        q, k, v, padding, gradient, lse, delta, dk, dv, *arguments, **flags
    )
    _backward_query_kernel[lambda meta: (triton.cdiv(query_length, meta["BLOCK_M"]), batch * heads)](
        q, k, v, padding, gradient, lse, delta, dq, *arguments, **flags
    )
    return dq, dk, dv


# ---- autograd


def _dense(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor itself when its strides are a permutation of a contiguous layout (a transposed view,
    as transformers passes), else a contiguous copy: gradients are written with the input's strides,
    which an expanded (stride 0) or sliced tensor cannot take."""
    expected = 1
    for dimension in sorted(range(tensor.dim()), key=tensor.stride):
        if tensor.shape[dimension] != 1 and tensor.stride(dimension) != expected:
            return tensor.contiguous()
        expected *= tensor.shape[dimension]
    return tensor


class FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal: bool, softmax_scale: float, padding_mask):
        q, k, v = _dense(q), _dense(k), _dense(v)
        output, lse = forward(q, k, v, causal, softmax_scale, padding_mask)
        ctx.save_for_backward(q, k, v, output, lse, padding_mask)
        ctx.causal, ctx.softmax_scale = causal, softmax_scale
        return output

    @staticmethod
    def backward(ctx, gradient):
        q, k, v, output, lse, padding_mask = ctx.saved_tensors
        dq, dk, dv = backward(gradient, q, k, v, output, lse, ctx.causal, ctx.softmax_scale, padding_mask)
        return dq, dk, dv, None, None, None


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    scale: float | None = None,
    padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q kᵀ · scale) v over (batch, heads, seq, head_dim) tensors, differentiable in q, k and v.
    scale defaults to 1/sqrt(head_dim); k and v may have fewer heads than q (grouped-query); causal
    masking is aligned to the bottom right; padding_mask (batch, key_length) bool keeps True keys."""
    return FlashAttention.apply(q, k, v, bool(causal), resolve_scale(q.shape[-1], scale), padding_mask)
