"""Fuzzing a real coordinator process (issue 16): its REST and /v1 API with requests schemathesis makes
from the OpenAPI schema, and the `/node` websocket with frames hypothesis makes from the wire models.

Both are bounded in examples and time, and derandomized: each run tries the same cases, as many as
its time allows. Each bug they found has its own small regression test at the end of this file.
"""

from __future__ import annotations

import contextlib
import json
import struct
import threading
import time
import types
import typing
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from socket import SO_LINGER, SOL_SOCKET

import annotated_types
import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection

from compute_swarm import protocol
from compute_swarm.engine.jobs import DEFAULT_MODEL, DEMO_CHAT_DATASET
from compute_swarm.sdk.client import SwarmClient
from tests.coordinator.test_node_socket import TELEMETRY, ScriptedNode, check_ledger, open_socket
from tests.swarm_processes import Coordinator, wait_for

pytestmark = pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager")

ADMIN_TOKEN = "fuzz-admin-token-0123456789abcdef"
# Per operation and generation mode (valid and invalid requests), and again with the names of real
# things in the path and body, and a few without credentials: up to about 2,700 requests. Each
# operation has its share of the REST budget, so that a slow machine sends fewer requests (the count
# is printed) rather than run long; websocket connections stop at their budget too. On a 2-core
# machine the REST test takes 35 s idle, 50 s with both cores busy; the websocket one 30 to 50 s.
EXAMPLES_PER_OPERATION = 20
ANONYMOUS_EXAMPLES = 5
REST_BUDGET_SECONDS = 70
SOCKET_EXAMPLES = 500
SOCKET_BUDGET_SECONDS = 50
# What the coordinator may close a node's socket with when it sent something wrong; never 1011.
REFUSALS = {
    protocol.CloseCode.MALFORMED,
    protocol.CloseCode.POLICY_VIOLATION,
    protocol.CloseCode.MESSAGE_TOO_BIG,
    protocol.CloseCode.UNSUPPORTED_VERSION,
}


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory):
    # A generation no node can take is answered 503 (failing the fuzz test) in 2 s rather than 30.
    server = Coordinator(
        tmp_path_factory.mktemp("coordinator"),
        environment={"SWARM_ADMIN_TOKEN": ADMIN_TOKEN, "SWARM_INFERENCE_WAIT_SECONDS": "2"},
    ).start()
    yield server
    server.stop()
    check_ledger(server.data_dir)


def unhandled_errors(coordinator: Coordinator, since: int = 0) -> list[str]:
    """The tracebacks in the log (after its first `since` characters)."""
    lines = coordinator.log()[since:].splitlines()
    return [
        "\n".join(lines[index : index + 80])
        for index, line in enumerate(lines)
        if "Traceback" in line or "Exception in ASGI" in line
    ]


# ---- the REST and /v1 API


@contextmanager
def serving_node(coordinator: Coordinator) -> Iterator[ScriptedNode]:
    """A node that answers every inference request at once (one word, then done), so that generation
    requests are answered as buyers' are, not with "no capacity" (a 503) for want of a node. A lease
    it is sent, it keeps without a word (the job stays held for the fuzzer to read and cancel)."""
    node = ScriptedNode(coordinator, "fuzz-server")
    node.connect(models=[DEFAULT_MODEL], inference_slots=8)
    assert node.socket is not None
    socket = node.socket

    def answer() -> None:
        try:
            for frame in socket:
                message = json.loads(frame)
                if message["type"] != "inference":
                    continue
                request_id = message["request_id"]
                node.send({"type": "inference_delta", "request_id": request_id, "text": "Hi", "tokens": 1})
                node.send({"type": "inference_done", "request_id": request_id, "finish_reason": "stop",
                           "prompt_tokens": 3, "completion_tokens": 1})  # fmt: skip
        except ConnectionClosed:
            pass

    answering = threading.Thread(target=answer, name="fuzz-server", daemon=True)
    answering.start()
    try:
        yield node
    finally:
        node.disconnect()
        answering.join(10)


