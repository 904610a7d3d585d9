"""Attention throughput: our Triton kernel against torch's scaled_dot_product_attention (each backend
this machine has) and the pure-torch reference, in the same run, on the same tensors.

FLOPs counted (as FlashAttention's benchmarks do):
    forward            4 · B · H · N² · D, halved when causal (two matmuls of 2·N²·D each)
    backward           2.5 × forward (five matmuls instead of two)
    forward+backward   3.5 × forward
TFLOPS = FLOPs / time. On a GPU the full sweep: N = 512 … 16384, D = 64 and 128, causal and not,
with B·N = 16384 tokens and H·D = 2048 (FlashAttention-2's setting), timed by triton.testing.do_bench.
On the CPU (Triton's interpreter) a small correctness-and-timing pass: its numbers say nothing about GPUs.

    python bench/attention.py [--sequence-lengths 512 1024 ...] [--head-dims 64 128] [--dtype bf16]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY))
RESULTS = REPOSITORY / "bench" / "results" / "attention.json"
DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def forward_flops(batch: int, heads: int, length: int, head_dim: int, causal: bool) -> float:
    flops = 4.0 * batch * heads * length * length * head_dim
    return flops / 2 if causal else flops


def timer(device: str):
    """Milliseconds per call: triton's do_bench on a GPU (it flushes the L2 and takes the median), a
    median of a few calls on the CPU."""
    if device == "cuda":
        from triton.testing import do_bench

        return lambda function: do_bench(function, warmup=25, rep=100)

    def cpu_time(function) -> float:
        function()
        samples = []
        for _ in range(3):
            started = time.perf_counter()
            function()
            samples.append(time.perf_counter() - started)
        return 1000 * sorted(samples)[1]

    return cpu_time


def variants(device: str, include_reference: bool):
    """name -> attention(q, k, v, causal) for ours, each SDPA backend and the reference."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from compute_swarm.kernels.reference import attention_reference
    from compute_swarm.kernels.triton_attention import flash_attention

    def sdpa_with(backend):
        def run(q, k, v, causal):
            with sdpa_kernel([backend]):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)

        return run

    found = {"ours (triton)": lambda q, k, v, causal: flash_attention(q, k, v, causal=causal)}
    backends = {"sdpa flash": SDPBackend.FLASH_ATTENTION, "sdpa efficient": SDPBackend.EFFICIENT_ATTENTION}
    if hasattr(SDPBackend, "CUDNN_ATTENTION") and device == "cuda":
        backends["sdpa cudnn"] = SDPBackend.CUDNN_ATTENTION
    backends["sdpa math"] = SDPBackend.MATH
    for name, backend in backends.items():
        found[name] = sdpa_with(backend)
    if include_reference:
        found["reference"] = lambda q, k, v, causal: attention_reference(q, k, v, causal=causal)
    return found


def time_variant(time_call, attend, q, k, v, gradient, causal: bool, flops: float) -> dict:
    import torch

    output = attend(q, k, v, causal)
    forward_ms = time_call(lambda: attend(q, k, v, causal))
    backward_ms = time_call(lambda: torch.autograd.grad(output, (q, k, v), gradient, retain_graph=True))
    both_ms = time_call(lambda: torch.autograd.grad(attend(q, k, v, causal), (q, k, v), gradient))
    return {
        "forward_ms": forward_ms,
        "backward_ms": backward_ms,
        "forward_backward_ms": both_ms,
        "forward_tflops": flops / forward_ms / 1e9,
        "backward_tflops": 2.5 * flops / backward_ms / 1e9,
        "forward_backward_tflops": 3.5 * flops / both_ms / 1e9,
    }


def measure_shape(time_call, device, dtype, batch, heads, length, head_dim, causal) -> list[dict]:
    import torch

    from compute_swarm.kernels.reference import attention_reference

    generator = torch.Generator(device=device).manual_seed(0)
    q, k, v = (
        torch.randn(
            batch, heads, length, head_dim, device=device, dtype=dtype, generator=generator
        ).requires_grad_()
        for _ in range(3)
    )
    gradient = torch.randn_like(q)
    flops = forward_flops(batch, heads, length, head_dim, causal)
    shape = {"B": batch, "H": heads, "N": length, "D": head_dim, "causal": causal}
    # The reference holds the (N, N) scores of every head: keep it to sizes that fit.
    include_reference = batch * heads * length * length * 4 <= 8 << 30
    rows = []
    for name, attend in variants(device, include_reference).items():
        try:
            row = {
                "variant": name,
                **shape,
                **time_variant(time_call, attend, q, k, v, gradient, causal, flops),
            }
        except RuntimeError as error:  # this SDPA backend does not take these inputs
            rows.append({"variant": name, **shape, "skipped": str(error)[:200]})
            continue
        if name.startswith("ours") and include_reference:
            exact = attention_reference(q.float(), k.float(), v.float(), causal=causal)
            row["max_error_vs_fp32_reference"] = (attend(q, k, v, causal).float() - exact).abs().max().item()
        rows.append(row)
        print(
            f"  N={length:6d} D={head_dim:3d} {'causal' if causal else 'full  '} {name:16s} "
            f"fwd {row['forward_tflops']:9.3g}  bwd {row['backward_tflops']:9.3g}  "
            f"fwd+bwd {row['forward_backward_tflops']:9.3g} TFLOPS",
            flush=True,
        )
    return rows


