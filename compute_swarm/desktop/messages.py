"""What the node agent says to the coordinator and when, as plain functions and small classes tested
without a socket: its telemetry and cached models, a lease turned into a job spec, engine records turned
into wire messages, the progress throttle, the outbox of reports awaiting acknowledgement, and the
reconnect backoff, what is worth retrying and what a closed connection means. desktop.agent and desktop.job do the talking.
"""

from __future__ import annotations

import contextlib
import logging
import random
import socket
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from pydantic import ValidationError

from compute_swarm import protocol
from compute_swarm.desktop import token_store
from compute_swarm.engine.devices import DeviceInventory
from compute_swarm.engine.jobs import CATALOGUE, InferenceJobSpec, JobSpec, parse_job_spec
from compute_swarm.engine.records import Completed, Progress
from compute_swarm.protocol import finite_or_none
from compute_swarm.sdk.client import DownloadTooLarge, SwarmError

logger = logging.getLogger(__name__)

RECONNECT_BASE_SECONDS = 1.0
RECONNECT_CAP_SECONDS = 60.0
PROGRESS_INTERVAL_SECONDS = 1.0
MAX_OUTBOX = 1000
_TELEMETRY_BACKENDS = ("cuda", "rocm", "mps", "cpu")


class Backoff:
    """Full-jitter exponential backoff: the n-th delay is uniform in [0, min(cap, base·2ⁿ)]."""

    def __init__(
        self,
        base: float = RECONNECT_BASE_SECONDS,
        cap: float = RECONNECT_CAP_SECONDS,
        rng: random.Random | None = None,
    ):
        self.base, self.cap = base, cap
        self.failures = 0
        self._rng = rng or random.Random()

    def ceiling(self) -> float:
        return min(self.cap, self.base * 2 ** min(self.failures, 32))

    def next_delay(self) -> float:
        delay = self._rng.uniform(0, self.ceiling())
        self.failures += 1
        return delay

    def reset(self) -> None:
        self.failures = 0


def is_transient(error: SwarmError) -> bool:
    """Whether a refused request may succeed if tried again later."""
    if isinstance(error, DownloadTooLarge):  # the same artifact will be as long again
        return False
    status = error.status_code
    return status is None or status in (408, 425, 429) or status >= 500


def is_invite_code_refusal(error: SwarmError) -> bool:
    """Whether a registration was refused for its invite code: the coordinator admits nodes by
    invitation and the code was missing, unknown, used up or expired (its only 403 there)."""
    return error.status_code == 403


def describe_error(error: BaseException) -> str:
    return str(error) or type(error).__name__


def websocket_url(coordinator: str) -> str:
    """ws(s)://HOST[/prefix]/node for an http(s) coordinator URL."""
    parts = urlsplit(token_store.normalize_coordinator_url(coordinator))
    scheme = "wss" if parts.scheme == "https" else "ws"
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + "/node", "", ""))


def refused_token_message(coordinator: str, reason: str) -> str:
    return (
        f"the coordinator at {coordinator} refused this node's token "
        f"({reason or 'unknown or revoked'}); run `compute-swarm node --coordinator {coordinator} "
        "--forget` and start again to register this machine anew"
    )


@dataclass(frozen=True)
class ConnectionEnd:
    problem: str  # why the connection ended, in words
    fatal: bool = False  # reconnecting cannot help: the agent stops, saying `problem`
    slow_reconnect: bool = False  # the coordinator welcomed the node and then objected


def connection_end(code: int | None, reason: str, coordinator: str) -> ConnectionEnd:
    """What a welcomed connection's close code means for the agent."""
    if code == protocol.CloseCode.UNAUTHORIZED:
        return ConnectionEnd(refused_token_message(coordinator, reason), fatal=True)
    if code in protocol.FATAL_CLOSE_CODES:  # UNSUPPORTED_VERSION, and any added later
        return ConnectionEnd(
            f"the coordinator at {coordinator} closed the connection ({reason or code}): update compute-swarm",
            fatal=True,
        )
    # Reconnecting at once would only repeat what the coordinator objected to.
    slow = code in (
        protocol.CloseCode.REPLACED,
        protocol.CloseCode.MALFORMED,
        protocol.CloseCode.POLICY_VIOLATION,
    )
    if code == protocol.CloseCode.REPLACED:
        problem = (
            "another agent connected with this node's token and replaced this connection "
            "(is the node running twice?)"
        )
    elif code in (None, 1006):  # 1006: the connection dropped without a close frame
        problem = "lost the connection to the coordinator (it dropped without a close)"
    else:
        problem = (
            f"lost the connection to the coordinator (close code {code}{': ' + reason if reason else ''})"
        )
    return ConnectionEnd(problem, slow_reconnect=slow)