def real_resources(coordinator: Coordinator, api_key: str) -> dict[str, str]:
    """Names of things that exist, for path parameters and body fields, so that requests get past
    "no such job" or "no such model" to the handlers behind."""
    buyer = SwarmClient(coordinator.url, api_key)
    file = buyer.upload_file(DEMO_CHAT_DATASET)
    job = buyer.submit_lora({"base_model": DEFAULT_MODEL, "dataset": file["id"], "max_steps": 3})
    sweep = buyer.submit_sweep(
        {
            "base": {"base_model": DEFAULT_MODEL, "dataset": file["id"], "max_steps": 3},
            "parameters": {"learning_rate": {"values": [1e-4, 2e-4]}},
        }
    )
    headers = {"Authorization": f"Bearer {api_key}"}
    key = httpx.post(f"{coordinator.url}/api/keys", json={"name": "to revoke"}, headers=headers).json()
    upload = httpx.post(
        f"{coordinator.url}/api/uploads", json={"sha256": "0" * 64, "size": 10}, headers=headers
    ).json()
    # Ops may revoke, trust or approve this one: not the node that serves the requests.
    ops_target = ScriptedNode(coordinator, "fuzz-ops-target")
    return {
        "job_id": job["id"],
        "file_id": file["id"],
        "training_file": file["id"],
        "sweep_id": sweep["id"],
        "key_id": key["id"],
        "upload_id": upload["upload_id"],
        "model_id": DEFAULT_MODEL,
        "model": DEFAULT_MODEL,
        "node_id": ops_target.node_id,
        "sha256": file["sha256"],
    }


def with_real_names(strategy: st.SearchStrategy, operation, resources: dict[str, str]) -> st.SearchStrategy:
    """The operation's cases with the names of real things in its path and in its JSON body."""
    path_parameters = {
        parameter.name: resources[parameter.name]
        for parameter in operation.path_parameters
        if parameter.name in resources
    }

    def named(case):
        case.path_parameters = {**(case.path_parameters or {}), **path_parameters}
        if isinstance(case.body, dict):
            case.body = {name: resources.get(name, value) for name, value in case.body.items()}
        return case

    return strategy.map(named)


def last_if_destructive(operation) -> bool:
    """Deleting, cancelling and revoking go last, so that the real things stay for the others."""
    return operation.method.upper() == "DELETE" or operation.path.endswith(("/cancel", "/revoke"))


def may_be_invalid(operation) -> bool:
    """Whether a request to the operation can be invalid: not when its only inputs are strings in its
    path (any string is one), where hypothesis would spend seconds finding out that it cannot."""
    return bool(
        list(operation.query)
        or list(operation.headers)
        or list(operation.body)
        or any(
            parameter.definition.get("schema", {}).get("type") != "string"
            for parameter in operation.path_parameters
        )
    )


def credentials_for(path: str, buyer_key: str, node_token: str) -> dict[str, str]:
    if path.startswith("/api/ops/"):
        token = ADMIN_TOKEN
    elif path.startswith(("/api/nodes/me", "/api/artifacts/")):
        token = node_token
    else:
        token = buyer_key
    return {"Authorization": f"Bearer {token}"}


# /metrics answers Prometheus text and the downloads their files: under their documented content types.
CHECKS = [not_a_server_error, content_type_conformance]
FUZZ_SETTINGS = settings(
    deadline=None,
    database=None,
    derandomize=True,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)


def fuzz_operation(
    base_url: str,
    strategy: st.SearchStrategy,
    headers: dict[str, str],
    failures: list[str],
    *,
    deadline: float,
    examples: int = EXAMPLES_PER_OPERATION,
) -> int:
    """Send the operation up to `examples` generated requests, none but the first after the deadline
    (monotonic seconds); how many went out. Failures are collected rather than raised, so that one
    run reports every operation that fails."""
    sent = 0

    @settings(FUZZ_SETTINGS, max_examples=examples)
    @given(case=strategy)
    def call(case) -> None:
        nonlocal sent
        if sent and time.monotonic() > deadline:
            return
        sent += 1
        try:
            response = case.call(base_url=base_url, headers=headers, timeout=15)
            case.validate_response(response, checks=CHECKS)
        except BaseException as failure:  # schemathesis' FailureGroup is a BaseExceptionGroup
            if isinstance(failure, KeyboardInterrupt):
                raise
            failures.append(f"{case.operation.label}: {failure}"[:2000])

    # Unsatisfiable: there is no invalid request to make (an operation without parameters).
    with contextlib.suppress(Unsatisfiable):
        call()
    return sent


