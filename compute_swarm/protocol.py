"""The node ⇄ coordinator wire protocol: typed JSON messages over the `/node` websocket.

Shared by the coordinator and the node agent, so it imports nothing heavier than pydantic. Every
message is a frozen, strict model tagged by `type`; one union per direction. Large data never travels
here: datasets, checkpoints and adapters move as content-addressed artifacts over HTTP.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from compute_swarm.engine.jobs import CatalogueModel, ChatMessage, InferenceJobSpec, Sampling, WireJobSpec

# 3: a lease may bring a llama.cpp adapter to fetch (batch inference with a fine-tuned model).
# 4: a lease states the size of every artifact it names, and a node stops a download past it.
# 5: the welcome says the node's standing (active, awaiting ops' approval, quarantined), and a
#    `standing` message says it again at once when it changes.
# 6: a lease's spec is typed (protocol.Lease.spec): every datum in it is named by its content hash, a
#    batch's adapter and a verification re-run's adapter to evaluate included, as the lease names them.
# 7: the welcome says the oldest agent version the coordinator takes and the newest it offers (its
#    sell page); a hello from an older agent is closed with UNSUPPORTED_VERSION.
# 8: the coordinator times each node's round trip (`ping`, answered at once by `pong`).
# 9: swarm transfer: hello and heartbeats carry the node's `network` (its transfer port, its tunnel's
#    port, its measured transfer rates); the coordinator tests the port from outside and says what it
#    found in a `reachability` message, with the tunnel server to use when the node cannot be reached.
# 10: seller economics: `welcome` says what a credit is worth (`credit_value`), `earnings` carries the
#    credit waiting to be paid out and what was paid, a lease says what it pays the node and how much
#    work it is (`pay_micro`, `work_tokens`), and a node may decline a job for its seller's rules
#    (failure kind "declined": no attempt is used and the job goes to another node).
# 11: an ops-curated catalogue: a lease and an inference request name the base model's files
#    (`model`, `model_file`), which a node fetches as artifacts, never from anywhere else; model names
#    may hold dots (qwen2.5-7b-instruct).
PROTOCOL_VERSION = 11

# Where the node token goes in the websocket handshake (and in HTTP requests from a node).
AUTHORIZATION_HEADER = "Authorization"
TOKEN_SCHEME = "Bearer"

MAX_FRAME_BYTES = 256 * 1024
PING_INTERVAL_SECONDS = 20.0
PING_TIMEOUT_SECONDS = 20.0  # with the interval above, a dead node is noticed within about 40 s
HEARTBEAT_INTERVAL_SECONDS = 10.0
# How often the coordinator times a node's round trip (a `ping` it must answer at once).
PING_INTERVAL_SECONDS = 30.0
# A node may send this many messages per second on average, in bursts of MESSAGE_BURST.
MESSAGES_PER_SECOND = 20.0
MESSAGE_BURST = 100
# And this many bytes of frames per second, in bursts of BYTES_BURST: generated text, exempt from
# the message rate, is bounded here (a frame counts as at least MINIMUM_FRAME_COST bytes, so a flood
# of tiny frames is bounded too). An honest node streams a few KB of text a second.
BYTES_PER_SECOND = 1 << 20
BYTES_BURST = 4 << 20
MINIMUM_FRAME_COST = 256

# Money on the wire (and everywhere else) is whole micro-credits.
MICRO_PER_CREDIT = 1_000_000

# A job's states, as the coordinator stores them and buyers read them (REST API, SDK, web page) and
# nodes hear them in acknowledgements. What moves a job between them: coordinator.domain.lifecycle.
QUEUED, LEASED, RUNNING = "queued", "leased", "running"
VERIFYING = "verifying"  # done and charged; the result is held from the buyer until it is verified
COMPLETED, VERIFIED, FAILED, CANCELLED = "completed", "verified", "failed", "cancelled"
JOB_STATES = (QUEUED, LEASED, RUNNING, VERIFYING, COMPLETED, VERIFIED, FAILED, CANCELLED)
FINAL_JOB_STATES = frozenset({COMPLETED, VERIFIED, FAILED, CANCELLED})
SUCCEEDED_JOB_STATES = frozenset({COMPLETED, VERIFIED})  # a result was delivered (verified or not yet)

# Why a job's run ended badly: the engine's kinds (engine.records.Failed.kind), and two only a node
# sends, neither the job's fault: "released" (it gives the job back: its seller paused it, a game
# started, the agent is shutting down, it was busy) and "declined" (its seller's rules refuse this job,
# e.g. it would pay less than its electricity; another node should take it).
FailureKind = Literal[
    "invalid_spec",  # the spec or its dataset cannot be used: the buyer's to fix, retrying won't help
    "insufficient_memory",  # refused before start: it would not fit this device
    "out_of_memory",  # ran out of memory while running
    "cancelled",
    "crashed",  # the child process died without saying why (signal, segfault, OOM killer)
    "error",  # any other exception in the job
    "released",
    "declined",
]

SHA256_PATTERN = r"^[0-9a-f]{64}$"
Sha256 = Annotated[str, Field(pattern=SHA256_PATTERN)]
# Counts that fit every database's 32-bit integer columns.
Count = Annotated[int, Field(ge=0, le=2**31 - 1)]
Identifier = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
Nonce = Annotated[str, Field(min_length=8, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
Port = Annotated[int, Field(ge=1, le=65535)]
# A catalogue model's name (coordinator/service/catalogue.py: lowercase letters, digits, . _ -).
ModelName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
# A file's name inside a model's directory on a node: plain, never a path, never hidden.
FileName = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
# A model a node keeps loaded: a catalogue name, or "<catalogue name>+<adapter sha256>".
ModelKey = Annotated[str, Field(min_length=1, max_length=140, pattern=r"^[A-Za-z0-9_.-]+(\+[0-9a-f]{64})?$")]
# Generated text travels in pieces of at most this many characters (4 bytes each at most in UTF-8).
MAX_DELTA_CHARACTERS = 16 * 1024
# A node reports at most this many models it has seen crash, each with a report of at most this length.
MAX_CRASHED_MODELS = 64
MAX_CRASH_REPORT_CHARACTERS = 1000


def finite_or_none(value: float | None) -> float | None:
    """A reading, or None for no reading (NaN and infinities are not valid JSON numbers)."""
    return value if value is not None and math.isfinite(value) else None


class CloseCode:
    """Websocket close codes the coordinator uses; the reason text says what went wrong."""

    NORMAL = 1000
    GOING_AWAY = 1001  # the coordinator is shutting down: reconnect later
    POLICY_VIOLATION = 1008  # too many messages
    MESSAGE_TOO_BIG = 1009
    MALFORMED = 4400  # not JSON, not a known message, or a message out of order
    UNAUTHORIZED = 4401  # missing, unknown or revoked token
    REPLACED = 4409  # the same node connected again; this older connection is closed
    # The protocol versions differ, or the agent is older than the coordinator takes: the seller needs
    # the version the coordinator's sell page (/sell) offers.
    UNSUPPORTED_VERSION = 4426


# Close codes after which reconnecting with the same token cannot help.
FATAL_CLOSE_CODES = frozenset({CloseCode.UNAUTHORIZED, CloseCode.UNSUPPORTED_VERSION})


class _Message(BaseModel):
    # NaN and infinity are not JSON numbers, and no reading or amount may be one.
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)


# ---- telemetry (the coordinator's own copy of what engine.devices reports: it must not import torch)


class GpuTelemetry(_Message):
    index: int = Field(ge=0, le=1024)
    vendor: Literal["nvidia", "amd", "apple"]
    name: str = Field(max_length=256)
    backend: Literal["cuda", "rocm", "mps"]
    memory_total_bytes: int | None = Field(default=None, ge=0)
    memory_free_bytes: int | None = Field(default=None, ge=0)
    temperature_celsius: float | None = None
    utilization_percent: float | None = None
    power_watts: float | None = None


class CpuTelemetry(_Message):
    name: str = Field(max_length=256)
    logical_cores: int = Field(ge=1, le=65536)
    memory_total_bytes: int = Field(ge=0)
    memory_available_bytes: int = Field(ge=0)


class Telemetry(_Message):
    gpus: tuple[GpuTelemetry, ...] = Field(default=(), max_length=64)
    cpu: CpuTelemetry
    backends: tuple[Literal["cuda", "rocm", "mps", "cpu"], ...] = Field(min_length=1, max_length=8)


class LeaseReference(_Message):
    job_id: Identifier
    lease_id: Identifier


# ---- node → coordinator


class CrashedModel(_Message):
    """A model whose llama.cpp process crashed on this node, with what the buyer is told. The node
    serves it again (and stops reporting it) once a fresh process has served it; a crashed base model
    stands for every adapter on it too."""

    model: ModelKey
    message: str = Field(max_length=MAX_CRASH_REPORT_CHARACTERS)


class NetworkReport(_Message):
    """A node's side of swarm transfer: where its peers reach it, and what its transfers measured."""

    # The TCP port its BitTorrent session listens on; None: it shares nothing.
    transfer_port: Port | None = None
    # Its port on the coordinator's tunnel server (frps), while its tunnel is up.
    tunnel_port: Port | None = None
    # Payload bytes per second over its recent real transfers; None until it has measured one.
    download_bytes_per_second: float | None = Field(default=None, ge=0, le=1e12)
    upload_bytes_per_second: float | None = Field(default=None, ge=0, le=1e12)


