"""A new user's first minutes: `compute-swarm local-swarm` started as `make run` starts it, then the
submit, download and curl commands it prints, pasted into a shell in another directory, then Ctrl-C.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest

from tests.swarm_processes import COMMAND, free_port

BANNER_END = "Press Ctrl-C here to stop both."


class LocalSwarm:
    """`compute-swarm local-swarm` as a child process, its terminal output collected as it comes."""

    def __init__(self, data_dir: Path, port: int, environment: dict[str, str], cwd: Path):
        self.data_dir = data_dir
        self.environment = environment  # the user's shell: the printed commands run in it
        self.process = subprocess.Popen(
            [COMMAND, "local-swarm", "--data-dir", str(data_dir), "--port", str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=cwd,
            env=environment,
            start_new_session=True,
            # A terminal's foreground job takes Ctrl-C; one started from a script may inherit SIGINT
            # ignored, and then Python would ignore it too.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        self.lines: list[str] = []
        self.banner_printed = threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            if line.strip() == BANNER_END:
                self.banner_printed.set()

    def output(self) -> str:
        return "".join(self.lines)

    def wait_for_banner(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while not self.banner_printed.wait(0.2):
            assert self.process.poll() is None, f"local-swarm exited with {self.process.returncode}\n{self}"
            assert time.monotonic() < deadline, f"local-swarm printed no banner within {timeout} s\n{self}"
        return self.output()

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def interrupt(self, timeout: float) -> int | None:
        """Ctrl-C, as a terminal sends it: SIGINT to the foreground process group."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def __str__(self) -> str:
        tails = [f"--- local-swarm output:\n{self.output()[-3000:]}"]
        for name in ("coordinator.log", "node.log"):
            log = self.data_dir / name
            text = log.read_text(errors="replace")[-3000:] if log.exists() else "(none)"
            tails.append(f"--- {name} (last 3000 characters):\n{text}")
        return "\n".join(tails)


def user_environment(home: Path) -> dict[str, str]:
    """This environment with a fresh home and none of the developer's own swarm settings; models come
    from the verified cache the fixtures filled, never from a hub."""
    from compute_swarm.engine.models import MODELS_DIR_ENVIRONMENT_VARIABLE, models_directory

    models = models_directory()  # before HOME changes: where demo_model_directory put the model
    environment = {
        name: value for name, value in os.environ.items() if not name.startswith(("SWARM_", "XDG_"))
    }
    environment.update(
        {"HOME": str(home), MODELS_DIR_ENVIRONMENT_VARIABLE: str(models), "HF_HUB_OFFLINE": "1"}
    )
    return environment


@pytest.fixture
def local_swarm(tmp_path, demo_model_directory):
    home = tmp_path / "home"
    home.mkdir()
    swarm = LocalSwarm(tmp_path / "swarm", free_port(), user_environment(home), cwd=home)
    yield swarm
    if swarm.process.poll() is None:  # the test failed before its Ctrl-C
        left = swarm.descendants()
        if swarm.interrupt(30) is None:
            swarm.process.kill()
            swarm.process.wait(10)
        for process in left:
            if process.is_running():
                process.kill()


def printed_command(banner: str, marker: str) -> str:
    """The one indented command of the banner that contains `marker`, without its indentation."""
    blocks = [block for block in banner.split("\n\n") if block.startswith("  ") and marker in block]
    assert len(blocks) == 1, f"expected one printed command with {marker!r}:\n{banner}"
    return "\n".join(line.strip() for line in blocks[0].splitlines())


def run_in_shell(command: str, cwd: Path, environment: dict[str, str], timeout: float):
    return subprocess.run(
        ["bash", "-c", command], capture_output=True, text=True, cwd=cwd, env=environment, timeout=timeout
    )


def test_a_new_user_fine_tunes_downloads_and_chats_with_the_commands_local_swarm_prints(
    local_swarm, tmp_path, demo_model_directory
):
    banner = local_swarm.wait_for_banner(timeout=120)
    # Another terminal, somewhere else than the repository: what is printed must work from anywhere.
    terminal = tmp_path / "terminal"
    terminal.mkdir()

    submit = printed_command(banner, " submit lora ")
    assert "--steps 30" in submit
    submitted = run_in_shell(submit, terminal, local_swarm.environment, timeout=400)
    assert submitted.returncode == 0, f"{submitted.stderr[-3000:]}\n{local_swarm}"
    job_id = submitted.stdout.strip().splitlines()[-1]
    assert job_id.startswith("job_"), submitted.stdout
    assert "Done: 30 steps" in submitted.stderr, submitted.stderr[-3000:]

    # The banner says to put the job id in place of JOB_ID.
    download = printed_command(banner, " download ")
    assert download.count("JOB_ID") == 1
    downloaded = run_in_shell(download.replace("JOB_ID", job_id), terminal, local_swarm.environment, 120)
    assert downloaded.returncode == 0, f"{downloaded.stderr[-3000:]}\n{local_swarm}"
    adapter = terminal / downloaded.stdout.strip().splitlines()[-1]
    assert adapter == terminal / "adapters" / job_id
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(demo_model_directory), adapter)
    assert any("lora_A" in name for name, _ in tuned.named_parameters())

    if shutil.which("curl", path=local_swarm.environment.get("PATH")) is None:
        pytest.skip("curl is not installed: the printed chat command cannot be run (apt-get install curl)")
    chatted = run_in_shell(printed_command(banner, "curl "), terminal, local_swarm.environment, 120)
    assert chatted.returncode == 0, f"{chatted.stderr[-3000:]}\n{local_swarm}"
    lines = [line for line in chatted.stdout.splitlines() if line]
    assert lines and all(line.startswith("data: ") for line in lines), f"{chatted.stdout}\n{local_swarm}"
    events = [line.removeprefix("data: ") for line in lines]
    assert events[-1] == "[DONE]", chatted.stdout
    pieces = [json.loads(event)["choices"][0]["delta"].get("content") for event in events[:-1]]
    assert sum(1 for piece in pieces if piece) >= 2, chatted.stdout  # streamed, not one lump
    assert "".join(piece or "" for piece in pieces).strip(), chatted.stdout

    children = local_swarm.descendants()
    assert len([child for child in children if child.ppid() == local_swarm.process.pid]) == 2, children
    assert local_swarm.interrupt(timeout=90) == 0, str(local_swarm)
    local_swarm.reader.join(10)
    assert "Stopping the node and the coordinator" in local_swarm.output()
    # Its children are waited for; their own children (the node's inference server) are gone too.
    deadline = time.monotonic() + 10
    while alive := [child for child in children if _alive(child)]:
        assert time.monotonic() < deadline, f"still running after Ctrl-C: {alive}\n{local_swarm}"
        time.sleep(0.2)


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
