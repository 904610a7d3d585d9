"""The node session state machine, fed frames without a socket."""

from __future__ import annotations

import json

import pytest

from compute_swarm import protocol
from compute_swarm.coordinator.node_session import NodeSession
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