class Hello(_Message):
    """First message on every connection."""

    type: Literal["hello"] = "hello"
    protocol_version: int
    agent_version: str = Field(max_length=64)
    telemetry: Telemetry
    models: tuple[str, ...] = Field(default=(), max_length=256)  # catalogue models already on disk
    running: tuple[LeaseReference, ...] = Field(default=(), max_length=64)  # jobs still running here
    accepting_jobs: bool = True
    # Inference requests this node serves at once; 0: it does not serve inference.
    inference_slots: int = Field(default=0, ge=0, le=64)
    crashed_models: tuple[CrashedModel, ...] = Field(default=(), max_length=MAX_CRASHED_MODELS)
    network: NetworkReport = NetworkReport()


class Pong(_Message):
    """The answer to a `ping`, sent at once: the coordinator's clock times the round trip, so a node
    can make itself look slower, never faster."""

    type: Literal["pong"] = "pong"
    nonce: Nonce


class Heartbeat(_Message):
    type: Literal["heartbeat"] = "heartbeat"
    telemetry: Telemetry
    running: tuple[LeaseReference, ...] = Field(default=(), max_length=64)
    accepting_jobs: bool = True  # False while paused (GPU hot, a game running, the seller paused)
    loaded_models: tuple[ModelKey, ...] = Field(default=(), max_length=64)  # kept loaded for inference
    # Not to be routed here until they leave this list (sent at once when it changes, not only on a tick).
    crashed_models: tuple[CrashedModel, ...] = Field(default=(), max_length=MAX_CRASHED_MODELS)
    network: NetworkReport = NetworkReport()  # sent at once when its ports change


