"""One node's websocket session as a state machine fed with text frames (no sockets here).

It enforces what every message must satisfy before the hub acts on it: the frame limit, the
message and byte rates, a valid typed message, and hello first with a matching protocol version.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from compute_swarm import protocol
from compute_swarm.protocol import CloseCode, ProtocolViolation


class TokenBucket:
    """A rate with bursts: `rate` units a second on average, at most `burst` at once."""

    def __init__(self, rate: float, burst: float, what: str, clock: Callable[[], float]):
        self.rate, self.burst, self.what = rate, burst, what
        self._allowance = float(burst)
        self._clock = clock
        self._last = clock()

    def spend(self, units: float) -> None:
        now = self._clock()
        self._allowance = min(self.burst, self._allowance + (now - self._last) * self.rate)
        self._last = now
        if self._allowance < units:
            raise ProtocolViolation(
                CloseCode.POLICY_VIOLATION, f"more than {self.rate:g} {self.what} per second"
            )
        self._allowance -= units


class NodeSession:
    def __init__(
        self,
        node_id: str,
        *,
        messages_per_second: float = protocol.MESSAGES_PER_SECOND,
        burst: int = protocol.MESSAGE_BURST,
        bytes_per_second: float = protocol.BYTES_PER_SECOND,
        bytes_burst: int = protocol.BYTES_BURST,
        clock: Callable[[], float] = time.monotonic,
        minimum_agent_version: str = "",
    ):
        self.node_id = node_id
        self.greeted = False
        self._minimum_agent_version = minimum_agent_version
        self._messages = TokenBucket(messages_per_second, burst, "messages", clock)
        self._bytes = TokenBucket(bytes_per_second, bytes_burst, "bytes", clock)

    def receive(self, text: str | bytes) -> protocol.NodeMessage:
        """Parse one frame; raises ProtocolViolation (close code and reason) for anything not allowed."""
        # Before parsing: parsing a flood is the cost to bound.
        self._bytes.spend(max(len(text), protocol.MINIMUM_FRAME_COST))
        if not self.greeted:
            # Read before the strict parse: an older agent's hello may not parse as this version's.
            self._check_versions(text)
        message = protocol.parse_node_message(text)
        # Generated text comes as fast as the GPU makes it: only the byte rate bounds it here, and the
        # relay bounds each request's text by its max_tokens.
        if not isinstance(message, protocol.InferenceDelta):
            self._messages.spend(1)
        if not self.greeted:
            if not isinstance(message, protocol.Hello):
                raise ProtocolViolation(CloseCode.MALFORMED, f"expected hello first, got {message.type}")
            self.greeted = True
        elif isinstance(message, protocol.Hello):
            raise ProtocolViolation(CloseCode.MALFORMED, "hello sent twice")
        return message

    def _check_versions(self, text: str | bytes) -> None:
        """Turn away a hello in another protocol version or from an agent older than the minimum, with
        UNSUPPORTED_VERSION: the agent then tells its seller to fetch the version the sell page offers.
        Anything else is left to the strict parse."""
        try:
            hello = json.loads(text)
        except ValueError:
            return
        if not isinstance(hello, dict) or hello.get("type") != "hello":
            return
        version = hello.get("protocol_version")
        if version != protocol.PROTOCOL_VERSION:
            raise ProtocolViolation(
                CloseCode.UNSUPPORTED_VERSION,
                f"protocol version {str(version)[:16]} is not supported; this coordinator speaks "
                f"{protocol.PROTOCOL_VERSION}",
            )
        agent_version = hello.get("agent_version")
        if (
            self._minimum_agent_version
            and isinstance(agent_version, str)
            and protocol.is_older_version(agent_version, self._minimum_agent_version)
        ):
            raise ProtocolViolation(
                CloseCode.UNSUPPORTED_VERSION,
                f"agent version {agent_version[:32]} is older than the oldest this coordinator takes, "
                f"{self._minimum_agent_version}",
            )
