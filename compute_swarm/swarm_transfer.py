"""What the coordinator tells a node about fetching one artifact from its peers (swarm transfer), shared
by both sides and light (pydantic only).

A node asks `GET /api/swarm/{sha256}/offer` for an artifact it may read. The answer names a private
BitTorrent v2 swarm for that artifact alone: the torrent, the coordinator's tracker (which names only
the nodes the coordinator allows for that artifact), and the coordinator's own copy as an HTTP web
seed, the last resort. The tracker, web-seed and report addresses carry a ticket: the coordinator's
signature over (node, artifact, expiry), so those routes need no token and leak none to peers.
"""

from __future__ import annotations

import base64

from pydantic import BaseModel, ConfigDict, Field

# How often a node re-announces to the tracker; the tracker forgets a node silent for three intervals.
ANNOUNCE_INTERVAL_SECONDS = 30
# A node that has fetched nothing from its peers for this long adds the web seed it was not given at
# once: the designated first fetcher may be slow, stalled or gone.
STALL_SECONDS = 12.0
# At most this many peers in one tracker answer.
MAX_PEERS_PER_ANSWER = 50
# The largest torrent the coordinator sends (a v2 torrent of a 100 GiB file with 4 MiB pieces is
# about 800 KiB: its piece layer holds one 32-byte hash per piece).
MAX_TORRENT_BYTES = 4 << 20


class TransferOffer(BaseModel):
    """How to fetch one artifact from the swarm."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)
    # The bencoded .torrent (BitTorrent v2, private), base64: one file named after its sha256.
    torrent_base64: str = Field(max_length=MAX_TORRENT_BYTES * 4 // 3 + 4)
    tracker_url: str
    web_seed_url: str
    # Where to report a peer that served pieces which failed their hash (POST {"peer": "host:port"}).
    report_url: str
    # True for the one node the coordinator picks to fetch from its web seed at once; the others
    # fetch from peers and add the web seed only after STALL_SECONDS without progress. One first
    # fetcher keeps the coordinator's egress near one copy, however many nodes want the artifact.
    web_seed_at_once: bool
    expires_at: float
    # A public swarm (a catalogue model, where ops allow it): not private, so the node also finds
    # peers through the DHT and peer exchange. Datasets, checkpoints and adapters are never public.
    public: bool = False

    @property
    def torrent(self) -> bytes:
        return base64.b64decode(self.torrent_base64, validate=True)


class PeerReport(BaseModel):
    """A node's report of a peer that served data which failed verification."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    peer: str = Field(min_length=3, max_length=64, description="host:port, as the tracker named it")
    reason: str = Field(default="pieces failed their hash", max_length=300)