def measure(arguments: argparse.Namespace) -> dict:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, DTYPES[arguments.dtype or ("bf16" if device == "cuda" else "fp16")])
    lengths = arguments.sequence_lengths or (
        [512, 1024, 2048, 4096, 8192, 16384] if device == "cuda" else [64, 128]
    )
    time_call = timer(device)
    rows = []
    for head_dim in arguments.head_dims:
        heads = max(1, 2048 // head_dim) if device == "cuda" else 2
        for length in lengths:
            batch = max(1, 16384 // length) if device == "cuda" else 1
            for causal in (False, True):
                rows += measure_shape(time_call, device, dtype, batch, heads, length, head_dim, causal)
                if device == "cuda":
                    torch.cuda.empty_cache()
    return {
        "device": torch.cuda.get_device_name()
        if device == "cuda"
        else "cpu (Triton interpreter: not a GPU figure)",
        "dtype": str(dtype).removeprefix("torch."),
        "formula": "forward 4*B*H*N*N*D (halved when causal); backward 2.5x forward; forward+backward 3.5x forward",
        "rows": rows,
        "ratios": ratios(rows),
    }


def ratios(rows: list[dict]) -> list[dict]:
    """Per shape: ours / the best SDPA backend, for each of forward, backward, forward+backward."""
    shapes = {(row["N"], row["D"], row["causal"]) for row in rows if "forward_ms" in row}
    summary = []
    for length, head_dim, causal in sorted(shapes):
        same = [
            row
            for row in rows
            if (row["N"], row["D"], row["causal"]) == (length, head_dim, causal) and "forward_ms" in row
        ]
        ours = next((row for row in same if row["variant"].startswith("ours")), None)
        sdpa = [row for row in same if row["variant"].startswith("sdpa")]
        if ours is None or not sdpa:
            continue
        entry = {"N": length, "D": head_dim, "causal": causal}
        for measure_name in ("forward_tflops", "backward_tflops", "forward_backward_tflops"):
            best = max(sdpa, key=lambda row: row[measure_name])
            entry[measure_name.removesuffix("_tflops")] = {
                "ours": ours[measure_name],
                "best_sdpa": best[measure_name],
                "best_sdpa_backend": best["variant"],
                "ratio": ours[measure_name] / best[measure_name],
            }
        summary.append(entry)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sequence-lengths", type=int, nargs="+")
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default bf16 on a GPU, fp16 on the CPU")
    parser.add_argument("--output", type=Path, default=RESULTS)
    arguments = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        # Triton reads this when the kernels are defined, before kernels.triton_attention is imported.
        os.environ.setdefault("TRITON_INTERPRET", "1")
        if arguments.dtype == "bf16":
            parser.error("bf16 tl.dot does not run in Triton's CPU interpreter: use fp16 or fp32 here")
    print(__doc__.split("\n\n")[1], flush=True)
    result = measure(arguments)
    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    arguments.output.write_text(json.dumps(result, indent=2))
    print(f"\n{result['device']}, {result['dtype']}; ours / best torch SDPA backend (TFLOPS):")
    for entry in result["ratios"]:
        parts = [
            f"{name} {entry[name]['ours']:.3g} vs {entry[name]['best_sdpa']:.3g} ({entry[name]['ratio']:.2f}x)"
            for name in ("forward", "backward", "forward_backward")
        ]
        print(
            f"  N={entry['N']:6d} D={entry['D']:3d} {'causal' if entry['causal'] else 'full  '} "
            + "; ".join(parts)
        )
    errors = [
        row["max_error_vs_fp32_reference"]
        for row in result["rows"]
        if row.get("max_error_vs_fp32_reference") is not None
    ]
    if errors:
        print(f"largest error of ours against the fp32 reference: {max(errors):.2e}")
    print(f"written to {arguments.output}")
    if not math.isfinite(max(errors, default=0.0)):
        raise SystemExit("our kernel gave a non-finite error")


if __name__ == "__main__":
    main()
