"""A node whose llama.cpp crashes, as a buyer meets it: a real coordinator and a real node agent on
loopback, the node's inference child really segfaulting (tests.crashing_llama), the official client."""

from __future__ import annotations

import time

import pytest

from compute_swarm.engine.jobs import DEFAULT_MODEL
from compute_swarm.sdk.client import SwarmClient
from tests.coordinator.test_node_socket import check_ledger
from tests.crashing_llama import CrashingLlama
from tests.swarm_processes import Coordinator, Node, wait_for

openai = pytest.importorskip("openai")
pytest.importorskip("llama_cpp")

CRASH = f"the node's llama.cpp crashed (killed by SIGSEGV) while serving {DEFAULT_MODEL}"


def test_a_buyer_hears_of_the_crash_in_seconds_the_node_is_spared_and_nothing_is_charged(tmp_path):
    from compute_swarm.engine.models import fetch_catalogue_model

    fetch_catalogue_model(DEFAULT_MODEL)  # in the shared cache, where the node finds it
    llama = CrashingLlama(tmp_path / "llama")
    coordinator = Coordinator(tmp_path / "coordinator").start()
    node = Node(coordinator, tmp_path / "node", environment=llama.environment()).start()
    try:
        wait_for(lambda: coordinator.health()["nodes_connected"] == 1, 60, "the node to connect")
        api_key = coordinator.create_buyer("crash-buyer", "5")
        account = SwarmClient(coordinator.url, api_key)
        before = account.balance()
        client = openai.OpenAI(base_url=f"{coordinator.url}/v1", api_key=api_key, max_retries=0, timeout=60)
        messages = [{"role": "user", "content": "What is 2 + 2?"}]

        # Streamed: the node starts llama.cpp, which crashes at its first evaluation.
        started = time.monotonic()
        with pytest.raises(openai.APIStatusError) as crashed:
            for _ in client.chat.completions.create(
                model=DEFAULT_MODEL, messages=messages, max_tokens=8, stream=True
            ):
                pass
        assert time.monotonic() - started < 10, node.log()[-3000:]
        assert crashed.value.status_code == 502 and crashed.value.code == "node_crashed"
        assert CRASH in crashed.value.message, node.log()[-3000:]
        assert len(llama.starts()) == 1 and len(llama.crashes()) == 1

        # Asked again: refused at once, and the node does not start llama.cpp to crash it again.
        started = time.monotonic()
        with pytest.raises(openai.APIStatusError) as refused:
            client.chat.completions.create(model=DEFAULT_MODEL, messages=messages, max_tokens=8)
        assert time.monotonic() - started < 3
        assert refused.value.code == "node_crashed" and CRASH in refused.value.message
        assert len(llama.starts()) == 1

        assert account.balance() == before  # both holds came back whole
    finally:
        node.kill()
        coordinator.kill()
    check_ledger(coordinator.data_dir)
