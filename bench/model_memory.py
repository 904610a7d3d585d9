"""What a LoRA fine-tune of each popular 0.5-8B base needs on a GPU, by how its base is held: 4 bits
(nf4, QLoRA), 8 bits (LLM.int8()) and 16 bits (bf16), and the smallest common card each fits.

The job: rank 16 on q_proj, k_proj, v_proj, o_proj, batch 1 × 512 tokens, gradient checkpointing on
(the settings QLoRA's paper trains with, and what a buyer sets to fit a gaming card), on CUDA in bf16.
"Needs" is the free memory the scheduler asks of a node: engine.memory.estimate_lora's peak divided by
USABLE_PERCENT. "An N GB card" is N GiB of VRAM (what nvidia-smi reports for an RTX 3060 12 GB:
12288 MiB) less 1 GiB the desktop holds (compositor, browser), so a card fits when need <= N - 1 GiB.

The published reference: Dettmers et al. 2023 (QLoRA, arXiv 2305.14314) fine-tune LLaMA-65B on one
48 GB GPU ("from >780GB to <48GB"). That run used paged 32-bit optimizer states and adapters on every
linear layer (rank 64); the last line below estimates it with those adapters, batch 1 × 512. Our
estimate (46 GiB) keeps the adapters in fp32 with fp32 AdamW states, 16 bytes a LoRA parameter
(12 GiB of the 46); the paper's code casts the adapters to bf16 (12 bytes a parameter) and pages the
optimizer states out to CPU memory when the GPU fills, which is how that run stays under 48 GB.

    python bench/model_memory.py [--sequence-length 512] [--batch-size 1] [--rank 16] [--no-checkpointing]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from compute_swarm.engine.jobs import LoraJobSpec
from compute_swarm.engine.memory import (
    GIB,
    PUBLISHED_SHAPES,
    decoder_shape,
    estimate_lora,
    free_bytes_needed,
    smallest_card_gb,
)

ALL_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# LLaMA-65B's config (Touvron et al. 2023): 65,285,660,672 parameters.
LLAMA_65B = decoder_shape(
    layer_count=80,
    hidden_size=8192,
    intermediate_size=22016,
    attention_heads=64,
    key_value_heads=64,
    vocabulary_size=32000,
    tied_embeddings=False,
)


def smallest_card(needed_bytes: int) -> str:
    card = smallest_card_gb(needed_bytes)
    return f"{card} GB" if card is not None else "none"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequence-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--no-checkpointing", action="store_true")
    arguments = parser.parse_args()

    def spec(quantization: str, **changes: object) -> LoraJobSpec:
        settings: dict[str, object] = dict(
            base_model="bench",
            dataset="bench.jsonl",
            max_steps=1,
            rank=arguments.rank,
            batch_size=arguments.batch_size,
            max_sequence_length=arguments.sequence_length,
            gradient_checkpointing=not arguments.no_checkpointing,
            quantization=quantization,
        )
        return LoraJobSpec(**{**settings, **changes})

    def needed(job: LoraJobSpec, shape) -> int:
        return free_bytes_needed(
            estimate_lora(job, shape, device_kind="cuda", compute_dtype_bytes=2).total_bytes
        )

    print(
        f"rank {arguments.rank} on q/k/v/o, batch {arguments.batch_size} × {arguments.sequence_length} tokens, "
        f"gradient checkpointing {'off' if arguments.no_checkpointing else 'on'}, CUDA bf16; "
        f"free memory needed in GiB (smallest card)"
    )
    print(f"{'model':<16} {'parameters':>14}  {'nf4':>16}  {'int8':>16}  {'bf16':>16}")
    for name, (shape, _) in PUBLISHED_SHAPES.items():
        cells = []
        for quantization in ("nf4", "int8", "none"):
            need = needed(spec(quantization), shape)
            cells.append(f"{need / GIB:5.1f} ({smallest_card(need):>5})")
        print(f"{name:<16} {shape.parameters:>14,}  " + "  ".join(f"{cell:>16}" for cell in cells))

    paper = spec("nf4", rank=64, target_modules=ALL_LINEARS, batch_size=1, max_sequence_length=512)
    held = estimate_lora(paper, LLAMA_65B, device_kind="cuda", compute_dtype_bytes=2)
    print(
        f"\nLLaMA-65B, nf4, rank 64 on every linear, batch 1 × 512, checkpointing: {held.total_bytes / GIB:.1f} GiB "
        f"held ({held.breakdown()}); QLoRA's paper: under 48 GB"
    )


if __name__ == "__main__":
    main()
