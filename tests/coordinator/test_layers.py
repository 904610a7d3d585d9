"""The coordinator's roles (ARCHITECTURE.md): who may import whom, so a newcomer knows which room a
change belongs in, and the pure domain stays pure."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_import_names import PACKAGE, imported_modules

COORDINATOR = PACKAGE / "coordinator"
PREFIX = "compute_swarm.coordinator."
# Besides itself, what each role may import of the coordinator. `settings` is the configuration every
# role but the domain reads. The transport reads tables for its pages and lists (a known debt: those
# queries belong in services); it never writes through the store.
ALLOWED = {
    "domain": set(),
    "store": {"domain"},
    "service": {"domain", "store", "settings"},
    "transport": {"domain", "store", "service", "settings"},
}
# The domain decides; it does not reach a database, a socket, a clock or chance (its events carry the
# time, and draws are injected).
NOT_IN_DOMAIN = (
    "sqlalchemy",
    "fastapi",
    "starlette",
    "uvicorn",
    "websockets",
    "httpx",
    "asyncio",
    "time",
    "random",
)


def role_of(module: str) -> str | None:
    """The coordinator role (or top-level module) a dotted module belongs to; None outside it."""
    if not module.startswith(PREFIX):
        return None
    return module.removeprefix(PREFIX).split(".")[0]


@pytest.mark.parametrize("role", sorted(ALLOWED))
def test_each_role_imports_only_the_roles_below_it(role: str) -> None:
    offences = []
    for path in sorted((COORDINATOR / role).rglob("*.py")):
        for line, module in imported_modules(path):
            other = role_of(module)
            if other is not None and other != role and other not in ALLOWED[role]:
                offences.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {module}")
    assert offences == [], "\n".join(offences)


def test_the_domain_touches_no_database_socket_clock_or_chance() -> None:
    offences = [
        f"{path.relative_to(PACKAGE.parent)}:{line} imports {module}"
        for path in sorted((COORDINATOR / "domain").rglob("*.py"))
        for line, module in imported_modules(path)
        if module.split(".")[0] in NOT_IN_DOMAIN
    ]
    assert offences == [], "\n".join(offences)


def test_every_coordinator_module_sits_in_a_role() -> None:
    """Only the wiring (app, cli, settings, local_swarm) stays at the top: anything new goes in a role."""
    top = sorted(path.stem for path in COORDINATOR.glob("*.py") if path.stem != "__init__")
    assert top == ["app", "cli", "local_swarm", "settings"]
    assert sorted(
        path.name for path in COORDINATOR.iterdir() if path.is_dir() and path.name != "__pycache__"
    ) == [
        "domain",
        "service",
        "store",
        "transport",
    ]


def test_a_jobs_state_is_written_in_one_place() -> None:
    """coordinator.store.job_changes applies the lifecycle's transitions; nothing else sets a job's state."""
    writers = []
    for path in sorted(COORDINATOR.rglob("*.py")):
        for number, line in enumerate(Path(path).read_text().splitlines(), 1):
            stripped = line.strip()
            if stripped.startswith(("job.state =", "check.state =", "trial.state =")):
                writers.append(f"{path.relative_to(COORDINATOR)}:{number}")
    assert writers == [], writers
    # There, a new job's fields are set before its insert, a known job's written with one statement.
    changes = (COORDINATOR / "store" / "job_changes.py").read_text()
    assert 'values["state"]' in changes and "_UPDATE_JOB" in changes
