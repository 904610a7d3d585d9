"""Why the node agent cannot go on: `NodeStopped`, and `InviteCodeRefused` for a coordinator that
admits nodes by invitation and refused this one. The agent raises them from `run()`; the CLI and the
tray say them to the seller.
"""

from __future__ import annotations


class NodeStopped(Exception):
    """The agent cannot go on (its token was refused, its protocol is out of date); str() says why
    and what to do."""


class UnsupportedVersion(NodeStopped):
    """The coordinator does not work with this version of the agent: the seller installs the one its
    sell page (`download_page`) offers."""

    def __init__(self, message: str, download_page: str):
        super().__init__(message)
        self.download_page = download_page


class InviteCodeRefused(NodeStopped):
    """The coordinator admits nodes by invitation and refused to register this one: it had no invite
    code (`code_given` False), or the coordinator refused the one it had. `detail` is the coordinator's
    own explanation. Raised only by an agent that does not wait for a code (see `set_invite_code`)."""

    def __init__(self, coordinator: str, code_given: bool, detail: str):
        self.coordinator = coordinator
        self.code_given = code_given
        self.detail = detail
        super().__init__(f"the coordinator at {coordinator} refused to register this node: {detail}")
