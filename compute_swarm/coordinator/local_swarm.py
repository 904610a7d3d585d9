"""`compute-swarm local-swarm`: a coordinator and one node on this machine, for trying the product.

Both run as child processes of this one, exactly as ops and sellers run them; Ctrl-C stops both.
The demo buyer's API key is kept (mode 0600) in the data directory, so a second start reuses it.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from compute_swarm.engine.jobs import DEFAULT_MODEL, DEMO_CHAT_DATASET

KEY_FILE = "demo-buyer-api-key"
ADMIN_TOKEN_FILE = "admin-token"


def run(data_dir: Path, host: str, port: int) -> int:
    # A service manager's SIGTERM stops the swarm as cleanly as Ctrl-C does.
    signal.signal(signal.SIGTERM, _interrupt)
    data_dir = data_dir.expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    command = _command()
    url = f"http://{host}:{port}"
    coordinator_dir, node_dir = data_dir / "coordinator", data_dir / "node"
    admin_token = _kept_secret(data_dir / ADMIN_TOKEN_FILE, lambda: secrets.token_urlsafe(32))
    children: list[subprocess.Popen] = []
    try:
        children.append(
            _start(
                [
                    *command,
                    "coordinator",
                    "--host",
                    host,
                    "--port",
                    str(port),
                    "--data-dir",
                    str(coordinator_dir),
                ],
                data_dir / "coordinator.log",
                {
                    # A local swarm is for trying the product: the page lets anyone here sign up.
                    "SWARM_ALLOW_SIGNUP": "true",
                    "SWARM_SIGNUP_CREDITS_MICRO": "20000000",
                    "SWARM_ADMIN_TOKEN": admin_token,
                    # Its own node, and any machine here the user starts, join without ops.
                    "SWARM_NODE_ADMISSION": "open",
                },
            )
        )
        try:
            wait_until_healthy(url, children[0], data_dir / "coordinator.log")
        except CoordinatorNotUp as error:
            raise SystemExit(str(error)) from None
        api_key = _demo_buyer_key(command, coordinator_dir, data_dir / KEY_FILE)
        children.append(
            _start(
                [
                    *command,
                    "-v",
                    "node",
                    "--coordinator",
                    url,
                    "--data-dir",
                    str(node_dir),
                    "--name",
                    "local-node",
                ],
                data_dir / "node.log",
                {"SWARM_TOKEN_STORE": "file"},
            )
        )
        # Quoted for a POSIX shell, so each command pastes as printed even where a path has a space.
        buyer_environment = f"SWARM_COORDINATOR={shlex.quote(url)} SWARM_API_KEY={shlex.quote(api_key)}"
        swarm_command = shlex.join(command)
        chat_request = json.dumps(
            {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "Hello!"}], "stream": True}
        )
        print(
            f"""
The swarm is up: a coordinator and one local node.

  Web page:      {url}/   (sign in with the buyer API key, or create an account there)
  Ops page:      {url}/ops   (admin token: {admin_token})
  Coordinator:   {url}   (health: {url}/healthz, metrics: {url}/metrics)
  Buyer API key: {api_key}
  Logs:          {data_dir / "coordinator.log"}, {data_dir / "node.log"}

Fine-tune the demo model on the demo data through the swarm (paste into another terminal):

  {buyer_environment} \\
    {swarm_command} submit lora --data {shlex.quote(str(DEMO_CHAT_DATASET))} --steps 30 --learning-rate 1e-3 --follow

It prints the job id last. Put it in place of JOB_ID to fetch the adapter (peft layout) into
./adapters/JOB_ID:

  {buyer_environment} \\
    {swarm_command} download JOB_ID

Or chat with the model through the OpenAI-compatible API (any OpenAI client works with base_url
{url}/v1 and this key):

  curl -N {shlex.quote(url + "/v1/chat/completions")} -H {shlex.quote("Authorization: Bearer " + api_key)} \\
    -H "Content-Type: application/json" \\
    -d {shlex.quote(chat_request)}

Press Ctrl-C here to stop both.
""",
            flush=True,
        )
        while all(child.poll() is None for child in children):
            time.sleep(0.5)
        crashed = next(child for child in children if child.poll() is not None)
        print(f"a swarm process exited with code {crashed.returncode}; see the logs above", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nStopping the node and the coordinator...", file=sys.stderr)
        return 0
    finally:
        _stop(children)


def _interrupt(signal_number: int, frame: object) -> None:
    raise KeyboardInterrupt


def _command() -> list[str]:
    installed = shutil.which("compute-swarm", path=str(Path(sys.executable).parent)) or shutil.which(
        "compute-swarm"
    )
    return [installed] if installed else [sys.executable, "-m", "compute_swarm.cli"]


def _start(arguments: list[str], log: Path, environment: dict[str, str] | None = None) -> subprocess.Popen:
    with open(log, "ab") as output:
        # Its own process group: Ctrl-C reaches this process, which then stops the children in order.
        return subprocess.Popen(
            arguments,
            stdout=output,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(environment or {})},
            start_new_session=True,
        )


class CoordinatorNotUp(RuntimeError):
    pass


def wait_until_healthy(url: str, process: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    """Wait for a coordinator child process to answer /healthz; CoordinatorNotUp, with its log, if
    it exits or stays silent."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise CoordinatorNotUp(
                f"the coordinator exited; its log:\n{log.read_text(errors='replace')[-3000:]}"
            )
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise CoordinatorNotUp(
        f"the coordinator did not answer at {url} within {timeout:.0f} s (is the port taken?)"
    )


def _kept_secret(path: Path, make) -> str:
    """A secret kept (mode 0600) in the data directory, so the next start reuses it."""
    if path.is_file():
        return path.read_text().strip()
    secret = make()
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(secret + "\n")
    return secret


def _demo_buyer_key(command: list[str], coordinator_dir: Path, key_file: Path) -> str:
    return _kept_secret(key_file, lambda: _create_demo_buyer(command, coordinator_dir))


def _create_demo_buyer(command: list[str], coordinator_dir: Path) -> str:
    result = subprocess.run(
        [
            *command,
            "admin",
            "create-buyer",
            "--data-dir",
            str(coordinator_dir),
            "--name",
            "demo",
            "--credits",
            "100",
        ],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise SystemExit(f"could not create the demo buyer: {result.stderr.strip()}")
    return result.stdout.strip().splitlines()[-1]


def _stop(children: list[subprocess.Popen]) -> None:
    # The node first (it checkpoints a running job and says goodbye), then the coordinator.
    for child in reversed(children):
        if child.poll() is None:
            child.send_signal(signal.SIGINT)
            try:
                child.wait(30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
