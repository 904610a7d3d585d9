"""engine.inference and engine.inference_server on the real demo model (SmolLM2-135M, Q4_1 GGUF)."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import time
from pathlib import Path

import pytest

llama_cpp = pytest.importorskip("llama_cpp")

from compute_swarm.engine import artifacts, inference  # noqa: E402
from compute_swarm.engine.inference import (  # noqa: E402
    GenerationDone,
    GenerationError,
    GenerationRequest,
    ModelPool,
    TextDelta,
)
from compute_swarm.engine.inference_server import InferenceProcess, ServerOptions  # noqa: E402
from compute_swarm.engine.jobs import ChatMessage, InferenceJobSpec, Sampling  # noqa: E402
from compute_swarm.engine.resources import estimate_inference_memory  # noqa: E402
from tests.crashing_llama import CrashingLlama  # noqa: E402


@pytest.fixture(scope="module")
def gguf() -> Path:
    from compute_swarm.engine.models import DEFAULT_MODEL, fetch_catalogue_model

    return fetch_catalogue_model(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def pool(gguf):
    models = ModelPool(max_models=2, context_tokens=1024)
    yield models
    models.close()


def chat(gguf: Path, question: str, **sampling) -> GenerationRequest:
    return GenerationRequest(
        request_id="request-1",
        model=str(gguf),
        messages=(ChatMessage(role="user", content=question),),
        sampling=Sampling(**{"max_tokens": 24, "temperature": 0.0, **sampling}),
    )


def test_greedy_answers_repeat_and_stream_in_pieces_with_their_counts(pool, gguf):
    request = chat(gguf, "Name three colours.")
    events = list(inference.generate(pool, request))
    deltas, done = events[:-1], events[-1]
    assert len(deltas) > 3 and all(isinstance(delta, TextDelta) for delta in deltas)
    assert (
        isinstance(done, GenerationDone) and sum(delta.tokens for delta in deltas) == done.completion_tokens
    )
    text = "".join(delta.text for delta in deltas)
    assert text.strip() and inference.complete(pool, request) == (text, done)
    # The GGUF's chat template wraps the question: the prompt holds more than its own tokens.
    llm = pool.get(str(gguf))
    assert done.prompt_tokens > len(llm.tokenize(b"Name three colours.", add_bos=False)) + 4


def test_max_tokens_and_stop_sequences_end_an_answer(pool, gguf):
    text, done = inference.complete(pool, chat(gguf, "Write a long story about a dragon.", max_tokens=12))
    assert (done.finish_reason, done.completion_tokens) == ("length", 12)
    words = text.split()
    stop = words[len(words) // 2]
    stopped, done = inference.complete(pool, chat(gguf, "Write a long story about a dragon.", stop=(stop,)))
    assert done.finish_reason == "stop" and stop not in stopped and text.startswith(stopped.rstrip())


def test_sampling_is_seeded(pool, gguf):
    def sample(seed: int) -> str:
        return inference.complete(
            pool, chat(gguf, "Tell me a story.", temperature=1.0, seed=seed, max_tokens=32)
        )[0]

    assert sample(1) == sample(1)
    assert len({sample(1), sample(2), sample(3)}) > 1


def test_coalesced_deltas_keep_the_text_and_counts_and_send_the_first_at_once():
    times = iter([0.0, 0.01, 0.02, 0.06, 0.07, 0.2])
    events = [TextDelta(request_id="r", text=piece, tokens=1) for piece in "abcdef"]
    done = GenerationDone(request_id="r", finish_reason="stop", prompt_tokens=3, completion_tokens=6)
    out = list(inference.coalesce(iter([*events, done]), 0.05, clock=lambda: next(times)))
    assert [(event.text, event.tokens) for event in out[:-1]] == [("a", 1), ("bcd", 3), ("ef", 2)]
    assert out[-1] is done


def test_the_pool_evicts_the_least_recently_used_by_count_and_by_memory(gguf, tmp_path):
    copy = tmp_path / "copy.gguf"
    shutil.copyfile(gguf, copy)
    needed = estimate_inference_memory(gguf, None, 512)
    # Room for one model and a half: a second one only loads once the first is gone.
    pool = ModelPool(
        max_models=4,
        context_tokens=512,
        free_memory=lambda on_gpu: int(1.5 * needed / 0.9) - len(pool.loaded) * needed,
    )
    try:
        pool.get(str(gguf))
        pool.get(str(copy))
        assert pool.loaded == [(str(copy), None)]
    finally:
        pool.close()
    starved = ModelPool(context_tokens=512, free_memory=lambda on_gpu: needed // 2)
    with pytest.raises(GenerationError, match="needs about") as refused:
        starved.get(str(gguf))
    assert refused.value.kind == "unavailable"
    with pytest.raises(GenerationError, match="not on this machine"):
        starved.get(str(tmp_path / "missing.gguf"))
    counted = ModelPool(max_models=1, context_tokens=512)
    try:
        counted.get(str(gguf))
        counted.get(str(copy))
        assert counted.loaded == [(str(copy), None)]
    finally:
        counted.close()


def test_a_batch_job_answers_every_line_in_order(pool, gguf, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"id": "a", "messages": [{"role": "user", "content": "Say hello."}]})
        + "\n\n"
        + json.dumps({"prompt": "One, two, three,"})
        + "\n"
    )
    spec = InferenceJobSpec(
        base_model=str(gguf), dataset=str(prompts), sampling=Sampling(max_tokens=8, temperature=0.0)
    )
    records = []
    completed = inference.run_batch(spec, tmp_path / "out", pool=pool, report=records.append)
    answers = [
        json.loads(line) for line in (tmp_path / "out" / artifacts.COMPLETIONS_FILE).read_text().splitlines()
    ]
    assert [(answer["line"], answer.get("id")) for answer in answers] == [(1, "a"), (2, None)]
    assert answers[0]["message"]["role"] == "assistant" and answers[1]["text"]
    assert completed.steps == 2 and completed.train_tokens == sum(a["completion_tokens"] for a in answers)
    assert [record.step for record in records if record.type == "progress"] == [1, 2]


def test_the_inference_process_serves_survives_a_crash_and_reports_failures(gguf, tmp_path):
    server = InferenceProcess(ServerOptions(context_tokens=1024), log_directory=tmp_path)
    try:

        def serve(request: GenerationRequest) -> list:
            events: queue.Queue = queue.Queue()
            server.submit(request, events.put)
            received = []
            while not received or received[-1].type == "delta":
                received.append(events.get(timeout=120))
            return received

        first = serve(chat(gguf, "What is 2 + 2?"))
        assert first[-1].type == "done" and "".join(event.text for event in first[:-1]).strip()
        missing = serve(chat(tmp_path / "missing.gguf", "Hi"))
        assert [(event.type, event.kind) for event in missing] == [("failed", "unavailable")]

        def start_long_story(request_id: str) -> queue.Queue:
            """A long answer, once its first piece arrived."""
            events: queue.Queue = queue.Queue()
            request = chat(gguf, "Write a long story.", max_tokens=400)
            server.submit(request.model_copy(update={"request_id": request_id}), events.put)
            assert events.get(timeout=120).type == "delta"
            return events

        def ending(events: queue.Queue):
            while (event := events.get(timeout=30)).type == "delta":
                pass
            return event

        # A child killed mid-answer ends that request with a failure; the next one gets a new child.
        events = start_long_story("long")
        os.kill(server._process.pid, signal.SIGKILL)
        failed = ending(events)
        assert failed.type == "failed" and failed.kind == "crashed" and "killed by SIGKILL" in failed.message
        again = serve(chat(gguf, "What is 2 + 2?"))
        assert "".join(event.text for event in again[:-1]) == "".join(event.text for event in first[:-1])

        # A stopped request ends early, with its end.
        events = start_long_story("stopped")
        started = time.monotonic()
        server.stop("stopped")
        done = ending(events)
        assert done.type == "done" and done.completion_tokens < 400 and time.monotonic() - started < 10
        assert server.in_flight == 0
    finally:
        server.close()
    assert server._process is None  # closed: no child left behind


@pytest.mark.parametrize("signal_name", ["SIGSEGV", "SIGILL"])
def test_the_request_that_crashes_llama_cpp_is_told_so_and_those_queued_behind_it_are_not_blamed(
    gguf, tmp_path, monkeypatch, signal_name
):
    llama = CrashingLlama(tmp_path / "llama", signal_name)
    for name, value in llama.environment().items():
        monkeypatch.setenv(name, value)
    server = InferenceProcess(ServerOptions(context_tokens=1024), log_directory=tmp_path)
    try:
        served, queued = queue.Queue(), queue.Queue()
        server.submit(chat(gguf, "What is 2 + 2?"), served.put)
        server.submit(chat(gguf, "Hi").model_copy(update={"request_id": "request-2"}), queued.put)
        crashed, behind = served.get(timeout=120), queued.get(timeout=30)
        assert (crashed.type, crashed.kind) == ("failed", "crashed")
        assert crashed.message.startswith(f"llama.cpp crashed (killed by {signal_name}")
        if signal_name == "SIGILL":
            assert "the CPU may lack an instruction set llama.cpp was built for" in crashed.message
        assert (behind.type, behind.kind) == ("failed", "error")
        assert "before this request started" in behind.message
        assert len(llama.starts()) == 1 and len(llama.crashes()) == 1

        # Once llama.cpp behaves, a fresh child serves the same request.
        llama.heal()
        served = queue.Queue()
        server.submit(chat(gguf, "What is 2 + 2?"), served.put)
        while (event := served.get(timeout=120)).type == "delta":
            pass
        assert event.type == "done" and event.completion_tokens > 0
        assert len(llama.starts()) == 2 and len(llama.crashes()) == 1
    finally:
        server.close()


# ---- offload and measured memory (engine.offload plans; the pool measures)


def test_a_loaded_model_is_measured_and_its_answers_and_batches_say_where_it_runs(gguf, tmp_path):
    from compute_swarm.engine.offload import Offload
    from compute_swarm.engine.records import Log

    pool = ModelPool(context_tokens=512, gpu_offload=lambda: False)
    try:
        _, done = inference.complete(pool, chat(gguf, "Say hi.", max_tokens=4))
        assert done.offload == Offload(gpu_layers=0, layers=31)
        footprint = pool.footprint(str(gguf))
        # The weights are mmapped: once read they are resident, with the KV cache and buffers.
        size = gguf.stat().st_size
        assert size / 2 < footprint.ram_bytes < 3 * size and footprint.gpu_bytes == 0
        prompts = tmp_path / "prompts.jsonl"
        prompts.write_text(json.dumps({"prompt": "One, two,"}) + "\n")
        spec = InferenceJobSpec(base_model=str(gguf), dataset=str(prompts), sampling=Sampling(max_tokens=2))
        records = []
        inference.run_batch(spec, tmp_path / "out", pool=pool, report=records.append)
        assert records[0].device == "cpu"
        assert any(isinstance(record, Log) and record.message.endswith("CPU only") for record in records)
    finally:
        pool.close()


def test_a_gpu_build_takes_the_layers_that_fit_its_free_memory(gguf):
    from compute_swarm.engine.offload import GPU_RUNTIME_BYTES, split
    from compute_swarm.engine.resources import read_gguf_layout

    # llama.cpp without a GPU ignores n_gpu_layers: the plan is what is tested here.
    ten_layers = split(read_gguf_layout(gguf), 10, 512).gpu_bytes + GPU_RUNTIME_BYTES
    pool = ModelPool(
        context_tokens=512,
        gpu_offload=lambda: True,
        free_memory=lambda on_gpu: -(-ten_layers * 100 // 90) if on_gpu else 1 << 40,
        measure=lambda on_gpu: inference.MemoryInUse(ram_bytes=0, gpu_bytes=0),
    )
    try:
        _, done = inference.complete(pool, chat(gguf, "Say hi.", max_tokens=2))
        assert done.offload is not None and done.offload.describe() == "10 of 31 layers on the GPU"
    finally:
        pool.close()


def test_the_pool_evicts_by_what_models_were_measured_to_hold(gguf, tmp_path, monkeypatch):
    from compute_swarm.engine.offload import split
    from compute_swarm.engine.resources import read_gguf_layout, usable_bytes

    copies = []
    for name in "abc":
        copies.append(str(tmp_path / f"{name}.gguf"))
        shutil.copyfile(gguf, copies[-1])
    # What each file holds once loaded, as the fake measurement sees it: RSS is the live models' sum.
    holds: dict[str, int] = {}
    live: list[str] = []

    class Tracked(llama_cpp.Llama):
        def __init__(self, model_path: str, **options):
            super().__init__(model_path=model_path, **options)
            live.append(model_path)

        def close(self):
            if self.model_path in live:
                live.remove(self.model_path)
            super().close()

    monkeypatch.setattr(llama_cpp, "Llama", Tracked)
    estimate = split(read_gguf_layout(gguf), 0, 512).ram_bytes
    free = [1 << 40]
    pool = ModelPool(
        max_models=4,
        context_tokens=512,
        gpu_offload=lambda: False,
        # The free figure lags: it does not rise when a model goes, so only the measurements tell.
        free_memory=lambda on_gpu: free[0],
        measure=lambda on_gpu: inference.MemoryInUse(sum(holds[path] for path in live), 0),
    )
    a, b, c = copies
    try:
        for big_first in (True, False):
            holds.update({a: 400 << 20 if big_first else 5 << 20, b: 5 << 20 if big_first else 400 << 20})
            free[0] = 1 << 40
            pool.get(a)
            pool.get(b)
            assert pool.footprint(a).ram_bytes == holds[a]
            # Short of c's estimate by 100 MiB of usable memory: a's measured 400 MiB make room, 5 do not.
            free[0] = -(-(estimate - (100 << 20)) * 100 // 90)
            holds[c] = estimate
            pool.get(c)
            assert pool.loaded == ([(b, None), (c, None)] if big_first else [(c, None)])
            pool.close()
        # Loaded before and measured at 5 MiB: a loads again where its estimate would not fit.
        free[0] = -(-(5 << 20) * 100 // 90) + 1
        assert usable_bytes(free[0]) < estimate
        pool.get(a)
        assert pool.loaded == [(a, None)]
    finally:
        pool.close()
