"""Two coordinator processes on one PostgreSQL database serve one swarm: a job submitted on one replica
reaches a node on the other at once, a cancel and a revocation follow the node to its replica, a job is
leased once whichever replica leases it, and when the leader dies the other replica leads.

The replicas sweep only every 20 s here, so what arrives within a second or two arrived through
PostgreSQL's notifications, not through a sweep or the dispatcher's idle poll (every 5 s)."""

from __future__ import annotations

import contextlib
import copy
import json
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from compute_swarm import protocol
from compute_swarm.coordinator.domain.effects import NodeConnected, StopOnNode, WakeDispatcher, decode
from compute_swarm.coordinator.transport.replicas import payloads
from compute_swarm.engine.jobs import CATALOGUE, DEFAULT_MODEL, DEMO_CHAT_DATASET
from compute_swarm.sdk.client import SwarmClient
from tests.coordinator.test_node_socket import ScriptedNode, check_ledger_at, closed_with, new_buyer, submit
from tests.swarm_processes import Coordinator, run_cli, wait_for

pgserver = pytest.importorskip("pgserver", reason="PostgreSQL tests need the pgserver wheel (the dev extra)")
pytest.importorskip("psycopg", reason="PostgreSQL tests need psycopg (the dev extra)")
pytestmark = pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager")

PROMPTLY = 2.0  # seconds: well under the sweep interval and the dispatcher's idle poll


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    """The PostgreSQL server's data directory (a test restarts the server on it)."""
    data = tmp_path_factory.mktemp("postgres")
    pgserver.get_server(data, cleanup_mode="stop")
    yield data
    pgserver.get_server(data, cleanup_mode="stop").cleanup()


@pytest.fixture(scope="module")
def database_url(postgres):
    return pgserver.get_server(postgres).get_uri().replace("postgresql://", "postgresql+psycopg://", 1)


@pytest.fixture(autouse=True)
def ledger_balances(request):
    """After each test that ran replicas, the swarm's one ledger balances."""
    yield
    if "replicas" in request.fixturenames:
        check_ledger_at(request.getfixturevalue("database_url"))


@pytest.fixture(scope="module")
def replicas(tmp_path_factory, database_url):
    shared = tmp_path_factory.mktemp("shared")  # the artifacts both replicas serve
    started = []
    try:
        for name in ("replica-a", "replica-b"):
            environment = {
                "SWARM_DATABASE_URL": database_url,
                "SWARM_REPLICA_NAME": name,
                "SWARM_SWEEP_INTERVAL_SECONDS": "20",
                "SWARM_LEASE_SECONDS": "90",
            }
            started.append(Coordinator(shared, environment=environment, log_name=f"{name}.log").start())
        # Both listen (and one leads) within a second or two of starting.
        wait_for(lambda: sum(replica.health()["leader"] for replica in started) == 1, 15, "a leader")
        yield started
    finally:
        for replica in started:
            replica.stop()


def test_effects_travel_in_payloads_under_postgresql_limit():
    stops = [
        StopOnNode(f"node_{index}", f"job_{index}", f"lease_{index}", "cancelled by its buyer")
        for index in range(300)
    ]
    long = StopOnNode("node_x", "job_x", "lease_x", "é" * 10_000)
    connected = NodeConnected("node_y", "0123abcd", 1765100000.25)
    messages = payloads("instance", [WakeDispatcher(), *stops, long, connected])
    assert len(messages) > 1 and all(len(message.encode()) < 8000 for message in messages)
    received = [effect for message in messages for effect in decode(json.loads(message)["effects"])]
    assert received[:301] == [WakeDispatcher(), *stops]
    assert received[301].node_id == "node_x" and len(received[301].reason) == 500
    assert received[302] == connected
    with pytest.raises(ValueError):
        decode([{"effect": "StopOnNode", "node_id": "n"}])  # fields missing
    assert decode([{"effect": "SomethingNewer", "detail": 1}]) == []  # from a newer replica: skipped


def test_each_replica_names_itself_and_one_leads(replicas):
    first, second = (replica.health() for replica in replicas)
    assert (first["replica"], second["replica"]) == ("replica-a", "replica-b")
    assert first["leader"] != second["leader"]


def test_a_job_submitted_on_one_replica_reaches_a_node_on_the_other_and_so_does_its_cancel(replicas):
    on_a, on_b = replicas
    node = ScriptedNode(on_b, "on-replica-b")
    node.connect()
    buyer = new_buyer(on_a, "buyer-on-a")
    started = time.monotonic()
    job = submit(buyer)
    lease = node.receive_type("lease", timeout=10)
    assert lease["job_id"] == job["id"]
    assert time.monotonic() - started < PROMPTLY
    started = time.monotonic()
    buyer.cancel(job["id"])
    cancel = node.receive_type("cancel", timeout=10)
    assert (cancel["job_id"], cancel["lease_id"]) == (job["id"], lease["lease_id"])
    assert time.monotonic() - started < PROMPTLY
    node.disconnect()


