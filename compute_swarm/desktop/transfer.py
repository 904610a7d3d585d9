"""Swarm transfer, the node's side: artifacts fetched from peers over BitTorrent (libtorrent), the
coordinator's web seed the last resort, and what the node holds served back to the peers the
coordinator names (compute_swarm.swarm_transfer and coordinator/service/swarm_transfer.py).

Every piece is checked against the torrent's SHA-256 merkle tree as it arrives; a peer whose data fails
is banned by libtorrent and reported to the coordinator; the whole file is checked against its sha256
before it takes its name. Anything that goes wrong (no libtorrent, a coordinator without peer
transfer, a swarm that stalls) ends in the plain HTTP download, so a fetch never depends on peers.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field

from compute_swarm.sdk.client import SwarmError, sha256_of_file
from compute_swarm.swarm_transfer import STALL_SECONDS, PeerReport, TransferOffer

logger = logging.getLogger(__name__)

POLL_SECONDS = 0.2
# With the web seed added, a fetch that still gets nothing for this long gives up (to plain HTTP).
GIVE_UP_SECONDS = 60.0
RENAME_SECONDS = 30.0
TRANSFER_SUFFIX = ".transfer"  # the partial file, beside where it will land; the cache keeps it


class TransferSettings(BaseModel):
    """The seller's say over swarm transfer (the tray's Settings, or the node command's flags)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Fetch artifacts from other nodes and serve them what this machine holds.
    enabled: bool = True
    # The most this machine sends to other nodes, in KiB/s; 0: no cap.
    upload_limit_kib_per_second: int = Field(default=0, ge=0, le=10_000_000)
    # The cache of datasets, checkpoints and adapters (models are kept apart), in GiB.
    cache_gib: float = Field(default=5.0, ge=0.5, le=4096)
    # The TCP port other nodes reach this machine on; 0: any free port.
    port: int = Field(default=0, ge=0, le=65535)

    @property
    def upload_bytes_per_second(self) -> int:
        return self.upload_limit_kib_per_second * 1024

    @property
    def cache_bytes(self) -> int:
        return int(self.cache_gib * 2**30)


class TransferFailed(Exception):
    """A peer fetch that did not finish: the caller downloads over HTTP instead."""


@dataclass
class _Fetch:
    sha256: str
    handle: Any
    report_url: str
    partial: Path | None = None
    flushed: threading.Event = field(default_factory=threading.Event)
    renamed: threading.Event = field(default_factory=threading.Event)
    failure: str | None = None
    banned: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class TransferStats:
    served_bytes: int  # payload bytes this node sent to peers since it started
    # Smoothed over real transfers (fetches of a megabyte or more; uploads while they ran); None
    # until measured.
    download_bytes_per_second: float | None = None
    upload_bytes_per_second: float | None = None


MEASURED_FETCH_BYTES = 1 << 20  # smaller fetches are all latency: they say nothing about the line
MAXIMUM_RATE_BYTES_PER_SECOND = 1e12  # protocol.NetworkReport's bound


def _smoothed(previous: float | None, sample: float) -> float:
    return sample if previous is None else 0.7 * previous + 0.3 * sample


def libtorrent_available() -> bool:
    try:
        import libtorrent  # noqa: F401
    except ImportError:
        return False
    return True