class JobProgress(_Message):
    type: Literal["progress"] = "progress"
    job_id: Identifier
    lease_id: Identifier
    step: Count
    total_steps: Count
    loss: float | None = None
    eval_loss: float | None = None
    learning_rate: float | None = None
    tokens_per_second: float | None = None
    eta_seconds: float | None = None


class CheckpointUploaded(_Message):
    """A resumable checkpoint (a tar of the engine's checkpoint directory) is stored as an artifact."""

    type: Literal["checkpoint"] = "checkpoint"
    job_id: Identifier
    lease_id: Identifier
    step: Count = Field(ge=1)
    sha256: Sha256


class Offload(_Message):
    """Where the model that did the work had its layers: `gpu_layers` of `layers` on the GPU, in
    llama.cpp's count (the repeating blocks and 1 for the output layer). The node's report."""

    gpu_layers: int = Field(ge=0, le=100_000)
    layers: int = Field(ge=1, le=100_000)

    def describe(self) -> str:
        if self.gpu_layers == 0:
            return "CPU only"
        if self.gpu_layers >= self.layers:
            return f"all {self.layers} layers on the GPU"
        return f"{self.gpu_layers} of {self.layers} layers on the GPU"


class JobResult(_Message):
    """The job finished; its adapter (a tar of the adapter directory) is stored as an artifact."""

    type: Literal["result"] = "result"
    job_id: Identifier
    lease_id: Identifier
    sha256: Sha256
    # The adapter as a llama.cpp LoRA file (an "adapter" artifact), which serves the fine-tuned model.
    gguf_sha256: Sha256 | None = None
    steps: Count
    final_loss: float | None = None
    eval_loss: float | None = None
    # A verification re-run (the lease named evaluate_result_sha256): that adapter's held-out loss,
    # measured here; None when it could not be loaded onto the job's model.
    delivered_eval_loss: float | None = None
    train_tokens: int = Field(default=0, ge=0, le=2**62)
    seconds: float = Field(default=0.0, ge=0, le=1e9)
    offload: Offload | None = None  # a batch: where its model had its layers