def test_a_node_revoked_from_the_command_line_is_dropped_by_its_replica_at_once(replicas):
    on_a, on_b = replicas
    node = ScriptedNode(on_b, "to-revoke")
    node.connect()
    started = time.monotonic()
    result = run_cli(
        "admin", "revoke-node", "--data-dir", str(on_a.data_dir), node.node_id,
        environment=on_a.database_environment(),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert node.socket is not None
    code, reason = closed_with(node.socket)
    assert code == protocol.CloseCode.UNAUTHORIZED and "revoked" in reason
    assert time.monotonic() - started < PROMPTLY + 3  # the command starts Python and migrates first


def test_a_node_that_connects_again_through_the_other_replica_is_dropped_by_the_first(replicas):
    on_a, on_b = replicas
    first = ScriptedNode(on_a, "moving")
    first.connect()
    again = copy.copy(first)  # the same node (its token), its socket given up on, through replica b
    again.coordinator = on_b
    started = time.monotonic()
    again.connect()
    assert first.socket is not None
    code, reason = closed_with(first.socket)
    assert code == protocol.CloseCode.REPLACED and "connected again" in reason
    assert time.monotonic() - started < PROMPTLY
    # Its work now goes through replica b, whichever replica takes the job.
    buyer = new_buyer(on_a, "buyer-of-a-moved-node")
    job = submit(buyer)
    assert again.receive_type("lease", timeout=10)["job_id"] == job["id"]
    buyer.cancel(job["id"])
    again.disconnect()


def chat(replica: Coordinator, api_key: str, *, stream: bool = False, max_tokens: int = 16) -> httpx.Response:
    return httpx.post(
        f"{replica.url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {api_key}"},
        json={"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "Hi " * 3000}],
              "max_tokens": max_tokens, "stream": stream},
        timeout=60,
    )  # fmt: skip


def test_a_chat_on_one_replica_is_answered_by_a_node_on_the_other_and_charged_once(replicas):
    on_a, on_b = replicas
    node = ScriptedNode(on_b, "serving-on-b")
    node.connect(models=[DEFAULT_MODEL], inference_slots=1)
    api_key = on_a.create_buyer("chatting-on-a", "5")
    buyer = SwarmClient(on_a.url, api_key)
    before = buyer.balance()["available_micro"]
    with ThreadPoolExecutor(1) as pool:
        # Replica a hears of the node within a second (replica b tells its capacity each second).
        asked = pool.submit(chat, on_a, api_key)
        request = node.receive_type("inference", timeout=15)
        # The prompt (3000 words, over PostgreSQL's 8000-byte payload) came whole, in parts.
        assert request["messages"][0]["content"] == "Hi " * 3000
        for word in ("Ahoy", " there"):
            node.send(
                {"type": "inference_delta", "request_id": request["request_id"], "text": word, "tokens": 1}
            )
        node.send({"type": "inference_done", "request_id": request["request_id"], "finish_reason": "stop",
                   "prompt_tokens": 3010, "completion_tokens": 2})  # fmt: skip
        answer = asked.result(30)
    assert answer.status_code == 200, answer.text[:300]
    body = answer.json()
    assert body["choices"][0]["message"]["content"] == "Ahoy there"
    # Counted by replica a with SmolLM2's tokenizer (three tokens), not the node's claim of two.
    assert body["usage"]["completion_tokens"] == 3
    charged = before - buyer.balance()["available_micro"]
    assert charged > 0
    time.sleep(1.5)  # nothing else is charged for it, by either replica
    assert before - buyer.balance()["available_micro"] == charged
    # The node's replica answers a stream the same way, and a node that leaves mid-answer ends it
    # with an error and no charge.
    with ThreadPoolExecutor(1) as pool:
        asked = pool.submit(chat, on_a, api_key, stream=True)
        request = node.receive_type("inference", timeout=15)
        node.send({"type": "inference_delta", "request_id": request["request_id"], "text": "Ah", "tokens": 1})
        time.sleep(0.5)
        node.disconnect()
        streamed = asked.result(30)
    assert streamed.status_code == 200
    assert '"Ah"' in streamed.text and "disconnected while answering" in streamed.text
    wait_for(
        lambda: buyer.balance()["available_micro"] == before - charged, 10, "the refund of the cut answer"
    )