class PeerTransfer:
    """This node's BitTorrent session: one private swarm per artifact, TCP only (a tunnel carries TCP),
    no DHT, local discovery, UPnP or NAT-PMP, uploads capped at the seller's setting."""

    def __init__(
        self,
        *,
        listen_host: str = "0.0.0.0",
        listen_port: int = 0,
        upload_bytes_per_second: int = 0,
        user_agent: str = "compute-swarm",
    ):
        import libtorrent

        self._lt = libtorrent
        alerts = libtorrent.alert.category_t
        self.session = libtorrent.session(
            {
                "listen_interfaces": f"{listen_host}:{listen_port}",
                "user_agent": user_agent,
                "enable_dht": False,
                "enable_lsd": False,
                "enable_upnp": False,
                "enable_natpmp": False,
                "enable_incoming_utp": False,
                "enable_outgoing_utp": False,
                # Several nodes may share an address (one NAT, one tunnel server, loopback in tests).
                "allow_multiple_connections_per_ip": True,
                # Seeds stay connected to each other: a small swarm re-forms slowly otherwise.
                "close_redundant_connections": False,
                # The seller's cap holds on a LAN too.
                "ignore_limits_on_local_network": False,
                "upload_rate_limit": max(0, upload_bytes_per_second),
                "min_announce_interval": 10,
                # It refuses trackers on this machine at any path but /announce (against URLs planted
                # in a torrent); here every tracker and web seed comes from the coordinator's offer, and
                # a local swarm runs its coordinator on loopback.
                "ssrf_mitigation": False,
                "alert_mask": alerts.error_notification
                | alerts.peer_notification
                | alerts.status_notification
                | alerts.storage_notification
                | alerts.tracker_notification,
            }
        )
        self._fetches: dict[str, _Fetch] = {}
        self._lock = threading.Lock()
        self._removed_uploads = 0
        self._dht = False
        self._download_rate: float | None = None
        self._upload_rate: float | None = None
        self._closed = threading.Event()
        self._alerts = threading.Thread(target=self._pump_alerts, name="transfer-alerts", daemon=True)
        self._alerts.start()

    @property
    def listen_port(self) -> int:
        return self.session.listen_port()

    def fetch(
        self,
        offer: TransferOffer,
        destination: Path,
        *,
        cancel: threading.Event | None = None,
        max_bytes: int | None = None,
    ) -> Path:
        """Fetch the offered artifact to `destination`, then keep serving it from there. Blocks;
        TransferFailed when it cannot finish (the caller falls back to HTTP)."""
        if max_bytes is not None and offer.size > max_bytes:
            raise TransferFailed(f"the artifact is {offer.size} bytes, more than the {max_bytes} expected")
        cancel = cancel or threading.Event()
        started = time.monotonic()
        partial_name = destination.name + TRANSFER_SUFFIX
        fetch = self._join(offer, destination.parent, partial_name, web_seed=offer.web_seed_at_once)
        fetch.partial = destination.parent / partial_name
        handle = fetch.handle
        web_seed_added = offer.web_seed_at_once
        done, last_done, last_change = 0, -1, time.monotonic()
        try:
            while True:
                if cancel.is_set():
                    raise TransferFailed("cancelled")
                if fetch.failure:
                    raise TransferFailed(fetch.failure)
                status = handle.status()
                done = status.total_wanted_done
                if status.is_seeding:
                    break
                now = time.monotonic()
                if done != last_done:
                    last_done, last_change = done, now
                elif not web_seed_added and now - last_change > STALL_SECONDS:
                    logger.info(
                        "no peer has sent %s for %.0f s: adding the web seed",
                        offer.sha256[:12],
                        STALL_SECONDS,
                    )
                    handle.add_url_seed(offer.web_seed_url)
                    web_seed_added, last_change = True, now
                elif web_seed_added and now - last_change > GIVE_UP_SECONDS:
                    raise TransferFailed(f"nothing arrived for {GIVE_UP_SECONDS:.0f} s, web seed included")
                time.sleep(POLL_SECONDS)
            # libtorrent 2.1 hashes pieces from its write buffer: the file is whole once they are flushed.
            handle.flush_cache()
            if not fetch.flushed.wait(RENAME_SECONDS) or fetch.failure:
                raise TransferFailed(fetch.failure or "the finished file was not written out")
            if sha256_of_file(fetch.partial) != offer.sha256:
                raise TransferFailed("the assembled file does not hash to the artifact's sha256")
            handle.rename_file(0, destination.name)
            if not fetch.renamed.wait(RENAME_SECONDS) or fetch.failure:
                raise TransferFailed(fetch.failure or "the finished file could not be renamed")
            fetch.partial = None
        except BaseException:
            self.forget(offer.sha256, delete_partial=True)
            raise
        self.record_download(offer.size, time.monotonic() - started)
        return destination

    def record_download(self, size: int, seconds: float) -> None:
        """A finished download (from peers, or over HTTP), for the node's measured download rate."""
        if size >= MEASURED_FETCH_BYTES and seconds > 0:
            # A file the cache already held (a hard link, a copy from disk) arrives faster than any
            # line: such a sample is capped at what the protocol takes as a rate.
            sample = min(size / seconds, MAXIMUM_RATE_BYTES_PER_SECOND)
            with self._lock:
                self._download_rate = _smoothed(self._download_rate, sample)

    def serve(self, offer: TransferOffer, path: Path, timeout: float = 120.0) -> bool:
        """Serve a file this node already holds (a cached model) to the artifact's swarm; False when
        the file is not the artifact (libtorrent checks every piece first)."""
        try:
            # Upload mode: should the file not be the artifact, nothing is written into it.
            fetch = self._join(offer, path.parent, path.name, web_seed=False, upload_only=True)
        except TransferFailed as failure:
            logger.warning("cannot serve %s: %s", offer.sha256[:12], failure)
            return False
        states = self._lt.torrent_status
        checking = {states.checking_files, states.queued_for_checking, states.checking_resume_data}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not fetch.failure:
            status = fetch.handle.status()
            if status.is_seeding:
                return True
            if status.state not in checking:
                break  # checked, and some pieces are not what they should be
            time.sleep(POLL_SECONDS)
        self.forget(offer.sha256)
        return False

    def _join(
        self,
        offer: TransferOffer,
        save_path: Path,
        file_name: str,
        *,
        web_seed: bool,
        upload_only: bool = False,
    ) -> _Fetch:
        """Add the offered artifact's swarm, its one file at save_path/file_name."""
        lt = self._lt
        try:
            info = lt.torrent_info(offer.torrent)
        except (RuntimeError, ValueError) as error:
            raise TransferFailed(f"the offered torrent is unreadable: {error}") from None
        if not _describes(info, offer):
            raise TransferFailed("the offered torrent does not describe the artifact asked for")
        save_path.mkdir(parents=True, exist_ok=True)
        self.forget(offer.sha256)  # an earlier membership: failed, or its file evicted
        params = lt.add_torrent_params()
        params.ti = info
        params.save_path = str(save_path)
        params.renamed_files = {0: file_name}
        params.trackers = [offer.tracker_url]
        if web_seed:
            params.url_seeds = [offer.web_seed_url]
        if offer.public and not self._dht:
            # A public swarm: the DHT finds peers the tracker does not name (peer exchange comes
            # with any torrent that is not private).
            self.session.apply_settings({"enable_dht": True})
            self._dht = True
        params.flags &= ~lt.torrent_flags.auto_managed
        params.flags &= ~lt.torrent_flags.paused
        if upload_only:
            params.flags |= lt.torrent_flags.upload_mode
        fetch = _Fetch(offer.sha256, self.session.add_torrent(params), offer.report_url)
        with self._lock:
            self._fetches[offer.sha256] = fetch
        return fetch

    def forget(self, sha256: str, *, delete_partial: bool = False) -> None:
        """Stop serving an artifact (evicted from the cache, or a fetch given up)."""
        with self._lock:
            fetch = self._fetches.pop(sha256, None)
        if fetch is None:
            return
        with contextlib.suppress(RuntimeError):
            self._removed_uploads += fetch.handle.status().all_time_upload
            flags = self._lt.session.delete_partfile if delete_partial else 0
            self.session.remove_torrent(fetch.handle, flags)
            if delete_partial and fetch.partial is not None:
                fetch.partial.unlink(missing_ok=True)

    def stats(self) -> TransferStats:
        with self._lock:
            fetches = list(self._fetches.values())
        served, uploading = self._removed_uploads, 0
        for fetch in fetches:
            with contextlib.suppress(RuntimeError):
                status = fetch.handle.status()
                served += status.all_time_upload
                uploading += status.upload_payload_rate
        with self._lock:
            if uploading > 0:
                self._upload_rate = _smoothed(self._upload_rate, uploading)
            return TransferStats(served, self._download_rate, self._upload_rate)

    def close(self) -> None:
        self._closed.set()
        self._alerts.join(timeout=5)
        with self._lock:
            self._fetches.clear()
        self.session.pause()

    # ---- internals

    def _fetch_for(self, alert: Any) -> _Fetch | None:
        try:
            name = alert.handle.torrent_file().name()
        except (RuntimeError, AttributeError):
            return None
        with self._lock:
            return self._fetches.get(name)

    def _pump_alerts(self) -> None:
        lt = self._lt
        while not self._closed.is_set():
            if self.session.wait_for_alert(500) is None:
                continue
            for alert in self.session.pop_alerts():
                if isinstance(alert, lt.peer_ban_alert):
                    self._on_banned(alert)
                elif isinstance(alert, lt.hash_failed_alert):
                    logger.warning("a piece of %s failed its hash: %s", alert.torrent_name, alert.message())
                elif isinstance(alert, lt.cache_flushed_alert):
                    fetch = self._fetch_for(alert)
                    if fetch is not None:
                        fetch.flushed.set()
                elif isinstance(alert, lt.file_renamed_alert):
                    fetch = self._fetch_for(alert)
                    if fetch is not None:
                        fetch.renamed.set()
                elif isinstance(
                    alert, (lt.file_rename_failed_alert, lt.file_error_alert, lt.torrent_error_alert)
                ):
                    fetch = self._fetch_for(alert)
                    if fetch is not None:
                        fetch.failure = alert.message()
                        fetch.flushed.set()
                        fetch.renamed.set()
                        if fetch.handle.status().is_seeding:
                            # Its file is gone (evicted, deleted): it cannot be served any more.
                            self.forget(fetch.sha256)
                elif isinstance(alert, lt.tracker_error_alert):
                    logger.debug("tracker: %s", alert.message())

    def _on_banned(self, alert: Any) -> None:
        fetch = self._fetch_for(alert)
        address = f"{alert.endpoint[0]}:{alert.endpoint[1]}"
        logger.warning("banned peer %s: it sent pieces that failed their hash", address)
        if fetch is None or address in fetch.banned:
            return
        fetch.banned.add(address)
        threading.Thread(
            target=_report, args=(fetch.report_url, address), name="transfer-report", daemon=True
        ).start()


