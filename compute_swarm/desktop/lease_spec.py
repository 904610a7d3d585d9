"""A lease from the coordinator turned into the job spec this node runs: the same job with its data
named by the node's own copies of the artifacts. The lease's spec was validated when it arrived
(protocol.Lease), so what is left to refuse is a base model this node does not have: an
`InvalidLease`, reported as an invalid_spec failure by desktop.job.
"""

from __future__ import annotations

from pathlib import Path

from compute_swarm import protocol
from compute_swarm.engine.jobs import CATALOGUE, JobSpec, LocalPath, relocated


class InvalidLease(Exception):
    """A lease this node cannot run; reported as an invalid_spec failure."""


def check_lease(lease: protocol.Lease) -> None:
    """Refuse, before anything is downloaded, a lease whose base model is not in this node's catalogue
    (a path or a hub name from the coordinator never is)."""
    if lease.spec.base_model not in CATALOGUE:
        raise InvalidLease(
            f"base model {lease.spec.base_model!r} is not in this node's catalogue "
            f"({', '.join(sorted(CATALOGUE))})"
        )


def spec_for_lease(lease: protocol.Lease, dataset: Path, adapter: Path | None = None) -> JobSpec:
    """The job spec to run: the lease's, with `dataset` (and `adapter`: a batch's llama.cpp adapter,
    or a verification re-run's adapter to evaluate) pointing at this node's copies of the artifacts."""
    check_lease(lease)
    return relocated(
        lease.spec, LocalPath, dataset=str(dataset), adapter=None if adapter is None else str(adapter)
    )
