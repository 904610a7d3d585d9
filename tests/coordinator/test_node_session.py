"""The node session state machine, fed frames without a socket."""

from __future__ import annotations

import json

import pytest

from compute_swarm import protocol
from compute_swarm.coordinator.transport.node_session import NodeSession
from compute_swarm.protocol import CloseCode, ProtocolViolation

TELEMETRY = {
    "cpu": {"name": "cpu", "logical_cores": 2, "memory_total_bytes": 1, "memory_available_bytes": 1},
    "backends": ["cpu"],
}
HELLO = json.dumps(
    {
        "type": "hello",
        "protocol_version": protocol.PROTOCOL_VERSION,
        "agent_version": "1",
        "telemetry": TELEMETRY,
    }
)
HEARTBEAT = json.dumps({"type": "heartbeat", "telemetry": TELEMETRY})


def test_hello_first_then_any_node_message():
    session = NodeSession("node_1")
    assert isinstance(session.receive(HELLO), protocol.Hello)
    assert isinstance(session.receive(HEARTBEAT), protocol.Heartbeat)
    with pytest.raises(ProtocolViolation, match="hello sent twice"):
        session.receive(HELLO)


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (HEARTBEAT, CloseCode.MALFORMED),
        ("{", CloseCode.MALFORMED),
        (json.dumps({"type": "lease"}), CloseCode.MALFORMED),  # a coordinator message, not a node's
        (
            HELLO.replace(f'"protocol_version": {protocol.PROTOCOL_VERSION}', '"protocol_version": 0'),
            CloseCode.UNSUPPORTED_VERSION,
        ),
        ("x" * (protocol.MAX_FRAME_BYTES + 1), CloseCode.MESSAGE_TOO_BIG),
        (HELLO.replace('"agent_version": "1"', '"agent_version": "1", "extra": 1'), CloseCode.MALFORMED),
    ],
)
def test_violations_carry_a_close_code(frame, code):
    with pytest.raises(ProtocolViolation) as violation:
        NodeSession("node_1").receive(frame)
    assert violation.value.code == code
    assert len(violation.value.reason.encode()) <= 123


def test_a_flood_of_messages_is_cut_off():
    now = [0.0]
    session = NodeSession("node_1", messages_per_second=10, burst=5, clock=lambda: now[0])
    session.receive(HELLO)
    for _ in range(4):
        session.receive(HEARTBEAT)
    with pytest.raises(ProtocolViolation) as violation:
        session.receive(HEARTBEAT)
    assert violation.value.code == CloseCode.POLICY_VIOLATION
    now[0] += 1.0  # a second later the allowance has refilled
    session.receive(HEARTBEAT)


def test_generated_text_is_exempt_from_the_message_rate_but_not_from_the_byte_rate():
    now = [0.0]
    session = NodeSession(
        "node_1",
        messages_per_second=10,
        burst=5,
        bytes_per_second=100_000,
        bytes_burst=200_000,
        clock=lambda: now[0],
    )
    session.receive(HELLO)
    delta = json.dumps({"type": "inference_delta", "request_id": "req_1", "text": "x" * 16_000, "tokens": 1})
    # Many more deltas than messages allowed, as an honest node's answer streams...
    for _ in range(12):
        session.receive(delta)
    # ...but not more bytes than the byte rate allows, however they are cut.
    with pytest.raises(ProtocolViolation, match="more than 100000 bytes per second") as violation:
        session.receive(delta)
    assert violation.value.code == CloseCode.POLICY_VIOLATION
    now[0] += 1.0
    session.receive(delta)
    # Tiny frames cost at least MINIMUM_FRAME_COST each, so a flood of them is bounded too.
    tiny = json.dumps({"type": "inference_delta", "request_id": "req_1", "text": "", "tokens": 0})
    now[0] += 10.0
    with pytest.raises(ProtocolViolation):
        for _ in range(200_000 // protocol.MINIMUM_FRAME_COST + 1):
            session.receive(tiny)


def test_an_agent_older_than_the_minimum_is_turned_away_with_unsupported_version():
    session = NodeSession("node_1", minimum_agent_version="0.2.0")
    with pytest.raises(ProtocolViolation) as violation:
        session.receive(HELLO.replace('"agent_version": "1"', '"agent_version": "0.1.9"'))
    assert violation.value.code == CloseCode.UNSUPPORTED_VERSION
    assert violation.value.reason == (
        "agent version 0.1.9 is older than the oldest this coordinator takes, 0.2.0"
    )
    # A version that cannot be read is not known to be new enough.
    with pytest.raises(ProtocolViolation) as violation:
        NodeSession("node_1", minimum_agent_version="0.2.0").receive(
            HELLO.replace('"agent_version": "1"', '"agent_version": "dev build"')
        )
    assert violation.value.code == CloseCode.UNSUPPORTED_VERSION
    for version in ("0.2.0", "0.10.0", "1"):
        fresh = NodeSession("node_1", minimum_agent_version="0.2.0")
        hello = fresh.receive(HELLO.replace('"agent_version": "1"', f'"agent_version": "{version}"'))
        assert isinstance(hello, protocol.Hello)


def test_a_hello_of_another_protocol_version_is_unsupported_even_when_it_does_not_parse_as_this_one():
    older = json.dumps({"type": "hello", "protocol_version": 3, "agent_version": "0.0.1", "gpus": []})
    with pytest.raises(ProtocolViolation) as violation:
        NodeSession("node_1").receive(older)
    assert violation.value.code == CloseCode.UNSUPPORTED_VERSION
    assert "protocol version 3 is not supported" in violation.value.reason


def test_a_round_trip_is_timed_by_the_coordinators_clock_and_a_silent_node_looks_slow():
    from compute_swarm.coordinator.transport.hub.registry import Connection

    async def nothing(*arguments) -> None:
        return None

    hello = protocol.parse_node_message(HELLO)
    connection = Connection("node_1", nothing, nothing, hello, hello.telemetry, True)
    assert connection.round_trip_seconds(100.0) is None and connection.ping_due(100.0)
    connection.ping_nonce, connection.pinged_at = "nonce-one", 100.0
    assert not connection.ping_due(200.0)  # one ping at a time
    assert connection.round_trip_seconds(100.5) == 0.5  # still waiting: at least this long
    assert not connection.timed_pong("made-up-nonce", 100.02)
    assert connection.timed_pong("nonce-one", 100.02)
    assert connection.round_trip_seconds(101.0) == pytest.approx(0.02)
    assert not connection.timed_pong("nonce-one", 100.03)  # answered already
    # A slow answer moves the smoothed figure without defining it.
    connection.ping_nonce, connection.pinged_at = "nonce-two", 200.0
    assert connection.timed_pong("nonce-two", 200.22)
    assert connection.round_trip_seconds(201.0) == pytest.approx(0.7 * 0.02 + 0.3 * 0.22)
    # A node that stops answering looks as slow as it is.
    connection.ping_nonce, connection.pinged_at = "nonce-three", 300.0
    assert connection.round_trip_seconds(309.0) == pytest.approx(9.0)
