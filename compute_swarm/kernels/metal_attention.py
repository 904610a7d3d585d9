"""Attention on Apple GPUs: a Metal kernel compiled at first use with torch.mps.compile_shader (the
forward pass; the backward recomputes through the reference, in torch on the GPU), and MPS's own
scaled_dot_product_attention where the kernel does not apply (bfloat16, head dims above 256, a
macOS whose Metal cannot compile it).

Imported lazily by kernels.attention and only on a machine with MPS; importing it elsewhere is harmless.
The kernel gives each (batch, head, query) row one thread, which walks the keys it may see with an
online softmax in fp32: simple, exact, and never materialises the (Nq, Nk) score matrix.
"""

from __future__ import annotations

import functools
import logging

import torch

from compute_swarm.kernels.reference import attention_reference, check_shapes, resolve_scale

logger = logging.getLogger(__name__)

MAX_HEAD_DIM = 256
KERNEL_DTYPES = {torch.float32: "float", torch.float16: "half"}

SOURCE = """
#include <metal_stdlib>
using namespace metal;

// sizes: batch, heads, kv_heads, query_length, key_length, head_dim, causal, has_padding
template <typename T>
kernel void attention_forward(
    device const T* q [[buffer(0)]],
    device const T* k [[buffer(1)]],
    device const T* v [[buffer(2)]],
    device const char* padding [[buffer(3)]],
    device T* out [[buffer(4)]],
    device const int* sizes [[buffer(5)]],
    device const float* scale [[buffer(6)]],
    uint index [[thread_position_in_grid]]) {
  const int batch = sizes[0], heads = sizes[1], kv_heads = sizes[2];
  const int query_length = sizes[3], key_length = sizes[4], head_dim = sizes[5];
  const bool causal = sizes[6] != 0, has_padding = sizes[7] != 0;
  if (index >= uint(batch * heads * query_length)) return;
  const int row = index % query_length;
  const int batch_head = index / query_length;
  const int head = batch_head % heads, b = batch_head / heads;
  const int kv_head = head / (heads / kv_heads);
  device const T* query = q + (ulong(batch_head) * query_length + row) * head_dim;
  device const T* keys = k + (ulong(b) * kv_heads + kv_head) * key_length * head_dim;
  device const T* values = v + (ulong(b) * kv_heads + kv_head) * key_length * head_dim;
  float accumulator[256];
  for (int d = 0; d < head_dim; ++d) accumulator[d] = 0.0f;
  float row_max = -INFINITY, row_sum = 0.0f;
  // Causal masking aligned to the bottom right: row i sees keys j <= i + (Nk - Nq).
  const int end = causal ? min(key_length, row + (key_length - query_length) + 1) : key_length;
  for (int j = 0; j < end; ++j) {
    if (has_padding && padding[b * key_length + j] == 0) continue;
    device const T* key = keys + ulong(j) * head_dim;
    float logit = 0.0f;
    for (int d = 0; d < head_dim; ++d) logit += float(query[d]) * float(key[d]);
    logit *= scale[0];
    const float new_max = max(row_max, logit);
    const float rescale = exp(row_max - new_max);
    const float probability = exp(logit - new_max);
    row_sum = row_sum * rescale + probability;
    device const T* value = values + ulong(j) * head_dim;
    for (int d = 0; d < head_dim; ++d) accumulator[d] = accumulator[d] * rescale + probability * float(value[d]);
    row_max = new_max;
  }
  device T* output = out + (ulong(batch_head) * query_length + row) * head_dim;
  for (int d = 0; d < head_dim; ++d) output[d] = T(row_sum > 0.0f ? accumulator[d] / row_sum : 0.0f);
}

template [[host_name("attention_forward_float")]] kernel void attention_forward<float>(
    device const float*, device const float*, device const float*, device const char*, device float*,
    device const int*, device const float*, uint);
template [[host_name("attention_forward_half")]] kernel void attention_forward<half>(
    device const half*, device const half*, device const half*, device const char*, device half*,
    device const int*, device const float*, uint);
"""


def available() -> bool:
    return hasattr(torch.backends, "mps") and torch.backends.mps.is_available()


@functools.cache
def _library():
    """The compiled shader library, or None where Metal cannot compile it (it is then SDPA's job)."""
    try:
        return torch.mps.compile_shader(SOURCE)
    except Exception as error:  # a RuntimeError with the Metal compiler's message, on old macOS
        logger.warning("the Metal attention kernel did not compile (%s); using MPS's own attention", error)
        return None


def _forward_kernel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    scale: float,
    padding_mask: torch.Tensor | None,
) -> torch.Tensor | None:
    """The Metal kernel's output, or None when it does not apply to these tensors."""
    library = _library()
    if library is None or q.dtype not in KERNEL_DTYPES or q.shape[-1] > MAX_HEAD_DIM:
        return None
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    batch, heads, query_length, head_dim = q.shape
    output = torch.empty_like(q)
    padding = (
        padding_mask.to(torch.int8).contiguous()
        if padding_mask is not None
        else torch.ones(1, dtype=torch.int8, device=q.device)
    )
    sizes = torch.tensor(
        [
            batch,
            heads,
            k.shape[1],
            query_length,
            k.shape[2],
            head_dim,
            int(causal),
            int(padding_mask is not None),
        ],
        dtype=torch.int32,
        device=q.device,
    )
    scale_buffer = torch.tensor([scale], dtype=torch.float32, device=q.device)
    kernel = getattr(library, f"attention_forward_{KERNEL_DTYPES[q.dtype]}")
    kernel(q, k, v, padding, output, sizes, scale_buffer, threads=batch * heads * query_length)
    return output


def _sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    scale: float,
    padding_mask: torch.Tensor | None,
) -> torch.Tensor:
    from compute_swarm.kernels.reference import allowed_keys

    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    mask = allowed_keys(q.shape[2], k.shape[2], causal=causal, padding_mask=padding_mask, device=q.device)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


class MetalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal: bool, scale: float, padding_mask):
        ctx.save_for_backward(q, k, v, padding_mask)
        ctx.causal, ctx.scale = causal, scale
        output = _forward_kernel(q, k, v, causal, scale, padding_mask)
        return output if output is not None else _sdpa(q, k, v, causal, scale, padding_mask)

    @staticmethod
    def backward(ctx, gradient):
        q, k, v, padding_mask = ctx.saved_tensors
        with torch.enable_grad():
            inputs = [tensor.detach().requires_grad_() for tensor in (q, k, v)]
            output = attention_reference(
                *inputs, causal=ctx.causal, scale=ctx.scale, padding_mask=padding_mask
            )
            dq, dk, dv = torch.autograd.grad(output, inputs, gradient)
        return dq, dk, dv, None, None, None


def metal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    scale: float | None = None,
    padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """kernels.triton_attention.flash_attention's contract, on MPS tensors."""
    check_shapes(q, k, v, padding_mask)
    if q.device.type != "mps":
        raise ValueError(f"the Metal kernel runs on Apple GPUs (mps tensors), not on {q.device}")
    return MetalAttention.apply(q, k, v, bool(causal), resolve_scale(q.shape[-1], scale), padding_mask)
