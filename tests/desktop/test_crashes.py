"""desktop.crashes: when a node tries again a model that crashed its llama.cpp process."""

from __future__ import annotations

from compute_swarm import protocol
from compute_swarm.desktop import crashes
from compute_swarm.desktop.crashes import ModelCrash, ProbeBackoff

BACKOFF = ProbeBackoff(first_seconds=30.0, longest_seconds=600.0)
MODEL = "smollm2-135m-instruct"
ADAPTER = f"{MODEL}+{'a' * 64}"


def test_each_crash_in_a_row_doubles_the_wait_before_the_next_probe_up_to_the_ceiling() -> None:
    crash = crashes.after_crash(None, "killed by SIGSEGV", now=100.0, backoff=BACKOFF)
    assert (crash.crashes, crash.next_probe_at) == (1, 130.0)
    waits = []
    for probe in range(7):
        now = crash.next_probe_at
        crash = crashes.after_crash(crash, f"probe {probe}: killed by SIGSEGV", now, BACKOFF)
        waits.append(crash.next_probe_at - now)
    assert waits == [60.0, 120.0, 240.0, 480.0, 600.0, 600.0, 600.0]
    assert crash.message == "probe 6: killed by SIGSEGV"  # the newest report is the one told
    # Thousands of crashes later the wait is still the ceiling (no overflow).
    assert BACKOFF.delay(5000) == 600.0


def test_a_probe_that_proves_nothing_keeps_the_report_and_waits_longer() -> None:
    crash = crashes.after_crash(None, "killed by SIGILL", now=0.0, backoff=BACKOFF)
    failed = crashes.after_failed_probe(crash, now=30.0, backoff=BACKOFF)
    assert (failed.message, failed.crashes, failed.next_probe_at) == ("killed by SIGILL", 2, 90.0)


def test_a_paused_node_puts_a_probe_off_without_counting_it() -> None:
    crash = crashes.after_crash(None, "killed by SIGSEGV", now=0.0, backoff=BACKOFF)
    later = crashes.put_off(crashes.after_failed_probe(crash, 30.0, BACKOFF), now=90.0, backoff=BACKOFF)
    assert (later.crashes, later.next_probe_at) == (2, 120.0)


def test_due_probes_come_longest_overdue_first_and_the_wait_until_the_next() -> None:
    records = {
        "late": ModelCrash("x", 1, next_probe_at=50.0),
        "early": ModelCrash("x", 3, next_probe_at=10.0),
        "future": ModelCrash("x", 1, next_probe_at=70.0),
    }
    assert crashes.due_probes(records, now=60.0) == ["early", "late"]
    assert crashes.seconds_until_probe(records, now=60.0) == 0.0
    assert crashes.seconds_until_probe({"future": records["future"]}, now=60.0) == 10.0
    assert crashes.seconds_until_probe({}, now=60.0) is None


def test_a_crashed_base_model_covers_its_adapters_but_an_adapter_only_itself() -> None:
    assert protocol.crash_covering({MODEL: "base crashed"}, ADAPTER) == "base crashed"
    assert protocol.crash_covering({MODEL: "base crashed"}, MODEL) == "base crashed"
    assert protocol.crash_covering({ADAPTER: "adapter crashed"}, MODEL) is None
    assert protocol.crash_covering({ADAPTER: "adapter crashed"}, ADAPTER) == "adapter crashed"
    other_adapter = f"{MODEL}+{'b' * 64}"
    assert protocol.crash_covering({ADAPTER: "adapter crashed"}, other_adapter) is None
