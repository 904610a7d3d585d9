"""Each buyer's live inference requests: how many a minute and how many at once."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable

from compute_swarm.coordinator.service.inference import InferenceError


class RequestLimiter:
    """Each buyer's requests per minute (a token bucket) and requests at once; thread-safe."""

    def __init__(self, per_minute: int, concurrent: int, clock: Callable[[], float] = time.monotonic):
        self.per_minute = per_minute
        self.concurrent = concurrent
        self._clock = clock
        self._lock = threading.Lock()
        self._allowance: dict[str, tuple[float, float]] = {}  # buyer → (allowance, when)
        self._running: Counter[str] = Counter()

    def admit(self, buyer_id: str) -> None:
        """Count one request in; raises InferenceError (429) when the buyer is over a limit."""
        with self._lock:
            now = self._clock()
            allowance, since = self._allowance.get(buyer_id, (float(self.per_minute), now))
            allowance = min(float(self.per_minute), allowance + (now - since) * self.per_minute / 60)
            if allowance < 1:
                raise InferenceError(
                    f"Rate limit reached: {self.per_minute} requests per minute. Try again in a few seconds.",
                    429,
                    "rate_limit_exceeded",
                )
            if self._running[buyer_id] >= self.concurrent:
                raise InferenceError(
                    f"Rate limit reached: {self.concurrent} requests at once. Wait for one to finish.",
                    429,
                    "rate_limit_exceeded",
                )
            self._allowance[buyer_id] = (allowance - 1, now)
            self._running[buyer_id] += 1

    def release(self, buyer_id: str) -> None:
        with self._lock:
            self._running[buyer_id] -= 1
            if self._running[buyer_id] <= 0:
                del self._running[buyer_id]
