"""The tray's only way to the node agent: runs `NodeAgent` on its own asyncio thread and hands what it
says to the Qt thread as signals, so the window never waits on the network or the GPU.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from PySide6.QtCore import QObject, Signal

from compute_swarm.desktop.agent import NodeAgent
from compute_swarm.desktop.electricity import ElectricitySettings
from compute_swarm.desktop.guards import GuardSettings
from compute_swarm.desktop.node_description import telemetry_from_inventory
from compute_swarm.desktop.node_stopped import NodeStopped, UnsupportedVersion
from compute_swarm.desktop.transfer import TransferSettings
from compute_swarm.engine.devices import DeviceInventory

logger = logging.getLogger(__name__)


class AgentBridge(QObject):
    status_changed = Signal(object)  # AgentStatus, on every change while the agent runs
    telemetry_read = Signal(object)  # protocol.Telemetry, read while the agent is not running
    earnings_history_read = Signal(object)  # the coordinator's answer (dict)
    earnings_history_failed = Signal(str)
    # What the app asked of the coordinator (`ask`, `fetch_market`): its name and the answer, or the
    # name and why it failed, in words.
    answered = Signal(str, object)
    ask_failed = Signal(str, str)
    # None after a clean stop, else why the agent could not go on (str); and where the coordinator does
    # not work with this app's version, its sell page (str), which offers the version it does.
    stopped = Signal(object, object)

    def __init__(
        self,
        data_dir: Path,
        *,
        agent_factory: Callable[..., NodeAgent] = NodeAgent,
        agent_options: dict[str, Any] | None = None,
        parent: QObject | None = None,
    ):
        super().__init__(parent)
        self.data_dir = data_dir
        self._agent_factory = agent_factory
        self._agent_options = dict(agent_options or {})
        self._agent: NodeAgent | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._probe_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tray-probe")
        # The coordinator's answers on their own thread: one slow to come must not hold up the GPUs' readings.
        self._network_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tray-network")
        self._probe_pending = False

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(
        self,
        coordinator: str,
        guards: GuardSettings,
        invite_code: str | None = None,
        sharing: TransferSettings | None = None,
        electricity: ElectricitySettings | None = None,
    ) -> None:
        """Register (the first time, with the invite code where the coordinator wants one), connect and
        take jobs, on the agent's own thread. A registration refused for its invite code waits for
        `set_invite_code` (the agent's status says so) rather than stop."""
        if self._thread is not None:
            return
        agent = self._agent_factory(
            coordinator,
            self.data_dir,
            guards=guards,
            transfer=sharing,
            electricity=electricity,
            on_change=self.status_changed.emit,  # a queued signal: safe from the agent's thread
            invite_code=invite_code,
            wait_for_invite_code=True,
            **self._agent_options,
        )
        self._agent = agent
        self._thread = threading.Thread(target=self._run, args=(agent,), name="node-agent", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Finish gracefully: the running job checkpoints and is handed back. A second call kills it."""
        if self._agent is not None:
            self._agent.stop()

    def set_guards(self, guards: GuardSettings) -> None:
        if self._agent is not None:
            self._agent.set_guards(guards)

    def set_electricity(self, electricity: ElectricitySettings) -> None:
        if self._agent is not None:
            self._agent.set_electricity(electricity)

    def ask(self, what: str, call: Callable[[Any], Any]) -> None:
        """Run call(node client) on the agent's side, once it has registered; the answer comes as
        `answered(what, answer)`, a failure as `ask_failed(what, words)`."""
        loop, agent = self._loop, self._agent
        if loop is None or agent is None or agent.status.node_id is None:
            self.ask_failed.emit(what, "start earning first: this computer is not connected to a swarm")
            return
        future = asyncio.run_coroutine_threadsafe(agent.ask_coordinator(call), loop)
        future.add_done_callback(lambda done: self._asked(what, done))

    def fetch_market(self, coordinator: str) -> None:
        """The coordinator's market figures (public), whether or not the agent runs: for the forecast
        before *Start earning*."""
        from compute_swarm.sdk.client import NodeClient

        self._network_executor.submit(NodeClient.market_figures, coordinator).add_done_callback(
            lambda done: self._asked("market", done)
        )

    def set_invite_code(self, code: str) -> None:
        """Hand the running agent an invite code: a registration waiting for one tries it at once.
        Raises ValueError for text that cannot be a code."""
        if self._agent is not None:
            self._agent.set_invite_code(code)

    def wait(self, timeout: float) -> bool:
        """Block until the agent's thread has ended (at quit); True if it has."""
        thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()

    def request_earnings_history(self, days: int = 30) -> None:
        loop, agent = self._loop, self._agent
        if loop is None or agent is None or agent.status.node_id is None:
            return
        future = asyncio.run_coroutine_threadsafe(agent.earnings_history(days), loop)
        future.add_done_callback(self._earnings_history_done)

    def probe_telemetry(self) -> None:
        """Read the GPUs once in a worker thread (for the window while the agent is not running)."""
        if self._probe_pending or self.running:
            return
        self._probe_pending = True
        probe: Callable[[bool], DeviceInventory] | None = self._agent_options.get("probe")
        if probe is None:
            from compute_swarm.engine import devices

            def probe(check_torch: bool) -> DeviceInventory:
                return devices.probe(check_torch=check_torch)

        self._probe_executor.submit(probe, False).add_done_callback(self._probe_done)

    def close(self) -> None:
        self._probe_executor.shutdown(wait=False, cancel_futures=True)
        self._network_executor.shutdown(wait=False, cancel_futures=True)

    # ---- on other threads

    def _run(self, agent: NodeAgent) -> None:
        problem: str | None = None
        download_page: str | None = None
        try:
            asyncio.run(self._serve(agent))
        except UnsupportedVersion as error:
            problem, download_page = str(error), error.download_page
        except NodeStopped as error:
            problem = str(error)
        except Exception as error:  # a bug: say so rather than die silently with the window open
            logger.exception("the node agent failed")
            problem = f"the node agent failed: {error!r}"
        finally:
            self._loop = None
            self._thread = None
            self.stopped.emit(problem, download_page)

    async def _serve(self, agent: NodeAgent) -> None:
        self._loop = asyncio.get_running_loop()
        await agent.run()

    def _earnings_history_done(self, future: Future) -> None:
        try:
            self.earnings_history_read.emit(future.result())
        except Exception as error:
            self.earnings_history_failed.emit(str(error))

    def _asked(self, what: str, future: Future) -> None:
        try:
            self.answered.emit(what, future.result())
        except Exception as error:
            self.ask_failed.emit(what, str(error))

    def _probe_done(self, future: Future) -> None:
        self._probe_pending = False
        try:
            self.telemetry_read.emit(telemetry_from_inventory(future.result()))
        except Exception as error:
            logger.debug("could not read the GPUs: %r", error)
