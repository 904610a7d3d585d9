"""A hostile node serving live inference, against a real coordinator process (issue 16, H1): a node
that floods a request with text gets neither the coordinator's memory nor the buyer's money, and one
that floods the socket is cut off."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from compute_swarm.engine.jobs import DEFAULT_MODEL
from compute_swarm.sdk.client import SwarmClient
from tests.coordinator.test_node_socket import ScriptedNode
from tests.swarm_processes import Coordinator

pytestmark = pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager")

# What the review measured: 6,400 deltas of 16 KB (105 MB), each claiming no token.
FLOOD_DELTAS = 6400
FLOOD_TEXT = "x" * (16 * 1024)


def peak_memory_bytes(process_id: int) -> int:
    """The process's peak resident memory (VmHWM), which a flood would raise and nothing lowers."""
    for line in Path(f"/proc/{process_id}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc status")


def chat(coordinator: Coordinator, api_key: str, max_tokens: int) -> httpx.Response:
    return httpx.post(
        f"{coordinator.url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {api_key}"},
        json={
            "model": DEFAULT_MODEL,
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": max_tokens,
        },
        timeout=60,
    )


def flood(node: ScriptedNode, request_id: str) -> int:
    """Send the flood as fast as the socket takes it, then the end of the answer; how many deltas went
    out before the coordinator closed the socket."""
    sent = 0
    try:
        for _ in range(FLOOD_DELTAS):
            node.send({"type": "inference_delta", "request_id": request_id, "text": FLOOD_TEXT, "tokens": 0})
            sent += 1
        node.send({"type": "inference_done", "request_id": request_id, "finish_reason": "length",
                   "prompt_tokens": 0, "completion_tokens": 0})  # fmt: skip
    except ConnectionClosed:
        pass
    return sent


def test_a_node_flooding_an_answer_is_cut_off_and_the_buyer_pays_nothing(coordinator):
    api_key = coordinator.create_buyer("flooded buyer", "5")
    buyer = SwarmClient(coordinator.url, api_key)
    before = buyer.balance()["available_micro"]
    node = ScriptedNode(coordinator, "flooder")
    node.connect(models=[DEFAULT_MODEL], inference_slots=1)
    assert coordinator.process is not None
    memory_before = peak_memory_bytes(coordinator.process.pid)
    with ThreadPoolExecutor(1) as pool:
        asked = pool.submit(chat, coordinator, api_key, 16)
        request = node.receive_type("inference")
        started = time.monotonic()
        sent = flood(node, request["request_id"])
        answer = asked.result(60)
    grown = peak_memory_bytes(coordinator.process.pid) - memory_before
    print(f"{sent} deltas sent in {time.monotonic() - started:.1f} s; the coordinator grew {grown >> 20} MiB")

    # Before: a 200 with 104,857,888 bytes, usage 0/0, and a 400 MB peak. Now the answer stops at the
    # first piece past what 16 tokens can hold, and the buyer is refunded whole.
    assert answer.status_code == 502, answer.text[:200]
    error = answer.json()["error"]
    assert "bytes of text for max_tokens 16" in error["message"] and "nothing was charged" in error["message"]
    assert len(answer.content) < 4096
    assert grown < 64 << 20
    assert buyer.balance() == {"available_micro": before, "escrow_micro": 0}
    # The rest of the flood is more than a node may send: the coordinator closed the socket.
    assert sent < FLOOD_DELTAS


