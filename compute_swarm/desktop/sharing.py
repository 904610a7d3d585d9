"""Swarm transfer for the agent: the node's BitTorrent session (desktop/transfer.py), the tunnel it opens
when the coordinator cannot reach it from outside (desktop/tunnel.py), and what it tells the
coordinator about its network (protocol.NetworkReport) and the seller about its sharing (AgentStatus).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from compute_swarm import protocol
from compute_swarm.desktop.agent_status import StatusBoard
from compute_swarm.desktop.background_tasks import BackgroundTasks
from compute_swarm.desktop.node_description import cached_catalogue_models
from compute_swarm.desktop.transfer import (
    PeerTransfer,
    TransferSettings,
    libtorrent_available,
    share_cached_model,
)
from compute_swarm.desktop.tunnel import FrpTunnel
from compute_swarm.desktop.workspace import Workspace
from compute_swarm.frp import FrpNotFound, find_program

logger = logging.getLogger(__name__)


class Sharing:
    """Runs on the agent's event loop; the session and the tunnel do their work in their own threads."""

    def __init__(
        self,
        settings: TransferSettings,
        workspace: Workspace,
        status: StatusBoard,
        tasks: BackgroundTasks,
        *,
        user_agent: str,
        tell_coordinator: Callable[[], None],
    ):
        self.settings = settings
        self.workspace = workspace
        self._status = status
        self._tasks = tasks
        self._user_agent = user_agent
        self._tell_coordinator = tell_coordinator  # a heartbeat at once: the ports changed
        self._tunnel: FrpTunnel | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def transfer(self) -> PeerTransfer | None:
        return self.workspace.transfer

    async def start(self, client: Any) -> None:
        """The session, where the seller allows it and libtorrent is installed; then the catalogue
        models this machine holds are offered to the nodes that need them."""
        self._loop = asyncio.get_running_loop()
        if self.transfer is not None:
            return
        if not self.settings.enabled or not await asyncio.to_thread(libtorrent_available):
            logger.info("sharing is off: artifacts come from the coordinator alone")
            return
        try:
            transfer = await asyncio.to_thread(
                PeerTransfer,
                listen_port=self.settings.port,
                upload_bytes_per_second=self.settings.upload_bytes_per_second,
                user_agent=self._user_agent,
            )
        except RuntimeError as error:  # the port is taken, say
            logger.warning("sharing is off: %s", error)
            self._status.update(problem=f"cannot share with other nodes: {error}")
            return
        self.workspace.transfer = transfer
        self._status.update(served_bytes=0)
        logger.info("sharing with other nodes on TCP port %d", transfer.listen_port)
        for name in await asyncio.to_thread(cached_catalogue_models):
            self._tasks.spawn(
                asyncio.to_thread(share_cached_model, client, transfer, name), name=f"serve-{name}"
            )

    def network_report(self) -> protocol.NetworkReport:
        """For the hello and each heartbeat; refreshes what the window shows was served."""
        transfer = self.transfer
        if transfer is None:
            return protocol.NetworkReport()
        stats = transfer.stats()
        self._status.update(served_bytes=stats.served_bytes)
        tunnel = self._tunnel
        return protocol.NetworkReport(
            transfer_port=transfer.listen_port or None,
            tunnel_port=tunnel.remote_port if tunnel is not None else None,
            download_bytes_per_second=stats.download_bytes_per_second,
            upload_bytes_per_second=stats.upload_bytes_per_second,
        )

    def reachability_arrived(self, message: protocol.Reachability) -> None:
        """The coordinator's verdict: shown to the seller; an unreachable node offered a tunnel opens
        one (and keeps it while the coordinator reaches it through it)."""
        self._status.update(reachability=message.state)
        transfer = self.transfer
        if message.state == protocol.UNREACHABLE and message.tunnel is not None and transfer is not None:
            server = message.tunnel
            if self._tunnel is None or self._tunnel.server != server:
                self._tasks.spawn(
                    asyncio.to_thread(self._open_tunnel, server, transfer.listen_port), name="tunnel"
                )
        elif message.state == protocol.REACHABLE and self._tunnel is not None:
            self._tasks.spawn(asyncio.to_thread(self._close_tunnel), name="tunnel-close")  # not needed

    async def close(self) -> None:
        await asyncio.to_thread(self._close_tunnel)
        transfer, self.workspace.transfer = self.workspace.transfer, None
        if transfer is not None:
            await asyncio.to_thread(transfer.close)

    # ---- threads

    def _open_tunnel(self, server: protocol.TunnelServer, local_port: int) -> None:
        self._close_tunnel()
        try:
            frpc = find_program("frpc", Path(self.workspace.data_dir) / "bin")
        except FrpNotFound as error:
            logger.warning("other nodes cannot reach this one, and it cannot open a tunnel: %s", error)
            return
        logger.info(
            "other nodes cannot reach this one: opening a tunnel through %s:%d", server.host, server.port
        )
        self._tunnel = FrpTunnel(
            frpc, server, local_port, name=f"transfer-{local_port}", on_change=self._tunnel_changed
        ).start()

    def _close_tunnel(self) -> None:
        tunnel, self._tunnel = self._tunnel, None
        if tunnel is not None:
            tunnel.stop()

    def _tunnel_changed(self, remote_port: int | None) -> None:
        """The tunnel's thread: its port came or went; the coordinator tests it again."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._tell_coordinator)
