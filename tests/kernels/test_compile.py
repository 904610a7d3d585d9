"""Our Triton kernels compile for the GPUs sellers have (NVIDIA Ampere to Hopper, AMD CDNA3), checked
ahead of time on this machine, GPU or not. See tests/kernels/compile_ahead.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed")
REPOSITORY = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("backend", "architecture"), [("cuda", "90"), ("cuda", "86"), ("hip", "gfx942")])
def test_the_kernels_compile_for_real_gpus(backend, architecture):
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    completed = subprocess.run(
        [sys.executable, "-m", "tests.kernels.compile_ahead", backend, architecture],
        cwd=REPOSITORY,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    compiled = completed.stdout.splitlines()
    assert len(compiled) == 10 and compiled[-1] == "_backward_preprocess_kernel"