class JobFailure(_Message):
    type: Literal["failure"] = "failure"
    job_id: Identifier
    lease_id: Identifier
    kind: FailureKind
    message: str = Field(max_length=4000)


class InferenceDelta(_Message):
    """Generated text of an inference request, as it comes: `tokens` tokens since the last delta."""

    type: Literal["inference_delta"] = "inference_delta"
    request_id: Identifier
    text: str = Field(max_length=MAX_DELTA_CHARACTERS)
    tokens: Count


class InferenceDone(_Message):
    type: Literal["inference_done"] = "inference_done"
    request_id: Identifier
    finish_reason: Literal["stop", "length"]
    prompt_tokens: Count
    completion_tokens: Count
    offload: Offload | None = None


class InferenceFailed(_Message):
    """The request ended without an answer. `unavailable`: this node cannot serve it (the model does not
    load here), another node may; `invalid`: no node can (the prompt is longer than the context);
    `crashed`: the model crashed this node's llama.cpp process (now, or before: then the node refuses it
    at once), and the node reports it in `crashed_models` until a fresh process serves it."""

    type: Literal["inference_failed"] = "inference_failed"
    request_id: Identifier
    kind: Literal["invalid", "unavailable", "error", "crashed"]
    message: str = Field(max_length=4000)


NodeMessage = Annotated[
    Hello
    | Heartbeat
    | Pong
    | JobProgress
    | CheckpointUploaded
    | JobResult
    | JobFailure
    | InferenceDelta
    | InferenceDone
    | InferenceFailed,
    Field(discriminator="type"),
]
node_message_adapter: TypeAdapter[NodeMessage] = TypeAdapter(NodeMessage)


# ---- coordinator → node


class Earnings(_Message):
    type: Literal["earnings"] = "earnings"
    pending_micro: int  # credited for completed jobs, held until verified
    available_micro: int
    jobs_completed: int
    payout_pending_micro: int = 0  # asked to be paid out, waiting for the swarm operator
    paid_out_micro: int = 0  # paid out, ever


class CreditValue(_Message):
    """What a credit is worth in the swarm operator's currency: the rate payouts are made at, and the
    one a seller's app weighs earnings against electricity with."""

    currency: str = Field(pattern=r"^[A-Z]{3}$")
    micro_per_credit: int = Field(ge=1, le=10**12)  # micro-units of the currency per credit


# What the node may do: take work (active), or wait, connected, for ops to approve it
# (awaiting_approval) or to lift the quarantine verification put it in (quarantined).
StandingState = Literal["active", "awaiting_approval", "quarantined"]
MAX_STANDING_REASON_CHARACTERS = 1000


class Standing(_Message):
    """Whether this node gets work, and if not why, in words for its seller. Part of the welcome, and
    sent again the moment it changes (ops approve the node, verification quarantines it, ops lift
    the quarantine). A node that is not active stays connected and is sent no lease and no inference
    request until it is."""

    type: Literal["standing"] = "standing"
    state: StandingState
    reason: str = Field(default="", max_length=MAX_STANDING_REASON_CHARACTERS)


class Welcome(_Message):
    type: Literal["welcome"] = "welcome"
    protocol_version: int
    node_id: Identifier
    heartbeat_interval_seconds: float
    lease_seconds: float
    earnings: Earnings
    standing: Standing
    # The oldest agent version this coordinator takes, and the newest it offers on its sell page
    # (/sell): an older agent shows "Update available". None: no such bound.
    minimum_agent_version: str | None = Field(default=None, max_length=64)
    latest_agent_version: str | None = Field(default=None, max_length=64)
    credit_value: CreditValue | None = None


REACHABLE, TUNNELLED, UNREACHABLE = "reachable", "tunnelled", "unreachable"
ReachabilityState = Literal["reachable", "tunnelled", "unreachable"]


class TunnelServer(_Message):
    """The frp server ops run beside the coordinator, for nodes other nodes cannot reach."""

    host: str = Field(min_length=1, max_length=253)
    port: Port
    token: str = Field(min_length=1, max_length=256)


class Reachability(_Message):
    """What the coordinator found when it connected to the node's transfer port from outside: at `hello`
    and whenever the node's address or ports change. `address` is where its peers are told to connect.
    An unreachable node is given `tunnel` when ops run a tunnel server: it opens one and says its port
    in its next heartbeat, and is tested again."""

    type: Literal["reachability"] = "reachability"
    state: ReachabilityState
    address: str | None = Field(default=None, max_length=300)
    tunnel: TunnelServer | None = None


