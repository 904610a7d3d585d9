"""`compute-swarm sweep run|show|cancel`: hyperparameter sweeps from the command line."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from compute_swarm.engine.jobs import DEFAULT_MODEL
from compute_swarm.protocol import format_credits
from compute_swarm.sdk.client import SwarmClient, SweepTable
from compute_swarm.sdk.commands import UsageError, client_from, command, upload_with_progress
from compute_swarm.sweeps import SWEEPABLE, expand, parse


def credits(text: str) -> int:
    """Credits as typed by a person ("2.5") to micro-credits, exactly."""
    whole, _, fraction = text.strip().partition(".")
    if not whole.isdigit() or (fraction and (not fraction.isdigit() or len(fraction) > 6)):
        raise argparse.ArgumentTypeError(f"{text!r} is not an amount of credits like 5 or 2.5")
    return int(whole) * 1_000_000 + int(fraction.ljust(6, "0") or 0)


def _name(text: str) -> tuple[str, str]:
    name, equals, values = text.partition("=")
    if not equals or name not in SWEEPABLE:
        raise argparse.ArgumentTypeError(f"{text!r}: write NAME=..., NAME one of {', '.join(SWEEPABLE)}")
    return name, values


def grid_values(text: str) -> tuple[str, dict]:
    """learning_rate=1e-4,3e-4,1e-3"""
    name, values = _name(text)
    try:
        return name, {"values": [float(value) for value in values.split(",")]}
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: values are numbers separated by commas") from None


def range_values(text: str) -> tuple[str, dict]:
    """learning_rate=1e-5:1e-3:log"""
    name, values = _name(text)
    parts = values.split(":")
    try:
        low, high = float(parts[0]), float(parts[1])
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(f"{text!r}: write NAME=LOW:HIGH or NAME=LOW:HIGH:log") from None
    if parts[2:] not in ([], ["log"]):
        raise argparse.ArgumentTypeError(f"{text!r}: only ':log' may follow LOW:HIGH")
    return name, {"low": low, "high": high, "log": parts[2:] == ["log"]}


def register(subcommands: argparse._SubParsersAction, connection: argparse.ArgumentParser) -> None:
    sweep = subcommands.add_parser("sweep", help="hyperparameter sweeps: many fine-tunes at once")
    actions = sweep.add_subparsers(dest="action", metavar="ACTION", required=True)

    run = actions.add_parser(
        "run",
        parents=[connection],
        help="sweep settings over a dataset; the worse trials stop early",
        description="Each trial is a LoRA fine-tune of the same data with one combination of the settings: "
        "every combination of --grid values, or --random N draws from --range and --grid. Trials run in "
        "parallel across the swarm's nodes; a trial whose held-out loss falls above the median of the "
        "others' at the same step is stopped and charged only for the steps it ran.",
    )
    run.add_argument(
        "--data", required=True, metavar="FILE_OR_FILE_ID", help="a local JSONL dataset, or a file id"
    )
    run.add_argument("--model", default=DEFAULT_MODEL)
    run.add_argument("--grid", type=grid_values, action="append", default=[], metavar="NAME=V1,V2,...")
    run.add_argument("--range", type=range_values, action="append", default=[], metavar="NAME=LOW:HIGH[:log]")
    run.add_argument("--random", type=int, metavar="N", help="draw N trials at random (else: the whole grid)")
    run.add_argument("--steps", type=int, default=30, help="steps per trial, unless swept (default 30)")
    run.add_argument("--batch-size", type=int)
    run.add_argument("--max-length", type=int)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--max-per-trial", type=credits, metavar="CREDITS", help="refuse a trial costing more")
    run.add_argument("--max-total", type=credits, metavar="CREDITS", help="refuse a sweep costing more")
    run.add_argument("--no-early-stopping", action="store_true", help="run every trial to its end")
    run.add_argument("--follow", action="store_true", help="wait for the trials, then show the table")
    run.add_argument("--json", action="store_true", help="print the sweep as JSON")
    run.set_defaults(handler=command("sweep run", _run))

    show = actions.add_parser("show", parents=[connection], help="a sweep's trials and its best")
    show.add_argument("sweep_id")
    show.add_argument("--follow", action="store_true", help="wait until every trial finished")
    show.add_argument("--json", action="store_true")
    show.set_defaults(handler=command("sweep show", _show))

    cancel = actions.add_parser("cancel", parents=[connection], help="cancel the trials still open")
    cancel.add_argument("sweep_id")
    cancel.set_defaults(handler=command("sweep cancel", _cancel))


def spec_from(arguments: argparse.Namespace, dataset_id: str) -> dict:
    parameters = dict(arguments.grid) | dict(arguments.range)
    if not parameters:
        raise UsageError("give at least one --grid or --range")
    base = {"base_model": arguments.model, "dataset": dataset_id, "seed": arguments.seed}
    if "max_steps" not in parameters:
        base["max_steps"] = arguments.steps
    if arguments.batch_size is not None:
        base["batch_size"] = arguments.batch_size
    if arguments.max_length is not None:
        base["max_sequence_length"] = arguments.max_length
    spec: dict = {
        "base": base,
        "parameters": parameters,
        "strategy": "random" if arguments.random else "grid",
        "seed": arguments.seed,
        "median_stopping": {"enabled": not arguments.no_early_stopping},
    }
    if arguments.random:
        spec["trials"] = arguments.random
    if arguments.max_per_trial is not None:
        spec["max_price_per_trial_micro"] = arguments.max_per_trial
    if arguments.max_total is not None:
        spec["max_total_price_micro"] = arguments.max_total
    return spec


def check(spec: dict) -> None:
    """Everything about the sweep this side can check: its spec, and that it expands into trials."""
    try:
        expand(parse(spec))
    except ValueError as error:
        raise UsageError(str(error)) from None


def _report(swarm: SwarmClient, status: dict, arguments: argparse.Namespace) -> int:
    while arguments.follow and status["state"] == "running":
        time.sleep(2)
        status = swarm.sweep_status(status["id"])
    if arguments.json:
        print(json.dumps(status, indent=2))
        return 0
    print(SweepTable(status))
    held = f", {format_credits(status['held_micro'])} still held" if status["held_micro"] else ""
    print(
        f"{status['state']}: {len(status['trials'])} trials, {format_credits(status['cost_micro'])} credits charged{held}"
    )
    best = status.get("best")
    if best is not None:
        print(f"best: trial {best['trial']} ({best['job_id']}), held-out loss {best['eval_loss']}")
        print(f"download it: compute-swarm download {best['job_id']}")
    print(status["id"])
    return 0


def _run(arguments: argparse.Namespace) -> int:
    check(spec_from(arguments, "file_checked_before_upload"))  # a usage error costs no upload
    with client_from(arguments) as swarm:
        path = Path(arguments.data)
        dataset_id = upload_with_progress(swarm, path)["id"] if path.is_file() else arguments.data
        return _report(swarm, swarm.submit_sweep(spec_from(arguments, dataset_id)), arguments)


def _show(arguments: argparse.Namespace) -> int:
    with client_from(arguments) as swarm:
        return _report(swarm, swarm.sweep_status(arguments.sweep_id), arguments)


def _cancel(arguments: argparse.Namespace) -> int:
    with client_from(arguments) as swarm:
        swarm.cancel_sweep(arguments.sweep_id)
    print(f"{arguments.sweep_id}: its open trials are cancelled and their escrow refunded")
    return 0
