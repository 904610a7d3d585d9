"""`compute-swarm train` as a person runs it: a progress bar, the adapter directory on the last line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from compute_swarm.engine import artifacts
from tests.conftest import write_jsonl

COMMAND = str(Path(sys.executable).parent / "compute-swarm")


def run(*arguments: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [COMMAND, *arguments], capture_output=True, text=True, cwd=cwd, timeout=600, check=False
    )


def test_train_writes_a_peft_adapter_and_prints_its_directory_last(
    tiny_model_directory: Path, chat_dataset: Path, tmp_path: Path
) -> None:
    output = tmp_path / "my-adapter"
    result = run(
        "train",
        "--model",
        str(tiny_model_directory),
        "--data",
        str(chat_dataset),
        "--steps",
        "3",
        "--max-length",
        "48",
        "--batch-size",
        "2",
        "--output",
        str(output),
        "--checkpoint-every",
        "2",
        "--sample",
        "What is 2 plus 3?",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == str(output)
    for name in (artifacts.ADAPTER_CONFIG_FILE, artifacts.ADAPTER_WEIGHTS_FILE):
        assert (output / name).is_file()
    assert "3/3" in result.stderr  # the progress bar reached the end
    assert "checkpoint at step 2" in result.stderr and "Done: 3 steps" in result.stderr
    assert "Prompt:     What is 2 plus 3?" in result.stderr and "Fine-tuned: " in result.stderr


def test_train_refuses_bad_data_naming_the_line(tiny_model_directory: Path, tmp_path: Path) -> None:
    data = write_jsonl(
        tmp_path / "data.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "no completion"}]
    )
    result = run(
        "train", "--model", str(tiny_model_directory), "--data", str(data), "--steps", "1", cwd=tmp_path
    )
    assert result.returncode == 1
    assert "line 2: completion: Field required" in result.stderr


def test_train_refuses_bad_settings_naming_the_option(tmp_path: Path) -> None:
    result = run("train", "--data", "x.jsonl", "--rank", "0", "--learning-rate", "-1", cwd=tmp_path)
    assert result.returncode == 2
    assert "--rank: Input should be greater than or equal to 1" in result.stderr
    assert "--learning-rate: Input should be greater than 0" in result.stderr


def test_devices_lists_the_cpu(tmp_path: Path) -> None:
    result = run("devices", cwd=tmp_path)
    assert result.returncode == 0 and "CPU:" in result.stdout and "training would use" in result.stdout
