"""The headless node agent: holds the `/node` websocket to the coordinator, runs each leased job in
engine.runner's child process, and reports progress, checkpoints and results back.

`NodeAgent` is the facade the CLI and the tray app use. What it says and when (telemetry, lease → spec,
record → message, what waits for an acknowledgement, reconnect delays) is decided in desktop.messages,
and its files are kept in desktop.workspace; this module does the I/O around them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import tarfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from coordinator import protocol
from coordinator.client import NodeClient, SwarmError, pack_directory, unpack_archive
from coordinator.protocol import CloseCode, ProtocolViolation, format_credits
from desktop import token_store, workspace
from desktop.messages import (
    Backoff,
    InvalidLease,
    Outbox,
    ProgressThrottle,
    Reportable,
    agent_version,
    cached_catalogue_models,
    checkpoint_message,
    default_node_name,
    failure_message,
    finite_or_none,
    progress_message,
    result_message,
    spec_for_lease,
    telemetry_from_inventory,
    websocket_url,
)
from desktop.workspace import Workspace
from engine.devices import DeviceInventory
from engine.jobs import LoraJobSpec
from engine.records import CheckpointSaved, Completed, Failed, Log, Progress, Record, Started

logger = logging.getLogger("desktop.agent")

WELCOME_TIMEOUT_SECONDS = 30.0
CANCEL_GRACE_SECONDS = 60.0  # a cancelled job may take this long to checkpoint before it is killed
STOP_JOB_SECONDS = 90.0  # a graceful stop waits this long for the job to checkpoint and report
STOP_DRAIN_SECONDS = 15.0  # ... and this long for the coordinator to acknowledge what was sent
DOWNLOAD_ATTEMPTS = 10
UPLOAD_ATTEMPTS = 30  # with the 60 s cap, about half an hour of the coordinator being unreachable
SLOW_RECONNECT_AFTER = 5  # backoff failures after a close the coordinator chose: waits up to 32 s


class NodeStopped(Exception):
    """The agent cannot go on (its token was refused, its protocol is out of date); str() says why
    and what to do."""


# ---- what the facade reports


@dataclass(frozen=True)
class JobStatus:
    job_id: str
    lease_id: str
    attempt: int
    max_attempts: int
    phase: Literal["downloading", "training", "uploading"] = "downloading"
    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    eval_loss: float | None = None
    tokens_per_second: float | None = None
    eta_seconds: float | None = None


@dataclass(frozen=True)
class JobOutcome:
    job_id: str
    # "cancelled": stopped here, whether the coordinator cancelled it or this node released it
    outcome: Literal["completed", "failed", "cancelled"]
    message: str


@dataclass(frozen=True)
class AgentStatus:
    """A snapshot; the agent replaces it whole on every change, so any thread may read it."""

    coordinator: str
    node_id: str | None = None
    connected: bool = False
    paused: bool = False
    pause_reason: str | None = None
    job: JobStatus | None = None
    last_job: JobOutcome | None = None
    telemetry: protocol.Telemetry | None = None
    earnings: protocol.Earnings | None = None
    problem: str | None = None  # why the agent is not connected, in words
    stopped: bool = False


# ---- the agent


class _GiveUp(Exception):
    """A download or upload that will not succeed (refused, retries used up, the lease ended)."""


@dataclass(eq=False)
class _ActiveJob:
    lease: protocol.Lease
    directory: Path
    status: JobStatus
    runner: Any = None
    cancel_reason: Literal["coordinator", "paused", "shutdown"] | None = None
    pause_reason: str = ""
    completed: bool = False  # the adapter is done: a checkpoint is no longer worth uploading
    tidy_when_done: bool = False  # its result or failure was acknowledged before its child exited
    reported: bool = False  # its result or failure was posted
    previous: _ActiveJob | None = None  # the job before, whose child may still be exiting
    newest_checkpoint_step: int = 0
    throttle: ProgressThrottle = field(default_factory=ProgressThrottle)
    uploads: set[asyncio.Task] = field(default_factory=set)
    upload_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    task: asyncio.Task | None = None

    @property
    def output_dir(self) -> Path:
        return workspace.output_directory(self.directory)

    @property
    def reference(self) -> protocol.LeaseReference:
        return protocol.LeaseReference(job_id=self.lease.job_id, lease_id=self.lease.lease_id)


def _probe_devices(check_torch: bool) -> DeviceInventory:
    from engine import devices

    return devices.probe(check_torch=check_torch)


def _job_runner(spec: LoraJobSpec, output_dir: Path, *, resume_from: Path | None, device: str | None) -> Any:
    from engine.runner import JobRunner

    return JobRunner(spec, output_dir, resume_from=resume_from, device=device)


def _transient(error: SwarmError) -> bool:
    status = error.status_code
    return status is None or status in (408, 425, 429) or status >= 500


def _describe(error: BaseException) -> str:
    return str(error) or type(error).__name__


class NodeAgent:
    """One node: connects, heartbeats, runs one leased job at a time, reports it, reconnects.

    `run()` runs until `stop()` (or raises NodeStopped). `stop()`, `pause()` and `resume()` may be
    called from any thread; `status` is a snapshot any thread may read; `on_change(status)` is called on
    the agent's event loop after each change (a GUI hands it to its own thread).
    """

    def __init__(
        self,
        coordinator: str,
        data_dir: str | Path,
        *,
        name: str | None = None,
        device: str | None = None,
        on_change: Callable[[AgentStatus], None] | None = None,
        # Seams for tests; the defaults are the real engine and coordinator client.
        runner_factory: Callable[..., Any] = _job_runner,
        client_factory: Callable[[str, str], Any] = NodeClient,
        register: Callable[[str, str], tuple[str, str]] = NodeClient.register,
        probe: Callable[[bool], DeviceInventory] = _probe_devices,
        rng: random.Random | None = None,
    ):
        self.coordinator = token_store.normalize_coordinator_url(coordinator)
        self.data_dir = Path(data_dir)
        self.workspace = Workspace(self.data_dir)
        self.name = name or default_node_name()
        self.device = device
        self.on_change = on_change
        self._runner_factory = runner_factory
        self._client_factory = client_factory
        self._register = register
        self._probe = probe
        self._rng = rng or random.Random()
        self._status = AgentStatus(coordinator=self.coordinator)
        self._outbox = Outbox()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._credentials: token_store.Credentials | None = None
        self._client: Any = None
        self._backends: tuple[str, ...] | None = None
        self._telemetry: protocol.Telemetry | None = None
        self._job: _ActiveJob | None = None  # the lease this node holds now
        self._live_jobs: set[_ActiveJob] = set()  # with any whose child is still exiting
        self._paused = False
        self._pause_reason: str | None = None
        self._stopping = False  # stop() was called: finish the job gracefully, then close
        self._abandoning = False  # stop() was called twice: kill the job, close at once
        self._closing = False  # the agent itself is closing the websocket
        self._stop_deadline: float | None = None
        self._stop_requested: asyncio.Event | None = None
        self._outgoing: asyncio.Queue | None = None  # the current connection's send queue
        self._websocket: ClientConnection | None = None
        self._background: set[asyncio.Task] = set()

    # ---- the facade

    @property
    def status(self) -> AgentStatus:
        return self._status

    @property
    def jobs_directory(self) -> Path:
        return self.workspace.jobs_directory

    @property
    def artifacts_directory(self) -> Path:
        return self.workspace.artifacts_directory

    async def run(self) -> None:
        """Connect and work until stop(); raises NodeStopped when the coordinator will never take this
        node as it is (refused token, unsupported protocol version)."""
        if self._loop is not None:
            raise RuntimeError("NodeAgent.run() may be called only once")
        self._loop = asyncio.get_running_loop()
        self._stop_requested = asyncio.Event()
        if self._stopping:
            self._stop_requested.set()
        connection = asyncio.create_task(self._stay_connected(), name="node-connection")
        stop = asyncio.create_task(self._stop_requested.wait(), name="node-stop")
        try:
            await asyncio.wait({connection, stop}, return_when=asyncio.FIRST_COMPLETED)
            if connection.done():
                connection.result()  # raises what ended it: NodeStopped, or a bug
                return
            await self._shut_down(connection)
        finally:
            await _cancel_all([connection, stop])
            await self._abandon_jobs()
            await _cancel_all(list(self._background))
            if self._client is not None:
                with contextlib.suppress(Exception):
                    self._client.close()  # also ends a transfer still running in a thread
            self._update(connected=False, stopped=True, job=None)

    def stop(self) -> None:
        """Stop gracefully: the running job checkpoints (and its checkpoint is uploaded), then the
        websocket closes with 1000. A second call stops at once, killing the job."""
        self._call_in_loop(self._stop_now)

    def pause(self, reason: str = "paused by the seller", *, stop_running: bool = False) -> None:
        """Take no new jobs. With stop_running the running job is stopped too and handed back (released,
        so it costs the buyer no attempt); its checkpoint lets another node resume it."""
        self._call_in_loop(self._pause_now, reason, stop_running)

    def resume(self) -> None:
        self._call_in_loop(self._resume_now)

    async def earnings(self) -> protocol.Earnings:
        """Ask the coordinator for this node's earnings now (they also arrive after each result)."""
        if self._client is None:
            raise RuntimeError("the agent has not registered with the coordinator yet")
        answer = await asyncio.to_thread(self._client.me)
        earnings = protocol.Earnings.model_validate(answer["earnings"], strict=False)
        self._update(earnings=earnings)
        return earnings

    # ---- facade plumbing

    def _call_in_loop(self, function: Callable[..., None], *arguments: Any) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            function(*arguments)
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            function(*arguments)
        else:
            loop.call_soon_threadsafe(function, *arguments)

    def _update(self, **changes: Any) -> None:
        new = replace(self._status, **changes)
        if new == self._status:
            return
        self._status = new
        if self.on_change is not None:
            try:
                self.on_change(new)
            except Exception:
                logger.exception("the status callback failed")

    def _stop_now(self) -> None:
        if self._stopping:
            if not self._abandoning:
                logger.warning("stopping at once: the running job is killed")
                self._abandoning = True
                for job in self._live_jobs:
                    if job.runner is not None:
                        job.runner.kill()
            return
        self._stopping = True
        self._heartbeat_at_once()  # accepting_jobs=False before anything ends: no lease comes back here
        if self._stop_requested is not None:
            self._stop_requested.set()

    def _pause_now(self, reason: str, stop_running: bool) -> None:
        self._paused, self._pause_reason = True, reason
        logger.info("paused (%s): taking no new jobs", reason)
        self._update(paused=True, pause_reason=reason)
        self._heartbeat_at_once()
        if stop_running and self._job is not None:
            self._job.pause_reason = reason
            self._cancel_job(self._job, "paused")

    def _resume_now(self) -> None:
        if not self._paused:
            return
        self._paused, self._pause_reason = False, None
        logger.info("resumed: taking jobs again")
        self._update(paused=False, pause_reason=None)
        self._heartbeat_at_once()

    def _spawn(self, coroutine: Any, name: str | None = None) -> asyncio.Task:
        task = asyncio.create_task(coroutine, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(_log_task_failure)
        return task

    # ---- start-up and connection

    async def _stay_connected(self) -> None:
        await self._start_up()
        backoff = Backoff(rng=self._rng)
        while True:
            problem = await self._connect_once(backoff)
            if self._closing:
                return
            delay = backoff.next_delay()
            logger.warning("%s; reconnecting in %.0f s", problem, delay)
            self._update(connected=False, problem=problem)
            await asyncio.sleep(delay)

    async def _start_up(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(self.workspace.tidy_all_jobs)
        inventory = await asyncio.to_thread(self._probe, True)
        self._backends = inventory.backends
        self._telemetry = telemetry_from_inventory(inventory, self._backends)
        self._update(telemetry=self._telemetry)
        self._credentials = await self._credentials_or_register()
        self._client = self._client_factory(self.coordinator, self._credentials.token)
        self._update(node_id=self._credentials.node_id)

    async def _credentials_or_register(self) -> token_store.Credentials:
        stored = await asyncio.to_thread(token_store.load, self.coordinator, self.data_dir)
        if stored is not None:
            return stored
        backoff = Backoff(rng=self._rng)
        while True:
            try:
                node_id, token = await asyncio.to_thread(self._register, self.coordinator, self.name)
                break
            except SwarmError as error:
                if not _transient(error):
                    raise NodeStopped(
                        f"the coordinator at {self.coordinator} refused to register this node: {error}"
                    ) from None
                delay = backoff.next_delay()
                logger.warning(
                    "could not register with %s (%s); retrying in %.0f s", self.coordinator, error, delay
                )
                self._update(problem=str(error))
                await asyncio.sleep(delay)
        credentials = token_store.Credentials(self.coordinator, node_id, token)
        try:
            await asyncio.to_thread(token_store.save, credentials, self.data_dir)
        except OSError as error:
            raise NodeStopped(
                f"registered as node {node_id} but could not store its token: {error}"
            ) from None
        logger.info("registered with %s as node %s (%s)", self.coordinator, node_id, self.name)
        return credentials

    async def _connect_once(self, backoff: Backoff) -> str:
        """One connection, from handshake to close; returns why it ended."""
        assert self._credentials is not None
        url = websocket_url(self.coordinator)
        try:
            hello = await self._hello()
            async with connect(
                url,
                additional_headers={
                    protocol.AUTHORIZATION_HEADER: f"{protocol.TOKEN_SCHEME} {self._credentials.token}"
                },
                user_agent_header=f"compute-swarm-node/{agent_version()}",
                max_size=protocol.MAX_FRAME_BYTES,
                ping_interval=protocol.PING_INTERVAL_SECONDS,
                ping_timeout=protocol.PING_TIMEOUT_SECONDS,
                open_timeout=WELCOME_TIMEOUT_SECONDS,
                close_timeout=10,
            ) as websocket:
                return await self._session(websocket, hello, backoff)
        except InvalidStatus as error:
            status = error.response.status_code
            if status in (401, 403):
                raise NodeStopped(self._refused_token_message(f"HTTP {status}")) from None
            return f"the coordinator at {url} answered the websocket handshake with HTTP {status}"
        except (OSError, TimeoutError, WebSocketException) as error:
            return f"cannot reach the coordinator at {url} ({_describe(error)})"

    async def _hello(self) -> protocol.Hello:
        await self._refresh_telemetry()
        assert self._telemetry is not None
        models = await asyncio.to_thread(cached_catalogue_models)
        return protocol.Hello(
            protocol_version=protocol.PROTOCOL_VERSION,
            agent_version=agent_version(),
            telemetry=self._telemetry,
            models=models,
            running=self._running(),
            accepting_jobs=self._accepting_jobs(),
        )

    async def _session(self, websocket: ClientConnection, hello: protocol.Hello, backoff: Backoff) -> str:
        outgoing: asyncio.Queue = asyncio.Queue()
        helpers: list[asyncio.Task] = []
        try:
            await websocket.send(hello.model_dump_json())
            welcome = protocol.parse_coordinator_message(
                await _within(websocket.recv(), WELCOME_TIMEOUT_SECONDS)
            )
            if not isinstance(welcome, protocol.Welcome):
                raise ProtocolViolation(CloseCode.MALFORMED, f"expected welcome first, got {welcome.type}")
            if welcome.protocol_version != protocol.PROTOCOL_VERSION:
                await websocket.close(CloseCode.NORMAL, "unsupported protocol version")
                raise NodeStopped(
                    f"the coordinator at {self.coordinator} speaks protocol version "
                    f"{welcome.protocol_version} and this agent {protocol.PROTOCOL_VERSION}: "
                    "update compute-swarm"
                )
            backoff.reset()
            if self._closing:  # stop() came during the handshake
                await websocket.close(CloseCode.NORMAL, "the node is stopping")
                return "stopped"
            self._websocket, self._outgoing = websocket, outgoing
            for message in self._outbox.for_new_connection():
                outgoing.put_nowait(message)
            helpers = [
                asyncio.create_task(self._write(websocket, outgoing), name="node-writer"),
                asyncio.create_task(
                    self._heartbeats(welcome.heartbeat_interval_seconds), name="node-heartbeat"
                ),
            ]
            for helper in helpers:
                helper.add_done_callback(_log_task_failure)
            logger.info("connected to %s as node %s", self.coordinator, welcome.node_id)
            self._update(connected=True, node_id=welcome.node_id, earnings=welcome.earnings, problem=None)
            async for text in websocket:
                message = protocol.parse_coordinator_message(text)
                try:
                    self._dispatch(message)
                except ProtocolViolation:
                    raise
                except Exception:
                    logger.exception("could not handle the coordinator's %s message", message.type)
        except ProtocolViolation as violation:
            logger.error(
                "the coordinator sent a message this agent does not understand: %s", violation.reason
            )
            await websocket.close(violation.code, violation.reason)
            return f"the coordinator sent a malformed message ({violation.reason})"
        except TimeoutError:
            return f"the coordinator did not welcome this node within {WELCOME_TIMEOUT_SECONDS:.0f} s"
        except ConnectionClosed:
            pass
        finally:
            await _cancel_all(helpers)
            if self._outgoing is outgoing:
                self._websocket, self._outgoing = None, None
            self._update(connected=False)
        code, reason = websocket.close_code, websocket.close_reason or ""
        if code == CloseCode.UNAUTHORIZED:
            raise NodeStopped(self._refused_token_message(reason))
        if code in protocol.FATAL_CLOSE_CODES:  # UNSUPPORTED_VERSION, and any added later
            raise NodeStopped(
                f"the coordinator at {self.coordinator} closed the connection ({reason or code}): "
                "update compute-swarm"
            )
        if code in (CloseCode.REPLACED, CloseCode.MALFORMED, CloseCode.POLICY_VIOLATION):
            # The coordinator welcomed us and then objected: reconnecting at once would only repeat it.
            backoff.failures = max(backoff.failures, SLOW_RECONNECT_AFTER)
        if code == CloseCode.REPLACED:
            return (
                "another agent connected with this node's token and replaced this connection "
                "(is the node running twice?)"
            )
        if code in (None, 1006):  # 1006: the connection dropped without a close frame
            return "lost the connection to the coordinator (it dropped without a close)"
        return f"lost the connection to the coordinator (close code {code}{': ' + reason if reason else ''})"

    def _refused_token_message(self, reason: str) -> str:
        return (
            f"the coordinator at {self.coordinator} refused this node's token "
            f"({reason or 'unknown or revoked'}); run `compute-swarm node --coordinator {self.coordinator} "
            "--forget` and start again to register this machine anew"
        )

    async def _write(self, websocket: ClientConnection, outgoing: asyncio.Queue) -> None:
        """The connection's only writer, so messages leave in the order they were posted."""
        with contextlib.suppress(ConnectionClosed):
            while True:
                message = await outgoing.get()
                await websocket.send(message.model_dump_json())

    def _post(self, message: protocol.NodeMessage) -> None:
        if isinstance(message, Reportable):
            self._outbox.add(message)
        if isinstance(message, protocol.JobResult | protocol.JobFailure):
            for job in self._live_jobs:
                if job.lease.lease_id == message.lease_id:
                    # Its end is told: the coordinator counts this node free, whether or not the child
                    # has exited yet.
                    job.reported = True
        if self._outgoing is not None:
            self._outgoing.put_nowait(message)

    async def _heartbeats(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            await self._refresh_telemetry()
            self._heartbeat_at_once()

    def _heartbeat_at_once(self) -> None:
        """Tell the coordinator now (with the last telemetry) whether this node takes jobs."""
        if self._telemetry is not None and self._outgoing is not None:
            self._post(
                protocol.Heartbeat(
                    telemetry=self._telemetry, running=self._running(), accepting_jobs=self._accepting_jobs()
                )
            )

    async def _refresh_telemetry(self) -> None:
        try:
            inventory = await asyncio.to_thread(self._probe, False)
            self._telemetry = telemetry_from_inventory(inventory, self._backends)
        except (ValidationError, ValueError) as error:
            logger.debug("kept the previous telemetry: %s", error)
            return
        self._update(telemetry=self._telemetry)

    def _running(self) -> tuple[protocol.LeaseReference, ...]:
        job = self._job
        holds_lease = job is not None and not job.reported and job.cancel_reason != "coordinator"
        return (job.reference,) if holds_lease else ()

    def _accepting_jobs(self) -> bool:
        return not (self._paused or self._stopping)

    # ---- coordinator messages

    def _dispatch(self, message: protocol.CoordinatorMessage) -> None:
        if isinstance(message, protocol.Lease):
            self._on_lease(message)
        elif isinstance(message, protocol.Cancel):
            self._on_cancel(message)
        elif isinstance(message, protocol.Acknowledged):
            self._on_acknowledged(message)
        elif isinstance(message, protocol.Earnings):
            logger.info(
                "earnings: %s credits pending verification, %s available, %d jobs completed",
                format_credits(message.pending_micro),
                format_credits(message.available_micro),
                message.jobs_completed,
            )
            self._update(earnings=message)
        else:
            raise ProtocolViolation(CloseCode.MALFORMED, f"unexpected {message.type} message")

    def _on_lease(self, lease: protocol.Lease) -> None:
        current = self._job
        if current is not None and current.lease.lease_id == lease.lease_id:
            return  # the same lease again
        if current is not None and not current.reported:
            refusal = f"node busy with job {current.lease.job_id}"
        elif self._paused:
            refusal = f"node paused ({self._pause_reason})"
        elif self._stopping:
            refusal = "node shutting down"
        else:
            refusal = None
        if refusal is not None:
            logger.warning("declined job %s: %s", lease.job_id, refusal)
            # Released, not failed: the job did nothing wrong, so it costs the buyer no attempt.
            self._post(failure_message(lease, "released", refusal))
            return
        resuming = f", resuming from step {lease.checkpoint_step}" if lease.checkpoint_sha256 else ""
        logger.info(
            "leased job %s (attempt %d of %d)%s", lease.job_id, lease.attempt, lease.max_attempts, resuming
        )
        job = _ActiveJob(
            lease=lease,
            directory=self.workspace.job_directory(lease.job_id),
            status=JobStatus(
                job_id=lease.job_id,
                lease_id=lease.lease_id,
                attempt=lease.attempt,
                max_attempts=lease.max_attempts,
            ),
            previous=current,
        )
        self._job = job
        self._live_jobs.add(job)
        self._update(job=job.status)
        job.task = self._spawn(self._run_job(job), name=f"job-{lease.job_id}")

    def _on_cancel(self, cancel: protocol.Cancel) -> None:
        job = self._job
        if job is None or (job.lease.job_id, job.lease.lease_id) != (cancel.job_id, cancel.lease_id):
            logger.debug("ignored a cancel for lease %s, which this node does not hold", cancel.lease_id)
            return
        logger.info("job %s cancelled by the coordinator: %s", cancel.job_id, cancel.reason)
        self._cancel_job(job, "coordinator")

    def _cancel_job(self, job: _ActiveJob, reason: Literal["coordinator", "paused", "shutdown"]) -> None:
        # An invalid lease outranks the other reasons: then nothing of the job may be uploaded.
        if job.cancel_reason is None or reason == "coordinator":
            job.cancel_reason = reason
        if job.runner is not None:
            job.runner.cancel(grace_seconds=CANCEL_GRACE_SECONDS)

    def _on_acknowledged(self, ack: protocol.Acknowledged) -> None:
        report = self._outbox.acknowledge(ack)
        if report is None:
            logger.debug("an acknowledgement of a %s of job %s nobody waited for", ack.about, ack.job_id)
            return
        if not ack.accepted:
            logger.info(
                "the coordinator did not take the %s of job %s (the job is %s)%s",
                ack.about,
                ack.job_id,
                ack.state,
                f": {ack.message}" if ack.message else "",
            )
        if ack.about not in ("result", "failure"):
            return
        job = self._job
        if job is None or job.lease.job_id != ack.job_id:
            self._tidy_later(ack.job_id)
        elif job.lease.lease_id == ack.lease_id:
            job.tidy_when_done = True  # its child may still be exiting, writing its log
        # else: a newer lease of the same job runs here now, in a directory cleared for it

    def _tidy_later(self, job_id: str) -> None:
        running = frozenset(job.lease.job_id for job in self._live_jobs)
        self._spawn(asyncio.to_thread(self.workspace.tidy_job, job_id, running), name=f"tidy-{job_id}")

    # ---- running a job

    async def _run_job(self, job: _ActiveJob) -> None:
        lease = job.lease
        try:
            try:
                # Refused before downloading anything.
                spec_for_lease(lease, self.workspace.artifact_path(lease.dataset_sha256))
                dataset, resume_from = await self._fetch_inputs(job)
                spec = spec_for_lease(lease, dataset)
            except InvalidLease as error:
                await self._report_early_failure(job, "invalid_spec", str(error))
                return
            except _GiveUp as error:
                if job.cancel_reason is None:
                    await self._report_early_failure(job, "error", str(error))
                    return
            previous, job.previous = job.previous, None
            if previous is not None and previous.task is not None and not previous.task.done():
                logger.info(
                    "job %s: waiting for job %s's worker to exit", lease.job_id, previous.lease.job_id
                )
                await asyncio.wait({previous.task})
            if job.cancel_reason is not None:
                await self._report_early_failure(job, *self._why_stopped(job))
                return
            await self._train(job, spec, resume_from)
        except Exception as error:
            logger.exception("job %s: the agent failed while running it", lease.job_id)
            self._post(failure_message(lease, "error", f"the node agent failed: {_describe(error)}"))
            self._update(last_job=JobOutcome(lease.job_id, "failed", _describe(error)))
        finally:
            if job.runner is not None:
                job.runner.kill()  # does nothing once the child has exited
            self._live_jobs.discard(job)
            if self._job is job:
                self._job = None
                self._update(job=None)
            if job.tidy_when_done:
                self._tidy_later(lease.job_id)

    async def _report_early_failure(self, job: _ActiveJob, kind: str, message: str) -> None:
        logger.warning("job %s failed before training: %s", job.lease.job_id, message)
        self._post(failure_message(job.lease, kind, message))
        outcome = "cancelled" if kind in ("cancelled", "released") else "failed"
        self._update(last_job=JobOutcome(job.lease.job_id, outcome, message))

    def _set_job(self, job: _ActiveJob, **changes: Any) -> None:
        job.status = replace(job.status, **changes)
        if self._job is job:
            self._update(job=job.status)

    async def _fetch_inputs(self, job: _ActiveJob) -> tuple[Path, Path | None]:
        lease = job.lease
        await asyncio.to_thread(self.workspace.clear_job_directory, job.directory)
        dataset = await self._retrying(
            job,
            "download the dataset",
            lambda: self._fetch_artifact(lease.dataset_sha256, job),
            DOWNLOAD_ATTEMPTS,
            download=True,
        )
        if lease.checkpoint_sha256 is None:
            return dataset, None
        checkpoint_sha256 = lease.checkpoint_sha256
        archive = await self._retrying(
            job,
            "download the checkpoint",
            lambda: self._fetch_artifact(checkpoint_sha256, job),
            DOWNLOAD_ATTEMPTS,
            download=True,
        )
        resume_from = workspace.resume_directory(job.directory)
        try:
            await asyncio.to_thread(unpack_archive, archive, resume_from)
        except (OSError, tarfile.TarError, SwarmError) as error:
            raise _GiveUp(f"could not unpack the checkpoint: {_describe(error)}") from None
        finally:
            # Unlike a dataset, a checkpoint is never fetched twice: a later lease brings a newer one.
            with contextlib.suppress(OSError):
                archive.unlink()
        return dataset, resume_from

    def _fetch_artifact(self, sha256: str, job: _ActiveJob) -> Path:
        """Thread: the artifact from the cache, downloaded into it when it is not there."""
        keep = (job.lease.dataset_sha256, job.lease.checkpoint_sha256)
        return self.workspace.fetch_artifact(sha256, self._client.download_artifact, keep)

    async def _retrying(
        self, job: _ActiveJob, what: str, call: Callable[[], Any], attempts: int, *, download: bool = False
    ) -> Any:
        """Run a transfer in a thread, retrying with backoff while the coordinator is unreachable.
        A download stops at any cancel; an upload only when the lease has ended (a pause or a stop
        still wants the last checkpoint uploaded)."""
        backoff = Backoff(rng=self._rng)
        for attempt in range(1, attempts + 1):
            if job.cancel_reason == "coordinator" or self._abandoning or (download and job.cancel_reason):
                raise _GiveUp(f"stopped trying to {what}: the job was cancelled")
            try:
                return await asyncio.to_thread(call)
            except SwarmError as error:
                if not _transient(error) or attempt == attempts:
                    raise _GiveUp(f"could not {what}: {error}") from None
                problem = error
            except OSError as error:
                raise _GiveUp(f"could not {what}: {_describe(error)}") from None
            delay = backoff.next_delay()
            if self._stop_deadline is not None and time.monotonic() + delay > self._stop_deadline:
                raise _GiveUp(f"could not {what} before stopping: {problem}")
            logger.warning(
                "job %s: could not %s (%s); retrying in %.0f s", job.lease.job_id, what, problem, delay
            )
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def _train(self, job: _ActiveJob, spec: LoraJobSpec, resume_from: Path | None) -> None:
        assert self._loop is not None
        runner = self._runner_factory(spec, job.output_dir, resume_from=resume_from, device=self.device)
        job.runner = runner
        records: asyncio.Queue[Record | None] = asyncio.Queue()
        threading.Thread(
            target=self._pump_records,
            args=(job, runner, records),
            name=f"records-{job.lease.job_id}",
            daemon=True,
        ).start()
        self._set_job(job, phase="training", step=job.lease.checkpoint_step)
        while (record := await records.get()) is not None:
            await self._handle_record(job, record)

    def _pump_records(self, job: _ActiveJob, runner: Any, records: asyncio.Queue) -> None:
        """Thread: start the child and hand each of its records to the event loop."""
        loop = self._loop
        assert loop is not None

        def hand(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(records.put_nowait, item)
            except RuntimeError:  # the loop is gone: nobody will read on
                runner.kill()

        try:
            runner.start()
            hand(_RunnerStarted())
            for record in runner.records():
                hand(record)
        except Exception as error:
            logger.exception("job %s: the runner failed", job.lease.job_id)
            hand(Failed(kind="error", message=f"could not run the job: {_describe(error)}"))
        finally:
            hand(None)

    async def _handle_record(self, job: _ActiveJob, record: Any) -> None:
        lease = job.lease
        if isinstance(record, _RunnerStarted):
            if job.cancel_reason is not None:  # a cancel that came while the child was starting
                job.runner.cancel(grace_seconds=CANCEL_GRACE_SECONDS)
        elif isinstance(record, Started):
            resumed = f", resumed at step {record.resumed_from_step}" if record.resumed_from_step else ""
            logger.info(
                "job %s: training on %s, %d steps%s", lease.job_id, record.device, record.total_steps, resumed
            )
            self._set_job(job, step=record.resumed_from_step, total_steps=record.total_steps)
        elif isinstance(record, Progress):
            self._set_job(
                job,
                step=record.step,
                total_steps=record.total_steps,
                loss=finite_or_none(record.loss),
                eval_loss=job.status.eval_loss
                if record.eval_loss is None
                else finite_or_none(record.eval_loss),
                tokens_per_second=finite_or_none(record.tokens_per_second),
                eta_seconds=finite_or_none(record.eta_seconds),
            )
            message = job.throttle.offer(progress_message(lease, record), time.monotonic())
            if message is not None:
                self._post(message)
        elif isinstance(record, CheckpointSaved):
            path = Path(record.path)
            if not path.resolve().is_relative_to(job.output_dir.resolve()):
                logger.warning("job %s: ignored a checkpoint outside its output directory", lease.job_id)
                return
            job.newest_checkpoint_step = max(job.newest_checkpoint_step, record.step)
            task = self._spawn(
                self._upload_checkpoint(job, record.step, path), name=f"checkpoint-{record.step}"
            )
            job.uploads.add(task)
            task.add_done_callback(job.uploads.discard)
        elif isinstance(record, Log):
            level = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}.get(
                record.level, logging.ERROR
            )
            logger.log(level, "job %s: %s", lease.job_id, record.message)
        elif isinstance(record, Completed | Failed):
            job.completed = isinstance(record, Completed)
            held = job.throttle.flush()
            if held is not None:
                self._post(held)
            if isinstance(record, Completed):
                await self._report_result(job, record)
            else:
                await self._report_failure(job, record)

    async def _upload_checkpoint(self, job: _ActiveJob, step: int, path: Path) -> None:
        lease = job.lease
        async with job.upload_lock:
            # Only the newest checkpoint matters, and none once the lease is gone or the job completed.
            if step < job.newest_checkpoint_step or job.completed or job.cancel_reason == "coordinator":
                return
            archive = job.directory / f"checkpoint-{step:08d}.tar"
            try:
                await asyncio.to_thread(pack_directory, path, archive)
                sha256 = await self._retrying(
                    job,
                    f"upload the checkpoint at step {step}",
                    lambda: self._client.upload_artifact(
                        archive, purpose="checkpoint", job_id=lease.job_id, lease_id=lease.lease_id
                    ),
                    UPLOAD_ATTEMPTS,
                )
            except (OSError, tarfile.TarError) as error:
                logger.warning(
                    "job %s: could not pack the checkpoint at step %d: %s", lease.job_id, step, error
                )
                return
            except _GiveUp as error:
                logger.warning("job %s: %s", lease.job_id, error)
                return
            finally:
                with contextlib.suppress(OSError):
                    archive.unlink(missing_ok=True)
        logger.info("job %s: checkpoint at step %d uploaded", lease.job_id, step)
        self._post(checkpoint_message(lease, step, sha256))

    async def _report_result(self, job: _ActiveJob, record: Completed) -> None:
        lease = job.lease
        if job.cancel_reason == "coordinator":  # finished just as the lease ended: nobody takes it now
            await self._report_failure(job, Failed(kind="cancelled", message="cancelled"))
            return
        self._set_job(job, phase="uploading")
        await asyncio.gather(*job.uploads, return_exceptions=True)
        archive = job.directory / "result.tar"
        try:
            await asyncio.to_thread(workspace.pack_result, job.directory, archive, lease.dataset_sha256)
            sha256 = await self._retrying(
                job,
                "upload the result",
                lambda: self._client.upload_artifact(
                    archive, purpose="result", job_id=lease.job_id, lease_id=lease.lease_id
                ),
                UPLOAD_ATTEMPTS,
            )
        except (OSError, tarfile.TarError, ValueError) as error:
            message = f"could not package the adapter: {_describe(error)}"
            logger.error("job %s: %s", lease.job_id, message)
            self._post(failure_message(lease, "error", message))
            self._update(last_job=JobOutcome(lease.job_id, "failed", message))
            return
        except _GiveUp as error:
            logger.error("job %s finished, but %s", lease.job_id, error)
            self._post(failure_message(lease, "error", f"finished, but {error}"))
            self._update(last_job=JobOutcome(lease.job_id, "failed", str(error)))
            return
        finally:
            with contextlib.suppress(OSError):
                archive.unlink(missing_ok=True)
        final_loss = finite_or_none(record.final_loss)
        loss = f", final loss {final_loss:.4f}" if final_loss is not None else ""
        summary = f"{record.steps} steps in {record.seconds:.0f} s{loss}"
        logger.info("job %s completed: %s; result uploaded", lease.job_id, summary)
        self._post(result_message(lease, record, sha256))
        self._update(last_job=JobOutcome(lease.job_id, "completed", summary))

    async def _report_failure(self, job: _ActiveJob, record: Failed) -> None:
        lease = job.lease
        # A checkpoint taken on the way out goes up before the failure, so the next node resumes from it.
        await asyncio.gather(*job.uploads, return_exceptions=True)
        if job.cancel_reason is not None and record.kind in ("cancelled", "crashed"):
            # Crashed too: a child that did not stop within the grace period was killed.
            (kind, message), outcome = self._why_stopped(job), "cancelled"
            logger.info("job %s stopped: %s", lease.job_id, message)
        else:
            kind, message, outcome = record.kind, record.message, "failed"
            logger.warning(
                "job %s failed (%s): %s", lease.job_id, record.kind.replace("_", " "), record.message
            )
            if record.details:
                # Tracebacks and stderr stay on this machine: they may name the seller's paths.
                logger.info(
                    "job %s: details (see %s):\n%s",
                    lease.job_id,
                    job.output_dir / workspace.WORKER_LOG,
                    record.details,
                )
        self._post(failure_message(lease, kind, message))
        self._update(last_job=JobOutcome(lease.job_id, outcome, message))

    def _why_stopped(self, job: _ActiveJob) -> tuple[Literal["cancelled", "released"], str]:
        """The failure kind and message for a job this node stopped. Only a lease the coordinator ended
        is "cancelled"; a job the node stops for its own reasons is "released", which the coordinator
        queues again without using up one of the buyer's attempts."""
        if job.cancel_reason == "coordinator":
            return "cancelled", "cancelled by the coordinator"
        if job.cancel_reason == "paused":
            return "released", f"the seller paused the node ({job.pause_reason})"
        return "released", "the node is shutting down"

    # ---- stopping

    async def _shut_down(self, connection: asyncio.Task) -> None:
        self._stop_deadline = time.monotonic() + STOP_JOB_SECONDS
        job = self._job
        if job is not None and not job.reported and not self._abandoning:
            logger.info("stopping: job %s saves a checkpoint first", job.lease.job_id)
            self._cancel_job(job, "shutdown")
        await self._until(lambda: not self._live_jobs or self._abandoning, self._stop_deadline)
        drain_until = time.monotonic() + STOP_DRAIN_SECONDS
        await self._until(
            lambda: not self._outbox or self._outgoing is None or self._abandoning or connection.done(),
            drain_until,
        )
        self._closing = True
        websocket = self._websocket
        if websocket is not None:
            with contextlib.suppress(Exception):
                await _within(websocket.close(CloseCode.NORMAL, "the node is stopping"), 10)
        logger.info("stopped")

    @staticmethod
    async def _until(condition: Callable[[], bool], deadline: float) -> None:
        while not condition() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def _abandon_jobs(self) -> None:
        jobs = list(self._live_jobs)
        for job in jobs:
            if job.runner is not None:
                job.runner.kill()
        await _cancel_all([job.task for job in jobs if job.task is not None])


class _RunnerStarted:
    """Handed to the loop once the child process exists, so a cancel that came earlier reaches it."""


async def _within(awaitable: Any, seconds: float) -> Any:
    """Like asyncio.wait_for, but a cancellation that meets a result is never swallowed (Python < 3.12
    wait_for can lose it, leaving a task that was told to stop running on)."""
    task = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait({task}, timeout=seconds)
    finally:
        if not task.done():
            task.cancel()
    if not done:
        raise TimeoutError
    return task.result()


async def _cancel_all(tasks: list[asyncio.Task]) -> None:
    """Cancel the tasks and wait until each has ended, cancelling again any that caught it."""
    while pending := [task for task in tasks if not task.done()]:
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=1.0)
    for task in tasks:
        if not task.cancelled():
            task.exception()  # retrieved: a failure was logged where it happened


def _log_task_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("background task %s failed", task.get_name(), exc_info=task.exception())
