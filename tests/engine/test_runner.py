"""The runner: jobs run in a child process whose crash, cancellation or refusal comes back as a record."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from compute_swarm.engine import artifacts, lora
from compute_swarm.engine.jobs import LoraJobSpec
from compute_swarm.engine.records import CheckpointSaved, Completed, Failed, Progress, Started
from compute_swarm.engine.runner import JobRunner
from tests.conftest import write_jsonl
from tests.engine.test_lora import adapter_bytes, tiny_spec


def test_a_child_killed_mid_job_is_reported_and_the_job_resumes_to_the_same_adapter(
    tiny_model_directory: Path, chat_dataset: Path, tmp_path: Path
) -> None:
    spec = tiny_spec(tiny_model_directory, chat_dataset, max_steps=9, checkpoint_interval=3)
    lora.train_lora(spec, tmp_path / "uninterrupted")

    runner = JobRunner(spec, tmp_path / "run", device="cpu")
    records = []
    for record in runner.records():
        records.append(record)
        if isinstance(record, CheckpointSaved) and record.step == 3:
            os.kill(runner.process.pid, signal.SIGKILL)
    final = records[-1]
    assert isinstance(final, Failed) and final.kind == "crashed", final
    assert "SIGKILL" in final.message
    assert not any(isinstance(record, Completed) for record in records)

    resumed = list(JobRunner(spec, tmp_path / "run", device="cpu", resume_from="latest").records())
    started = next(record for record in resumed if isinstance(record, Started))
    assert started.resumed_from_step >= 3 and started.process_id != runner.process.pid
    assert isinstance(resumed[-1], Completed) and resumed[-1].steps == 9
    # A fresh process, resumed from disk, ends on exactly the bytes of an uninterrupted run.
    assert adapter_bytes(tmp_path / "run") == adapter_bytes(tmp_path / "uninterrupted")


def test_cancel_stops_at_the_next_step_and_leaves_a_checkpoint(
    tiny_model_directory: Path, chat_dataset: Path, tmp_path: Path
) -> None:
    spec = tiny_spec(tiny_model_directory, chat_dataset, max_steps=10_000)
    runner = JobRunner(spec, tmp_path / "run", device="cpu")
    final = None
    for record in runner.records():
        if isinstance(record, Progress) and record.step == 2:
            runner.cancel(grace_seconds=60)
        final = record
    assert isinstance(final, Failed) and final.kind == "cancelled", final
    assert final.checkpoint is not None
    assert (Path(final.checkpoint) / artifacts.CHECKPOINT_STATE_FILE).is_file()
    assert runner.process.returncode == 0


def test_a_bad_dataset_fails_the_job_naming_the_line(tiny_model_directory: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "completion": "b"}, "{broken"])
    final = JobRunner(tiny_spec(tiny_model_directory, data), tmp_path / "run", device="cpu").run()
    assert isinstance(final, Failed) and final.kind == "invalid_spec"
    assert "line 2: not valid JSON" in final.message


def test_a_job_larger_than_the_device_is_refused_before_it_starts(
    tiny_model_directory: Path, chat_dataset: Path, tmp_path: Path
) -> None:
    # The largest batch and sequence the spec allows: terabytes of activations, more than any machine.
    spec = LoraJobSpec(
        base_model="smollm2-135m-instruct",
        dataset=str(chat_dataset),
        max_steps=1,
        batch_size=4096,
        max_sequence_length=131_072,
    )
    final = JobRunner(spec, tmp_path / "run", device="cpu").run()
    assert isinstance(final, Failed) and final.kind == "insufficient_memory", final
    assert "this job needs about" in final.message and "is free" in final.message
    assert not (tmp_path / "run" / artifacts.ADAPTER_WEIGHTS_FILE).exists()


def test_a_child_that_segfaults_before_reporting_anything_is_reported_as_crashed(tmp_path: Path) -> None:
    runner = JobRunner(LoraJobSpec(base_model="m", dataset="d", max_steps=1), tmp_path / "run")
    runner.start()
    os.kill(runner.process.pid, signal.SIGSEGV)  # it is still importing torch: nothing reported yet
    records = list(runner.records())
    assert len(records) == 1
    assert records[0].kind == "crashed" and "SIGSEGV" in records[0].message


def test_a_caller_that_stops_reading_does_not_leave_the_child_running(
    tiny_model_directory: Path, chat_dataset: Path, tmp_path: Path
) -> None:
    runner = JobRunner(tiny_spec(tiny_model_directory, chat_dataset, max_steps=10_000), tmp_path / "run")
    records = runner.records()
    for record in records:
        if isinstance(record, Progress):
            break
    records.close()  # what happens when the agent's task is cancelled mid-iteration
    assert runner.process.poll() is not None
