"""What a failure means to the node: whether a request the coordinator refused may succeed if tried
again, whether a registration was refused for its invite code, and any error put in words for a
report or a log line.
"""

from __future__ import annotations

from compute_swarm.sdk.client import DownloadTooLarge, SwarmError


def is_transient(error: SwarmError) -> bool:
    """Whether a refused request may succeed if tried again later."""
    if isinstance(error, DownloadTooLarge):  # the same artifact will be as long again
        return False
    status = error.status_code
    return status is None or status in (408, 425, 429) or status >= 500


def is_invite_code_refusal(error: SwarmError) -> bool:
    """Whether a registration was refused for its invite code: the coordinator admits nodes by
    invitation and the code was missing, unknown, used up or expired (its only 403 there)."""
    return error.status_code == 403


def describe_error(error: BaseException) -> str:
    return str(error) or type(error).__name__