def test_the_api_answers_fuzzed_requests_without_a_server_error(coordinator):
    log_start = len(coordinator.log())
    api_key = coordinator.create_buyer("fuzz buyer", "1000")
    schema = schemathesis.openapi.from_url(f"{coordinator.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    cases: Counter[str] = Counter()
    failures: list[str] = []
    started = time.monotonic()
    with serving_node(coordinator) as node:
        resources = real_resources(coordinator, api_key)
        for index, operation in enumerate(sorted(operations, key=last_if_destructive), start=1):
            deadline = started + REST_BUDGET_SECONDS * index / len(operations)
            headers = credentials_for(operation.path, api_key, node.token)
            # Past its share of the budget an operation still gets a case or two (generating the
            # cases not sent would cost time too).
            examples = EXAMPLES_PER_OPERATION if time.monotonic() < deadline else 1
            modes = [
                GenerationMode.POSITIVE,
                *([GenerationMode.NEGATIVE] if may_be_invalid(operation) else []),
            ]
            for mode in modes:
                strategy = operation.as_strategy(generation_mode=mode)
                for variant in (strategy, with_real_names(strategy, operation, resources)):
                    cases[operation.label] += fuzz_operation(
                        coordinator.url, variant, headers, failures, deadline=deadline, examples=examples
                    )
            # And from anyone: no credentials at all.
            anonymous = with_real_names(operation.as_strategy(), operation, resources)
            cases[operation.label] += fuzz_operation(
                coordinator.url,
                anonymous,
                {},
                failures,
                deadline=deadline,
                examples=min(examples, ANONYMOUS_EXAMPLES),
            )
    seconds = time.monotonic() - started
    print(f"schemathesis: {cases.total()} cases over {len(cases)} operations in {seconds:.0f} s")
    assert not failures, f"{len(failures)} failures; the first ones:\n\n" + "\n\n".join(failures[:10])
    assert all(cases[operation.label] > 0 for operation in operations)
    assert coordinator.health()["status"] == "ok"
    assert unhandled_errors(coordinator, log_start) == []


# ---- the /node websocket


def field_strategy(annotation: object, metadata: list[object]) -> st.SearchStrategy:
    """Values for one field of a wire model, within the bounds its metadata states (so that most
    messages are valid and reach the hub); nested models become dictionaries of their own fields."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        inner, *more = typing.get_args(annotation)
        # A Field(...) inside Annotated (Identifier, ModelKey) holds its constraints as metadata.
        more = [part for item in more for part in (item.metadata if isinstance(item, FieldInfo) else [item])]
        return field_strategy(inner, [*more, *metadata])
    if origin in (typing.Union, types.UnionType):
        return st.one_of([field_strategy(arm, metadata) for arm in typing.get_args(annotation)])
    if origin is typing.Literal:
        return st.sampled_from(typing.get_args(annotation))
    bounds: dict[str, object] = {}
    pattern = None
    for item in metadata:
        if isinstance(item, annotated_types.Ge):
            bounds["min_value"] = item.ge
        elif isinstance(item, annotated_types.Le):
            bounds["max_value"] = item.le
        elif isinstance(item, annotated_types.MinLen):
            bounds["min_size"] = item.min_length
        elif isinstance(item, annotated_types.MaxLen):
            bounds["max_size"] = item.max_length
        pattern = getattr(item, "pattern", None) or pattern
    if origin is tuple:
        element, _ = typing.get_args(annotation)
        most = min(int(bounds.get("max_size", 4)), 4)  # small: the cost is per element
        return st.lists(
            field_strategy(element, []), min_size=int(bounds.get("min_size", 0)), max_size=most
        ).map(tuple)
    if annotation is type(None):
        return st.none()
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return message_strategy(annotation)
    if annotation is bool:
        return st.booleans()
    if annotation is int:
        return st.integers(bounds.get("min_value"), bounds.get("max_value"))
    if annotation is float:
        return st.floats(
            bounds.get("min_value"), bounds.get("max_value"), allow_nan=False, allow_infinity=False
        )
    if annotation is str:
        most = int(bounds.get("max_size", 80))
        least = int(bounds.get("min_size", 0))
        if pattern is not None:
            # Without its anchors: Python's $ would let a final newline through, pydantic's does not.
            pattern = pattern.removeprefix("^").removesuffix("$")
            return st.from_regex(pattern, fullmatch=True).filter(lambda text: least <= len(text) <= most)
        return st.text(min_size=least, max_size=min(most, 80))
    raise AssertionError(f"no strategy for {annotation!r}")


def message_strategy(model: type[BaseModel]) -> st.SearchStrategy[dict]:
    required, optional = {}, {}
    for name, field in model.model_fields.items():
        values = field_strategy(field.annotation, list(field.metadata))
        (required if field.is_required() or name == "type" else optional)[name] = values
    return st.fixed_dictionaries(required, optional=optional)


NODE_MESSAGES = typing.get_args(typing.get_args(protocol.NodeMessage)[0])
MESSAGES = st.one_of([message_strategy(model) for model in NODE_MESSAGES])
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def mutated(draw, messages: st.SearchStrategy[dict]) -> str:
    """A message with one thing wrong: a field of the wrong type, an unknown field, a missing field."""
    message = dict(draw(messages))
    name = draw(st.sampled_from(sorted(message)))
    how = draw(st.sampled_from(["replace", "add", "remove"]))
    if how == "replace":
        message[name] = draw(JSON_VALUES)
    elif how == "add":
        message[draw(st.text(min_size=1, max_size=12))] = draw(JSON_VALUES)
    else:
        del message[name]
    return json.dumps(message)


def deeply_nested(depth: int) -> str:
    return '{"type": "heartbeat", "telemetry": ' + '{"x": ' * depth + "1" + "}" * depth + "}"


# Frames no message can be: each must close the socket with a refusal.
BROKEN_FRAMES = st.one_of(
    st.text(max_size=200).filter(lambda text: not text.lstrip().startswith(("{", "["))),
    st.binary(max_size=200),
    st.integers(min_value=10, max_value=5000).map(deeply_nested),
    st.integers(min_value=400, max_value=5000).map(
        lambda digits: (
            '{"type": "progress", "job_id": "j", "lease_id": "l", "step": '
            + "9" * digits
            + ', "total_steps": 1}'
        )
    ),
    st.sampled_from(
        [
            '{"type": "progress", "job_id": "j", "lease_id": "l", "step": 1, "total_steps": 1, "loss": NaN}',
            '{"type": "progress", "job_id": "j", "lease_id": "l", "step": 1, "total_steps": 1, "loss": 1e999}',
            '{"type": "inference_delta", "request_id": "r", "text": "\\ud800", "tokens": 1}',
            "",
            "null",
            "[]",
            "x" * (protocol.MAX_FRAME_BYTES + 1),
        ]
    ),
)

# What a node sends after its hello: mostly messages as they should be (as dictionaries, to be named
# after a lease the node holds), some with one thing wrong, some that no message can be.
FRAMES = st.sampled_from(["valid"] * 6 + ["mutated"] * 2 + ["broken"] * 2).flatmap(
    lambda kind: {
        "valid": st.one_of(
            [message_strategy(model) for model in NODE_MESSAGES if model is not protocol.Hello]
        ),
        "mutated": mutated(MESSAGES),
        "broken": BROKEN_FRAMES,
    }[kind]
)


def must_take(frame: str | bytes, *, hello: bool) -> bool:
    """Whether the coordinator must take this frame, not close the socket over it: a valid message,
    in text, the hello first and only first."""
    if isinstance(frame, bytes):
        return False
    try:
        message = protocol.parse_node_message(frame)
    except protocol.ProtocolViolation:
        return False
    return isinstance(message, protocol.Hello) == hello


# Answered with an ack once every frame before it was handled (a stale checkpoint changes nothing).
BARRIER = {"type": "checkpoint", "job_id": "barrier", "lease_id": "barrier", "step": 1, "sha256": "0" * 64}


class FuzzedNode:
    """A registered node the fuzzer connects as, again and again, and the leases it was sent (lease id
    → job id): its hellos claim them, and its messages name them, so that they reach the jobs."""

    def __init__(self, coordinator: Coordinator, name: str):
        self.token = ScriptedNode(coordinator, name).token
        self.leases: dict[str, str] = {}

    def take_leases(self, coordinator: Coordinator, timeout: float = 10) -> None:
        """Connect as a sane node and wait for the first lease (no lease within the timeout: none)."""
        socket = open_socket(coordinator, self.token)
        hello = {"type": "hello", "protocol_version": protocol.PROTOCOL_VERSION, "agent_version": "fuzz"}
        socket.send(json.dumps({**hello, "telemetry": TELEMETRY}))
        deadline = time.monotonic() + timeout
        with contextlib.suppress(TimeoutError):
            while not self.leases:
                message = json.loads(socket.recv(timeout=max(0.01, deadline - time.monotonic())))
                if message["type"] == "lease":
                    self.leases[message["lease_id"]] = message["job_id"]
        socket.close()

    def answer_to_barrier(self, socket: ClientConnection, timeout: float = 15) -> int | str:
        """Read until the barrier's ack ("ack") or until the coordinator closes the socket (its close
        code), noting the leases granted and cancelled on the way."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                message = json.loads(socket.recv(timeout=max(0.01, deadline - time.monotonic())))
                if message["type"] == "lease":
                    self.leases[message["lease_id"]] = message["job_id"]
                elif message["type"] == "cancel":
                    self.leases.pop(message["lease_id"], None)
                elif message["type"] == "ack" and message["job_id"] == BARRIER["job_id"]:
                    return "ack"
        except TimeoutError:
            return "no answer"
        except ConnectionClosed as closed:
            return closed.rcvd.code if closed.rcvd is not None else "dropped"


