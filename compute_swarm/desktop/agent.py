"""The headless node agent: holds the `/node` websocket to the coordinator (registration, reconnects,
heartbeats), takes leases and hands each to a desktop.job.JobRun, which runs it and reports it back.

`NodeAgent` is the facade the CLI and the tray app use. What it says and when (telemetry, lease → spec,
record → message, what waits for an acknowledgement, reconnect delays) is decided in desktop.messages,
and its files are kept in desktop.workspace; this module does the I/O around them.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from compute_swarm import protocol
from compute_swarm.desktop import token_store
from compute_swarm.desktop.activity import Activity, read_activity
from compute_swarm.desktop.guards import GuardDecision, GuardSettings, MachineReading, evaluate
from compute_swarm.desktop.job import JobHost, JobOutcome, JobRun, JobStatus, StopSignal, job_runner
from compute_swarm.desktop.messages import (
    Backoff,
    Outbox,
    Reportable,
    agent_version,
    cached_catalogue_models,
    connection_end,
    default_node_name,
    describe_error,
    failure_message,
    is_invite_code_refusal,
    is_transient,
    refused_token_message,
    telemetry_from_inventory,
    websocket_url,
)
from compute_swarm.desktop.serving import InferenceServing
from compute_swarm.desktop.settings import normalize_invite_code
from compute_swarm.desktop.workspace import Workspace
from compute_swarm.engine.devices import DeviceInventory
from compute_swarm.protocol import CloseCode, ProtocolViolation, format_credits
from compute_swarm.sdk.client import NodeClient, SwarmError

logger = logging.getLogger("compute_swarm.desktop.agent")

WELCOME_TIMEOUT_SECONDS = 30.0
STOP_JOB_SECONDS = 90.0  # a graceful stop waits this long for the job to checkpoint and report
STOP_DRAIN_SECONDS = 15.0  # ... and this long for the coordinator to acknowledge what was sent
SLOW_RECONNECT_AFTER = 5  # backoff failures after a close the coordinator chose: waits up to 32 s
GUARD_INTERVAL_SECONDS = 5.0  # how often the GPU and the seller's activity are read for the guards


class NodeStopped(Exception):
    """The agent cannot go on (its token was refused, its protocol is out of date); str() says why
    and what to do."""


class InviteCodeRefused(NodeStopped):
    """The coordinator admits nodes by invitation and refused to register this one: it had no invite
    code (`code_given` False), or the coordinator refused the one it had. `detail` is the coordinator's
    own explanation. Raised only by an agent that does not wait for a code (see `set_invite_code`)."""

    def __init__(self, coordinator: str, code_given: bool, detail: str):
        self.coordinator = coordinator
        self.code_given = code_given
        self.detail = detail
        super().__init__(f"the coordinator at {coordinator} refused to register this node: {detail}")


# ---- what the facade reports


@dataclass(frozen=True)
class AgentStatus:
    """A snapshot; the agent replaces it whole on every change, so any thread may read it."""

    coordinator: str
    node_id: str | None = None
    connected: bool = False
    paused: bool = False
    pause_reason: str | None = None  # the seller's, else the first guard's
    paused_by: Literal["seller", "guard"] | None = None
    job: JobStatus | None = None
    last_job: JobOutcome | None = None
    telemetry: protocol.Telemetry | None = None
    earnings: protocol.Earnings | None = None
    problem: str | None = None  # why the agent is not connected, in words
    stopped: bool = False
    # Registration waits for an invite code: none was given ("missing"), or the coordinator refused
    # the one given ("refused"); `problem` then holds the coordinator's words. See set_invite_code.
    invite_code_wanted: Literal["missing", "refused"] | None = None
    # Whether the coordinator gives this node work, as it last said (None: not welcomed yet).
    standing: protocol.Standing | None = None


# ---- the agent


def _probe_devices(check_torch: bool) -> DeviceInventory:
    from compute_swarm.engine import devices

    return devices.probe(check_torch=check_torch, torch_in_child=True)


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
        runner_factory: Callable[..., Any] = job_runner,
        client_factory: Callable[[str, str], Any] = NodeClient,
        register: Callable[..., tuple[str, str]] = NodeClient.register,
        probe: Callable[[bool], DeviceInventory] = _probe_devices,
        activity: Callable[[], Activity] = read_activity,
        guards: GuardSettings | None = None,
        guard_interval_seconds: float = GUARD_INTERVAL_SECONDS,
        clock: Callable[[], datetime.datetime] = datetime.datetime.now,
        rng: random.Random | None = None,
        inference_slots: int | None = None,  # None: 1 where llama-cpp-python is installed, else 0
        invite_code: str | None = None,  # where the coordinator admits nodes by invitation
        # True where someone can answer (the tray): a refused or missing invite code is said in the
        # status, and registration waits for set_invite_code. False (the headless node): run() raises
        # InviteCodeRefused.
        wait_for_invite_code: bool = False,
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
        self._invite_code = None if invite_code is None else normalize_invite_code(invite_code)
        self._wait_for_invite_code = wait_for_invite_code
        self._invite_code_given = asyncio.Event()
        self._probe = probe
        self._activity = activity
        self._guard_settings = guards or GuardSettings()
        self._guard_interval_seconds = guard_interval_seconds
        self._clock = clock
        self._guard = GuardDecision()
        self._rng = rng or random.Random()
        self._status = AgentStatus(coordinator=self.coordinator)
        self._outbox = Outbox()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._credentials: token_store.Credentials | None = None
        self._client: Any = None
        self._backends: tuple[str, ...] | None = None
        self._telemetry: protocol.Telemetry | None = None
        self._job: JobRun | None = None  # the lease this node holds now
        self._live_jobs: set[JobRun] = set()  # with any whose child is still exiting
        self._seller_pause_reason: str | None = None  # set while the seller has paused the node
        self._stopping = False  # stop() was called: finish the job gracefully, then close
        self._closing = False  # the agent itself is closing the websocket
        self._stop = StopSignal()  # shared with the jobs; abandoned: stop() came twice, close at once
        self._stop_requested: asyncio.Event | None = None
        self._outgoing: asyncio.Queue | None = None  # the current connection's send queue
        self._websocket: ClientConnection | None = None
        self._background: set[asyncio.Task] = set()
        self._serving = InferenceServing(
            self.workspace,
            self._post,
            client=lambda: self._client,
            slots=inference_slots,
            # A crash takes the model off this node's offer at once, not at the next heartbeat.
            advertisement_changed=self._heartbeat_at_once,
            may_probe=self._accepting_jobs,
        )

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
        self._spawn(self._watch_machine(), name="node-guards")
        try:
            await asyncio.wait({connection, stop}, return_when=asyncio.FIRST_COMPLETED)
            if connection.done():
                connection.result()  # raises what ended it: NodeStopped, or a bug
                return
            await self._shut_down(connection)
        finally:
            await _cancel_all([connection, stop])
            await self._abandon_jobs()
            await asyncio.to_thread(self._serving.close)
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
        """Undo the seller's pause; the guards still hold the node while one of them says so."""
        self._call_in_loop(self._resume_now)

    def set_guards(self, guards: GuardSettings) -> None:
        """New guard settings, applied at the next reading (within GUARD_INTERVAL_SECONDS)."""
        self._call_in_loop(self._set_guards_now, guards)

    def set_invite_code(self, code: str) -> None:
        """Register with this invite code: a registration waiting for one (`status.invite_code_wanted`)
        tries again with it at once, even with the same code as before (ops may have made it since).
        Raises ValueError, saying what to do, for text that cannot be a code (empty, overlong)."""
        self._call_in_loop(self._set_invite_code_now, normalize_invite_code(code))

    async def earnings_history(self, days: int = 30) -> dict[str, Any]:
        """This node's credits per UTC hour over the last `days` days, with its earnings now (the
        coordinator's `GET /api/nodes/me/earnings`)."""
        if self._client is None:
            raise RuntimeError("the agent has not registered with the coordinator yet")
        answer = await asyncio.to_thread(self._client.earnings_history, days)
        self._update(earnings=protocol.Earnings.model_validate(answer["earnings"], strict=False))
        return answer

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
            if not self._stop.abandoned:
                logger.warning("stopping at once: the running job is killed")
                self._stop.abandoned = True
                for job in self._live_jobs:
                    job.kill()
            return
        self._stopping = True
        self._heartbeat_at_once()  # accepting_jobs=False before anything ends: no lease comes back here
        if self._stop_requested is not None:
            self._stop_requested.set()

    def _pause_now(self, reason: str, stop_running: bool) -> None:
        self._seller_pause_reason = reason
        logger.info("paused (%s): taking no new jobs", reason)
        self._pause_changed()
        if stop_running:
            self._hand_back_job(reason)

    def _resume_now(self) -> None:
        if self._seller_pause_reason is None:
            return
        self._seller_pause_reason = None
        logger.info("the seller resumed the node")
        self._pause_changed()

    def _set_guards_now(self, guards: GuardSettings) -> None:
        self._guard_settings = guards

    def _set_invite_code_now(self, code: str) -> None:
        self._invite_code = code
        self._invite_code_given.set()

    def _hand_back_job(self, reason: str) -> None:
        if self._job is not None:
            self._job.cancel("paused", pause_reason=reason)

    def _pause_changed(self) -> None:
        """Tell the coordinator (at once) and the status whether and why the node is paused now."""
        if self._seller_pause_reason is not None:
            paused_by, reason = "seller", self._seller_pause_reason
        elif self._guard.paused:
            paused_by, reason = "guard", self._guard.reasons[0]
        else:
            paused_by, reason = None, None
        was_paused = self._status.paused
        self._update(paused=paused_by is not None, pause_reason=reason, paused_by=paused_by)
        if was_paused != self._status.paused:
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
            # Cleared before the code is read: a code given while this request is under way is tried next.
            self._invite_code_given.clear()
            invite_code = self._invite_code
            try:
                node_id, token = await asyncio.to_thread(
                    self._register, self.coordinator, self.name, invite_code=invite_code
                )
                break
            except SwarmError as error:
                if is_invite_code_refusal(error):
                    refusal = InviteCodeRefused(
                        self.coordinator, invite_code is not None, error.detail or str(error)
                    )
                    if not self._wait_for_invite_code:
                        raise refusal from None
                    logger.warning("%s; waiting for an invite code", refusal)
                    self._update(
                        invite_code_wanted="refused" if refusal.code_given else "missing",
                        problem=refusal.detail,
                    )
                    await self._invite_code_given.wait()
                    logger.info("registering with %s with the invite code given", self.coordinator)
                    self._update(invite_code_wanted=None, problem=None)
                    continue
                if not is_transient(error):
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
                raise NodeStopped(refused_token_message(self.coordinator, f"HTTP {status}")) from None
            return f"the coordinator at {url} answered the websocket handshake with HTTP {status}"
        except (OSError, TimeoutError, WebSocketException) as error:
            return f"cannot reach the coordinator at {url} ({describe_error(error)})"

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
            inference_slots=self._serving.slots,
            crashed_models=self._serving.crashed_models,
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
            self._log_standing(welcome.standing)
            self._update(
                connected=True,
                node_id=welcome.node_id,
                earnings=welcome.earnings,
                standing=welcome.standing,
                problem=None,
            )
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
            self._serving.stop_all()  # nobody is listening for their answers any more
            self._update(connected=False)
        end = connection_end(websocket.close_code, websocket.close_reason or "", self.coordinator)
        if end.fatal:
            raise NodeStopped(end.problem)
        if end.slow_reconnect:
            backoff.failures = max(backoff.failures, SLOW_RECONNECT_AFTER)
        return end.problem

    async def _write(self, websocket: ClientConnection, outgoing: asyncio.Queue) -> None:
        """The connection's only writer, so messages leave in the order they were posted."""
        with contextlib.suppress(ConnectionClosed):
            while True:
                message = await outgoing.get()
                await websocket.send(message.model_dump_json())

    def _post(self, message: protocol.NodeMessage) -> None:
        if isinstance(message, Reportable):
            self._outbox.add(message)
        if self._outgoing is not None:
            self._outgoing.put_nowait(message)

    async def _heartbeats(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self._heartbeat_at_once()  # with the telemetry _watch_machine read last

    def _heartbeat_at_once(self) -> None:
        """Tell the coordinator now (with the last telemetry) whether this node takes jobs."""
        if self._telemetry is not None and self._outgoing is not None:
            self._post(
                protocol.Heartbeat(
                    telemetry=self._telemetry,
                    running=self._running(),
                    accepting_jobs=self._accepting_jobs(),
                    loaded_models=self._serving.loaded_models,
                    crashed_models=self._serving.crashed_models,
                )
            )

    async def _watch_machine(self) -> None:
        """Read the GPUs and the seller's activity every few seconds, connected or not: the telemetry
        the heartbeats carry, and the guards' decision."""
        while True:
            try:
                await self._refresh_telemetry()
            except Exception:  # one bad reading must not end the guards for the rest of the run
                logger.exception("could not read this machine for the guards")
            await asyncio.sleep(self._guard_interval_seconds)

    async def _refresh_telemetry(self) -> None:
        try:
            reading = await asyncio.to_thread(self._read_machine)
            self._telemetry = telemetry_from_inventory(reading.inventory, self._backends)
        except (ValidationError, ValueError) as error:
            logger.debug("kept the previous telemetry: %s", error)
            return
        self._update(telemetry=self._telemetry)
        self._apply_guards(evaluate(self._guard_settings, reading, self._guard))

    def _read_machine(self) -> MachineReading:
        inventory = self._probe(False)
        try:
            activity = self._activity()
        except Exception:
            logger.exception("could not read the seller's activity")
            activity = Activity(user_idle_seconds=None, fullscreen_application=None)
        return MachineReading(
            inventory=inventory,
            now=self._clock(),
            own_process_ids=_own_process_ids(),
            user_idle_seconds=activity.user_idle_seconds,
            full_screen_application=activity.fullscreen_application,
        )

    def _apply_guards(self, decision: GuardDecision) -> None:
        previous, self._guard = self._guard, decision
        if decision.reasons == previous.reasons:
            return
        if decision.paused and not previous.paused:
            logger.info("pausing: %s", decision.reasons[0])
            # The seller needs the GPU now: the job checkpoints and goes back to the queue, and the
            # models kept loaded for inference leave the GPU.
            self._hand_back_job(decision.reasons[0])
            self._spawn(asyncio.to_thread(self._serving.release), name="release-inference")
        elif previous.paused and not decision.paused:
            logger.info("the guards let work run again")
        self._pause_changed()

    def _running(self) -> tuple[protocol.LeaseReference, ...]:
        job = self._job
        return (job.reference,) if job is not None and job.holds_lease else ()

    def _accepting_jobs(self) -> bool:
        return not (self._status.paused or self._stopping)

    # ---- coordinator messages

    def _dispatch(self, message: protocol.CoordinatorMessage) -> None:
        if isinstance(message, protocol.Lease):
            self._on_lease(message)
        elif isinstance(message, protocol.Cancel):
            self._on_cancel(message)
        elif isinstance(message, protocol.Acknowledged):
            self._on_acknowledged(message)
        elif isinstance(message, protocol.InferenceRequest):
            if self._accepting_jobs():
                self._serving.handle(message)
            else:
                refusal = (
                    f"node paused ({self._status.pause_reason})"
                    if self._status.paused
                    else "node shutting down"
                )
                self._post(
                    protocol.InferenceFailed(
                        request_id=message.request_id, kind="unavailable", message=refusal
                    )
                )
        elif isinstance(message, protocol.InferenceStop):
            self._serving.stop(message.request_id)
        elif isinstance(message, protocol.Earnings):
            logger.info(
                "earnings: %s credits pending verification, %s available, %d jobs completed",
                format_credits(message.pending_micro),
                format_credits(message.available_micro),
                message.jobs_completed,
            )
            self._update(earnings=message)
        elif isinstance(message, protocol.Standing):
            self._log_standing(message)
            self._update(standing=message)
        else:
            raise ProtocolViolation(CloseCode.MALFORMED, f"unexpected {message.type} message")

    def _log_standing(self, standing: protocol.Standing) -> None:
        if standing == self._status.standing:
            return
        if standing.state == "active":
            if self._status.standing is not None:
                logger.info("the coordinator gives this node work again")
        else:
            logger.warning(
                "the coordinator gives this node no work (%s): %s", standing.state, standing.reason
            )

    def _on_lease(self, lease: protocol.Lease) -> None:
        current = self._job
        if current is not None and current.lease.lease_id == lease.lease_id:
            return  # the same lease again
        if current is not None and not current.reported:
            refusal = f"node busy with job {current.lease.job_id}"
        elif self._status.paused:
            refusal = f"node paused ({self._status.pause_reason})"
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
        job = JobRun(lease, self._job_host(), previous=current)
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
        job.cancel("coordinator")

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

    # ---- the jobs

    def _job_host(self) -> JobHost:
        return JobHost(
            workspace=self.workspace,
            client=self._client,
            runner_factory=self._runner_factory,
            device=self.device,
            rng=self._rng,
            stop=self._stop,
            post=self._post,
            status_changed=self._job_status_changed,
            ended=lambda outcome: self._update(last_job=outcome),
            spawn=lambda coroutine, name: self._spawn(coroutine, name=name),
        )

    async def _run_job(self, job: JobRun) -> None:
        try:
            await job.run()
        finally:
            self._live_jobs.discard(job)
            if self._job is job:
                self._job = None
                self._update(job=None)
            if job.tidy_when_done:
                self._tidy_later(job.lease.job_id)

    def _job_status_changed(self, job: JobRun) -> None:
        if self._job is job:
            self._update(job=job.status)

    # ---- stopping

    async def _shut_down(self, connection: asyncio.Task) -> None:
        self._stop.deadline = time.monotonic() + STOP_JOB_SECONDS
        job = self._job
        if job is not None and not job.reported and not self._stop.abandoned:
            logger.info("stopping: job %s saves a checkpoint first", job.lease.job_id)
            job.cancel("shutdown")
        await self._until(lambda: not self._live_jobs or self._stop.abandoned, self._stop.deadline)
        drain_until = time.monotonic() + STOP_DRAIN_SECONDS
        await self._until(
            lambda: not self._outbox or self._outgoing is None or self._stop.abandoned or connection.done(),
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
            job.kill()
        await _cancel_all([job.task for job in jobs if job.task is not None])


def _own_process_ids() -> frozenset[int]:
    """This process and its children (the trainer, the inference server): on the GPU, but not a game."""
    own = {os.getpid()}
    try:
        import psutil

        own.update(child.pid for child in psutil.Process().children(recursive=True))
    except Exception as error:  # psutil missing, or a child gone while listed
        logger.debug("could not list this process's children: %r", error)
    return frozenset(own)


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
