"""The packaged app's one executable: the tray app (no arguments), any `compute-swarm` command
(`compute-swarm-app runtime --status`), and the interpreter of the engine's children
(`--engine-child MODULE ...`, engine/child_process), which run with the engine runtime on their path."""

from __future__ import annotations

import sys

from compute_swarm.engine import child_process


def main() -> int:
    arguments = sys.argv[1:]
    if arguments[:1] == [child_process.FROZEN_CHILD_FLAG]:
        child_process.run_child(arguments[1:])
        return 0
    # The engine runtime fetched before (none on a first run: the tray fetches it at Start earning).
    from compute_swarm.desktop.runtime.this_machine import take_runtime_in_use

    take_runtime_in_use()
    from compute_swarm.cli import main as command_line

    return command_line(arguments or ["tray"])


if __name__ == "__main__":
    sys.exit(main())
