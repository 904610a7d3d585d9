"""The headless node agent: `NodeAgent` is the facade the CLI and the tray app use, and the place its
parts are wired together. Each part has one job:

- desktop.connection: the `/node` websocket session (hello and welcome, heartbeats, reconnects, the
  outbox of reports awaiting acknowledgement);
- desktop.registration: the node's token, stored or newly registered (with an invite code);
- desktop.leased_jobs: the leases taken or declined, each run by a desktop.job.JobRun, which fetches,
  trains and uploads;
- desktop.serving: inference requests, served by a child process;
- desktop.machine_watch and desktop.availability: the machine's telemetry, the guards, and whether the
  node takes work now (the seller's pause, a guard's, a stop under way);
- desktop.account and desktop.agent_status: the earnings, standing and status the tray shows;
- desktop.sharing: swarm transfer (models and data from and to other nodes, a tunnel when needed).

This module routes the coordinator's messages to them, composes the hello and the heartbeats, and
stops them in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from compute_swarm import protocol
from compute_swarm.desktop import token_store
from compute_swarm.desktop.account import NodeAccount
from compute_swarm.desktop.activity import Activity, read_activity
from compute_swarm.desktop.agent_status import AgentStatus, StatusBoard
from compute_swarm.desktop.availability import Availability
from compute_swarm.desktop.background_tasks import BackgroundTasks, cancel_all
from compute_swarm.desktop.connection import ConnectionHost, CoordinatorConnection
from compute_swarm.desktop.economics import Economics
from compute_swarm.desktop.electricity import ElectricitySettings, default_electricity
from compute_swarm.desktop.energy import EnergyMeter
from compute_swarm.desktop.energy import energy_meter as economics_meter
from compute_swarm.desktop.guards import GuardSettings
from compute_swarm.desktop.job import StopSignal, job_runner
from compute_swarm.desktop.leased_jobs import LeasedJobs
from compute_swarm.desktop.machine_watch import MachineWatch
from compute_swarm.desktop.node_description import agent_version, cached_catalogue_models, default_node_name
from compute_swarm.desktop.registration import Registration
from compute_swarm.desktop.serving import InferenceServing
from compute_swarm.desktop.settings import normalize_invite_code
from compute_swarm.desktop.sharing import Sharing
from compute_swarm.desktop.transfer import TransferSettings
from compute_swarm.desktop.workspace import Workspace
from compute_swarm.engine.devices import DeviceInventory
from compute_swarm.protocol import CloseCode, ProtocolViolation
from compute_swarm.sdk.client import NodeClient

logger = logging.getLogger("compute_swarm.desktop.agent")

STOP_JOB_SECONDS = 90.0  # a graceful stop waits this long for the job to checkpoint and report
STOP_DRAIN_SECONDS = 15.0  # ... and this long for the coordinator to acknowledge what was sent
GUARD_INTERVAL_SECONDS = 5.0  # how often the GPU and the seller's activity are read for the guards
RECENT_JOBS_SHOWN = 200  # the jobs whose records the status carries, for the tray's list and chart


def _probe_devices(check_torch: bool) -> DeviceInventory:
    from compute_swarm.engine import devices

    return devices.probe(check_torch=check_torch, torch_in_child=True)


class NodeAgent:
    """One node: connects, heartbeats, runs one leased job at a time, reports it, reconnects.

    `run()` runs until `stop()` (or raises desktop.node_stopped.NodeStopped). `stop()`, `pause()` and
    `resume()` may be called from any thread; `status` is a snapshot any thread may read;
    `on_change(status)` is called on the agent's event loop after each change (a GUI hands it to its
    own thread).
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
        transfer: TransferSettings | None = None,
        electricity: ElectricitySettings | None = None,
        energy_meter: Callable[[protocol.Telemetry, float], EnergyMeter] | None = None,
    ):
        self.coordinator = token_store.normalize_coordinator_url(coordinator)
        self.data_dir = Path(data_dir)
        self._transfer_settings = transfer or TransferSettings()
        self.workspace = Workspace(self.data_dir, cache_bytes=self._transfer_settings.cache_bytes)
        self.name = name or default_node_name()
        self.device = device
        rng = rng or random.Random()
        self._client_factory = client_factory
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: Any = None  # the coordinator's HTTP API, once registered
        self._stop = StopSignal()  # shared with the jobs; abandoned: stop() came twice, close at once
        self._stop_requested: asyncio.Event | None = None
        self._tasks = BackgroundTasks()
        self._status = StatusBoard(self.coordinator, on_change)
        self._registration = Registration(
            self.coordinator,
            self.data_dir,
            self.name,
            self._status,
            register=register,
            invite_code=None if invite_code is None else normalize_invite_code(invite_code),
            wait_for_invite_code=wait_for_invite_code,
            rng=rng,
        )
        self._connection = CoordinatorConnection(
            self.coordinator,
            ConnectionHost(
                hello=self._hello,
                heartbeat=self._heartbeat,
                welcomed=self._welcomed,
                handle=self._dispatch,
                ended=self._connection_ended,
                reconnecting=lambda problem: self._status.update(connected=False, problem=problem),
            ),
            rng=rng,
        )
        self._availability = Availability(
            self._status,
            tell_coordinator=self._connection.heartbeat_at_once,
            hand_back_job=lambda reason: self._jobs.hand_back(reason),
            release_inference=lambda: self._tasks.spawn(
                asyncio.to_thread(self._serving.release), name="release-inference"
            ),
        )
        self._economics = Economics(
            self.data_dir,
            electricity or default_electricity(),
            meter_factory=energy_meter or economics_meter,
            on_change=self._economics_changed,
        )
        self._machine = MachineWatch(
            self._status,
            self._availability,
            economics=self._economics,
            probe=probe,
            activity=activity,
            guards=guards or GuardSettings(),
            interval_seconds=guard_interval_seconds,
            clock=clock,
        )
        self._jobs = LeasedJobs(
            self.workspace,
            self._status,
            self._availability,
            client=lambda: self._client,
            runner_factory=runner_factory,
            device=device,
            rng=rng,
            stop=self._stop,
            post=self._connection.post,
            tasks=self._tasks,
            economics=self._economics,
        )
        self._serving = InferenceServing(
            self.workspace,
            self._connection.post,
            client=lambda: self._client,
            slots=inference_slots,
            # A crash takes the model off this node's offer at once, not at the next heartbeat.
            advertisement_changed=self._connection.heartbeat_at_once,
            may_probe=self._availability.accepting_jobs,
        )
        self._account = NodeAccount(self._status, client=lambda: self._client)
        self._sharing = Sharing(
            self._transfer_settings,
            self.workspace,
            self._status,
            self._tasks,
            user_agent=f"compute-swarm/{agent_version()}",
            tell_coordinator=self._connection.heartbeat_at_once,
        )

    # ---- the facade

    @property
    def status(self) -> AgentStatus:
        return self._status.current

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
        if self._availability.stopping:
            self._stop_requested.set()
        connection = asyncio.create_task(self._start_and_stay_connected(), name="node-connection")
        stop = asyncio.create_task(self._stop_requested.wait(), name="node-stop")
        self._tasks.spawn(self._machine.watch(), name="node-guards")
        try:
            await asyncio.wait({connection, stop}, return_when=asyncio.FIRST_COMPLETED)
            if connection.done():
                connection.result()  # raises what ended it: NodeStopped, or a bug
                return
            await self._shut_down(connection)
        finally:
            await cancel_all([connection, stop])
            await self._jobs.abandon()
            await asyncio.to_thread(self._serving.close)
            await self._tasks.cancel_all()
            await self._sharing.close()
            if self._client is not None:
                with contextlib.suppress(Exception):
                    self._client.close()  # also ends a transfer still running in a thread
            self._status.update(connected=False, stopped=True, job=None)

    def stop(self) -> None:
        """Stop gracefully: the running job checkpoints (and its checkpoint is uploaded), then the
        websocket closes with 1000. A second call stops at once, killing the job."""
        self._call_in_loop(self._stop_now)

    def pause(self, reason: str = "paused by the seller", *, stop_running: bool = False) -> None:
        """Take no new jobs. With stop_running the running job is stopped too and handed back (released,
        so it costs the buyer no attempt); its checkpoint lets another node resume it."""
        self._call_in_loop(self._availability.pause, reason, stop_running)

    def resume(self) -> None:
        """Undo the seller's pause; the guards still hold the node while one of them says so."""
        self._call_in_loop(self._availability.resume)

    def set_guards(self, guards: GuardSettings) -> None:
        """New guard settings, applied at the next reading (within GUARD_INTERVAL_SECONDS)."""
        self._call_in_loop(self._machine.use_guards, guards)

    def set_electricity(self, electricity: ElectricitySettings) -> None:
        """New electricity settings: the price of jobs from now on, and the *only profitable work* guard."""
        self._call_in_loop(self._economics.use_settings, electricity)

    def set_invite_code(self, code: str) -> None:
        """Register with this invite code: a registration waiting for one (`status.invite_code_wanted`)
        tries again with it at once, even with the same code as before (ops may have made it since).
        Raises ValueError, saying what to do, for text that cannot be a code (empty, overlong)."""
        self._call_in_loop(self._registration.set_invite_code, normalize_invite_code(code))

    async def earnings_history(self, days: int = 30) -> dict[str, Any]:
        """This node's credits per UTC hour over the last `days` days, with its earnings now (the
        coordinator's `GET /api/nodes/me/earnings`)."""
        return await self._account.earnings_history(days)

    async def ask_coordinator(self, call: Callable[[Any], Any]) -> Any:
        """call(node client) in a worker thread, for the tray's questions (payouts, a receipt)."""
        client = self._client
        if client is None:
            raise RuntimeError("this computer has not registered with the coordinator yet")
        return await asyncio.to_thread(call, client)

    async def earnings(self) -> protocol.Earnings:
        """Ask the coordinator for this node's earnings now (they also arrive after each result)."""
        return await self._account.earnings()

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

    def _stop_now(self) -> None:
        if self._availability.stopping:
            if not self._stop.abandoned:
                logger.warning("stopping at once: the running job is killed")
                self._stop.abandoned = True
                self._jobs.kill_all()
            return
        self._availability.stop_taking_work()
        if self._stop_requested is not None:
            self._stop_requested.set()

    # ---- start-up and the connection

    async def _start_and_stay_connected(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(self.workspace.tidy_all_jobs)
        await self._machine.first_reading()
        credentials = await self._registration.credentials()
        self._client = self._client_factory(self.coordinator, credentials.token)
        self._status.update(node_id=credentials.node_id)
        await self._sharing.start(self._client)
        await self._connection.stay_connected(credentials.token)

    async def _hello(self) -> protocol.Hello:
        await self._machine.refresh()
        assert self._machine.telemetry is not None
        models = await asyncio.to_thread(cached_catalogue_models)
        return protocol.Hello(
            protocol_version=protocol.PROTOCOL_VERSION,
            agent_version=agent_version(),
            telemetry=self._machine.telemetry,
            models=models,
            running=self._jobs.running(),
            accepting_jobs=self._availability.accepting_jobs(),
            inference_slots=self._serving.slots,
            crashed_models=self._serving.crashed_models,
            network=self._sharing.network_report(),
        )

    def _heartbeat(self) -> protocol.Heartbeat | None:
        if self._machine.telemetry is None:
            return None
        return protocol.Heartbeat(
            telemetry=self._machine.telemetry,
            running=self._jobs.running(),
            accepting_jobs=self._availability.accepting_jobs(),
            loaded_models=self._serving.loaded_models,
            crashed_models=self._serving.crashed_models,
            network=self._sharing.network_report(),
        )

    def _economics_changed(self) -> None:
        economics = self._economics
        self._status.update(
            credit_value=economics.credit_value,
            electricity=economics.settings,
            recent_jobs=economics.journal.recent(RECENT_JOBS_SHOWN),
            electricity_by_day=tuple(sorted(economics.journal.electricity_by_day().items())),
            energy_source=economics.meter.source if economics.meter is not None else None,
        )

    def _welcomed(self, welcome: protocol.Welcome) -> None:
        self._economics.welcomed(welcome)
        self._account.log_standing(welcome.standing)
        latest = welcome.latest_agent_version
        self._status.update(
            connected=True,
            node_id=welcome.node_id,
            earnings=welcome.earnings,
            standing=welcome.standing,
            problem=None,
            newer_version=latest if latest and protocol.is_older_version(agent_version(), latest) else None,
        )

    def _connection_ended(self) -> None:
        self._serving.stop_all()  # nobody is listening for their answers any more
        self._status.update(connected=False)

    def _dispatch(self, message: protocol.CoordinatorMessage) -> None:
        if isinstance(message, protocol.Ping):
            self._connection.post(protocol.Pong(nonce=message.nonce))  # at once: it is being timed
        elif isinstance(message, protocol.Lease):
            self._jobs.take(message)
        elif isinstance(message, protocol.Cancel):
            self._jobs.cancel(message)
        elif isinstance(message, protocol.Acknowledged):
            if self._connection.settle(message):
                self._jobs.end_acknowledged(message)
        elif isinstance(message, protocol.InferenceRequest):
            refusal = self._availability.refusal()
            if refusal is None:
                self._serving.handle(message)
            else:
                self._connection.post(
                    protocol.InferenceFailed(
                        request_id=message.request_id, kind="unavailable", message=refusal
                    )
                )
        elif isinstance(message, protocol.InferenceStop):
            self._serving.stop(message.request_id)
        elif isinstance(message, protocol.Earnings):
            self._account.earnings_arrived(message)
        elif isinstance(message, protocol.Standing):
            self._account.standing_arrived(message)
        elif isinstance(message, protocol.Reachability):
            self._sharing.reachability_arrived(message)
        else:
            raise ProtocolViolation(CloseCode.MALFORMED, f"unexpected {message.type} message")

    # ---- stopping

    async def _shut_down(self, connection: asyncio.Task) -> None:
        self._stop.deadline = time.monotonic() + STOP_JOB_SECONDS
        await self._jobs.stop_for_shutdown()
        await self._connection.close(
            STOP_DRAIN_SECONDS, given_up=lambda: self._stop.abandoned or connection.done()
        )
        logger.info("stopped")
