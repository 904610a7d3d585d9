"""Our attention kernels against the fp32 reference, with FlashAttention's rule: our error is at most
twice the error of plain torch attention computed in the same dtype, plus a small atol. Triton runs on
a CUDA/ROCm GPU when there is one, else on the CPU through TRITON_INTERPRET=1 (small shapes there)."""

from __future__ import annotations

import math

import pytest
import torch

from compute_swarm.kernels import attention as dispatch
from compute_swarm.kernels.reference import attention_reference

triton_attention = pytest.importorskip(
    "compute_swarm.kernels.triton_attention", reason="triton is not installed"
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"
ATOL = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def torch_in_dtype(q, k, v, causal=False, scale=None, padding_mask=None):
    """Attention as plain torch computes it in the inputs' own dtype: the error budget we compare with."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    from compute_swarm.kernels.reference import allowed_keys

    allowed = allowed_keys(q.shape[2], k.shape[2], causal=causal, padding_mask=padding_mask, device=q.device)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    probabilities = torch.softmax(scores, dim=-1)
    if allowed is not None:
        probabilities = torch.where(allowed.any(-1, keepdim=True), probabilities, 0.0)
    return torch.matmul(probabilities, v)


def inputs(batch, heads, kv_heads, query_length, key_length, head_dim, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def tensor(*shape):
        return torch.randn(*shape, generator=generator).to(device=DEVICE, dtype=dtype).requires_grad_()

    return (
        tensor(batch, heads, query_length, head_dim),
        tensor(batch, kv_heads, key_length, head_dim),
        tensor(batch, kv_heads, key_length, head_dim),
    )


def forward_and_gradients(function, q, k, v, gradient, **options):
    output = function(q, k, v, **options)
    return (output, *torch.autograd.grad(output, (q, k, v), gradient))


def assert_within_flash_attention_rule(q, k, v, **options):
    """Forward and the three gradients: |ours - fp32 reference| <= 2 |torch same dtype - fp32| + atol."""
    gradient = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(q)
    upcast = [tensor.detach().float().requires_grad_() for tensor in (q, k, v)]
    reference = forward_and_gradients(attention_reference, *upcast, gradient.float(), **options)
    ours = forward_and_gradients(triton_attention.flash_attention, q, k, v, gradient, **options)
    plain = forward_and_gradients(torch_in_dtype, q, k, v, gradient, **options)
    for name, mine, baseline, exact in zip(("output", "dq", "dk", "dv"), ours, plain, reference, strict=True):
        assert mine.dtype == q.dtype and mine.shape == baseline.shape, name
        our_error = (mine.float() - exact).abs().max().item()
        torch_error = (baseline.float() - exact).abs().max().item()
        assert our_error <= 2 * torch_error + ATOL[q.dtype], (
            f"{name}: ours {our_error:.2e}, torch {torch_error:.2e}"
        )


DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if ON_GPU else [])
# (batch, heads, kv_heads, query_length, key_length, head_dim): block-sized and odd lengths, keys
# longer and shorter than queries, grouped-query (2 and 4 query heads per kv head), head dims 32-128.
SHAPES = [
    (1, 2, 2, 16, 16, 32),
    (2, 4, 2, 37, 37, 64),
    (1, 4, 1, 29, 53, 64),
    (1, 2, 2, 53, 29, 32),
    (1, 2, 1, 1, 33, 64),
    (1, 2, 1, 18, 32, 32),  # a diagonal one key short of a tile boundary
    (1, 2, 2, 31, 32, 32),  # and one key past it
    (1, 2, 2, 19, 19, 96),
    (1, 2, 1, 24, 24, 128),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: "x".join(map(str, shape)))
def test_forward_and_gradients_match_the_reference(shape, causal, dtype):
    assert_within_flash_attention_rule(*inputs(*shape, dtype), causal=causal)


@pytest.mark.parametrize("head_dim", [256] + ([32, 64, 128] if ON_GPU else []))
def test_wide_heads(head_dim):
    assert_within_flash_attention_rule(*inputs(1, 2, 1, 17, 17, head_dim, torch.float16), causal=True)


@pytest.mark.skipif(not ON_GPU, reason="gpu: long sequences take minutes in the interpreter")
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_long_sequences_on_the_gpu(dtype, causal):
    assert_within_flash_attention_rule(*inputs(2, 8, 2, 1031, 1031, 128, dtype), causal=causal)


def test_a_padding_mask_and_a_custom_scale_and_rows_that_see_nothing():
    q, k, v = inputs(2, 4, 2, 23, 23, 32, torch.float32)
    keep = torch.ones(2, 23, dtype=torch.bool, device=DEVICE)
    keep[0, :6] = False  # left padding: with causal, the first six queries of row 0 see no key
    keep[1, -4:] = False
    assert_within_flash_attention_rule(q, k, v, causal=True, padding_mask=keep, scale=0.3)
    output = triton_attention.flash_attention(q, k, v, causal=True, padding_mask=keep)
    assert torch.isfinite(output).all() and output[0, :, :6].abs().max() == 0


def test_transposed_inputs_give_gradients_with_their_layout():
    # transformers hands over (B, H, N, D) views of (B, N, H, D) tensors.
    q, k, v = (
        tensor.detach().transpose(1, 2).contiguous().transpose(1, 2)
        for tensor in inputs(1, 2, 2, 20, 20, 32, torch.float32)
    )
    for tensor in (q, k, v):
        tensor.requires_grad_()
    assert not q.is_contiguous()
    assert_within_flash_attention_rule(q, k, v, causal=True)


def test_bad_inputs_are_refused_with_the_reason():
    q, k, v = inputs(1, 3, 2, 16, 16, 32, torch.float32)
    with pytest.raises(ValueError, match="multiple of"):
        triton_attention.flash_attention(q, k, v)
    q, k, v = inputs(1, 2, 2, 16, 16, 32, torch.float32)
    with pytest.raises(ValueError, match="one dtype"):
        triton_attention.flash_attention(q, k.half(), v)
    with pytest.raises(ValueError, match="padding_mask"):
        triton_attention.flash_attention(
            q, k, v, padding_mask=torch.ones(1, 15, dtype=torch.bool, device=DEVICE)
        )


def test_the_dispatcher_picks_a_backend_by_device_and_setting(monkeypatch):
    monkeypatch.delenv(dispatch.SETTING, raising=False)
    assert dispatch.default_backend("cpu") == "sdpa" and dispatch.default_backend("mps") == "metal"
    assert dispatch.transformers_implementation("cpu") == "sdpa"
    q, k, v = inputs(1, 2, 1, 16, 16, 32, torch.float32)
    assert torch.equal(
        dispatch.attention(q, k, v, causal=True, backend="reference"),
        attention_reference(q, k, v, causal=True),
    )
    monkeypatch.setenv(dispatch.SETTING, "triton")
    assert (
        dispatch.choose_backend("cpu") == "triton" and dispatch.transformers_implementation("cpu") == "swarm"
    )
    assert torch.allclose(
        dispatch.attention(q, k, v, causal=True), attention_reference(q, k, v, causal=True), atol=1e-5
    )
    monkeypatch.setenv(dispatch.SETTING, "tensor-cores-please")
    with pytest.raises(dispatch.AttentionSettingError, match="not one of"):
        dispatch.choose_backend("cpu")


def test_the_metal_kernel_is_refused_off_apple_gpus_and_imports_anywhere():
    from compute_swarm.kernels import metal_attention

    if not metal_attention.available():
        q, k, v = inputs(1, 2, 2, 16, 16, 32, torch.float32)
        with pytest.raises(ValueError, match="Apple GPUs"):
            metal_attention.metal_attention(q, k, v)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.backends.mps.is_available(), reason="gpu: needs an Apple GPU (MPS)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_the_metal_kernel_matches_the_reference(dtype, causal):
    from compute_swarm.kernels.metal_attention import metal_attention

    generator = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(2, 4, n, 64, generator=generator).to("mps", dtype).requires_grad_() for n in (37, 37, 37)
    )
    k = k.detach()[:, :2].requires_grad_()
    v = v.detach()[:, :2].requires_grad_()
    gradient = torch.randn(q.shape, generator=generator).to(q)
    ours = forward_and_gradients(metal_attention, q, k, v, gradient, causal=causal)
    upcast = [tensor.detach().float().requires_grad_() for tensor in (q, k, v)]
    exact = forward_and_gradients(attention_reference, *upcast, gradient.float(), causal=causal)
    plain = forward_and_gradients(torch_in_dtype, q, k, v, gradient, causal=causal)
    for mine, reference, baseline in zip(ours, exact, plain, strict=True):
        assert (mine.float() - reference).abs().max() <= 2 * (
            baseline.float() - reference
        ).abs().max() + ATOL[dtype]
