"""A real node agent that cheats, for the verification tests: `compute-swarm node`, run as sellers
run it, with one dishonest step patched into its agent process.

    python -m tests.cheating_node MODE[,MODE...] [node arguments...]

MODE:
- random-adapter: trains, then delivers random LoRA weights of the right shapes instead.
- skip-steps: trains one step of the job's many and says it trained them all.
- altered-tokens: answers a batch, then changes the words of every answer before delivering it.
- honest: no cheat (with no-inference, an honest node that takes only fine-tunes).
- no-inference: not a cheat: the node serves no inference, so it takes no batch job.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from compute_swarm.cli import main
from compute_swarm.desktop import job, serving, workspace
from compute_swarm.engine.jobs import LoraJobSpec

honest_pack_result = workspace.pack_result
honest_spec_for_lease = job.spec_for_lease
honest_result_message = job.result_message


def random_adapter(job_directory: Path, archive: Path, dataset_sha256: str) -> str:
    import torch
    from safetensors.torch import load_file, save_file

    weights_path = workspace.output_directory(job_directory) / "adapter_model.safetensors"
    if weights_path.is_file():
        weights = load_file(weights_path)
        save_file({name: torch.randn_like(tensor) * 0.05 for name, tensor in weights.items()}, weights_path)
    return honest_pack_result(job_directory, archive, dataset_sha256)


def one_step(lease, *arguments):
    spec = honest_spec_for_lease(lease, *arguments)
    if isinstance(spec, LoraJobSpec) and spec.max_steps:
        return spec.model_copy(update={"max_steps": 1})
    return spec


def claim_every_step(lease, record, sha256, gguf_sha256=None):
    max_steps = lease.spec.max_steps if isinstance(lease.spec, LoraJobSpec) else None
    claimed = record.model_copy(update={"steps": max_steps or record.steps})
    return honest_result_message(lease, claimed, sha256, gguf_sha256)


def altered_tokens(job_directory: Path, archive: Path, dataset_sha256: str) -> str:
    completions = workspace.output_directory(job_directory) / "completions.jsonl"
    if completions.is_file():
        answers = [json.loads(line) for line in completions.read_text().splitlines() if line.strip()]
        for answer in answers:
            field = answer.get("message", answer)
            key = "content" if "message" in answer else "text"
            field[key] = " ".join(reversed(field[key].split())) or "nothing"
        completions.write_text("".join(json.dumps(answer) + "\n" for answer in answers))
    return honest_pack_result(job_directory, archive, dataset_sha256)


def cheat(mode: str) -> None:
    if mode == "honest":
        return
    if mode == "no-inference":
        serving.inference_available = lambda: False
    elif mode == "random-adapter":
        workspace.pack_result = random_adapter
    elif mode == "skip-steps":
        job.spec_for_lease = one_step
        job.result_message = claim_every_step
    elif mode == "altered-tokens":
        workspace.pack_result = altered_tokens
    else:
        raise SystemExit(f"unknown cheat {mode!r}")


if __name__ == "__main__":
    for mode in sys.argv[1].split(","):
        cheat(mode)
    raise SystemExit(main(sys.argv[2:]))
