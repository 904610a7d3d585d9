"""Python's cyclic garbage collector, kept off the lease path.

A coordinator holding thousands of nodes keeps millions of long-lived objects (each connection's
websocket, buffers, last hello and telemetry). CPython's full collection walks all of them while the
event loop stands still: hundreds of milliseconds in which no lease is sent and no token relayed. The
objects that lived through a period are frozen (gc.freeze: the collector no longer walks them; their
memory is still freed by reference counting when they go), so a full collection walks only what is
new. Cycles among frozen objects are found by the one complete collection each `full_seconds`.

The period is short (10 s by default): with a minute, a swarm whose nodes were still connecting at the
last freeze had full collections of up to 500 ms during a burst of submissions (bench/coordinator.py,
10,000 nodes); with 5 s, none at all. Garbage cycles caught by a freeze wait for the hourly collection:
only those alive at that instant, as the young collections free the rest within milliseconds.

The youngest generation is collected once YOUNG_THRESHOLD more objects were made than freed, not
Python's 700: a submission's objects (its request, rows and lease) are nearly all freed by reference
counting within milliseconds, but at 700 the collector still ran on them every few submissions and
promoted the ones alive at that instant, whose older-generation collections then walked them again.
In a 500/s stream to 10,000 nodes (bench/coordinator.py) the collections of all three generations
took 2.1 s of the stream's 19 s, with pauses of up to 250 ms; at 20,000, one collection of 0.2 s.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time

logger = logging.getLogger("compute_swarm.coordinator.transport.collector")
YOUNG_THRESHOLD = 20_000  # objects made less objects freed between collections of the youngest generation


async def keep_collections_short(freeze_seconds: float, full_seconds: float) -> None:
    """Freeze what lived through each `freeze_seconds`, and collect everything once per `full_seconds`.
    Runs until cancelled; with freeze_seconds 0 it returns at once, leaving the collector as it is."""
    if not freeze_seconds:
        return
    last_full = time.monotonic()  # the first freeze takes what start-up made: modules, the app
    thresholds = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, *thresholds[1:])
    try:
        while True:
            await asyncio.sleep(freeze_seconds)
            if time.monotonic() - last_full >= full_seconds:
                started = time.perf_counter()
                gc.unfreeze()
                found = gc.collect()
                gc.freeze()
                last_full = time.monotonic()
                logger.info(
                    "full garbage collection: %d objects freed in %.0f ms, %d frozen",
                    found,
                    1000 * (time.perf_counter() - started),
                    gc.get_freeze_count(),
                )
            else:
                gc.freeze()
    finally:
        gc.unfreeze()  # another app in this process (tests) starts from Python's own collector
        gc.set_threshold(*thresholds)
