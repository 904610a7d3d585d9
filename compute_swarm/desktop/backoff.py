"""How long the node waits before trying again: full-jitter exponential backoff, used between
reconnects, registration attempts and a job's download and upload retries. Jittered so that many
nodes that lost the coordinator at the same moment do not all come back at the same moment.
"""

from __future__ import annotations

import random

RECONNECT_BASE_SECONDS = 1.0
RECONNECT_CAP_SECONDS = 60.0


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
