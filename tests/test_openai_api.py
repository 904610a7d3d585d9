"""The OpenAI-compatible API as buyers use it: the official `openai` client against a real coordinator
and a real node serving SmolLM2 with llama-cpp-python on loopback, fine-tuning included."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from compute_swarm.engine.jobs import DEMO_CHAT_DATASET
from compute_swarm.sdk.client import FINAL_JOB_STATES, SwarmClient
from tests.conftest import write_jsonl
from tests.coordinator.test_node_socket import TELEMETRY, ScriptedNode, check_ledger
from tests.swarm_processes import Coordinator, Node, run_cli, wait_for

openai = pytest.importorskip("openai")
pytest.importorskip("llama_cpp")

MODEL = "smollm2-135m-instruct"

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


def read_completions(account: SwarmClient, job_id: str, directory: Path) -> list[dict]:
    account.download_result(job_id, directory)
    return [json.loads(line) for line in (directory / "completions.jsonl").read_text().splitlines()]


def test_a_buyer_serves_and_fine_tunes_with_the_official_client(swarm):
    api_key = swarm.create_buyer("openai-buyer", "20")
    client = client_for(swarm, api_key)
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
    # Beside OpenAI's fields, where the node had the model: the demo model's 30 blocks and its output
    # layer, on this machine's CPU build of llama.cpp.
    assert completion.model_extra["offload"] == {"gpu_layers": 0, "layers": 31, "description": "CPU only"}

    # Fine-tune: upload, run to success on the node, then chat with the ft: model.
    uploaded = client.files.create(file=DEMO_CHAT_DATASET.open("rb"), purpose="fine-tune")
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

    # The fine-tuned model answers a batch job too (the node fetches its adapter for the lease), with
    # the same greedy answer as the live request on the same machine.
    account = SwarmClient(swarm.url, api_key)
    prompts = write_jsonl(
        swarm.data_dir / "peru.jsonl", [{"messages": [{"role": "user", "content": question}]}]
    )
    batch = account.submit_inference(
        {
            "base_model": finished.fine_tuned_model,
            "dataset": account.upload_file(prompts, purpose="prompts")["id"],
            "sampling": {"max_tokens": 24, "temperature": 0.0},
        }
    )
    batch = wait_for(
        lambda: (job := account.job(batch["id"]))["state"] in FINAL_JOB_STATES and job, 300, "the batch"
    )
    assert batch["state"] == "completed", batch
    answers = read_completions(account, batch["id"], swarm.data_dir / "peru-answers")
    assert [answer["message"]["content"] for answer in answers] == [tuned]

    # Bad requests get OpenAI's error shapes.
    with pytest.raises(openai.NotFoundError):
        ask(client, f"ft:{MODEL}:peru:job_0000000000000000", question)
    with pytest.raises(openai.AuthenticationError):
        client_for(swarm, "swarm-buyer-wrong").models.list()
    with pytest.raises(openai.BadRequestError, match="line 2"):
        client.files.create(file=("bad.jsonl", b'{"messages": []}\n{"prompt": 1}\n'), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=3)
    with pytest.raises(openai.APIStatusError) as broke:
        ask(client_for(swarm, swarm.create_buyer("broke-buyer", "0")), MODEL, question)
    assert broke.value.status_code == 402 and broke.value.code == "insufficient_quota"


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


def test_a_batch_of_prompts_is_answered_on_the_swarm_and_charged_by_its_tokens(swarm, tmp_path):
    api_key = swarm.create_buyer("batch-buyer", "5")
    account = SwarmClient(swarm.url, api_key)
    environment = {"SWARM_COORDINATOR": swarm.url, "SWARM_API_KEY": api_key}
    prompts = write_jsonl(
        tmp_path / "prompts.jsonl",
        [
            {"id": "colours", "messages": [{"role": "user", "content": "Name three colours."}]},
            "",
            {"id": "france", "prompt": "The capital of France is"},
        ],
    )

    # A prompts file is checked line by line at upload, and a fine-tuning dataset is not a prompts file.
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "fine"}, {"messages": []}])
    refused = run_cli("upload", "--purpose", "prompts", str(bad), environment=environment)
    assert refused.returncode == 1 and "line 2" in refused.stderr
    dataset = account.upload_file(DEMO_CHAT_DATASET)["id"]
    refused = run_cli("submit", "inference", "--data", dataset, environment=environment)
    assert refused.returncode == 1 and "prompts" in refused.stderr

    before = account.balance()["available_micro"]
    submitted = run_cli(
        "submit",
        "inference",
        "--data",
        str(prompts),
        "--max-tokens",
        "16",
        "--temperature",
        "0",
        "--follow",
        environment=environment,
        timeout=300,
    )
    assert submitted.returncode == 0, submitted.stderr + swarm.node.log()[-3000:]
    job_id = submitted.stdout.strip().splitlines()[-1]
    downloaded = run_cli("download", job_id, "--output", str(tmp_path / "answers"), environment=environment)
    assert downloaded.returncode == 0, downloaded.stderr
    answers = [
        json.loads(line) for line in (tmp_path / "answers" / "completions.jsonl").read_text().splitlines()
    ]
    assert [(answer["line"], answer["id"]) for answer in answers] == [(1, "colours"), (2, "france")]
    assert answers[0]["message"]["role"] == "assistant" and answers[0]["message"]["content"].strip()
    assert answers[1]["text"].strip() and 1 <= answers[1]["completion_tokens"] <= 16

    # The same greedy answer as a live request on the same node.
    client = client_for(swarm, api_key)
    live = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=16, temperature=0
    )
    assert live.choices[0].text == answers[1]["text"]

    # Charged for the tokens it used, not the most it could have: the rest of the hold came back.
    job = account.job(job_id)
    assert job["state"] == "completed" and job["metrics"]["completion_tokens"] == sum(
        answer["completion_tokens"] for answer in answers
    )
    assert job["metrics"]["offload"] == {"gpu_layers": 0, "layers": 31, "description": "CPU only"}
    charges = [entry for entry in account.ledger() if entry["job_id"] == job_id]
    held = -sum(entry["amount_micro"] for entry in charges if entry["kind"] == "escrow")
    returned = sum(entry["amount_micro"] for entry in charges if entry["kind"] == "charge")
    assert 0 < job["price_micro"] == held - returned and returned > 0
    live_price = before - job["price_micro"] - account.balance()["available_micro"]
    assert live_price > 0  # the live request above, charged on its own
    shown = run_cli("job", job_id, environment=environment)
    assert "batch inference" in shown.stdout and "completion" in shown.stdout


@pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager")
def test_a_request_whose_node_drops_before_the_first_token_is_answered_by_another(swarm):
    api_key = swarm.create_buyer("failover-buyer", "5")
    client = client_for(swarm, api_key, timeout=120)
    expected = ask(client, MODEL, "What is 2 + 2?")  # served by the real node, which loads the model

    # A node that claims the model loaded on a GPU is preferred, takes the request, and vanishes. (The
    # GPU decides it: by now the real node may report the model loaded too, and its round trip is
    # timed while the flaky node's is not.)
    gpu = {"index": 0, "vendor": "nvidia", "name": "test gpu", "backend": "cuda",
           "memory_total_bytes": 24 << 30, "memory_free_bytes": 22 << 30}  # fmt: skip
    telemetry = {**TELEMETRY, "gpus": [gpu], "backends": ["cuda", "cpu"]}
    flaky = ScriptedNode(swarm, "flaky")
    flaky.connect(models=[MODEL], inference_slots=1, telemetry=telemetry)
    flaky.send({"type": "heartbeat", "telemetry": telemetry, "loaded_models": [MODEL]})
    wait_for(lambda: swarm.health()["nodes_connected"] == 2, 20, "the flaky node")
    answer = {}
    asking = threading.Thread(target=lambda: answer.setdefault("text", ask(client, MODEL, "What is 2 + 2?")))
    asking.start()
    request = flaky.receive_type("inference", timeout=30)
    assert request["model"] == MODEL
    flaky.disconnect()
    asking.join(120)
    assert answer.get("text") == expected

    # The node that answered is paid; the one that vanished is not.
    earnings = flaky.http.me()["earnings"]
    assert earnings["pending_micro"] == 0 and earnings["available_micro"] == 0