def test_a_streamed_answer_stops_at_the_flood_and_ends_with_an_error(coordinator):
    api_key = coordinator.create_buyer("streaming buyer", "5")
    buyer = SwarmClient(coordinator.url, api_key)
    before = buyer.balance()["available_micro"]
    node = ScriptedNode(coordinator, "streaming flooder")
    node.connect(models=[DEFAULT_MODEL], inference_slots=1)

    def stream() -> list[str]:
        with httpx.stream(
            "POST",
            f"{coordinator.url}/v1/chat/completions",
            headers={"Authorization": f"Bearer {api_key}"},
            json={
                "model": DEFAULT_MODEL,
                "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 4,
                "stream": True,
            },
            timeout=60,
        ) as response:
            assert response.status_code == 200
            return [line for line in response.iter_lines() if line]

    with ThreadPoolExecutor(1) as pool:
        asked = pool.submit(stream)
        request = node.receive_type("inference")
        # Honest-looking pieces within the bound (4 tokens: 512 bytes) reach the buyer...
        for word in ("Hel", "lo"):
            node.send(
                {"type": "inference_delta", "request_id": request["request_id"], "text": word, "tokens": 1}
            )
        # ...then one piece too many bytes ends it.
        node.send(
            {"type": "inference_delta", "request_id": request["request_id"], "text": "y" * 600, "tokens": 1}
        )
        lines = asked.result(60)
    body = "\n".join(lines)
    assert '"Hel"' in body and '"lo"' in body and "y" * 600 not in body
    assert "bytes of text for max_tokens 4" in body and lines[-1] == "data: [DONE]"
    assert buyer.balance() == {"available_micro": before, "escrow_micro": 0}
    node.disconnect()


def llama_cpp_counts(messages: list[dict], answer: str) -> tuple[int, int]:
    """The prompt and answer tokens as llama.cpp itself counts them, with the model's own template."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from compute_swarm.engine.models import fetch_catalogue_model

    model = llama_cpp.Llama(str(fetch_catalogue_model(DEFAULT_MODEL)), vocab_only=True, verbose=False)
    template = model.metadata["tokenizer.chat_template"]
    prompt = Jinja2ChatFormatter(template=template, eos_token="", bos_token="")(messages=messages).prompt
    return (
        len(model.tokenize(prompt.encode(), add_bos=False, special=True)),
        len(model.tokenize(answer.encode(), add_bos=False, special=False)),
    )


def test_the_buyer_pays_the_tokens_the_coordinator_counts_not_what_the_node_claims(coordinator):
    from compute_swarm.coordinator.domain import pricing
    from compute_swarm.engine.jobs import CATALOGUE

    messages = [{"role": "user", "content": "What is the capital of Peru? Answer in a sentence."}]
    pieces = ["The capital", " of Peru", " is Lima."]
    expected_prompt, expected_answer = llama_cpp_counts(messages, "".join(pieces))
    api_key = coordinator.create_buyer("counted buyer", "5")
    buyer = SwarmClient(coordinator.url, api_key)
    before = buyer.balance()["available_micro"]
    node = ScriptedNode(coordinator, "overclaimer")
    node.connect(models=[DEFAULT_MODEL], inference_slots=1)

    def ask() -> httpx.Response:
        return httpx.post(
            f"{coordinator.url}/v1/chat/completions",
            headers={"Authorization": f"Bearer {api_key}"},
            json={"model": DEFAULT_MODEL, "messages": messages, "max_tokens": 64},
            timeout=60,
        )

    with ThreadPoolExecutor(1) as pool:
        asked = pool.submit(ask)
        request_id = node.receive_type("inference")["request_id"]
        # Each piece claims 16 tokens, and the end claims a prompt of 5,000.
        for piece in pieces:
            node.send({"type": "inference_delta", "request_id": request_id, "text": piece, "tokens": 16})
        node.send({"type": "inference_done", "request_id": request_id, "finish_reason": "stop",
                   "prompt_tokens": 5000, "completion_tokens": 48})  # fmt: skip
        answer = asked.result(60)
    assert answer.status_code == 200, answer.text
    usage = answer.json()["usage"]
    # Before: 48 completion tokens (the claims, within one per byte) and the prompt's whole bound.
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (expected_prompt, expected_answer)
    price = pricing.inference_price_micro(CATALOGUE[DEFAULT_MODEL], expected_prompt + expected_answer)
    assert before - buyer.balance()["available_micro"] == price
    node.disconnect()
