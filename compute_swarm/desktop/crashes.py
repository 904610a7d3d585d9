"""Models that crashed this node's llama.cpp process, and when to try each again: pure decisions that
desktop.serving carries out (it refuses those models, reports them to the coordinator, and probes them
in a fresh process with a one-token generation until one serves).

A crash is rarely a one-off (a llama.cpp built for another CPU, a model too big for this GPU), so each
further crash of the same model doubles the wait before the next probe, up to a ceiling.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class ProbeBackoff:
    first_seconds: float = 30.0
    longest_seconds: float = 600.0

    def delay(self, crashes: int) -> float:
        """The wait before the probe that follows the `crashes`-th crash in a row (1, 2, ...)."""
        return min(self.longest_seconds, self.first_seconds * 2 ** min(max(crashes - 1, 0), 32))


@dataclass(frozen=True)
class ModelCrash:
    message: str  # what a buyer is told: "the node's llama.cpp crashed (killed by SIGSEGV) while ..."
    crashes: int  # in a row: the request's crash, then each probe that did not serve
    next_probe_at: float  # monotonic seconds


def after_crash(previous: ModelCrash | None, message: str, now: float, backoff: ProbeBackoff) -> ModelCrash:
    """The model crashed a process (a buyer's request or a probe); the newest report is the one told."""
    crashes = (previous.crashes if previous is not None else 0) + 1
    return ModelCrash(message=message, crashes=crashes, next_probe_at=now + backoff.delay(crashes))


def after_failed_probe(crash: ModelCrash, now: float, backoff: ProbeBackoff) -> ModelCrash:
    """A probe that ended without serving and without a crash of its own (its process was closed, or
    another request crashed it, or the model's files could not be had): it proves nothing, so the
    crash stands as reported and the next probe waits longer, as after a crash."""
    crashes = crash.crashes + 1
    return replace(crash, crashes=crashes, next_probe_at=now + backoff.delay(crashes))


def put_off(crash: ModelCrash, now: float, backoff: ProbeBackoff) -> ModelCrash:
    """The node may not probe now (it is paused: a game wants the GPU): try after the shortest wait."""
    return replace(crash, next_probe_at=now + backoff.first_seconds)


def due_probes(crashes: Mapping[str, ModelCrash], now: float) -> list[str]:
    """The model keys to probe now, longest overdue first."""
    due = [(crash.next_probe_at, key) for key, crash in crashes.items() if crash.next_probe_at <= now]
    return [key for _, key in sorted(due)]


def seconds_until_probe(crashes: Mapping[str, ModelCrash], now: float) -> float | None:
    """How long until the next probe is due (0 when one is); None when nothing crashed."""
    if not crashes:
        return None
    return max(0.0, min(crash.next_probe_at for crash in crashes.values()) - now)