class Ping(_Message):
    """Answer with a `pong` of the same nonce, at once: the coordinator times the round trip."""

    type: Literal["ping"] = "ping"
    nonce: Nonce


class ModelFile(_Message):
    name: FileName
    sha256: Sha256
    size: int = Field(ge=0, le=2**42)


class ModelFiles(_Message):
    """A catalogue model's files, each an artifact a node fetches from the coordinator or its peers and
    checks against its sha256: the GGUF llama.cpp serves, and the Hugging Face files the engine trains
    from (none: it trains from the GGUF)."""

    name: ModelName
    gguf: ModelFile
    weights: tuple[ModelFile, ...] = Field(default=(), max_length=128)

    @model_validator(mode="after")
    def _names_are_distinct(self) -> ModelFiles:
        names = [file.name for file in (self.gguf, *self.weights)]
        if len(set(names)) != len(names) or "model.json" in names:
            raise ValueError("a model's files need distinct names, none of them model.json")
        return self

    @classmethod
    def of(cls, model: CatalogueModel, *, with_weights: bool) -> ModelFiles:
        """What a node fetches to run a job on `model`: its GGUF, and for a fine-tune the Hugging Face
        files it trains from."""
        return cls(
            name=model.name,
            gguf=ModelFile(name=model.gguf.name, sha256=model.gguf.sha256, size=model.gguf.size),
            weights=tuple(
                ModelFile(name=file.name, sha256=file.sha256, size=file.size) for file in model.weights
            )
            if with_weights
            else (),
        )


class Lease(_Message):
    """Run this job. Its spec names its data by content hash (the artifacts to fetch, each with its
    size as the coordinator stored it: a node stops a download that goes past it) and its base model
    by catalogue name; the node validates it here, once, and runs it on its own copies. Resume from the
    checkpoint artifact when one is given."""

    type: Literal["lease"] = "lease"
    job_id: Identifier
    lease_id: Identifier
    attempt: int = Field(ge=1)
    max_attempts: int = Field(ge=1)
    spec: WireJobSpec
    dataset_sha256: Sha256
    dataset_size: int = Field(ge=0)
    checkpoint_sha256: Sha256 | None = None
    checkpoint_size: int | None = Field(default=None, ge=0)
    checkpoint_step: int = 0
    # A batch inference job with a fine-tuned model: its llama.cpp LoRA adapter, as an artifact.
    adapter_sha256: Sha256 | None = None
    adapter_size: int | None = Field(default=None, ge=0)
    # A verification re-run of a fine-tune: the result another node delivered (a tar of its adapter),
    # whose held-out loss this node measures too and reports as delivered_eval_loss.
    evaluate_result_sha256: Sha256 | None = None
    evaluate_result_size: int | None = Field(default=None, ge=0)
    lease_seconds: float
    # What completing the job credits this node (the most, for a batch), and the work it is: the
    # tokens the coordinator priced it by (an upper bound), against which a node that measured its
    # own speed estimates how long the job will take, and so the electricity it will use.
    pay_micro: int | None = Field(default=None, ge=0, le=2**62)
    work_tokens: int | None = Field(default=None, ge=0, le=2**62)
    # The base model's files: a node fetches models from the coordinator and its peers only.
    model: ModelFiles

    @model_validator(mode="after")
    def _spec_names_the_artifacts(self) -> Lease:
        if self.model.name != self.spec.base_model:
            raise ValueError("the lease's model files are not the spec's base model")
        if isinstance(self.spec, InferenceJobSpec):
            named = (self.spec.dataset, self.spec.adapter, None)
        else:
            named = (self.spec.dataset, None, self.spec.evaluate_adapter)
        if named != (self.dataset_sha256, self.adapter_sha256, self.evaluate_result_sha256):
            raise ValueError("the spec's data are not the artifacts the lease names")
        return self


class Cancel(_Message):
    """Stop this job now; its lease is no longer valid (the buyer cancelled, or it was re-leased)."""

    type: Literal["cancel"] = "cancel"
    job_id: Identifier
    lease_id: Identifier
    reason: str = Field(max_length=1000)


class Acknowledged(_Message):
    """The answer to a checkpoint, result or failure: whether it changed anything, and the job's state.
    A duplicate or stale message is answered with accepted=False and the state as it is."""

    type: Literal["ack"] = "ack"
    job_id: Identifier
    lease_id: Identifier
    about: Literal["checkpoint", "result", "failure"]
    accepted: bool
    state: str
    message: str = ""


