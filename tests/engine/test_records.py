"""Records cross the process boundary as JSON and come back equal, odd floats included."""

from __future__ import annotations

import math

from compute_swarm.engine.records import Completed, Failed, Log, Progress, record_adapter


def test_records_round_trip_through_json() -> None:
    records = [
        Progress(
            step=3,
            total_steps=9,
            loss=1.5,
            learning_rate=2e-4,
            tokens_per_second=170.0,
            elapsed_seconds=4.2,
            eta_seconds=8.4,
            eval_loss=1.25,
        ),
        Completed(
            output_dir="/tmp/a", steps=9, final_loss=None, eval_loss=None, train_tokens=10, seconds=1.0
        ),
        Failed(kind="crashed", message="the worker was killed by SIGKILL", details="tail", checkpoint="/c"),
        Log(level="warning", message="ünïcode ✓"),
    ]
    for record in records:
        assert record_adapter.validate_json(record.model_dump_json()) == record


def test_a_diverged_loss_still_reads_back() -> None:
    record = Progress(
        step=1,
        total_steps=2,
        loss=math.nan,
        learning_rate=1.0,
        tokens_per_second=1.0,
        elapsed_seconds=1.0,
        eta_seconds=1.0,
        eval_loss=math.inf,
    )
    parsed = record_adapter.validate_json(record.model_dump_json())
    assert math.isnan(parsed.loss) and parsed.eval_loss == math.inf
