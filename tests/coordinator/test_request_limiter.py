"""Each buyer's live-inference limits: requests per minute (a token bucket) and requests at once."""

from __future__ import annotations

import pytest

from compute_swarm.coordinator.service.inference import InferenceError
from compute_swarm.coordinator.service.request_limiter import RequestLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_buyer_over_the_rate_waits_for_the_bucket_to_refill():
    clock = Clock()
    limiter = RequestLimiter(per_minute=3, concurrent=10, clock=clock)
    for _ in range(3):
        limiter.admit("alice")
        limiter.release("alice")
    with pytest.raises(InferenceError, match="3 requests per minute") as refused:
        limiter.admit("alice")
    assert (refused.value.status_code, refused.value.code) == (429, "rate_limit_exceeded")
    limiter.admit("bob")  # another buyer has a bucket of their own
    clock.now += 20  # a third of a minute: one request's worth
    limiter.admit("alice")
    with pytest.raises(InferenceError):
        limiter.admit("alice")


def test_requests_at_once_are_counted_until_released():
    limiter = RequestLimiter(per_minute=100, concurrent=2, clock=Clock())
    limiter.admit("alice")
    limiter.admit("alice")
    with pytest.raises(InferenceError, match="2 requests at once"):
        limiter.admit("alice")
    limiter.release("alice")
    limiter.admit("alice")