def test_the_node_socket_survives_fuzzed_frames_and_leaks_no_connection(coordinator):
    log_start = len(coordinator.log())
    api_key = coordinator.create_buyer("socket fuzz buyer", "1000")
    buyer, credentials = SwarmClient(coordinator.url, api_key), {"Authorization": f"Bearer {api_key}"}
    dataset = buyer.upload_file(DEMO_CHAT_DATASET)
    jobs = [
        buyer.submit_lora(
            {"base_model": DEFAULT_MODEL, "dataset": dataset["id"], "max_steps": 3}, max_attempts=20
        )
        for _ in range(4)
    ]
    nodes = [FuzzedNode(coordinator, f"fuzz-socket-{index}") for index in range(4)]
    # Each node holds a lease from the start: the fuzzed messages reach jobs, not only the hub.
    for node in nodes:
        node.take_leases(coordinator)
    outcomes: Counter[int | str] = Counter()
    connections_holding_a_lease = 0
    problems: list[str] = []
    started = time.monotonic()

    @given(
        node=st.sampled_from(nodes),
        # One connection in ten starts without its hello.
        hello=st.sampled_from([True] * 9 + [False]).flatmap(
            lambda greets: message_strategy(protocol.Hello) if greets else st.none()
        ),
        # Each frame with the lease to name in it: none, or which of those the node holds.
        frames=st.lists(st.tuples(FRAMES, st.none() | st.integers(0, 7)), min_size=1, max_size=5),
    )
    @settings(FUZZ_SETTINGS, max_examples=SOCKET_EXAMPLES)
    def exchange(node, hello, frames):
        nonlocal connections_holding_a_lease
        if time.monotonic() > started + SOCKET_BUDGET_SECONDS:
            return
        held = [{"job_id": job_id, "lease_id": lease_id} for lease_id, job_id in node.leases.items()]
        connections_holding_a_lease += bool(held)
        sent = []
        if hello is not None:
            # The right version and a sane machine, so that the messages after it count.
            hello = {**hello, "protocol_version": protocol.PROTOCOL_VERSION, "telemetry": TELEMETRY}
            hello["running"] = [*held, *hello.get("running", ())]
            sent.append(json.dumps(hello))
        for frame, lease in frames:
            if isinstance(frame, dict) and "lease_id" in frame and held and lease is not None:
                frame = {**frame, **held[lease % len(held)]}
            sent.append(json.dumps(frame) if isinstance(frame, dict) else frame)
        socket = open_socket(coordinator, node.token)
        try:
            for frame in [*sent, json.dumps(BARRIER)]:
                socket.send(frame)
        except ConnectionClosed:
            pass  # closed while sending: its close code is read below
        outcome = node.answer_to_barrier(socket)
        socket.close()
        outcomes[outcome] += 1
        taken = hello is not None and all(
            must_take(frame, hello=index == 0) for index, frame in enumerate(sent)
        )
        # "dropped": the close frame was lost because the coordinator, closing, reset the connection
        # with frames sent after the refused one still unread (TCP's doing, not a crash: the checks
        # after the run would see one).
        if outcome != "ack" if taken else outcome not in {*REFUSALS, "dropped"}:
            problems.append(f"{outcome} after {[frame[:300] for frame in sent]!r}")

    exchange()
    seconds = time.monotonic() - started
    states = Counter(buyer.job(job["id"])["state"] for job in jobs)
    print(
        f"websocket: {outcomes.total()} connections in {seconds:.0f} s ({connections_holding_a_lease} "
        f"holding a lease); outcomes: {dict(outcomes)}; jobs after: {dict(states)}"
    )
    assert problems == [], "\n".join(problems[:10])
    # Every socket closed, and the coordinator let go of each.
    wait_for(lambda: coordinator.health()["nodes_connected"] == 0, 15, "every fuzzed socket to be let go")
    assert coordinator.health()["status"] == "ok"
    # What the nodes reported reads back for their buyer.
    for job in jobs:
        for path in ("", "/progress", "/events", "/receipt"):
            answer = httpx.get(f"{coordinator.url}/api/jobs/{job['id']}{path}", headers=credentials)
            assert answer.status_code == 200, (path, answer.text)
    assert unhandled_errors(coordinator, log_start) == []


