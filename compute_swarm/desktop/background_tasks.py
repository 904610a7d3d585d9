"""The asyncio housekeeping the node agent's parts share: the set of background tasks cancelled together
when the agent ends, a wait with a deadline that never swallows a cancellation, cancelling tasks until
they have really ended, and polling a condition until a deadline.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

# The agent's parts log under one name, so the seller's log reads as one agent.
logger = logging.getLogger("compute_swarm.desktop.agent")


class BackgroundTasks:
    """Tasks the agent starts and cancels on exit; a failure in one is logged where it happens."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task] = set()

    def spawn(self, coroutine: Any, name: str | None = None) -> asyncio.Task:
        task = asyncio.create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(log_task_failure)
        return task

    async def cancel_all(self) -> None:
        await cancel_all(list(self._tasks))


async def within(awaitable: Any, seconds: float) -> Any:
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


async def cancel_all(tasks: list[asyncio.Task]) -> None:
    """Cancel the tasks and wait until each has ended, cancelling again any that caught it."""
    while pending := [task for task in tasks if not task.done()]:
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=1.0)
    for task in tasks:
        if not task.cancelled():
            task.exception()  # retrieved: a failure was logged where it happened


async def wait_until(condition: Callable[[], bool], deadline: float) -> None:
    """Return once `condition()` holds or time.monotonic() has passed `deadline`."""
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


def log_task_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("background task %s failed", task.get_name(), exc_info=task.exception())
