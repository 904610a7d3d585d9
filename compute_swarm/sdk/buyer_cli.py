"""The buyer's `compute-swarm` commands: upload, submit, jobs, job, download, balance, ledger.

Part of the light buyer install (standard library, httpx, tqdm, the spec module). Human-readable
lines go to stderr; the one value a script wants (a file id, a job id, a directory) is the last line
on stdout. Exit codes: 0 done, 1 the coordinator refused or the job failed, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from datetime import datetime
from pathlib import Path

from pydantic import ValidationError

from compute_swarm import protocol
from compute_swarm.engine.jobs import (
    DEFAULT_MODEL,
    InferenceJobSpec,
    LoraJobSpec,
    Sampling,
    add_lora_options,
    describe_option_errors,
    lora_fields_from_options,
)
from compute_swarm.protocol import format_credits
from compute_swarm.sdk import sweep_cli
from compute_swarm.sdk.client import FINAL_JOB_STATES, SUCCESSFUL_STATES, SwarmClient, SwarmError
from compute_swarm.sdk.commands import (
    ByteProgress,
    UsageError,
    client_from,
    command,
    complain,
    connection_options,
    upload_with_progress,
)

FOLLOW_INTERVAL_SECONDS = 1.0
JOB_STATES = protocol.JOB_STATES

# What a file or job id looks like (as opposed to a path): the protocol's identifier alphabet.
_IDENTIFIER = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# Stands in for the file id when the spec is checked before the upload that gives the real one.
_DATASET_PLACEHOLDER = "file-to-be-uploaded"


def register_commands(subcommands: argparse._SubParsersAction) -> None:
    connection = connection_options()

    upload = subcommands.add_parser(
        "upload",
        parents=[connection],
        help="upload a JSONL dataset to the coordinator",
        description="Upload a file (resumable); the last line printed is its file id.",
    )
    upload.add_argument("file", type=Path, metavar="FILE")
    upload.add_argument(
        "--purpose",
        choices=["dataset", "prompts"],
        default="dataset",
        help="dataset: fine-tuning examples (the default); prompts: a batch inference job's input",
    )
    upload.set_defaults(handler=command("upload", _upload))

    submit = subcommands.add_parser("submit", help="submit a job to the swarm")
    kinds = submit.add_subparsers(dest="job_type", metavar="TYPE", required=True)
    lora = kinds.add_parser(
        "lora",
        parents=[connection],
        help="fine-tune a LoRA adapter on the swarm",
        description="Upload the dataset (when a local file is given), submit a LoRA fine-tune and "
        "print its price; the last line printed is the job id.",
    )
    lora.add_argument(
        "--data",
        required=True,
        metavar="FILE_OR_FILE_ID",
        help="a local JSONL file to upload, or the id of a file already uploaded",
    )
    lora.add_argument("--model", default=None, help=f"catalogue name (default: {DEFAULT_MODEL})")
    lora.add_argument(
        "--max-attempts",
        type=int,
        help="how many nodes may try the job before it fails (default: the coordinator's)",
    )
    add_lora_options(lora)
    lora.add_argument("--follow", action="store_true", help="then follow the job until it ends")
    lora.set_defaults(handler=command("submit lora", _submit_lora))

    inference = kinds.add_parser(
        "inference",
        parents=[connection],
        help="answer a JSONL of prompts with a model on the swarm",
        description='Upload the prompts (when a local file is given: one {"messages": [...]} or '
        '{"prompt": "..."} per line, with an optional "id"), submit a batch inference job and print '
        "the most it can cost; the last line printed is the job id. `download` then gives "
        "completions.jsonl, one answer per prompt, in order.",
    )
    inference.add_argument(
        "--data",
        required=True,
        metavar="FILE_OR_FILE_ID",
        help="a local JSONL file of prompts to upload, or the id of a prompts file already uploaded",
    )
    inference.add_argument(
        "--model", default=None, help=f"a catalogue name or one of your ft: models (default: {DEFAULT_MODEL})"
    )
    inference.add_argument("--max-tokens", type=int, help="the longest answer, in tokens (default 256)")
    inference.add_argument("--temperature", type=float, help="0 is greedy decoding (default 1.0)")
    inference.add_argument("--top-p", type=float)
    inference.add_argument("--seed", type=int, help="sampling seed; each line gets its own from it")
    inference.add_argument(
        "--stop", action="append", metavar="TEXT", help="end an answer at this text (up to 4 times)"
    )
    inference.add_argument("--max-attempts", type=int, help="how many nodes may try the job before it fails")
    inference.add_argument("--follow", action="store_true", help="then follow the job until it ends")
    inference.set_defaults(handler=command("submit inference", _submit_inference))

    jobs = subcommands.add_parser("jobs", parents=[connection], help="list your jobs, newest first")
    jobs.add_argument("--state", choices=JOB_STATES)
    jobs.set_defaults(handler=command("jobs", _list_jobs))

    job = subcommands.add_parser(
        "job",
        parents=[connection],
        help="show a job, or follow it until it ends",
        description="Show a job. With --follow, show its progress until it ends: exit code 0 when it "
        "completed, 1 when it failed or was cancelled.",
    )
    job.add_argument("job_id", metavar="ID")
    job.add_argument("--follow", action="store_true", help="show progress until the job ends")
    job.add_argument(
        "--json", action="store_true", help="print the job as JSON (one line per change with --follow)"
    )
    job.set_defaults(handler=command("job", _show_job))

    download = subcommands.add_parser(
        "download",
        parents=[connection],
        help="download a completed job's result (an adapter, or a batch's completions)",
        description="Download, verify and unpack a completed job's result; the last line printed is "
        "its directory. An interrupted download resumes when run again.",
    )
    download.add_argument("job_id", metavar="ID")
    download.add_argument(
        "--output", type=Path, metavar="DIR", help="where to unpack it (default: ./adapters/ID)"
    )
    download.set_defaults(handler=command("download", _download))

    balance = subcommands.add_parser("balance", parents=[connection], help="show your credits")
    balance.set_defaults(handler=command("balance", _show_balance))

    ledger = subcommands.add_parser(
        "ledger", parents=[connection], help="show your ledger entries, newest first"
    )
    ledger.add_argument("--limit", type=int, default=20, help="how many entries (default 20)")
    ledger.set_defaults(handler=command("ledger", _show_ledger))

    sweep_cli.register(subcommands, connection)


# ---- commands


def _upload(arguments: argparse.Namespace) -> int:
    path: Path = arguments.file
    _require_file(path)
    with client_from(arguments) as swarm:
        uploaded = upload_with_progress(swarm, path, arguments.purpose)
    print(uploaded["id"])
    return 0


def _submit_lora(arguments: argparse.Namespace) -> int:
    model = arguments.model or DEFAULT_MODEL
    dataset = _local_file_or_id(arguments)
    try:
        spec = LoraJobSpec(
            base_model=model, dataset=dataset or _DATASET_PLACEHOLDER, **lora_fields_from_options(arguments)
        ).model_dump(mode="json", exclude_unset=True)
    except ValidationError as error:
        raise UsageError(f"invalid settings: {'; '.join(describe_option_errors(error))}") from None
    return _submit(arguments, "lora", spec, dataset, price="price")


def _submit_inference(arguments: argparse.Namespace) -> int:
    model = arguments.model or DEFAULT_MODEL
    dataset = _local_file_or_id(arguments)
    sampling = {
        name: value
        for name, value in (
            ("max_tokens", arguments.max_tokens),
            ("temperature", arguments.temperature),
            ("top_p", arguments.top_p),
            ("seed", arguments.seed),
            ("stop", tuple(arguments.stop) if arguments.stop else None),
        )
        if value is not None
    }
    try:
        spec = InferenceJobSpec(
            base_model=model, dataset=dataset or _DATASET_PLACEHOLDER, sampling=Sampling(**sampling)
        ).model_dump(mode="json", exclude_none=True)
    except ValidationError as error:
        problems = [
            f"--{str(problem['loc'][-1]).replace('_', '-')}: {problem['msg']}" for problem in error.errors()
        ]
        raise UsageError(f"invalid settings: {'; '.join(problems)}") from None
    return _submit(arguments, "inference", spec, dataset, price="at most")


def _local_file_or_id(arguments: argparse.Namespace) -> str | None:
    """None when --data is a local file to upload, else the file id it gives; checks --max-attempts
    too, so that everything this side can check is checked before an upload takes time."""
    if arguments.max_attempts is not None and arguments.max_attempts < 1:
        raise UsageError("--max-attempts: must be at least 1")
    path = Path(arguments.data)
    if path.exists():
        _require_file(path)
        return None
    if _IDENTIFIER.match(arguments.data):
        return arguments.data
    raise UsageError(f"{arguments.data}: no such file (and not a file id)")


def _submit(arguments: argparse.Namespace, kind: str, spec: dict, dataset: str | None, *, price: str) -> int:
    model = spec["base_model"]
    with client_from(arguments) as swarm:
        offered = [entry["name"] for entry in swarm.models()]
        # Fine-tuned models are the buyer's own: the coordinator checks those when the job arrives.
        if model not in offered and not (kind == "inference" and model.startswith("ft:")):
            offers = ", ".join(offered) or "nothing"
            raise UsageError(f"--model: {model!r} is not offered by this coordinator (it offers: {offers})")
        uploaded_now = dataset is None
        purpose = "prompts" if kind == "inference" else "dataset"
        if dataset is None:
            dataset = upload_with_progress(swarm, Path(arguments.data), purpose)["id"]
        spec["dataset"] = dataset
        submit = swarm.submit_inference if kind == "inference" else swarm.submit_lora
        try:
            job = submit(spec, max_attempts=arguments.max_attempts)
        except SwarmError as error:
            if uploaded_now:  # no need to send the data again next time
                error.args = (f"{error}; the {purpose} file stays uploaded: retry with --data {dataset}",)
            raise
        print(
            f"Submitted job {job['id']}: {model} on {arguments.data}, {price} "
            f"{format_credits(job['price_micro'])} credits (held in escrow until the job ends)",
            file=sys.stderr,
        )
        print(job["id"], flush=True)
        if not arguments.follow:
            return 0
        return _follow(swarm, job["id"], as_json=False)


def _list_jobs(arguments: argparse.Namespace) -> int:
    with client_from(arguments) as swarm:
        jobs = swarm.jobs(arguments.state)
    if not jobs:
        print(f"no {arguments.state + ' ' if arguments.state else ''}jobs", file=sys.stderr)
        return 0
    rows = [("ID", "STATE", "PROGRESS", "LOSS", "PRICE", "CREATED")]
    for job in jobs:
        step, total, loss = _steps_and_loss(job)
        rows.append(
            (
                job["id"],
                job["state"],
                f"{step}/{total}" if total is not None else "-",
                f"{loss:.4f}" if loss is not None else "-",
                format_credits(job["price_micro"]),
                _format_time(job.get("created_at")),
            )
        )
    _print_table(rows, right_aligned={2, 3, 4})
    return 0


def _show_job(arguments: argparse.Namespace) -> int:
    _require_id(arguments.job_id)
    with client_from(arguments) as swarm:
        if arguments.follow:
            return _follow(swarm, arguments.job_id, as_json=arguments.json)
        job = swarm.job(arguments.job_id)
    if arguments.json:
        print(json.dumps(job, indent=2))
    else:
        print(describe_job(job))
    return 0


def _download(arguments: argparse.Namespace) -> int:
    _require_id(arguments.job_id)
    with client_from(arguments) as swarm:
        batch = _is_batch(swarm.job(arguments.job_id))
        directory: Path = arguments.output or Path("results" if batch else "adapters") / arguments.job_id
        bar = ByteProgress(f"job {arguments.job_id}")
        try:
            swarm.download_result(arguments.job_id, directory, progress=bar)
        finally:
            bar.close()
    print(directory)
    return 0


def _show_balance(arguments: argparse.Namespace) -> int:
    with client_from(arguments) as swarm:
        balance = swarm.balance()
    print(f"available: {format_credits(balance['available_micro'])} credits")
    print(f"in escrow: {format_credits(balance['escrow_micro'])} credits (held for running jobs)")
    return 0


def _show_ledger(arguments: argparse.Namespace) -> int:
    if arguments.limit < 1:
        raise UsageError("--limit: must be at least 1")
    with client_from(arguments) as swarm:
        entries = swarm.ledger(arguments.limit)
    if not entries:
        print("no ledger entries", file=sys.stderr)
        return 0
    rows = [("TIME", "KIND", "AMOUNT", "JOB", "MEMO")]
    for entry in entries:
        amount = entry["amount_micro"]
        rows.append(
            (
                _format_time(entry.get("created_at")),
                entry["kind"],
                ("+" if amount > 0 else "") + format_credits(amount),
                entry.get("job_id") or "-",
                entry.get("memo") or "",
            )
        )
    _print_table(rows, right_aligned={2})
    return 0


# ---- following a job


def _follow(swarm: SwarmClient, job_id: str, *, as_json: bool) -> int:
    from tqdm import tqdm

    bar: tqdm | None = None
    previous: dict | None = None
    job: dict | None = None

    def say(line: str) -> None:
        if bar is not None:
            bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr)

    try:
        for job in swarm.follow(job_id, interval=FOLLOW_INTERVAL_SECONDS):
            if as_json:
                print(json.dumps(job), flush=True)
                continue
            change = describe_state_change(previous, job)
            if change:
                say(change)
            progress = job.get("progress")
            if progress and progress.get("total_steps"):
                if bar is None:
                    # No tqdm rate or ETA: steps jump when another node resumes from a checkpoint, so
                    # the node's own tokens/s and ETA go in the postfix instead.
                    bar = tqdm(
                        total=progress["total_steps"],
                        bar_format="{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                        + ("prompts" if _is_batch(job) else "steps")
                        + " [{elapsed}{postfix}]",
                        file=sys.stderr,
                        dynamic_ncols=True,
                    )
                bar.total = progress["total_steps"]
                bar.n = progress["step"]  # may go back: a new node resumes from the last checkpoint
                bar.set_postfix(_progress_postfix(progress), refresh=False)
                bar.refresh()
            previous = job
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()  # before the message, so it does not land inside the bar
        print(f"\nStopped following; the job goes on (compute-swarm job {job_id} --follow).", file=sys.stderr)
        return 130
    finally:
        if bar is not None:
            bar.close()
    assert job is not None
    return _final_report(job, quiet=as_json)


def _final_report(job: dict, *, quiet: bool) -> int:
    if job["state"] in SUCCESSFUL_STATES:
        if not quiet:
            metrics = job.get("metrics") or {}
            unit = "prompts answered" if _is_batch(job) else "steps"
            details = [f"{metrics['steps']} {unit}"] if metrics.get("steps") is not None else []
            if metrics.get("completion_tokens") is not None:
                details.append(
                    f"{metrics.get('prompt_tokens')} prompt + {metrics['completion_tokens']} completion tokens, "
                    f"charged {format_credits(job['price_micro'])} credits"
                )
            if metrics.get("final_loss") is not None:
                details.append(f"final loss {metrics['final_loss']:.4f}")
            if metrics.get("eval_loss") is not None:
                details.append(f"held-out loss {metrics['eval_loss']:.4f}")
            print(
                f"Done{': ' + ', '.join(details) if details else ''}. "
                f"Download it with: compute-swarm download {job['id']}",
                file=sys.stderr,
            )
        return 0
    if job["state"] == "failed":
        error = job.get("error") or {}
        kind = str(error.get("kind", "error")).replace("_", " ")
        complain("job", f"job {job['id']} failed: {kind}: {error.get('message', 'no reason given')}")
    else:
        complain("job", f"job {job['id']} was {job['state']}")
    return 1


def describe_state_change(previous: dict | None, job: dict) -> str | None:
    """The line to show when a followed job changes state or node (None when it did not).

    `attempt` counts the leases so far: 0 while first queued, N while the Nth node holds the job,
    and still N after that node dropped out and the job waits in the queue again.
    """
    attempt = f"attempt {job['attempt']}/{job['max_attempts']}"
    if previous is None:
        return f"job {job['id']}: {job['state']}" + (f" ({attempt})" if job["attempt"] else "")
    if job["state"] == previous["state"] and job["attempt"] == previous["attempt"]:
        return None
    moved = f"job {job['id']}: {previous['state']} → {job['state']}"
    holding = ("leased", "running")
    if job["state"] == "queued" and previous["state"] in holding:
        ended = f"attempt {previous['attempt']}/{previous['max_attempts']}"
        return f"{moved} again: {ended} ended without a result (its node dropped out or gave up)"
    if job["state"] in holding and job["attempt"] > previous["attempt"]:
        again = " again" if previous["state"] in holding else ""
        return f"{moved}{again} ({attempt})"
    return moved


def _progress_postfix(progress: dict) -> dict[str, str]:
    postfix = {}
    if progress.get("loss") is not None:
        postfix["loss"] = f"{progress['loss']:.3f}"
    if progress.get("eval_loss") is not None:
        postfix["eval"] = f"{progress['eval_loss']:.3f}"
    if progress.get("tokens_per_second") is not None:
        postfix["tok/s"] = f"{progress['tokens_per_second']:.0f}"
    if progress.get("eta_seconds") is not None:
        postfix["eta"] = _format_duration(progress["eta_seconds"])
    return postfix


def describe_job(job: dict) -> str:
    spec = job.get("spec") or {}
    attempts = (
        f"attempt {job['attempt']}/{job['max_attempts']}"
        if job["attempt"]
        else f"not started yet; up to {job['max_attempts']} attempts"
    )
    lines = [f"job {job['id']}: {job['state']} ({attempts})"]
    if _is_batch(job):
        sampling = spec.get("sampling") or {}
        lines.append(
            f"  model:    {spec.get('base_model')}, batch inference, answers of up to "
            f"{sampling.get('max_tokens', 256)} tokens at temperature {sampling.get('temperature', 1.0)}"
        )
        lines.append(f"  prompts:  {spec.get('dataset')}")
    elif spec:
        length = (
            f"{spec['max_steps']} steps"
            if spec.get("max_steps")
            else f"{spec.get('epochs')} epoch{'s' if spec.get('epochs') != 1 else ''}"
        )
        rank = f", rank {spec['rank']}" if spec.get("rank") else ""
        lines.append(f"  model:    {spec.get('base_model')}{rank}, {length}")
        lines.append(f"  dataset:  {spec.get('dataset')}")
    step, total, loss = _steps_and_loss(job)
    if total is not None:
        progress = job.get("progress") or {}
        parts = [f"{'prompt' if _is_batch(job) else 'step'} {step}/{total}"]
        if loss is not None:
            parts.append(f"loss {loss:.4f}")
        eval_loss = progress.get("eval_loss") or (job.get("metrics") or {}).get("eval_loss")
        if eval_loss is not None:
            parts.append(f"held-out loss {eval_loss:.4f}")
        if job["state"] not in FINAL_JOB_STATES and progress.get("tokens_per_second") is not None:
            parts.append(f"{progress['tokens_per_second']:.0f} tok/s")
        if job["state"] not in FINAL_JOB_STATES and progress.get("eta_seconds") is not None:
            parts.append(f"about {_format_duration(progress['eta_seconds'])} left")
        lines.append(f"  progress: {', '.join(parts)}")
    metrics = job.get("metrics") or {}
    if metrics.get("completion_tokens") is not None:
        lines.append(
            f"  tokens:   {metrics.get('prompt_tokens')} prompt, {metrics['completion_tokens']} completion"
        )
    held = " held (the most it can cost)" if _is_batch(job) and job["state"] not in FINAL_JOB_STATES else ""
    lines.append(f"  price:    {format_credits(job['price_micro'])} credits{held}")
    lines.append(f"  created:  {_format_time(job.get('created_at'))}")
    if job.get("finished_at"):
        lines.append(f"  finished: {_format_time(job['finished_at'])}")
    if job.get("error"):
        lines.append(f"  error:    {job['error'].get('kind')}: {job['error'].get('message')}")
    if job["state"] in SUCCESSFUL_STATES:
        lines.append(f"  result:   sha256 {job.get('result_sha256')} (compute-swarm download {job['id']})")
    return "\n".join(lines)


# ---- formatting


def _is_batch(job: dict) -> bool:
    return (job.get("spec") or {}).get("type") == "inference"


def _steps_and_loss(job: dict) -> tuple[int | None, int | None, float | None]:
    progress = job.get("progress")
    metrics = job.get("metrics")
    if metrics and metrics.get("steps") is not None:
        return metrics["steps"], metrics["steps"], metrics.get("final_loss")
    if progress:
        return progress.get("step"), progress.get("total_steps"), progress.get("loss")
    return None, None, None


def _format_time(value: float | str | None) -> str:
    """A timestamp (Unix seconds, or ISO 8601 text) in local time."""
    if value is None or value == "":
        return "-"
    try:
        if isinstance(value, int | float):
            moment = datetime.fromtimestamp(value)
        else:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
            if moment.tzinfo is not None:
                moment = moment.astimezone()
    except (ValueError, OverflowError, OSError):
        return str(value)
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def _format_duration(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    if seconds < 90:
        return f"{seconds} s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


def _print_table(rows: list[tuple[str, ...]], *, right_aligned: set[int]) -> None:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        cells = [
            cell.rjust(width) if column in right_aligned else cell.ljust(width)
            for column, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        print("  ".join(cells).rstrip())


# ---- transfers


def _require_id(job_id: str) -> None:
    if not _IDENTIFIER.match(job_id):
        raise UsageError(f"{job_id!r} is not a job id")


def _require_file(path: Path) -> None:
    if not path.exists():
        raise UsageError(f"{path}: no such file")
    if not path.is_file():
        raise UsageError(f"{path}: not a file")