def test_a_transfer_ticket_from_one_replica_is_good_at_the_other(replicas):
    on_a, on_b = replicas
    node = ScriptedNode(on_a, "fetching")
    model = CATALOGUE[DEFAULT_MODEL]
    offer = node.http.transfer_offer(model.sha256)
    assert offer.web_seed_url.startswith(on_a.url)
    # The load balancer sends the node's next request to the other replica: the ticket still opens it.
    through_b = offer.web_seed_url.replace(on_a.url, on_b.url, 1).rstrip("/") + f"/{model.sha256}"
    answer = httpx.get(through_b, headers={"Range": "bytes=0-3"}, timeout=30)
    assert answer.status_code == 206, answer.text[:200]
    assert answer.content == b"GGUF"


def test_jobs_are_leased_once_whichever_replica_leases_them(replicas):
    nodes = [ScriptedNode(replica, f"busy-{index}") for index in range(3) for replica in replicas]
    for node in nodes:
        node.connect()
    buyers = [new_buyer(replica, f"many-on-{replica.port}", credits="100") for replica in replicas]
    jobs = [submit(buyers[index % 2]) for index in range(12)]
    # Each node has one slot: six leases, of six different jobs, the other six still queued.
    leases = [node.receive_type("lease", timeout=15) for node in nodes]
    leased = {lease["job_id"] for lease in leases}
    assert len(leased) == len(nodes) and leased <= {job["id"] for job in jobs}
    states = [buyers[index % 2].job(job["id"])["state"] for index, job in enumerate(jobs)]
    assert sorted(states).count("queued") == len(jobs) - len(nodes)
    for node in nodes:
        node.disconnect()
    for index, job in enumerate(jobs):
        buyers[index % 2].cancel(job["id"])


def test_postgresql_restarted_under_load_is_answered_503_with_retry_after_and_nothing_is_lost(
    replicas, postgres
):
    api_key = replicas[0].create_buyer("through-a-restart", "1000")
    buyer = SwarmClient(replicas[0].url, api_key)
    dataset = buyer.upload_file(DEMO_CHAT_DATASET)["id"]
    spec = {"spec": {"type": "lora", "base_model": DEFAULT_MODEL, "dataset": dataset, "max_steps": 3}}
    before = buyer.balance()["available_micro"]
    answers: list[tuple[int, str | None, dict]] = []
    stop = threading.Event()

    def submit_forever(replica: Coordinator) -> None:
        with httpx.Client(headers={"Authorization": f"Bearer {api_key}"}, timeout=30) as client:
            while not stop.is_set():
                response = client.post(f"{replica.url}/api/jobs", json=spec)
                answers.append((response.status_code, response.headers.get("retry-after"), response.json()))
                time.sleep(0.05)

    threads = [threading.Thread(target=submit_forever, args=(replica,)) for replica in replicas]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1)
        pgserver.get_server(postgres).cleanup()  # stopped: every connection of both replicas dropped
        time.sleep(3)
        server = pgserver.get_server(postgres, cleanup_mode="stop")  # started again, same socket
        back = len(answers)
        wait_for(lambda: any(status == 201 for status, _, _ in answers[back:]), 30, "submissions again")
        time.sleep(1)
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    assert server.get_uri()
    statuses = Counter(status for status, _, _ in answers)
    print(f"\nsubmissions through a PostgreSQL restart: {dict(statuses)}")
    assert set(statuses) <= {201, 503}, [body for status, _, body in answers if status not in (201, 503)][:3]
    assert statuses[503] > 0 and statuses[201] > 0
    assert all(retry == "2" for status, retry, _ in answers if status == 503)
    # Every job answered 201 is there, and the buyer paid exactly for those.
    accepted = [body for status, _, body in answers if status == 201]
    for job in accepted:
        assert buyer.job(job["id"])["state"] == "queued"
    wait_for(lambda: all(replica.health()["status"] == "ok" for replica in replicas), 15, "healthy replicas")
    balance = buyer.balance()
    assert balance["available_micro"] + balance["escrow_micro"] == before
    assert balance["escrow_micro"] == sum(job["price_micro"] for job in accepted)
    for job in accepted:
        buyer.cancel(job["id"])
    # Both replicas listen again, and one of them leads.
    wait_for(lambda: sum(replica.health()["leader"] for replica in replicas) == 1, 15, "a leader again")


