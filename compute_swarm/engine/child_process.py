"""How the engine starts its children (a job's worker, the inference server), so that they import the
same compute_swarm as the parent and, in a packaged app, the engine runtime it fetched.

A packaged app carries no torch: its engine runtime (desktop/runtime) is a folder of site-packages it
fetched, named to children by $COMPUTE_SWARM_RUNTIME and put after their own paths, so the app's
bundled packages come first. A child starts through `run_child` below: from a Python interpreter as
`python -m compute_swarm.engine.child_process MODULE ARGUMENTS...`, and from a frozen app as
`APP --engine-child MODULE ARGUMENTS...` (its entry point hands those to `run_child`: the frozen
executable is the children's interpreter too).

Kept free of third-party imports: a child imports this before its runtime is on its path.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

RUNTIME_VARIABLE = "COMPUTE_SWARM_RUNTIME"
FROZEN_CHILD_FLAG = "--engine-child"


def command(module: str, *arguments: str) -> list[str]:
    """The command line that runs `module` as __main__ in a child, with its arguments."""
    if getattr(sys, "frozen", False):
        return [sys.executable, FROZEN_CHILD_FLAG, module, *arguments]
    return [sys.executable, "-m", __name__, module, *arguments]


def environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """A child's environment: ours, plus `extra`, with the folder that holds this compute_swarm
    package first on PYTHONPATH, so the child imports this same code wherever the parent found it
    (an editable install, a source tree)."""
    result = {**os.environ, **(extra or {})}
    package_parent = str(Path(__file__).resolve().parents[2])
    result["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, result.get("PYTHONPATH")]))
    return result


def use_runtime(site_packages: Path) -> None:
    """Take a fetched engine runtime, here (after this process's own paths) and in every child
    started from now on."""
    folder = str(site_packages)
    if folder not in sys.path:
        sys.path.append(folder)
    os.environ[RUNTIME_VARIABLE] = folder


def run_child(arguments: list[str]) -> None:
    """Run MODULE ARGUMENTS... (`arguments`) as __main__, with $COMPUTE_SWARM_RUNTIME on the path."""
    if not arguments:
        raise SystemExit("usage: child_process MODULE [ARGUMENTS...]")
    runtime = os.environ.get(RUNTIME_VARIABLE)
    if runtime:
        use_runtime(Path(runtime))
    module, *rest = arguments
    sys.argv = [module, *rest]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    run_child(sys.argv[1:])