def agent_version() -> str:
    try:
        return metadata.version("compute-swarm")[:64]
    except metadata.PackageNotFoundError:
        return "0+unknown"


def default_node_name() -> str:
    return (socket.gethostname() or "node")[:64]


def telemetry_from_inventory(
    inventory: DeviceInventory, backends: tuple[str, ...] | None = None
) -> protocol.Telemetry:
    """The protocol's copy of engine.devices' probe. `backends` (from a probe that asked torch) replaces
    the inventory's own guess; "cpu" is always offered."""
    usable = [name for name in dict.fromkeys(backends or inventory.backends) if name in _TELEMETRY_BACKENDS]
    if "cpu" not in usable:
        usable.append("cpu")
    cpu = inventory.cpu
    return protocol.Telemetry(
        gpus=tuple(
            protocol.GpuTelemetry(
                index=gpu.index,
                vendor=gpu.vendor,
                name=gpu.name[:256],
                backend=gpu.backend,
                memory_total_bytes=gpu.memory_total_bytes,
                memory_free_bytes=gpu.memory_free_bytes,
                temperature_celsius=finite_or_none(gpu.temperature_celsius),
                utilization_percent=finite_or_none(gpu.utilization_percent),
                power_watts=finite_or_none(gpu.power_watts),
            )
            for gpu in inventory.gpus[:64]
        ),
        cpu=protocol.CpuTelemetry(
            name=(cpu.name or "unknown CPU")[:256],
            logical_cores=min(max(cpu.logical_cores, 1), 65536),
            memory_total_bytes=max(cpu.memory_total_bytes, 0),
            memory_available_bytes=max(cpu.memory_available_bytes, 0),
        ),
        backends=tuple(usable[:8]),
    )


def cached_catalogue_models(models_directory: Path | None = None) -> tuple[str, ...]:
    """Catalogue models already in engine.models' cache (looked up, never downloaded or hashed)."""
    from compute_swarm.engine import models

    directory = models_directory or models.models_directory()
    found = []
    for name, model in CATALOGUE.items():
        # engine.models.fetch_catalogue_model's layout: <cache>/<sha256[:16]>/<file name>.
        path = directory / model.sha256[:16] / Path(model.member).name
        with contextlib.suppress(OSError):
            if path.stat().st_size == model.file_size_bytes:
                found.append(name)
    return tuple(sorted(found))


class InvalidLease(Exception):
    """A lease this node must not run as sent; reported as an invalid_spec failure."""


def spec_for_lease(
    lease: protocol.Lease, dataset: Path, adapter: Path | None = None, evaluate: Path | None = None
) -> JobSpec:
    """The job spec to run: the lease's settings with `dataset` (a batch's `adapter`, a verification
    re-run's adapter to `evaluate`) pointing at the node's own copies of the artifacts. Only catalogue
    base models are accepted, and no adapter but one fetched here: a path from the coordinator never is."""
    base_model = lease.spec.get("base_model")
    if not isinstance(base_model, str) or base_model not in CATALOGUE:
        raise InvalidLease(
            f"base model {base_model!r} is not in this node's catalogue ({', '.join(sorted(CATALOGUE))})"
        )
    if lease.spec.get("adapter") is not None or lease.spec.get("evaluate_adapter") is not None:
        raise InvalidLease("the lease names an adapter file; a node only runs adapters it fetched itself")
    local = {"dataset": str(dataset)}
    if adapter is not None:
        local["adapter"] = str(adapter)
    if evaluate is not None:
        local["evaluate_adapter"] = str(evaluate)
    try:
        spec = parse_job_spec({**lease.spec, **local})
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in problem['loc']) or 'spec'}: {problem['msg']}"
            for problem in error.errors()
        )
        raise InvalidLease(f"invalid job spec: {problems}"[:4000]) from None
    if lease.adapter_sha256 is not None and not isinstance(spec, InferenceJobSpec):
        raise InvalidLease("only a batch inference job runs on an adapter")
    return spec


def progress_message(lease: protocol.Lease, record: Progress) -> protocol.JobProgress:
    return protocol.JobProgress(
        job_id=lease.job_id,
        lease_id=lease.lease_id,
        step=max(record.step, 0),
        total_steps=max(record.total_steps, 0),
        loss=finite_or_none(record.loss),
        eval_loss=finite_or_none(record.eval_loss),
        learning_rate=finite_or_none(record.learning_rate),
        tokens_per_second=finite_or_none(record.tokens_per_second),
        eta_seconds=finite_or_none(record.eta_seconds),
    )