def test_a_replica_killed_mid_stream_leaves_its_buyer_refunded_by_the_leader(replicas):
    leader = next(replica for replica in replicas if replica.health()["leader"])
    relaying = next(replica for replica in replicas if replica is not leader)
    api_key = relaying.create_buyer("streaming buyer", "5")
    buyer = SwarmClient(leader.url, api_key)
    before = buyer.balance()["available_micro"]
    node = ScriptedNode(relaying, "serving")
    node.connect(models=[DEFAULT_MODEL], inference_slots=1)

    def stream() -> list[str]:
        lines = []
        with contextlib.suppress(httpx.HTTPError), httpx.stream(
            "POST",
            f"{relaying.url}/v1/chat/completions",
            headers={"Authorization": f"Bearer {api_key}"},
            json={"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "Hi"}],
                  "max_tokens": 32, "stream": True},
            timeout=30,
        ) as response:  # fmt: skip
            lines += [line for line in response.iter_lines() if line]
        return lines

    with ThreadPoolExecutor(1) as pool:
        asked = pool.submit(stream)
        request = node.receive_type("inference")
        node.send(
            {"type": "inference_delta", "request_id": request["request_id"], "text": "Hel", "tokens": 1}
        )
        wait_for(lambda: buyer.balance()["available_micro"] < before, 10, "the request's hold")
        relaying.kill()  # mid-stream: the buyer's answer is cut off and never finished
        lines = asked.result(30)
    assert "data: [DONE]" not in lines
    # The leader finds the request's replica gone (its lock is free) at its next sweep, and refunds it.
    wait_for(lambda: buyer.balance()["available_micro"] == before, 30, "the refund", interval=0.5)
    assert buyer.balance() == {"available_micro": before, "escrow_micro": 0}
    relaying.start()  # back, as ops' supervisor would bring it, for the next test
    wait_for(lambda: sum(replica.health()["leader"] for replica in replicas) == 1, 15, "one leader")


def test_a_replica_killed_mid_dispatch_hands_its_nodes_and_their_jobs_to_the_other(replicas):
    survivor = next(replica for replica in replicas if replica.health()["leader"])
    doomed = next(replica for replica in replicas if replica is not survivor)
    buyer = new_buyer(survivor, "buyer-through-a-crash", "100")
    before = buyer.balance()["available_micro"]
    nodes = [ScriptedNode(doomed, f"on-the-doomed-replica-{number}") for number in range(3)]
    for node in nodes:
        node.connect()
    dataset = buyer.upload_file(DEMO_CHAT_DATASET)["id"]
    spec = {"base_model": DEFAULT_MODEL, "dataset": dataset, "max_steps": 3}
    with ThreadPoolExecutor(6) as pool:  # a burst: the doomed replica is still dispatching when it dies
        jobs = list(pool.map(lambda _: buyer.submit_lora(spec), range(6)))
    holding = {nodes[0].node_id: nodes[0].receive_type("lease", timeout=10)}
    doomed.kill()
    # What else reached a node before the end (a lease committed but never sent is not held).
    for node in nodes[1:]:
        with contextlib.suppress(Exception):
            holding[node.node_id] = node.receive_type("lease", timeout=0.5)
    before_the_crash = list(holding.values())

    # The nodes come back through the other replica, claiming what they hold, and finish every job.
    for node in nodes:
        node.move_to(survivor)
        lease = holding.get(node.node_id)
        node.connect(running=[{"job_id": lease["job_id"], "lease_id": lease["lease_id"]}] if lease else [])
    completed: dict[str, dict] = {}
    deadline = time.monotonic() + 60
    while len(completed) < len(jobs) and time.monotonic() < deadline:
        for node in nodes:
            lease = holding.pop(node.node_id, None)
            if lease is None:
                with contextlib.suppress(TimeoutError):
                    lease = node.receive_type("lease", timeout=0.5)
            if lease is not None:
                answer = node.report_result(lease, node.upload_result(lease))
                assert answer["accepted"], answer
                assert lease["job_id"] not in completed  # never run twice
                completed[lease["job_id"]] = lease
    assert set(completed) == {job["id"] for job in jobs}
    for job in jobs:
        assert buyer.job(job["id"])["state"] == "completed"
    # The jobs whose leases reached a node before the crash went on under those leases: one attempt.
    for lease in before_the_crash:
        assert completed[lease["job_id"]]["lease_id"] == lease["lease_id"]
    # Each job was paid for once, and its node paid once.
    spent = sum(job["price_micro"] for job in jobs)
    assert buyer.balance() == {"available_micro": before - spent, "escrow_micro": 0}
    earned = sum(node.http.me()["earnings"]["pending_micro"] for node in nodes)
    assert earned == sum(job["price_micro"] - job["price_micro"] // 10 for job in jobs)
    for node in nodes:
        node.disconnect()
    doomed.start()  # back, as ops' supervisor would bring it, for the next test
    wait_for(lambda: sum(replica.health()["leader"] for replica in replicas) == 1, 15, "one leader")


def test_when_the_leader_dies_the_other_replica_leads(replicas):
    leader = next(replica for replica in replicas if replica.health()["leader"])
    other = next(replica for replica in replicas if replica is not leader)
    leader.kill()  # SIGKILL: no goodbye; PostgreSQL sees its connections close
    started = time.monotonic()
    wait_for(lambda: other.health()["leader"], 10, "the surviving replica to lead")
    assert time.monotonic() - started < 5
