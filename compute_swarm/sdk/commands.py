"""What every buyer command shares: the connection options, one-line errors with exit codes, and
uploads with a progress bar. Light: the standard library, httpx and tqdm.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from compute_swarm.sdk.client import SwarmClient, SwarmError

COORDINATOR_ENVIRONMENT_VARIABLE = "SWARM_COORDINATOR"
API_KEY_ENVIRONMENT_VARIABLE = "SWARM_API_KEY"


class UsageError(Exception):
    """Bad input on the command line: reported in one line, exit code 2."""


def connection_options() -> argparse.ArgumentParser:
    """The options every command that talks to a coordinator takes (an argparse parent parser)."""
    connection = argparse.ArgumentParser(add_help=False)
    connection.add_argument(
        "--coordinator",
        metavar="URL",
        help=f"the coordinator's address (default: ${COORDINATOR_ENVIRONMENT_VARIABLE})",
    )
    connection.add_argument(
        "--api-key", metavar="KEY", help=f"your buyer API key (default: ${API_KEY_ENVIRONMENT_VARIABLE})"
    )
    return connection


def command(name: str, run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Wrap a command so that every expected failure is one line on stderr and an exit code."""

    def handler(arguments: argparse.Namespace) -> int:
        try:
            return run(arguments)
        except UsageError as error:
            complain(name, str(error))
            return 2
        except SwarmError as error:
            message = str(error)
            if error.status_code == 401:
                message += f"; check --api-key or ${API_KEY_ENVIRONMENT_VARIABLE}"
            complain(name, message)
            return 1
        except OSError as error:
            complain(name, f"{error.filename or ''}{': ' if error.filename else ''}{error.strerror or error}")
            return 1

    return handler


def complain(command: str, message: str) -> None:
    print(f"compute-swarm {command}: {message}", file=sys.stderr)


def client_from(arguments: argparse.Namespace) -> SwarmClient:
    coordinator = arguments.coordinator or os.environ.get(COORDINATOR_ENVIRONMENT_VARIABLE)
    api_key = arguments.api_key or os.environ.get(API_KEY_ENVIRONMENT_VARIABLE)
    if not coordinator:
        raise UsageError(
            f"no coordinator given: pass --coordinator URL or set ${COORDINATOR_ENVIRONMENT_VARIABLE}"
        )
    if not api_key:
        raise UsageError(f"no API key given: pass --api-key KEY or set ${API_KEY_ENVIRONMENT_VARIABLE}")
    try:
        return SwarmClient(coordinator, api_key)
    except SwarmError as error:  # a malformed address is a usage problem
        raise UsageError(str(error)) from None


def upload_with_progress(swarm: SwarmClient, path: Path, purpose: str = "dataset") -> dict:
    bar = ByteProgress(path.name)
    try:
        uploaded = swarm.upload_file(path, purpose=purpose, progress=bar)
    finally:
        bar.close()
    lines = f", {uploaded['lines']} lines" if uploaded.get("lines") is not None else ""
    print(f"Uploaded {path.name} as {uploaded['id']} ({uploaded['size']} bytes{lines})", file=sys.stderr)
    return uploaded


class ByteProgress:
    """A tqdm bar in bytes, created on the first report (so instant transfers show none)."""

    def __init__(self, description: str):
        self.description = description
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        from tqdm import tqdm

        if self.bar is None:
            if done >= total:
                return
            self.bar = tqdm(
                total=total,
                initial=done,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=self.description,
                file=sys.stderr,
                leave=False,
            )
        self.bar.total = total
        self.bar.n = done
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