def checkpoint_message(lease: protocol.Lease, step: int, sha256: str) -> protocol.CheckpointUploaded:
    return protocol.CheckpointUploaded(job_id=lease.job_id, lease_id=lease.lease_id, step=step, sha256=sha256)


def result_message(
    lease: protocol.Lease, record: Completed, sha256: str, gguf_sha256: str | None = None
) -> protocol.JobResult:
    return protocol.JobResult(
        job_id=lease.job_id,
        lease_id=lease.lease_id,
        sha256=sha256,
        gguf_sha256=gguf_sha256,
        steps=max(record.steps, 0),
        final_loss=finite_or_none(record.final_loss),
        eval_loss=finite_or_none(record.eval_loss),
        delivered_eval_loss=finite_or_none(record.delivered_eval_loss),
        train_tokens=max(record.train_tokens, 0),
        seconds=max(finite_or_none(record.seconds) or 0.0, 0.0),
    )


def failure_message(lease: protocol.Lease, kind: str, message: str) -> protocol.JobFailure:
    return protocol.JobFailure(
        job_id=lease.job_id, lease_id=lease.lease_id, kind=kind, message=message[:4000]
    )


class ProgressThrottle:
    """At most one progress message per interval; the newest one held back is sent by flush(). A new
    held-out loss always goes at once: the coordinator judges a sweep trial by the loss at the very
    step it was measured (its checkpoint follows), which a later report would misplace."""

    def __init__(self, interval: float = PROGRESS_INTERVAL_SECONDS):
        self.interval = interval
        self._last_sent: float | None = None
        self._last_eval_loss: float | None = None
        self._held: protocol.JobProgress | None = None

    def offer(self, message: protocol.JobProgress, now: float) -> protocol.JobProgress | None:
        new_evaluation = message.eval_loss is not None and message.eval_loss != self._last_eval_loss
        if new_evaluation or self._last_sent is None or now - self._last_sent >= self.interval:
            self._last_sent, self._held = now, None
            self._last_eval_loss = (
                message.eval_loss if message.eval_loss is not None else self._last_eval_loss
            )
            return message
        self._held = message
        return None

    def flush(self) -> protocol.JobProgress | None:
        held, self._held = self._held, None
        return held


Reportable = protocol.CheckpointUploaded | protocol.JobResult | protocol.JobFailure


def _outbox_key(message: Reportable | protocol.Acknowledged) -> tuple[str, str, str]:
    about = message.about if isinstance(message, protocol.Acknowledged) else message.type
    return message.job_id, message.lease_id, about


@dataclass
class _OutboxEntry:
    message: Reportable
    superseded: bool = False


class Outbox:
    """Checkpoint, result and failure reports kept until the coordinator acknowledges them, and sent
    again after every reconnect (a restarted coordinator answers duplicates with accepted=False).

    Each report gets exactly one acknowledgement per connection, in order, so an acknowledgement
    settles the oldest report with its (job, lease, about). A newer checkpoint of the same lease makes
    older ones pointless to send again; they stay only to absorb acknowledgements already on the way.
    """

    def __init__(self, limit: int = MAX_OUTBOX):
        self._entries: list[_OutboxEntry] = []
        self._limit = limit

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, message: Reportable) -> None:
        if isinstance(message, protocol.CheckpointUploaded):
            for entry in self._entries:
                if _outbox_key(entry.message) == _outbox_key(message):
                    entry.superseded = True
        self._entries.append(_OutboxEntry(message))
        if len(self._entries) > self._limit:
            dropped = self._entries.pop(0)
            logger.warning(
                "dropping an unacknowledged %s report of job %s", dropped.message.type, dropped.message.job_id
            )

    def acknowledge(self, ack: protocol.Acknowledged) -> Reportable | None:
        """Settle the report this acknowledgement answers; None when nothing was waiting for it."""
        key = _outbox_key(ack)
        for index, entry in enumerate(self._entries):
            if _outbox_key(entry.message) == key:
                del self._entries[index]
                return entry.message
        return None

    def for_new_connection(self) -> list[Reportable]:
        """What to send again on a new connection, oldest first."""
        self._entries = [entry for entry in self._entries if not entry.superseded]
        return [entry.message for entry in self._entries]

    def pending(self) -> list[Reportable]:
        return [entry.message for entry in self._entries]
