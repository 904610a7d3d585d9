"""One node's websocket session as a state machine fed with text frames (no sockets here).

It enforces what every message must satisfy before the hub acts on it: the frame limit, the
message rate, a valid typed message, and hello first with a matching protocol version.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from compute_swarm import protocol
from compute_swarm.protocol import CloseCode, ProtocolViolation


class NodeSession:
    def __init__(
        self,
        node_id: str,
        *,
        messages_per_second: float = protocol.MESSAGES_PER_SECOND,
        burst: int = protocol.MESSAGE_BURST,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.node_id = node_id
        self.greeted = False
        self._rate = messages_per_second
        self._burst = burst
        self._allowance = float(burst)
        self._clock = clock
        self._last = clock()

    def receive(self, text: str | bytes) -> protocol.NodeMessage:
        """Parse one frame; raises ProtocolViolation (close code and reason) for anything not allowed."""
        message = protocol.parse_node_message(text)
        # Generated text comes as fast as the GPU makes it; the hub bounds it instead: a delta must
        # belong to a request this node is serving, and a request's tokens to its max_tokens.
        if not isinstance(message, protocol.InferenceDelta):
            self._spend_allowance()
        if not self.greeted:
            if not isinstance(message, protocol.Hello):
                raise ProtocolViolation(CloseCode.MALFORMED, f"expected hello first, got {message.type}")
            if message.protocol_version != protocol.PROTOCOL_VERSION:
                raise ProtocolViolation(
                    CloseCode.UNSUPPORTED_VERSION,
                    f"protocol version {message.protocol_version} is not supported; this coordinator speaks "
                    f"{protocol.PROTOCOL_VERSION}: update the node",
                )
            self.greeted = True
        elif isinstance(message, protocol.Hello):
            raise ProtocolViolation(CloseCode.MALFORMED, "hello sent twice")
        return message

    def _spend_allowance(self) -> None:
        now = self._clock()
        self._allowance = min(self._burst, self._allowance + (now - self._last) * self._rate)
        self._last = now
        if self._allowance < 1:
            raise ProtocolViolation(
                CloseCode.POLICY_VIOLATION, f"more than {self._rate:g} messages per second"
            )
        self._allowance -= 1
