"""Compile our Triton kernels ahead of time for real GPU targets, with no GPU present: this catches
what Triton's CPU interpreter lets through (types, layouts, shared memory) before a seller's GPU does.

    python -m tests.kernels.compile_ahead cuda 90     (an H100; 89: an RTX 4090, 80: an A100)
    python -m tests.kernels.compile_ahead hip gfx942  (an MI300)

Run without TRITON_INTERPRET=1: kernels defined under the interpreter cannot be compiled.
"""

from __future__ import annotations

import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import compute_swarm.kernels.triton_attention as attention

TENSORS = {"Q", "K", "V", "Out", "DOut", "DK", "DV", "DQ"}
FP32_TENSORS = {"LSE", "Delta"}
FLOATS = {"scale_log2", "softmax_scale"}


def signature(function, dtype: str, constexprs: dict) -> dict[str, str]:
    """Triton's type for each argument, as the launcher passes them."""
    types = {}
    for name in function.arg_names:
        if name in constexprs:
            types[name] = "constexpr"
        elif name in TENSORS:
            types[name] = f"*{dtype}"
        elif name in FP32_TENSORS:
            types[name] = "*fp32"
        elif name == "Padding":
            types[name] = "*i8"
        elif name in FLOATS:
            types[name] = "fp32"
        else:
            types[name] = "i32"
    return types


def compile_all(target: GPUTarget) -> list[str]:
    compiled = []
    cases = [("bf16", True, True, 128, 128), ("fp16", False, False, 96, 128), ("fp16", True, False, 64, 64)]
    kernels = [
        (attention._forward_kernel.fn, 128),
        (attention._backward_key_value_kernel.fn, 64),
        (attention._backward_query_kernel.fn, 64),
    ]
    for function, block_m in kernels:
        for dtype, causal, padded, head_dim, head_dim_padded in cases:
            constexprs = {
                "HEAD_DIM_PADDED": head_dim_padded,
                "GROUP": 2,
                "CAUSAL": causal,
                "HAS_PADDING": padded,
                "BLOCK_M": block_m,
                "BLOCK_N": 64,
            }
            source = ASTSource(function, signature(function, dtype, constexprs), constexprs)
            kernel = triton.compile(source, target=target, options={"num_warps": 4, "num_stages": 2})
            compiled.append(
                f"{function.__name__} {dtype} D={head_dim} causal={causal}: {kernel.metadata.shared} B shared"
            )
    preprocess = attention._backward_preprocess_kernel
    constexprs = {"HEAD_DIM_PADDED": 128, "BLOCK_M": 64}
    triton.compile(
        ASTSource(preprocess, signature(preprocess, "bf16", constexprs), constexprs), target=target
    )
    compiled.append("_backward_preprocess_kernel")
    return compiled


def main() -> None:
    backend, architecture = sys.argv[1], sys.argv[2]
    if backend == "cuda":
        target = GPUTarget("cuda", int(architecture), 32)
    else:
        target = GPUTarget("hip", architecture, 64)
    for line in compile_all(target):
        print(line, flush=True)


if __name__ == "__main__":
    main()
