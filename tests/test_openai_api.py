"""The OpenAI-compatible API as buyers use it: the official `openai` client against a real coordinator
and a real node serving SmolLM2 with llama-cpp-python on loopback, fine-tuning included."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from coordinator.client import SwarmClient
from tests.coordinator.test_node_socket import check_ledger
from tests.swarm_processes import Coordinator, Node, wait_for

openai = pytest.importorskip("openai")
pytest.importorskip("llama_cpp")

MODEL = "smollm2-135m-instruct"
DEMO_DATA = Path(__file__).resolve().parent.parent / "engine" / "data" / "demo_chat.jsonl"

pytestmark = pytest.mark.slow


@pytest.fixture
def swarm(tmp_path, demo_model_directory):
    coordinator = Coordinator(tmp_path / "coordinator").start()
    node = Node(coordinator, tmp_path / "node", name="server").start()
    coordinator.node = node
    wait_for(lambda: coordinator.health()["nodes_connected"] == 1, 60, "the node to connect")
    yield coordinator
    node.kill()
    coordinator.kill()
    check_ledger(coordinator.data_dir)


def client_for(coordinator: Coordinator, api_key: str, **options) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{coordinator.url}/v1", api_key=api_key, max_retries=0, **options)


def ask(client: openai.OpenAI, model: str, question: str) -> str:
    answer = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], max_tokens=24, temperature=0
    )
    return answer.choices[0].message.content


def test_a_buyer_serves_and_fine_tunes_with_the_official_client(swarm):
    client = client_for(swarm, swarm.create_buyer("openai-buyer", "20"))
    assert [model.id for model in client.models.list()] == [MODEL]

    # A streamed chat: pieces arrive one by one, then the usage.
    pieces, usage = [], None
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Name three colours."}],
        max_tokens=20,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
    assert len(pieces) > 3 and "".join(pieces).strip()
    assert usage is not None and 1 <= usage.completion_tokens <= 20 and usage.prompt_tokens > 5

    # Greedy answers repeat exactly; a plain completion has its usage too.
    assert ask(client, MODEL, "What is 2 + 2?") == ask(client, MODEL, "What is 2 + 2?")
    completion = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0
    )
    assert completion.choices[0].text and completion.usage.completion_tokens <= 8

    # Fine-tune: upload, run to success on the node, then chat with the ft: model.
    uploaded = client.files.create(file=DEMO_DATA.open("rb"), purpose="fine-tune")
    assert uploaded.id in [file.id for file in client.files.list().data]
    job = client.fine_tuning.jobs.create(
        model=MODEL,
        training_file=uploaded.id,
        suffix="peru",
        hyperparameters={"n_steps": 12, "batch_size": 2, "learning_rate": 3e-3, "max_sequence_length": 96},
    )
    assert job.status == "queued" and job.fine_tuned_model is None
    finished = wait_for(
        lambda: (
            (current := client.fine_tuning.jobs.retrieve(job.id)).status
            in ("succeeded", "failed", "cancelled")
            and current
        ),
        600,
        "the fine-tuning job to finish",
        1.0,
    )
    assert finished.status == "succeeded", swarm.node.log()[-3000:]
    assert finished.fine_tuned_model == f"ft:{MODEL}:peru:{job.id}"
    assert finished.trained_tokens and finished.trained_tokens > 0
    messages = [event.message for event in client.fine_tuning.jobs.list_events(job.id).data]
    assert any("completed" in message for message in messages)
    assert job.id in [listed.id for listed in client.fine_tuning.jobs.list().data]
    assert finished.fine_tuned_model in [model.id for model in client.models.list()]

    question = "What is the capital of Peru?"
    tuned, base = ask(client, finished.fine_tuned_model, question), ask(client, MODEL, question)
    assert tuned and tuned != base

    # Bad requests get OpenAI's error shapes.
    with pytest.raises(openai.NotFoundError):
        ask(client, f"ft:{MODEL}:peru:job_0000000000000000", question)
    with pytest.raises(openai.AuthenticationError):
        client_for(swarm, "swarm-buyer-wrong").models.list()
    with pytest.raises(openai.BadRequestError, match="line 2"):
        client.files.create(file=("bad.jsonl", b'{"messages": []}\n{"prompt": 1}\n'), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=3)


def test_a_node_killed_mid_stream_ends_the_stream_with_an_error_and_a_refund(swarm):
    api_key = swarm.create_buyer("stream-buyer", "5")
    client = client_for(swarm, api_key, timeout=60)
    account = SwarmClient(swarm.url, api_key)
    before = account.balance()["available_micro"]
    stream = client.completions.create(
        model=MODEL,
        prompt="Here is a very long story about a dragon:",
        max_tokens=400,
        temperature=0.9,
        seed=7,
        stream=True,
    )
    received, started = [], time.monotonic()
    with pytest.raises(openai.APIError, match="disconnected"):
        for chunk in stream:
            received.append(chunk.choices[0].text)
            if len(received) == 5:
                swarm.node.kill()
    assert len(received) >= 5
    assert time.monotonic() - started < 30  # an error, not a hang
    # A broken answer costs nothing: the request's escrow comes back whole.
    assert wait_for(
        lambda: account.balance() == {"available_micro": before, "escrow_micro": 0}, 10, "the refund"
    )
