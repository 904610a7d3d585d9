"""Typed records a running job reports: progress, checkpoints, logs and how it ended.

The trainer emits them, the runner carries them across the process boundary as JSON lines, and the
node agent and CLI consume them. Nothing here is heavier than pydantic.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from compute_swarm.protocol import FailureKind, Offload


class _Record(BaseModel):
    # NaN and infinity travel as JSON's usual extensions, not as null, so a record always reads back.
    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_inf_nan="constants")


class Started(_Record):
    type: Literal["started"] = "started"
    process_id: int
    device: str
    total_steps: int
    resumed_from_step: int = 0
    train_examples: int
    eval_examples: int
    # What runs the model's attention: ours ("triton", "metal", "reference") or transformers' own.
    attention: str | None = None


class Progress(_Record):
    type: Literal["progress"] = "progress"
    step: int
    total_steps: int
    loss: float  # mean per answer token over this optimizer step
    learning_rate: float
    tokens_per_second: float
    elapsed_seconds: float
    eta_seconds: float
    eval_loss: float | None = None  # set on the steps where the held-out set was evaluated


class CheckpointSaved(_Record):
    type: Literal["checkpoint"] = "checkpoint"
    step: int
    path: str


class Log(_Record):
    type: Literal["log"] = "log"
    level: Literal["debug", "info", "warning", "error"]
    message: str


class Completed(_Record):
    type: Literal["completed"] = "completed"
    output_dir: str
    steps: int
    final_loss: float | None  # None when a resumed run had no step left to take
    eval_loss: float | None
    train_tokens: int
    seconds: float
    # With spec.evaluate_adapter: that adapter's held-out loss; None when it does not fit the model.
    delivered_eval_loss: float | None = None
    offload: Offload | None = None  # a batch: where its model had its layers


# Why a job ended badly: declared once, in the protocol (the engine's kinds are all but "released" and "declined").


class Failed(_Record):
    type: Literal["failed"] = "failed"
    kind: FailureKind
    message: str
    details: str = ""  # traceback or the tail of the child's stderr
    checkpoint: str | None = None  # where to resume from, when one was saved


Record = Annotated[
    Started | Progress | CheckpointSaved | Log | Completed | Failed, Field(discriminator="type")
]
record_adapter: TypeAdapter[Record] = TypeAdapter(Record)
FINAL_RECORD_TYPES = (Completed, Failed)
