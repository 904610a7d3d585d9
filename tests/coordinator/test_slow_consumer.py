"""A slow consumer: one buyer reads a streamed answer far slower than its node writes it. The node is not
held back (its socket is read as fast as it sends), another buyer served by the same node at the same
time gets the whole of its answer at once, and the slow buyer still gets every piece, in order."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from compute_swarm.engine.jobs import DEFAULT_MODEL
from tests.coordinator.test_node_socket import ScriptedNode
from tests.swarm_processes import Coordinator

pytestmark = pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager")

PIECES = 1500
PIECE = "y" * 99 + " "  # 100 bytes, one token each: 150 KB of text, over 300 KB as server-sent events


def slow_stream(coordinator: Coordinator, api_key: str, reading: threading.Event) -> bytes:
    """A chat stream read through a small receive window, a little at a time."""
    body = json.dumps(
        {
            "model": DEFAULT_MODEL,
            "messages": [{"role": "user", "content": "Tell me everything"}],
            "max_tokens": PIECES + 16,
            "stream": True,
        }
    ).encode()
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{coordinator.port}\r\n"
        f"Authorization: Bearer {api_key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body
    with socket.socket() as connection:
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: the window
        connection.connect(("127.0.0.1", coordinator.port))
        connection.sendall(request)
        received = bytearray()
        reading.set()
        while True:
            chunk = connection.recv(1024)
            if not chunk:
                return bytes(received)
            received += chunk
            time.sleep(0.01)  # about 100 KB/s at most: the answer takes seconds to read


def test_a_slow_reader_holds_back_neither_the_node_nor_another_buyer(coordinator):
    slow_key = coordinator.create_buyer("slow reader", "50")
    quick_key = coordinator.create_buyer("quick reader", "50")
    node = ScriptedNode(coordinator, "serving two")
    node.connect(models=[DEFAULT_MODEL], inference_slots=2)
    reading = threading.Event()
    with ThreadPoolExecutor(2) as pool:
        slow = pool.submit(slow_stream, coordinator, slow_key, reading)
        first = node.receive_type("inference")
        assert reading.wait(10)
        # The node writes the slow buyer's whole answer as fast as its socket takes it.
        started = time.monotonic()
        for _ in range(PIECES):
            node.send(
                {"type": "inference_delta", "request_id": first["request_id"], "text": PIECE, "tokens": 1}
            )
        node.send({"type": "inference_done", "request_id": first["request_id"], "finish_reason": "stop",
                   "prompt_tokens": 0, "completion_tokens": PIECES})  # fmt: skip
        node_seconds = time.monotonic() - started
        # Meanwhile another buyer asks, and the same node answers at once.
        started = time.monotonic()
        quick = pool.submit(
            httpx.post,
            f"{coordinator.url}/v1/chat/completions",
            headers={"Authorization": f"Bearer {quick_key}"},
            json={"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8},
            timeout=30,
        )
        second = node.receive_type("inference")
        node.send(
            {"type": "inference_delta", "request_id": second["request_id"], "text": "Hello", "tokens": 1}
        )
        node.send({"type": "inference_done", "request_id": second["request_id"], "finish_reason": "stop",
                   "prompt_tokens": 0, "completion_tokens": 1})  # fmt: skip
        answer = quick.result(30)
        quick_seconds = time.monotonic() - started
        assert not slow.done()  # the slow buyer is still reading its answer
        streamed = slow.result(120)
    print(
        f"\nnode sent {PIECES} pieces in {node_seconds:.2f} s; the other buyer's answer took "
        f"{quick_seconds:.2f} s while the slow one read {len(streamed) / 1e3:.0f} KB"
    )
    assert node_seconds < 5
    assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"] == "Hello"
    assert quick_seconds < 3
    text = streamed.decode()
    assert text.startswith("HTTP/1.1 200") and text.count(PIECE.strip()) == PIECES
    assert "data: [DONE]" in text[-64:]  # the last event (the body is chunked)
    node.disconnect()