# ---- what the fuzzers found


@pytest.fixture(scope="module")
def postgres_coordinator(tmp_path_factory):
    """A coordinator on a throwaway PostgreSQL (the pgserver wheel), as ops run a large swarm."""
    pgserver = pytest.importorskip(
        "pgserver", reason="PostgreSQL tests need the pgserver wheel (the dev extra)"
    )
    server = pgserver.get_server(tmp_path_factory.mktemp("postgres"), cleanup_mode="stop")
    url = server.get_uri().replace("postgresql://", "postgresql+psycopg://", 1)
    process = Coordinator(
        tmp_path_factory.mktemp("postgres-coordinator"),
        environment={"SWARM_ADMIN_TOKEN": ADMIN_TOKEN, "SWARM_DATABASE_URL": url},
    ).start()
    yield process
    process.stop()
    server.cleanup()


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_numbers_past_what_the_database_stores_are_refused_not_a_server_error(database, request):
    """GET /api/ledger?before=-15462201487136620544 answered 500 (OverflowError binding it for
    SQLite); /api/jobs/{id}/progress?after= had the same flaw, and /v1/fine_tuning/jobs/{id}/events
    took after=ftevent-² for a number (str.isdigit) that int() then refused. On PostgreSQL, whose
    ids are 32 bits, before=2**31 or more answered 500 (the schemathesis run against PostgreSQL)."""
    coordinator = request.getfixturevalue("coordinator" if database == "sqlite" else "postgres_coordinator")
    api_key = coordinator.create_buyer("paging buyer", "10")
    buyer = SwarmClient(coordinator.url, api_key)
    dataset = buyer.upload_file(DEMO_CHAT_DATASET)
    job = buyer.submit_lora({"base_model": DEFAULT_MODEL, "dataset": dataset["id"], "max_steps": 3})

    def get(path: str) -> httpx.Response:
        return httpx.get(f"{coordinator.url}{path}", headers={"Authorization": f"Bearer {api_key}"})

    for path in (
        f"/api/ledger?before={2**64}",
        f"/api/ledger?before=-{2**64}",
        f"/api/ledger?before={2**31}",
        f"/api/jobs/{job['id']}/progress?after={2**63}",
        f"/api/jobs/{job['id']}/progress?after={2**31}",
    ):
        assert get(path).status_code == 422, path
    assert get("/api/ledger?before=1").json() == []
    assert len(get(f"/api/ledger?before={2**31 - 1}").json()) == 2  # the grant and the job's hold
    assert get(f"/api/jobs/{job['id']}/progress?after={2**31 - 1}").json() == []
    events = f"/v1/fine_tuning/jobs/{job['id']}/events"
    everything = get(events).json()["data"]
    assert everything
    for cursor in ("ftevent-²", f"ftevent-{2**64}", f"ftevent-{2**31}", "1e3"):
        answer = get(f"{events}?after={cursor}")
        assert answer.status_code == 200, cursor
        assert answer.json()["data"] == everything  # not a cursor: no paging
    newest = everything[0]["id"]
    assert get(f"{events}?after={newest}").json()["data"] == everything[1:]


