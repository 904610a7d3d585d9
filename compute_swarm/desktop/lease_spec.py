"""A lease from the coordinator turned into the job spec this node runs, with the artifacts pointing
at the node's own copies. Only catalogue base models and adapters the node fetched itself are
accepted; anything else is an `InvalidLease`, reported as an invalid_spec failure by desktop.job.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from compute_swarm import protocol
from compute_swarm.engine.jobs import CATALOGUE, InferenceJobSpec, JobSpec, parse_job_spec


class InvalidLease(Exception):
    """A lease this node must not run as sent; reported as an invalid_spec failure."""


def spec_for_lease(
    lease: protocol.Lease, dataset: Path, adapter: Path | None = None, evaluate: Path | None = None
) -> JobSpec:
    """The job spec to run: the lease's settings with `dataset` (a batch's `adapter`, a verification
    re-run's adapter to `evaluate`) pointing at the node's own copies of the artifacts. Only catalogue
    base models are accepted, and no adapter but one fetched here: a path from the coordinator never is."""
    base_model = lease.spec.get("base_model")
    if not isinstance(base_model, str) or base_model not in CATALOGUE:
        raise InvalidLease(
            f"base model {base_model!r} is not in this node's catalogue ({', '.join(sorted(CATALOGUE))})"
        )
    if lease.spec.get("adapter") is not None or lease.spec.get("evaluate_adapter") is not None:
        raise InvalidLease("the lease names an adapter file; a node only runs adapters it fetched itself")
    local = {"dataset": str(dataset)}
    if adapter is not None:
        local["adapter"] = str(adapter)
    if evaluate is not None:
        local["evaluate_adapter"] = str(evaluate)
    try:
        spec = parse_job_spec({**lease.spec, **local})
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in problem['loc']) or 'spec'}: {problem['msg']}"
            for problem in error.errors()
        )
        raise InvalidLease(f"invalid job spec: {problems}"[:4000]) from None
    if lease.adapter_sha256 is not None and not isinstance(spec, InferenceJobSpec):
        raise InvalidLease("only a batch inference job runs on an adapter")
    return spec
