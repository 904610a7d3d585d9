"""The engine's `compute-swarm` subcommands: train on this machine, fetch models, show devices."""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

from pydantic import ValidationError

from compute_swarm.engine.jobs import add_lora_options


def register_commands(subcommands: argparse._SubParsersAction) -> None:
    train = subcommands.add_parser(
        "train",
        help="fine-tune a LoRA adapter on this machine",
        description="Fine-tune a LoRA adapter locally. The adapter lands in --output in peft's layout; "
        "the last line printed is that directory.",
    )
    train.add_argument(
        "--model",
        default=None,
        help="catalogue name, Hugging Face directory or .gguf file (default: the demo model)",
    )
    train.add_argument(
        "--data", required=True, type=Path, help="JSONL: chat 'messages' or 'prompt'/'completion'"
    )
    add_lora_options(train)
    train.add_argument("--output", type=Path, help="adapter directory (default: ./adapters/<time>)")
    train.add_argument("--device", help="cpu, cuda:N or mps (default: the best one found)")
    train.add_argument(
        "--resume", action="store_true", help="continue from the latest checkpoint in --output"
    )
    train.add_argument(
        "--sample",
        metavar="PROMPT",
        help="afterwards, show the base and the fine-tuned model's answers to PROMPT",
    )
    train.set_defaults(handler=_train)

    fetch = subcommands.add_parser("models", help="fetch and verify catalogue models")
    fetch.add_argument("names", nargs="*", help="catalogue names (default: the demo model)")
    fetch.set_defaults(handler=_fetch_models)

    devices = subcommands.add_parser("devices", help="show the GPUs and CPU this machine offers")
    devices.add_argument("--json", action="store_true")
    devices.set_defaults(handler=_show_devices)


def _train(arguments: argparse.Namespace) -> int:
    from tqdm import tqdm

    from compute_swarm.engine.jobs import (
        DEFAULT_MODEL,
        LoraJobSpec,
        describe_option_errors,
        lora_fields_from_options,
    )
    from compute_swarm.engine.records import CheckpointSaved, Completed, Failed, Log, Progress, Started
    from compute_swarm.engine.runner import JobRunner

    try:
        spec = LoraJobSpec(
            base_model=arguments.model or DEFAULT_MODEL,
            dataset=str(arguments.data.resolve()),
            **lora_fields_from_options(arguments),
        )
    except ValidationError as error:
        problems = "\n".join(f"  {line}" for line in describe_option_errors(error))
        print(f"compute-swarm train: invalid settings:\n{problems}", file=sys.stderr)
        return 2
    output = arguments.output or Path("adapters") / time.strftime("%Y%m%d-%H%M%S")
    runner = JobRunner(
        spec, output.resolve(), device=arguments.device, resume_from="latest" if arguments.resume else None
    )
    print(f"Training {spec.base_model} on {arguments.data} (log: {runner.log_path})", file=sys.stderr)
    bar: tqdm | None = None
    trained_on = arguments.device or "cpu"
    final = None
    try:
        runner.start()
        for record in runner.records():
            if isinstance(record, Started):
                trained_on = record.device
                print(
                    f"{record.train_examples} training and {record.eval_examples} held-out examples on "
                    f"{record.device}",
                    file=sys.stderr,
                )
                bar = tqdm(
                    total=record.total_steps, initial=record.resumed_from_step, unit="step", file=sys.stderr
                )
            elif isinstance(record, Progress) and bar is not None:
                bar.update(record.step - bar.n)
                postfix = {"loss": f"{record.loss:.3f}", "tok/s": f"{record.tokens_per_second:.0f}"}
                if record.eval_loss is not None:
                    postfix["eval"] = f"{record.eval_loss:.3f}"
                bar.set_postfix(postfix)
            elif isinstance(record, CheckpointSaved | Log):
                message = (
                    f"checkpoint at step {record.step}"
                    if isinstance(record, CheckpointSaved)
                    else record.message
                )
                (bar.write if bar else print)(message, file=sys.stderr)
            final = record
    except KeyboardInterrupt:
        print("\nStopping: saving a checkpoint (Ctrl-C again to abandon it)...", file=sys.stderr)
        runner.cancel()
        try:
            final = runner.run()
        except KeyboardInterrupt:
            runner.kill()
            return 130
    finally:
        if bar is not None:
            bar.close()
    if isinstance(final, Completed):
        loss_text = f", final loss {final.final_loss:.4f}" if final.final_loss is not None else ""
        eval_text = f", held-out loss {final.eval_loss:.4f}" if final.eval_loss is not None else ""
        print(f"Done: {final.steps} steps in {final.seconds:.0f} s{loss_text}{eval_text}", file=sys.stderr)
        if arguments.sample:
            _show_sample(spec, final.output_dir, arguments.sample, trained_on)
        print(final.output_dir)
        return 0
    assert isinstance(final, Failed)
    print(f"compute-swarm train: {final.kind.replace('_', ' ')}: {final.message}", file=sys.stderr)
    if final.kind == "crashed" and final.details:
        print(final.details, file=sys.stderr)
    if final.checkpoint:
        print(f"Resume with the same command plus --resume --output {output}", file=sys.stderr)
    return 1