def test_a_node_gone_before_its_bad_frame_is_refused_leaves_no_error_behind(coordinator):
    """A node that sent a bad frame and reset the connection at once made the coordinator's close
    raise WebSocketDisconnect, logged as "Exception in ASGI application"."""
    log_start = len(coordinator.log())
    node = ScriptedNode(coordinator, "gone at once")
    for _ in range(5):
        socket = open_socket(coordinator, node.token)
        socket.send("not json")
        # A reset, not a close: the coordinator's close frame has nowhere to go.
        socket.socket.setsockopt(SOL_SOCKET, SO_LINGER, struct.pack("ii", 1, 0))
        socket.socket.close()
    wait_for(
        lambda: coordinator.log()[log_start:].count(f"closing node {node.node_id}: bad message") == 5,
        15,
        "the coordinator to refuse the five frames",
    )
    time.sleep(1)  # its close attempts come just after the refusal is logged
    assert unhandled_errors(coordinator, log_start) == []
    assert coordinator.health()["nodes_connected"] == 0


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_text_with_a_nul_character_is_refused_alike_on_both_databases(database, request):
    """On PostgreSQL, which cannot store or compare text with a NUL, a NUL in an id, a key's name or a
    node's name answered 500 (and SQLite stored it). Now 400 on both; a node's message with one
    closes its socket as malformed, not as a coordinator error (1011) it would reconnect into."""
    from compute_swarm.sdk.client import NodeClient

    coordinator = request.getfixturevalue("coordinator" if database == "sqlite" else "postgres_coordinator")
    api_key = coordinator.create_buyer("nul buyer", "10")
    headers = {"Authorization": f"Bearer {api_key}"}
    for method, path, body in (
        ("GET", "/api/jobs/job_%00", None),
        ("GET", "/v1/files/file_%00", None),
        ("POST", "/api/keys", {"name": "a\u0000b"}),
        (
            "POST",
            "/v1/chat/completions",
            {"model": "ft:\u0000", "messages": [{"role": "user", "content": "hi"}]},
        ),
    ):
        answer = httpx.request(method, coordinator.url + path, json=body, headers=headers, timeout=10)
        assert answer.status_code == 400, (path, answer.status_code, answer.text)
        assert "NUL" in answer.text, answer.text
    assert httpx.post(coordinator.url + "/api/nodes/register", json={"name": "n\u0000"}).status_code == 400
    with pytest.raises(Exception, match="NUL"):
        NodeClient.register(coordinator.url, "n\u0000")

    buyer = SwarmClient(coordinator.url, api_key)
    node = ScriptedNode(coordinator, "nul-writer")
    node.connect()
    dataset = buyer.upload_file(DEMO_CHAT_DATASET)
    buyer.submit_lora({"base_model": DEFAULT_MODEL, "dataset": dataset["id"], "max_steps": 3})
    lease = node.receive_type("lease")
    node.send({"type": "failure", "job_id": lease["job_id"], "lease_id": lease["lease_id"], "kind": "error",
               "message": "boom\u0000"})  # fmt: skip
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            node.receive(timeout=10)
    assert closed.value.rcvd.code == protocol.CloseCode.MALFORMED
    assert "NUL" in closed.value.rcvd.reason


def test_answers_that_are_not_json_are_documented_as_what_they_are(coordinator):
    """The schema said application/json for Prometheus' text, files and streamed generations."""
    paths = httpx.get(f"{coordinator.url}/openapi.json").json()["paths"]

    def documented(path: str, method: str = "get") -> set[str]:
        return set(paths[path][method]["responses"]["200"]["content"])

    assert documented("/metrics") == {"text/plain"}
    assert documented("/v1/files/{file_id}/content") == {"application/jsonl"}
    assert documented("/api/jobs/{job_id}/result") == {"application/x-tar"}
    assert documented("/api/jobs/{job_id}/adapter.gguf") == {"application/octet-stream"}
    assert documented("/api/artifacts/{sha256}") == {"application/octet-stream"}
    for generation in ("/v1/chat/completions", "/v1/completions"):
        assert documented(generation, "post") == {"application/json", "text/event-stream"}
    metrics = httpx.get(f"{coordinator.url}/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
