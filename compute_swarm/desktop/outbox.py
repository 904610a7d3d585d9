"""The reports the coordinator must acknowledge (a checkpoint uploaded, a job's result or failure),
kept by the node until it does and sent again on every new connection, so a report survives a dropped
connection or a restarted coordinator. desktop.connection owns one `Outbox`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from compute_swarm import protocol

logger = logging.getLogger(__name__)

MAX_OUTBOX = 1000

Reportable = protocol.CheckpointUploaded | protocol.JobResult | protocol.JobFailure


def _outbox_key(message: Reportable | protocol.Acknowledged) -> tuple[str, str, str]:
    about = message.about if isinstance(message, protocol.Acknowledged) else message.type
    return message.job_id, message.lease_id, about


@dataclass
class _OutboxEntry:
    message: Reportable
    superseded: bool = False


class Outbox:
    """Checkpoint, result and failure reports kept until the coordinator acknowledges them, and sent
    again after every reconnect (a restarted coordinator answers duplicates with accepted=False).

    Each report gets exactly one acknowledgement per connection, in order, so an acknowledgement
    settles the oldest report with its (job, lease, about). A newer checkpoint of the same lease makes
    older ones pointless to send again; they stay only to absorb acknowledgements already on the way.
    """

    def __init__(self, limit: int = MAX_OUTBOX):
        self._entries: list[_OutboxEntry] = []
        self._limit = limit

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, message: Reportable) -> None:
        if isinstance(message, protocol.CheckpointUploaded):
            for entry in self._entries:
                if _outbox_key(entry.message) == _outbox_key(message):
                    entry.superseded = True
        self._entries.append(_OutboxEntry(message))
        if len(self._entries) > self._limit:
            dropped = self._entries.pop(0)
            logger.warning(
                "dropping an unacknowledged %s report of job %s", dropped.message.type, dropped.message.job_id
            )

    def acknowledge(self, ack: protocol.Acknowledged) -> Reportable | None:
        """Settle the report this acknowledgement answers; None when nothing was waiting for it."""
        key = _outbox_key(ack)
        for index, entry in enumerate(self._entries):
            if _outbox_key(entry.message) == key:
                del self._entries[index]
                return entry.message
        return None

    def for_new_connection(self) -> list[Reportable]:
        """What to send again on a new connection, oldest first."""
        self._entries = [entry for entry in self._entries if not entry.superseded]
        return [entry.message for entry in self._entries]

    def pending(self) -> list[Reportable]:
        return [entry.message for entry in self._entries]
