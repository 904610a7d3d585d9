"""Whether this node takes work now, and if not, why: the seller paused it, a guard holds it (a game, a
hot GPU, the seller at the keyboard: desktop.guards, read by desktop.machine_watch), or it is stopping.
`Availability` keeps that state, says it in the status, tells the coordinator at once when it changes,
and hands the running job back when a pause wants the GPU.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from compute_swarm.desktop.agent_status import StatusBoard
from compute_swarm.desktop.guards import GuardDecision

# The agent's parts log under one name, so the seller's log reads as one agent.
logger = logging.getLogger("compute_swarm.desktop.agent")


class Availability:
    """Runs on the agent's event loop."""

    def __init__(
        self,
        status: StatusBoard,
        *,
        tell_coordinator: Callable[[], None],  # a heartbeat now: whether this node takes jobs
        hand_back_job: Callable[[str], None],  # stop the running job and release its lease, saying why
        release_inference: Callable[[], None],  # take the models kept loaded for inference off the GPU
    ):
        self.guard_decision = GuardDecision()
        self.stopping = False  # stop() was called: finish the job gracefully, then close
        self._seller_pause_reason: str | None = None  # set while the seller has paused the node
        self._status = status
        self._tell_coordinator = tell_coordinator
        self._hand_back_job = hand_back_job
        self._release_inference = release_inference

    def accepting_jobs(self) -> bool:
        return self.refusal() is None

    def refusal(self) -> str | None:
        """Why this node takes no new work now, in the words a declined lease or request carries."""
        status = self._status.current
        if status.paused:
            return f"node paused ({status.pause_reason})"
        if self.stopping:
            return "node shutting down"
        return None

    def pause(self, reason: str, stop_running: bool) -> None:
        self._seller_pause_reason = reason
        logger.info("paused (%s): taking no new jobs", reason)
        self._pause_changed()
        if stop_running:
            self._hand_back_job(reason)

    def resume(self) -> None:
        if self._seller_pause_reason is None:
            return
        self._seller_pause_reason = None
        logger.info("the seller resumed the node")
        self._pause_changed()

    def apply_guards(self, decision: GuardDecision) -> None:
        previous, self.guard_decision = self.guard_decision, decision
        if decision.reasons == previous.reasons:
            return
        if decision.paused and not previous.paused:
            logger.info("pausing: %s", decision.reasons[0])
            # The seller needs the GPU now: the job checkpoints and goes back to the queue, and the
            # models kept loaded for inference leave the GPU.
            self._hand_back_job(decision.reasons[0])
            self._release_inference()
        elif previous.paused and not decision.paused:
            logger.info("the guards let work run again")
        self._pause_changed()

    def stop_taking_work(self) -> None:
        self.stopping = True
        self._tell_coordinator()  # accepting_jobs=False before anything ends: no lease comes back here

    def _pause_changed(self) -> None:
        """Tell the coordinator (at once) and the status whether and why the node is paused now."""
        if self._seller_pause_reason is not None:
            paused_by, reason = "seller", self._seller_pause_reason
        elif self.guard_decision.paused:
            paused_by, reason = "guard", self.guard_decision.reasons[0]
        else:
            paused_by, reason = None, None
        was_paused = self._status.current.paused
        self._status.update(paused=paused_by is not None, pause_reason=reason, paused_by=paused_by)
        if was_paused != self._status.current.paused:
            self._tell_coordinator()
