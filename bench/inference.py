"""Live inference through the swarm against llama-cpp-python called directly, in the same run.

Ours: the official `openai` client streams a chat completion from a real coordinator, which routes it
to a real node on loopback, whose inference child runs llama.cpp (openai -> coordinator -> node ->
llama.cpp, and the tokens back the same way). Baseline: `llama_cpp.Llama.create_chat_completion`
streamed in this process, with the same model file, context size and thread count. Both decode
greedily (temperature 0), so both give the same text; the bench checks that they do.

For each request:
  time to first token  from the call to the first piece of text
  tokens/s             (completion tokens - 1) / (time of the last piece - time of the first piece),
                       the decoding speed a streaming buyer sees
Requests alternate (baseline, ours, ours, baseline, ...) so that neither side gets the warmer
machine; medians are reported, with ours / baseline as a ratio and the extra time to first token in
milliseconds. Goals: tokens/s ratio >= 0.95, extra time to first token <= 20 ms.

    python bench/inference.py [--repeats 3] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY))
RESULTS = REPOSITORY / "bench" / "results" / "inference.json"
MODEL = "smollm2-135m-instruct"
PROMPTS = (
    "Name three colours and say one thing about each.",
    "Explain in two sentences why the sky is blue.",
    "Write a short poem about a cat that sleeps in the sun.",
    "What is the capital of France, and what river runs through it?",
)


class CountTokens:
    """A logits processor that only counts: llama.cpp calls it once per generated token."""

    def __init__(self) -> None:
        self.generated = 0

    def __call__(self, input_ids, scores):
        self.generated += 1
        return scores


def measurement(started: float, first: float | None, last: float, tokens: int, text: str) -> dict:
    if first is None:
        raise SystemExit("a request produced no text; the bench needs prompts that get an answer")
    return {
        "time_to_first_token_seconds": first - started,
        "tokens": tokens,
        "tokens_per_second": (tokens - 1) / (last - first) if tokens > 1 and last > first else float("nan"),
        "seconds": last - started,
        "text": text,
    }


def run_direct(llm, prompt: str, max_tokens: int) -> dict:
    from llama_cpp import LogitsProcessorList

    counter = CountTokens()
    llm.reset()  # as the engine does: every request starts from an empty context
    started = time.perf_counter()
    first = None
    pieces = []
    for chunk in llm.create_chat_completion(
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0.0,
        seed=0,
        stream=True,
        logits_processor=LogitsProcessorList([counter]),
    ):
        content = chunk["choices"][0]["delta"].get("content")
        if content:
            first = first or time.perf_counter()
            pieces.append(content)
    return measurement(started, first, time.perf_counter(), counter.generated, "".join(pieces))


def run_swarm(client, prompt: str, max_tokens: int) -> dict:
    started = time.perf_counter()
    first = None
    last = started
    pieces = []
    tokens = 0
    for chunk in client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0,
        seed=0,
        stream=True,
        stream_options={"include_usage": True},
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            last = time.perf_counter()
            first = first or last
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return measurement(started, first, last, tokens, "".join(pieces))


def summary(runs: list[dict]) -> dict:
    return {
        "requests": len(runs),
        "time_to_first_token_ms_median": 1000
        * statistics.median(r["time_to_first_token_seconds"] for r in runs),
        "tokens_per_second_median": statistics.median(r["tokens_per_second"] for r in runs),
        "tokens_median": statistics.median(r["tokens"] for r in runs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3, help="rounds over the prompts (default 3)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--output", type=Path, default=RESULTS)
    arguments = parser.parse_args()
    if arguments.max_tokens < 2:
        parser.error("--max-tokens must be at least 2")

    import openai
    from llama_cpp import Llama

    from compute_swarm.engine.inference import default_threads, gpu_offload_available
    from compute_swarm.engine.memory import DEFAULT_CONTEXT_TOKENS
    from compute_swarm.engine.models import fetch_catalogue_model
    from tests.swarm_processes import Coordinator, Node, wait_for

    model_path = fetch_catalogue_model(MODEL)
    threads = default_threads()
    gpu_layers = -1 if gpu_offload_available() else 0
    print(f"model {model_path.name}, {threads} threads, {'GPU offload' if gpu_layers else 'CPU'}", flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-inference-") as scratch:
        coordinator = Coordinator(Path(scratch) / "coordinator").start()
        node = Node(coordinator, Path(scratch) / "node", name="bench-node").start()
        try:
            wait_for(lambda: coordinator.health()["nodes_connected"] == 1, 120, "the node to connect")
            client = openai.OpenAI(
                base_url=f"{coordinator.url}/v1",
                api_key=coordinator.create_buyer("bench", "1000"),
                max_retries=0,
                timeout=120,
            )
            llm = Llama(
                model_path=str(model_path),
                n_ctx=DEFAULT_CONTEXT_TOKENS,
                n_threads=threads,
                n_gpu_layers=gpu_layers,
                verbose=False,
            )
            # Warm-up, not measured: loads the model in the node's inference child and fills caches.
            run_swarm(client, PROMPTS[0], 8)
            run_direct(llm, PROMPTS[0], 8)

            runs: dict[str, list[dict]] = {"ours": [], "baseline": []}
            mismatches = []
            for repeat in range(arguments.repeats):
                for number, prompt in enumerate(PROMPTS):
                    order = ("baseline", "ours") if (repeat + number) % 2 == 0 else ("ours", "baseline")
                    results = {}
                    for variant in order:
                        run = run_swarm if variant == "ours" else run_direct
                        results[variant] = run(
                            client if variant == "ours" else llm, prompt, arguments.max_tokens
                        )
                        runs[variant].append(results[variant])
                    if results["ours"]["text"] != results["baseline"]["text"]:
                        mismatches.append(prompt)
                    print(
                        f"  round {repeat + 1} prompt {number + 1}: "
                        + ", ".join(
                            f"{variant} {results[variant]['tokens_per_second']:6.1f} tok/s "
                            f"ttft {1000 * results[variant]['time_to_first_token_seconds']:6.1f} ms"
                            for variant in ("ours", "baseline")
                        ),
                        flush=True,
                    )
            llm.close()
        finally:
            node.stop()
            coordinator.stop()

    ours, baseline = summary(runs["ours"]), summary(runs["baseline"])
    ratio = ours["tokens_per_second_median"] / baseline["tokens_per_second_median"]
    extra_ttft = ours["time_to_first_token_ms_median"] - baseline["time_to_first_token_ms_median"]
    result = {
        "model": MODEL,
        "max_tokens": arguments.max_tokens,
        "threads": threads,
        "gpu_offload": bool(gpu_layers),
        "ours": ours,
        "baseline": baseline,
        "tokens_per_second_ratio": ratio,
        "extra_time_to_first_token_ms": extra_ttft,
        "same_text": not mismatches,
        "formula": "tokens/s = (completion tokens - 1) / (last piece - first piece); ttft = first piece - call",
    }
    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    arguments.output.write_text(json.dumps(result, indent=2))
    print(
        f"\n{'':10s}{'tokens/s':>10s}{'ttft ms':>10s}\n"
        f"{'ours':10s}{ours['tokens_per_second_median']:10.1f}{ours['time_to_first_token_ms_median']:10.1f}\n"
        f"{'baseline':10s}{baseline['tokens_per_second_median']:10.1f}"
        f"{baseline['time_to_first_token_ms_median']:10.1f}\n"
        f"ratio (ours / llama-cpp-python direct): {ratio:.3f} (goal >= 0.95); "
        f"extra time to first token: {extra_ttft:+.1f} ms (goal <= +20 ms)"
    )
    if mismatches:
        print(f"warning: greedy text differed for {len(mismatches)} requests", file=sys.stderr)
    print(f"written to {arguments.output}")


if __name__ == "__main__":
    main()
