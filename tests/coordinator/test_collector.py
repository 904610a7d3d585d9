"""The coordinator's garbage-collector policy (transport/collector.py): what lived through a period is
frozen out of the collector's walks, the youngest generation is collected less often, cycles among
frozen objects are still freed by the periodic full collection, and cancelling gives the process its
ordinary collector back."""

from __future__ import annotations

import asyncio
import gc
import weakref

from compute_swarm.coordinator.transport.collector import YOUNG_THRESHOLD, keep_collections_short


class Node:
    """Stands for a connection's objects: a cycle (as websockets and their protocol objects are)."""

    def __init__(self) -> None:
        self.itself = self


def test_survivors_are_frozen_and_a_frozen_cycle_is_freed_by_the_full_collection() -> None:
    async def scenario() -> None:
        policy = asyncio.create_task(keep_collections_short(freeze_seconds=0.05, full_seconds=0.5))
        node = Node()
        gone = weakref.ref(node)
        await asyncio.sleep(0.12)
        assert gc.get_freeze_count() > 0, "what lived through a period is frozen"
        assert gc.get_threshold()[0] == YOUNG_THRESHOLD, "the youngest generation is collected less often"
        del node  # now garbage, in a cycle, frozen: only a full collection finds it
        gc.collect()
        assert gone() is not None, "an ordinary collection does not walk frozen objects"
        for _ in range(100):
            if gone() is None:
                break
            await asyncio.sleep(0.05)
        assert gone() is None, "the periodic full collection freed it"
        policy.cancel()
        await asyncio.gather(policy, return_exceptions=True)
        assert gc.get_freeze_count() == 0
        assert gc.get_threshold() == thresholds, "the process has its own thresholds back"

    gc.unfreeze()
    thresholds = gc.get_threshold()
    asyncio.run(scenario())


def test_a_zero_period_leaves_the_collector_alone() -> None:
    gc.unfreeze()
    asyncio.run(keep_collections_short(freeze_seconds=0, full_seconds=1))
    assert gc.get_freeze_count() == 0