def _describes(info: Any, offer: TransferOffer) -> bool:
    """One file (libtorrent adds pad files of its own), named after the sha256, of the offered size."""
    layout = info.layout()
    pad = layout.flag_pad_file
    files = [index for index in range(layout.num_files()) if not layout.file_flags(index) & pad]
    return (
        info.name() == offer.sha256
        and files == [0]
        and layout.file_path(0) == offer.sha256
        and layout.file_size(0) == offer.size
    )


def _report(url: str, address: str) -> None:
    try:
        httpx.post(url, json=PeerReport(peer=address).model_dump(), timeout=10).raise_for_status()
    except httpx.HTTPError as error:
        logger.warning("could not report peer %s to the coordinator: %s", address, error)


def fetch_artifact(
    client: Any,
    transfer: PeerTransfer | None,
    sha256: str,
    destination: Path,
    *,
    size: int | None = None,
    cancel: threading.Event | None = None,
) -> Path:
    """An artifact from its swarm where the coordinator offers one, else (or when that fails) over
    plain HTTP: the same verified file at `destination` either way."""
    if transfer is not None:
        try:
            offer = client.transfer_offer(sha256)
        except SwarmError as error:
            if error.status_code is None or error.status_code >= 500:
                raise  # the coordinator is unreachable: HTTP would fail too, and the caller retries
            logger.debug("no swarm for %s: %s", sha256[:12], error)
        else:
            try:
                return transfer.fetch(offer, destination, cancel=cancel, max_bytes=size)
            except TransferFailed as failure:
                if cancel is not None and cancel.is_set():
                    raise SwarmError("the download was cancelled") from None
                logger.warning(
                    "peer transfer of %s failed (%s); downloading it directly", sha256[:12], failure
                )
    started = time.monotonic()
    path = client.download_artifact(sha256, destination, size=size)
    if transfer is not None:
        transfer.record_download(path.stat().st_size, time.monotonic() - started)
    return path


def share_cached_model(client: Any, transfer: PeerTransfer, name: str) -> None:
    """Serve the files of a catalogue model this machine holds to the nodes that need them. Never
    raises: sharing is a service to peers, and a node's own work does not depend on it."""
    from compute_swarm.desktop import model_files

    record = model_files.record_of(name)
    if record is None:
        return
    directory = model_files.model_directory(record)
    for file in (record.gguf, *record.weights):
        try:
            offer = client.transfer_offer(file.sha256, holding=True)
            if not transfer.serve(offer, directory / file.name):
                logger.warning(
                    "the cached %s of %s is not the catalogue's file: it is not served", file.name, name
                )
        except SwarmError as error:
            level = (
                logging.DEBUG if error.status_code == 404 else logging.WARNING
            )  # 404: no peer transfer there
            logger.log(level, "model %s through its swarm: %s", name, error)
            return
        except (TransferFailed, OSError) as error:
            logger.warning("model %s through its swarm: %s", name, error)