class InferenceRequest(_Message):
    """Generate an answer: a chat (messages) or a text to continue (prompt), with a catalogue model and,
    for a fine-tuned model, a llama.cpp LoRA adapter to fetch as an artifact."""

    type: Literal["inference"] = "inference"
    request_id: Identifier
    model: ModelName  # a catalogue name
    model_file: ModelFile  # its GGUF, fetched from the coordinator or its peers
    adapter_sha256: Sha256 | None = None
    adapter_size: int = Field(default=0, ge=0)
    messages: tuple[ChatMessage, ...] | None = Field(default=None, min_length=1, max_length=1024)
    prompt: str | None = None
    sampling: Sampling


class InferenceStop(_Message):
    """Stop generating for this request: its buyer went away."""

    type: Literal["inference_stop"] = "inference_stop"
    request_id: Identifier


CoordinatorMessage = Annotated[
    Welcome
    | Lease
    | Cancel
    | Acknowledged
    | Earnings
    | Standing
    | InferenceRequest
    | InferenceStop
    | Ping
    | Reachability,
    Field(discriminator="type"),
]
coordinator_message_adapter: TypeAdapter[CoordinatorMessage] = TypeAdapter(CoordinatorMessage)


class ProtocolViolation(Exception):
    """A message the other side must not have sent; the connection closes with `code` and `reason`."""

    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code = code
        # Websocket close reasons are limited to 123 bytes.
        self.reason = reason.encode()[:120].decode(errors="ignore")


def _parse(adapter: TypeAdapter, text: str | bytes) -> Any:
    if len(text) > MAX_FRAME_BYTES:
        raise ProtocolViolation(CloseCode.MESSAGE_TOO_BIG, f"message larger than {MAX_FRAME_BYTES} bytes")
    try:
        return adapter.validate_json(text)
    except ValidationError as error:
        problem = error.errors()[0]
        where = ".".join(str(part) for part in problem["loc"]) or "message"
        raise ProtocolViolation(CloseCode.MALFORMED, f"bad message: {where}: {problem['msg']}") from None


def parse_node_message(text: str | bytes) -> NodeMessage:
    return _parse(node_message_adapter, text)


class UnusableLease(Exception):
    """A lease whose envelope is sound but whose job this node cannot take as sent (its spec does not
    validate here): the node answers with `failure` and keeps the connection."""

    def __init__(self, failure: JobFailure):
        super().__init__(failure.message)
        self.failure = failure


class _LeaseEnvelope(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["lease"]
    job_id: Identifier
    lease_id: Identifier


def parse_coordinator_message(text: str | bytes) -> CoordinatorMessage:
    try:
        return _parse(coordinator_message_adapter, text)
    except ProtocolViolation as violation:
        if violation.code != CloseCode.MALFORMED:
            raise
        try:
            envelope = _LeaseEnvelope.model_validate_json(text)
        except ValidationError:
            raise violation from None
        failure = JobFailure(
            job_id=envelope.job_id,
            lease_id=envelope.lease_id,
            kind="invalid_spec",
            message=f"this node cannot take the lease as sent: {violation}"[:4000],
        )
        raise UnusableLease(failure) from None


def model_key(model: str, adapter_sha256: str | None) -> str:
    return f"{model}+{adapter_sha256}" if adapter_sha256 else model


Report = TypeVar("Report")


def crash_covering(crashed: Mapping[str, Report], key: str) -> Report | None:
    """What rules a model key out where these model keys crashed: its own crash, else its base model's
    (llama.cpp loads the base under every adapter, so a base that crashes takes its adapters down)."""
    if key in crashed:
        return crashed[key]
    return crashed.get(key.partition("+")[0])


def format_credits(micro: int) -> str:
    """Micro-credits as credits for people, exactly (no float on the way): 2500000 → "2.5"."""
    whole, fraction = divmod(abs(int(micro)), MICRO_PER_CREDIT)
    text = f"{whole}.{fraction:06d}".rstrip("0").rstrip(".")
    return f"-{text}" if micro < 0 else text


def is_older_version(version: str, than: str) -> bool:
    """Whether agent version `version` comes before `than`, by PEP 440. A version that does not parse
    counts as older: an agent that cannot say what it is is not known to be new enough."""
    from packaging.version import InvalidVersion, Version  # not for the SDK's light import of this module

    try:
        return Version(version) < Version(than)
    except InvalidVersion:
        return True
