"""The buyer's SDK and CLI: `SwarmClient` (and `NodeClient`, which the node agent uses) over the
coordinator's HTTP API, and the `compute-swarm` buyer and sweep commands.

Light: the standard library, pydantic, httpx and tqdm, plus the wire and spec modules
(`compute_swarm.protocol`, `compute_swarm.engine.jobs`, `compute_swarm.sweeps`); never torch or the service.
"""