def _show_sample(spec, adapter_dir: str, prompt: str, device: str) -> None:
    from transformers.utils import logging as transformers_logging

    from compute_swarm.engine.lora import compare_answers

    transformers_logging.disable_progress_bar()
    # peft calls a transformers helper that transformers 5 renamed; the warning means nothing to a user.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

    base_answer, tuned_answer = compare_answers(spec, adapter_dir, prompt, device=device)
    print(f"\nPrompt:     {prompt}\nBase model: {base_answer}\nFine-tuned: {tuned_answer}\n", file=sys.stderr)


def _fetch_models(arguments: argparse.Namespace) -> int:
    from compute_swarm.engine.models import DEFAULT_MODEL, ModelError, fetch_catalogue_model

    for name in arguments.names or [DEFAULT_MODEL]:
        try:
            print(fetch_catalogue_model(name))
        except ModelError as error:
            print(f"compute-swarm models: {error}", file=sys.stderr)
            return 1
    return 0


def _show_devices(arguments: argparse.Namespace) -> int:
    from compute_swarm.engine.devices import probe

    inventory = probe()
    if arguments.json:
        print(inventory.model_dump_json(indent=2))
        return 0
    cpu = inventory.cpu
    print(
        f"CPU: {cpu.name or 'unknown'}, {cpu.logical_cores} threads, "
        f"{cpu.memory_available_bytes / 2**30:.1f} of {cpu.memory_total_bytes / 2**30:.1f} GiB free"
    )
    for gpu in inventory.gpus:
        memory = (
            f"{gpu.memory_free_bytes / 2**30:.1f} of {gpu.memory_total_bytes / 2**30:.1f} GiB free"
            if gpu.memory_free_bytes is not None and gpu.memory_total_bytes is not None
            else "memory unknown"
        )
        temperature = f", {gpu.temperature_celsius:.0f} °C" if gpu.temperature_celsius is not None else ""
        print(f"GPU {gpu.index}: {gpu.name} ({gpu.backend}), {memory}{temperature}")
    print(f"Backends: {', '.join(inventory.backends)}; training would use {inventory.best_device()}")
    if cpu.missing_for_inference:
        print(
            f"Inference: unavailable, this CPU lacks {', '.join(cpu.missing_for_inference).upper()} "
            "(llama.cpp's portable build needs AVX2, FMA and F16C)"
        )
    else:
        print(f"Inference: {_llama_build()}")
    return 0


def _llama_build() -> str:
    """llama.cpp's build as llama-cpp-python reports it, read in a child: a build made for another CPU
    can crash the process that loads it."""
    import subprocess

    code = "import llama_cpp; print(llama_cpp.__version__, llama_cpp.llama_print_system_info().decode())"
    try:
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"llama-cpp-python could not be checked ({error})"
    if result.returncode == 0:
        version, _, features = result.stdout.strip().partition(" ")
        return f"llama-cpp-python {version}, {' '.join(features.split())}"
    if "No module named" in result.stderr:
        return "llama-cpp-python is not installed (the node extra installs it)"
    return f"llama-cpp-python fails to load (exit code {result.returncode}): {result.stderr.strip()[-300:]}"
