"""Inference routing around a node whose llama.cpp crashes, against a real coordinator process: the nodes
are scripted message by message, so each can crash, recover or leave exactly when the test says."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from compute_swarm.coordinator.domain import pricing
from compute_swarm.engine.jobs import CATALOGUE, DEFAULT_MODEL
from compute_swarm.sdk.client import SwarmClient
from tests.coordinator.test_node_socket import TELEMETRY, ScriptedNode
from tests.swarm_processes import Coordinator, wait_for

pytestmark = pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager")

CRASH = f"the node's llama.cpp crashed (killed by SIGSEGV) while serving {DEFAULT_MODEL}"


def applied(node: ScriptedNode) -> None:
    """Return once the coordinator has acted on everything the node sent: it handles a node's messages
    in order, and answers this one (a checkpoint of no job) with a refusal."""
    node.send({"type": "checkpoint", "job_id": "none", "lease_id": "none", "step": 1, "sha256": "0" * 64})
    assert node.receive_type("ack")["accepted"] is False


def heartbeat(node: ScriptedNode, *, loaded: tuple[str, ...] = (), crashed: tuple[str, ...] = ()) -> None:
    crashed_models = [{"model": model, "message": CRASH} for model in crashed]
    node.send(
        {
            "type": "heartbeat",
            "telemetry": TELEMETRY,
            "loaded_models": list(loaded),
            "crashed_models": crashed_models,
        }
    )
    applied(node)


def answer(node: ScriptedNode) -> None:
    request = node.receive_type("inference")
    request_id = request["request_id"]
    node.send({"type": "inference_delta", "request_id": request_id, "text": "4", "tokens": 1})
    node.send(
        {
            "type": "inference_done",
            "request_id": request_id,
            "finish_reason": "stop",
            "prompt_tokens": 12,
            "completion_tokens": 1,
        }
    )


def chat(coordinator: Coordinator, api_key: str) -> httpx.Response:
    return httpx.post(
        f"{coordinator.url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {api_key}"},
        json={"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "2 + 2?"}], "max_tokens": 4},
        timeout=30,
    )


def test_a_crash_sends_the_request_elsewhere_and_the_model_away_from_that_node_until_it_recovers(
    coordinator: Coordinator,
) -> None:
    api_key = coordinator.create_buyer("crash-buyer", "5")
    account = SwarmClient(coordinator.url, api_key)
    before = account.balance()["available_micro"]
    crashing, standby = ScriptedNode(coordinator, "crashing"), ScriptedNode(coordinator, "standby")
    crashing.connect(models=[DEFAULT_MODEL], inference_slots=1)
    standby.connect(inference_slots=1)
    heartbeat(crashing, loaded=(DEFAULT_MODEL,))  # so it is the node routing prefers
    answered = []
    with ThreadPoolExecutor(1) as buyer:
        # The preferred node crashes on the request; the other node answers it.
        asked = buyer.submit(chat, coordinator, api_key)
        request = crashing.receive_type("inference")
        crashing.send(
            {
                "type": "inference_failed",
                "request_id": request["request_id"],
                "kind": "crashed",
                "message": CRASH,
            }
        )
        answer(standby)
        answered.append(asked.result(30))

        # The crash alone, before any heartbeat, keeps the model away from the node that crashed.
        asked = buyer.submit(chat, coordinator, api_key)
        answer(standby)
        answered.append(asked.result(30))

        # Its heartbeat no longer reports the crash (a fresh process served the model): it is preferred again.
        heartbeat(crashing, loaded=(DEFAULT_MODEL,))
        asked = buyer.submit(chat, coordinator, api_key)
        answer(crashing)
        answered.append(asked.result(30))
    assert [response.status_code for response in answered] == [200, 200, 200]
    assert all(response.json()["choices"][0]["message"]["content"] == "4" for response in answered)

    # It crashes again (told in a heartbeat) and the other node leaves: the buyer hears why at once,
    # instead of waiting for capacity.
    heartbeat(crashing, crashed=(DEFAULT_MODEL,))
    standby.disconnect()
    wait_for(lambda: coordinator.health()["nodes_connected"] == 1, 20, "the standby node to leave")
    started = time.monotonic()
    refused = chat(coordinator, api_key)
    assert time.monotonic() - started < 5
    assert refused.status_code == 502
    error = refused.json()["error"]
    assert error["code"] == "node_crashed" and error["type"] == "server_error"
    assert error["message"] == f"{CRASH}; no other node can serve {DEFAULT_MODEL} now, try again later"

    # Charged for the three answers, nothing for the refusal.
    price = sum(
        pricing.inference_price_micro(CATALOGUE[DEFAULT_MODEL], response.json()["usage"]["total_tokens"])
        for response in answered
    )
    assert before - account.balance()["available_micro"] == price > 0
    crashing.disconnect()
