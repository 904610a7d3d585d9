"""desktop.serving with a real llama.cpp child that really crashes (tests.crashing_llama): the node
refuses the model, reports it, probes it with back-off, and serves it again once a probe does."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from compute_swarm import protocol
from compute_swarm.desktop.crashes import ProbeBackoff
from compute_swarm.desktop.serving import InferenceServing
from compute_swarm.desktop.workspace import Workspace
from compute_swarm.engine.jobs import CATALOGUE, DEFAULT_MODEL, ChatMessage, Sampling
from tests.crashing_llama import CrashingLlama

pytest.importorskip("llama_cpp")


def chat(request_id: str, adapter_sha256: str | None = None) -> protocol.InferenceRequest:
    return protocol.InferenceRequest(
        request_id=request_id,
        model=DEFAULT_MODEL,
        model_file=protocol.ModelFiles.of(CATALOGUE[DEFAULT_MODEL], with_weights=False).gguf,
        adapter_sha256=adapter_sha256,
        messages=(ChatMessage(role="user", content="What is 2 + 2?"),),
        sampling=Sampling(max_tokens=8, temperature=0.0),
    )


async def until(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)
    return value


def test_a_crashed_model_is_refused_reported_and_probed_until_a_fresh_child_serves_it(
    demo_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    llama = CrashingLlama(tmp_path / "llama")
    for name, value in llama.environment().items():
        monkeypatch.setenv(name, value)
    backoff = ProbeBackoff(first_seconds=0.5, longest_seconds=4.0)

    async def scenario() -> None:
        posted: list[protocol.NodeMessage] = []
        advertised: list[tuple[tuple[str, ...], tuple[protocol.CrashedModel, ...]]] = []
        serving = InferenceServing(
            Workspace(tmp_path / "node"),
            posted.append,
            client=lambda: None,
            resolve_base_model=lambda name, file: demo_gguf,
            slots=1,
            advertisement_changed=lambda: advertised.append((serving.loaded_models, serving.crashed_models)),
            probe_backoff=backoff,
        )

        def ending(request_id: str):
            return next(
                (
                    message
                    for message in posted
                    if isinstance(message, protocol.InferenceDone | protocol.InferenceFailed)
                    and message.request_id == request_id
                ),
                None,
            )

        try:
            serving.handle(chat("first"))
            crashed = await until(lambda: ending("first"), 120, "the first request to end")
            assert isinstance(crashed, protocol.InferenceFailed) and crashed.kind == "crashed"
            assert crashed.message == (
                f"the node's llama.cpp crashed (killed by SIGSEGV) while serving {DEFAULT_MODEL}"
            )
            # The agent is told at once, and what it would send says so.
            report = (protocol.CrashedModel(model=DEFAULT_MODEL, message=crashed.message),)
            assert advertised == [((), report)]

            # Refused at once, without a child, for the model and for an adapter on it.
            serving.handle(chat("second"))
            serving.handle(chat("tuned", adapter_sha256="a" * 64))
            for request_id in ("second", "tuned"):
                refused = ending(request_id)
                assert isinstance(refused, protocol.InferenceFailed)
                assert (refused.kind, refused.message) == ("crashed", crashed.message)
            assert len(llama.starts()) == 1

            # Probes in fresh children crash too, each after a wait twice as long as the last.
            await until(lambda: len(llama.crashes()) >= 3, 120, "two probes")
            first, second, third = llama.crashes()[:3]
            assert second - first >= backoff.first_seconds
            assert third - second >= 2 * backoff.first_seconds
            assert serving.crashed_models == report and len(advertised) == 1

            # Once llama.cpp behaves, the next probe serves and the model is offered again, loaded.
            llama.heal()
            await until(lambda: not serving.crashed_models, 120, "a probe to serve")
            assert advertised[-1] == ((DEFAULT_MODEL,), ())
            children = len(llama.starts())
            serving.handle(chat("after"))
            done = await until(lambda: ending("after"), 120, "the request after the probe")
            assert isinstance(done, protocol.InferenceDone) and done.completion_tokens > 0
            assert len(llama.starts()) == children  # the probe's child serves it
        finally:
            await asyncio.to_thread(serving.close)

    asyncio.run(scenario())
