"""The `compute-swarm` command line: a dispatcher over the parts' subcommands.

Each part registers its subcommands through the `compute_swarm.commands` entry-point group, so this
module imports no part, and a buyer's light install (the SDK alone) never imports torch.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from importlib.metadata import entry_points

ENTRY_POINT_GROUP = "compute_swarm.commands"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="compute-swarm", description="Fine-tune and serve LLMs on a swarm of idle GPUs."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show the engine's log messages")
    subcommands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    registrations: dict[str, Callable] = {}
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        if entry_point.name in registrations:
            continue
        try:
            registrations[entry_point.name] = entry_point.load()
        except ImportError as error:
            # A part whose extra is not installed here (a buyer's light install has no coordinator or
            # node agent): its commands are absent, the rest work.
            logging.getLogger(__name__).debug("no %s commands: %s", entry_point.name, error)
    for register in registrations.values():
        register(subcommands)
    return parser


def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if arguments.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return arguments.handler(arguments) or 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
