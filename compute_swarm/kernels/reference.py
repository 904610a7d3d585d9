"""Attention in plain torch, accumulated in fp32: the reference every kernel is tested against, and the
backend of last resort on any device.

Shapes, as in torch's scaled_dot_product_attention:
    q            (batch, heads, query_length, head_dim)
    k, v         (batch, kv_heads, key_length, head_dim), heads % kv_heads == 0 (grouped-query)
    padding_mask (batch, key_length) bool, True where a key may be attended to
    output       (batch, heads, query_length, head_dim), in q's dtype

Causal masking is aligned to the bottom right, as in FlashAttention 2: query i of Nq sees keys
j <= i + (Nk - Nq), so a query block that continues a cached prefix sees the whole prefix. A query that
sees no key at all (every key masked) gets zeros, not NaN.
"""

from __future__ import annotations

import math

import torch


def check_shapes(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, padding_mask: torch.Tensor | None
) -> None:
    """Raise ValueError unless the tensors have the shapes the module docstring gives."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k and v must be 4-D (batch, heads, seq, head_dim); got {q.dim()}, {k.dim()}, {v.dim()}"
        )
    batch, heads, _, head_dim = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, not {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"k/v {tuple(k.shape)} do not match q {tuple(q.shape)} in batch or head_dim")
    if k.shape[1] == 0 or heads % k.shape[1]:
        raise ValueError(f"q's {heads} heads must be a multiple of k/v's {k.shape[1]} heads")
    if padding_mask is not None and (
        padding_mask.dtype != torch.bool or padding_mask.shape != (batch, k.shape[2])
    ):
        raise ValueError(
            f"padding_mask must be bool of shape (batch, key_length) = {(batch, k.shape[2])}, "
            f"not {padding_mask.dtype} {tuple(padding_mask.shape)}"
        )


def resolve_scale(head_dim: int, scale: float | None) -> float:
    """The scale the logits get: 1/sqrt(head_dim) unless one is given."""
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def allowed_keys(
    query_length: int,
    key_length: int,
    *,
    causal: bool,
    padding_mask: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor | None:
    """(batch or 1, 1, query_length, key_length) bool: which key each query may attend to; None: all."""
    allowed = None
    if causal:
        rows = torch.arange(query_length, device=device)[:, None] + (key_length - query_length)
        allowed = (rows >= torch.arange(key_length, device=device)[None, :])[None, None]
    if padding_mask is not None:
        keys = padding_mask[:, None, None, :]
        allowed = keys if allowed is None else allowed & keys
    return allowed


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    scale: float | None = None,
    padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    check_shapes(q, k, v, padding_mask)
    scale = resolve_scale(q.shape[-1], scale)
    group = q.shape[1] // k.shape[1]
    key = k.float().repeat_interleave(group, dim=1)
    value = v.float().repeat_interleave(group, dim=1)
    scores = torch.matmul(q.float(), key.transpose(-1, -2)) * scale  # (B, H, Nq, Nk)
    allowed = allowed_keys(q.shape[2], k.shape[2], causal=causal, padding_mask=padding_mask, device=q.device)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    probabilities = torch.softmax(scores, dim=-1)
    if allowed is not None:
        # A row with no allowed key is all NaN after the softmax: it attends to nothing.
        probabilities = torch.where(allowed.any(dim=-1, keepdim=True), probabilities, 0.0)
    return torch.matmul(probabilities, value).to(q.dtype)
