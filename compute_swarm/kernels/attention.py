"""One attention entry point for the engine: `attention(q, k, v, causal, scale, backend)` picks the
Triton kernel on CUDA/ROCm, the Metal kernel on Apple GPUs, or the torch reference, and
`transformers_implementation(device)` registers it with transformers' attention interface so that
models loaded by the engine (LoRA training, torch inference) run their attention through it.

The setting SWARM_ATTENTION_BACKEND overrides the choice: auto (the default), triton, metal,
reference, or sdpa / eager (transformers' own implementations, bypassing ours).
"""

from __future__ import annotations

import importlib.util
import os

import torch

from compute_swarm.kernels.reference import attention_reference

BACKENDS = ("triton", "metal", "reference")
SETTING = "SWARM_ATTENTION_BACKEND"
SETTINGS = ("auto", *BACKENDS, "sdpa", "eager")
# The name our attention is registered under in transformers' AttentionInterface.
IMPLEMENTATION = "swarm"


class AttentionSettingError(ValueError):
    pass


def setting() -> str:
    value = os.environ.get(SETTING, "auto").strip().lower() or "auto"
    if value not in SETTINGS:
        raise AttentionSettingError(f"{SETTING}={value!r} is not one of: {', '.join(SETTINGS)}")
    return value


def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def default_backend(device: torch.device | str) -> str:
    """Ours where a kernel of ours runs: Triton on CUDA/ROCm (torch names both "cuda"), Metal on MPS;
    "sdpa" (torch's fused attention, faster than the reference) elsewhere."""
    kind = torch.device(device).type
    if kind == "cuda" and _triton_installed():
        return "triton"
    if kind == "mps":
        return "metal"
    return "sdpa"


def choose_backend(device: torch.device | str) -> str:
    """The setting, or default_backend when it is auto."""
    chosen = setting()
    return default_backend(device) if chosen == "auto" else chosen


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    scale: float | None = None,
    backend: str | None = None,
    padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q kᵀ · scale) v on (batch, heads, seq, head_dim) tensors; k and v may have fewer heads
    (grouped-query); causal masking aligned to the bottom right; padding_mask (batch, key_length) bool
    keeps the True keys. backend: triton, metal or reference; None follows the setting."""
    if backend is None:
        backend = choose_backend(q.device)
        if backend in ("sdpa", "eager"):
            backend = "reference"  # asked of us directly: ours is the reference
    if backend == "triton":
        from compute_swarm.kernels.triton_attention import flash_attention

        return flash_attention(q, k, v, causal=causal, scale=scale, padding_mask=padding_mask)
    if backend == "metal":
        from compute_swarm.kernels.metal_attention import metal_attention

        return metal_attention(q, k, v, causal=causal, scale=scale, padding_mask=padding_mask)
    if backend == "reference":
        return attention_reference(q, k, v, causal=causal, scale=scale, padding_mask=padding_mask)
    raise AttentionSettingError(f"attention backend {backend!r} is not one of: {', '.join(BACKENDS)}")


# ---- transformers


def _transformers_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention function contract: (B, H, N, D) in, (B, N, H, D) out. The mask comes from
    the mask function registered beside it: None, or a (batch, key_length) bool padding mask."""
    if dropout:
        raise ValueError("swarm attention has no attention dropout; set the model's attention_dropout to 0")
    for unsupported in ("sliding_window", "softcap"):
        if kwargs.get(unsupported) is not None:
            raise ValueError(f"swarm attention does not support {unsupported}; load the model with sdpa")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            "swarm attention takes a (batch, key_length) padding mask, not a full attention mask"
        )
    causal = (is_causal if is_causal is not None else getattr(module, "is_causal", True)) and query.shape[
        2
    ] > 1
    output = attention(
        query,
        key,
        value,
        causal=causal,
        scale=scaling,
        backend=backend_in_use(IMPLEMENTATION, query.device),
        padding_mask=attention_mask,
    )
    return output.transpose(1, 2).contiguous(), None


def register_with_transformers() -> str:
    """Register our attention (and its mask function) with transformers; idempotent. Returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(IMPLEMENTATION, _transformers_attention)
    # The padding-only mask FlashAttention 2 takes: None when every key is real, else (batch, keys) bool.
    AttentionMaskInterface.register(IMPLEMENTATION, flash_attention_mask)
    return IMPLEMENTATION


def backend_in_use(attn_implementation: str, device: torch.device | str) -> str:
    """What runs the attention of a model loaded with `attn_implementation` on `device`: one of our
    BACKENDS when it was loaded with ours, else transformers' own implementation's name."""
    if attn_implementation != IMPLEMENTATION:
        return attn_implementation
    backend = choose_backend(device)
    return backend if backend in BACKENDS else "reference"


def transformers_implementation(device: torch.device | str) -> str:
    """The attn_implementation the engine loads models with on this device: ours where one of our
    kernels runs there (or the setting asks for one), else transformers' sdpa or eager."""
    backend = choose_backend(device)
    if backend in ("sdpa", "eager"):
        return backend
    return register_with_transformers()
