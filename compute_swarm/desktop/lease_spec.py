"""A lease from the coordinator turned into the job spec this node runs: the same job with its base
model and data named by the node's own copies (desktop.model_files, the artifact cache). The lease's
spec was validated when it arrived (protocol.Lease), its base model's name included: a catalogue name,
never a path, and the one its model files describe.
"""

from __future__ import annotations

from pathlib import Path

from compute_swarm import protocol
from compute_swarm.engine.jobs import JobSpec, LocalPath, relocated


def spec_for_lease(
    lease: protocol.Lease, base_model: str, dataset: Path, adapter: Path | None = None
) -> JobSpec:
    """The job spec to run: the lease's, with `base_model` (this node's copy of the model: a directory
    or a GGUF), `dataset` and `adapter` (a batch's llama.cpp adapter, or a verification re-run's
    adapter to evaluate) pointing at this node's copies."""
    return relocated(
        lease.spec,
        LocalPath,
        dataset=str(dataset),
        adapter=None if adapter is None else str(adapter),
        base_model=base_model,
    )
