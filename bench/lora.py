"""LoRA training throughput: engine.lora against a plain transformers + peft loop, in the same run.

Both sides get the same model, the same tokenized examples, batch size, sequence length, LoRA
configuration, optimizer and number of steps. Each run happens in its own process so its peak memory
is its own; runs alternate (ours, baseline, ours, baseline, ...) and the median is reported.
tokens/s counts the non-padding tokens of steps 2..N (step 1 is warm-up), over the training loop's
wall time only (model loading excluded).

    python bench/lora.py [--model NAME_OR_PATH] [--steps 10] [--batch-size 4] [--max-length 64] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from compute_swarm.engine.jobs import DEMO_CHAT_DATASET

REPOSITORY = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY))
RESULTS = REPOSITORY / "bench" / "results" / "lora.json"


def make_spec(arguments: argparse.Namespace):
    from compute_swarm.engine.jobs import LoraJobSpec

    return LoraJobSpec(
        base_model=arguments.model,
        dataset=str(arguments.data),
        max_steps=arguments.steps,
        batch_size=arguments.batch_size,
        max_sequence_length=arguments.max_length,
        eval_fraction=0.0,
        checkpoint_interval=0,
        schedule="constant",
        dropout=0.05,
        seed=0,
    )


def peak_memory_bytes(device: str) -> int:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    # ru_maxrss is in KiB on Linux, in bytes on macOS.
    scale = 1 if platform.system() == "Darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def run_ours(arguments: argparse.Namespace) -> dict:
    from compute_swarm.engine import lora
    from compute_swarm.engine.records import Progress

    spec = make_spec(arguments)
    progress: list[Progress] = []
    with tempfile.TemporaryDirectory() as output:
        lora.train_lora(
            spec,
            output,
            device=arguments.device,
            report=lambda r: progress.append(r) if isinstance(r, Progress) else None,
        )
    first, last = progress[0], progress[-1]
    tokens = last.tokens_per_second * last.elapsed_seconds - first.tokens_per_second * first.elapsed_seconds
    return {
        "tokens": tokens,
        "seconds": last.elapsed_seconds - first.elapsed_seconds,
        "final_loss": last.loss,
        "peak_memory_bytes": peak_memory_bytes(arguments.device),
    }


def run_baseline(arguments: argparse.Namespace) -> dict:
    """The loop a practitioner writes from the transformers and peft docs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compute_swarm.engine import datasets, lora, models

    spec = make_spec(arguments)
    torch.manual_seed(spec.seed)
    directory = models.prepared_model_directory(spec.base_model)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    examples = datasets.tokenize_dataset(
        datasets.read_jsonl(spec.dataset), tokenizer, spec.max_sequence_length
    )
    precision = lora.choose_precision(arguments.device)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=precision.weights_dtype).to(
        arguments.device
    )
    model = get_peft_model(
        model,
        LoraConfig(
            r=spec.rank,
            lora_alpha=spec.alpha,
            lora_dropout=spec.dropout,
            target_modules=list(spec.target_modules),
            task_type="CAUSAL_LM",
        ),
    )
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=spec.learning_rate)
    order = torch.randperm(len(examples)).tolist()
    tokens, started, loss = 0, 0.0, float("nan")
    for step in range(spec.max_steps):
        if step == 1:
            tokens, started = 0, time.perf_counter()
        start = (step * spec.batch_size) % len(examples)
        batch_examples = [examples[order[(start + i) % len(examples)]] for i in range(spec.batch_size)]
        batch = lora.collate(batch_examples, tokenizer.pad_token_id, arguments.device)
        autocast = torch.autocast(
            arguments.device.split(":")[0],
            dtype=precision.autocast_dtype,
            enabled=precision.autocast_dtype is not None,
        )
        with autocast:
            output = model(**batch)
        output.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = output.loss.item()
        tokens += int(batch["attention_mask"].sum())
    if arguments.device.startswith("cuda"):
        torch.cuda.synchronize()
    return {
        "tokens": tokens,
        "seconds": time.perf_counter() - started,
        "final_loss": loss,
        "peak_memory_bytes": peak_memory_bytes(arguments.device),
    }


def measure_in_child(variant: str, arguments: argparse.Namespace) -> dict:
    command = [
        sys.executable,
        __file__,
        "--variant",
        variant,
        "--model",
        arguments.model,
        "--data",
        str(arguments.data),
        "--steps",
        str(arguments.steps),
        "--batch-size",
        str(arguments.batch_size),
        "--max-length",
        str(arguments.max_length),
        "--device",
        arguments.device,
    ]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise SystemExit(f"{variant} run failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data", type=Path, default=DEMO_CHAT_DATASET)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default=None)
    parser.add_argument("--variant", choices=["ours", "baseline"], help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.device is None:
        from compute_swarm.engine.devices import probe

        arguments.device = probe().best_device()
    if arguments.steps < 2:
        parser.error("--steps must be at least 2 (step 1 is warm-up)")

    if arguments.variant:
        result = (run_ours if arguments.variant == "ours" else run_baseline)(arguments)
        print(json.dumps(result))
        return

    runs: dict[str, list[dict]] = {"ours": [], "baseline": []}
    for repeat in range(arguments.repeats):
        for variant in ("ours", "baseline"):
            result = measure_in_child(variant, arguments)
            runs[variant].append(result)
            print(
                f"  run {repeat + 1} {variant:8s}: {result['tokens'] / result['seconds']:8.1f} tokens/s, "
                f"peak {result['peak_memory_bytes'] / 2**20:7.0f} MiB, final loss {result['final_loss']:.3f}",
                file=sys.stderr,
            )
    summary = {
        variant: {
            "tokens_per_second": statistics.median(run["tokens"] / run["seconds"] for run in results),
            "peak_memory_mib": statistics.median(run["peak_memory_bytes"] for run in results) / 2**20,
            "runs": results,
        }
        for variant, results in runs.items()
    }
    ratio = summary["ours"]["tokens_per_second"] / summary["baseline"]["tokens_per_second"]
    memory_kind = "peak CUDA memory allocated" if arguments.device.startswith("cuda") else "peak RSS"
    print(
        f"LoRA training on {arguments.device}: {arguments.model}, batch {arguments.batch_size}, "
        f"max length {arguments.max_length}, {arguments.steps} steps, median of {arguments.repeats}"
    )
    print(f"{'':28s}{'tokens/s':>10s}{memory_kind + ' (MiB)':>28s}")
    print(
        f"{'ours (engine.lora)':28s}{summary['ours']['tokens_per_second']:10.1f}"
        f"{summary['ours']['peak_memory_mib']:28.0f}"
    )
    print(
        f"{'baseline (plain loop)':28s}{summary['baseline']['tokens_per_second']:10.1f}"
        f"{summary['baseline']['peak_memory_mib']:28.0f}"
    )
    print(f"ratio ours/baseline: {ratio:.3f} (goal >= 0.95)")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "device": arguments.device,
                "model": arguments.model,
                "steps": arguments.steps,
                "batch_size": arguments.batch_size,
                "max_length": arguments.max_length,
                "ratio": ratio,
                **summary,
            },
            indent=2,
        )
    )
    print(f"results: {RESULTS}")


if __name__ == "__main__":
    main()
