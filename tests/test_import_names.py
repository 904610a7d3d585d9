"""One import name, and the import rules between the parts (DESIGN.md, "Layout").

Our parts once were top-level packages named `coordinator`, `desktop` and `kernels`: names of other
projects on PyPI. transformers imports Hugging Face's `kernels` when it loads a model, found ours
instead, and every fine-tune failed. These tests check what is installed, who imports whom, and that
Hugging Face's `kernels` and ours work side by side in this process and in the engine's children.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parent.parent
PACKAGE = REPOSITORY / "compute_swarm"

# Which parts of compute_swarm each part may import (besides itself). The shared light modules:
# the wire protocol, the sweep spec, the job specs (engine.jobs, which imports nothing heavy), what a
# downloaded app carries to join its swarm (invitation: the sell page writes it, the app reads it),
# the offer of an artifact's swarm (swarm_transfer) and where frp's programs are found (frp).
SHARED = {
    "compute_swarm.protocol",
    "compute_swarm.sweeps",
    "compute_swarm.engine.jobs",
    "compute_swarm.invitation",
    "compute_swarm.swarm_transfer",
    "compute_swarm.frp",
    "compute_swarm.money",
    "compute_swarm.market",
}
ALLOWED_IMPORTS = {
    "sdk": SHARED,
    # engine.catalogue: the model files, from which the coordinator reads each model's tokenizer.
    # engine.memory: the memory estimate (plain arithmetic, no torch), so the coordinator leases a job
    # only to a node that will find it fits, by the node's own figure.
    # engine.artifacts: the result's file names (no torch), so a batch's completions are read by the
    # name the engine wrote them under.
    # engine.model_facts: what ops' model files say (headers and metadata only, no torch), for the
    # catalogue; engine.gguf_export: the GGUF of a model ops add as a directory alone (admin add-model
    # only, where the engine is installed).
    "coordinator": SHARED
    | {
        "compute_swarm.engine.catalogue",
        "compute_swarm.engine.memory",
        "compute_swarm.engine.artifacts",
        "compute_swarm.engine.model_facts",
        "compute_swarm.engine.gguf_export",
    },
    "engine": {"compute_swarm.protocol", "compute_swarm.kernels"},
    "kernels": set(),
    "desktop": SHARED | {"compute_swarm.engine", "compute_swarm.kernels", "compute_swarm.sdk"},
}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every absolute import in a file, at any depth (lazy imports count too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from compute_swarm import protocol` imports compute_swarm.protocol
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def allowed(module: str, part: str) -> bool:
    if not module.startswith("compute_swarm.") or module.startswith(f"compute_swarm.{part}"):
        return True
    return any(module == rule or module.startswith(rule + ".") for rule in ALLOWED_IMPORTS[part])


@pytest.mark.parametrize("part", sorted(ALLOWED_IMPORTS))
def test_each_part_imports_only_what_the_design_allows(part: str) -> None:
    offences = []
    for path in sorted((PACKAGE / part).rglob("*.py")):
        for line, module in imported_modules(path):
            # `from compute_swarm.engine.jobs import X` is listed as compute_swarm.engine.jobs.X
            if not allowed(module, part) and not allowed(module.rsplit(".", 1)[0], part):
                offences.append(f"{path.relative_to(REPOSITORY)}:{line} imports {module}")
            if module.split(".")[0] in ("PySide6", "shiboken6") and part != "desktop":
                offences.append(f"{path.relative_to(REPOSITORY)}:{line} imports Qt outside desktop")
    assert not offences, "\n".join(offences)


def test_the_shared_modules_import_no_part() -> None:
    for name in ("protocol.py", "sweeps.py", "cli.py"):
        for line, module in imported_modules(PACKAGE / name):
            assert module.startswith("compute_swarm.engine.jobs") or not module.startswith(
                "compute_swarm."
            ), f"compute_swarm/{name}:{line} imports {module}"


def modules_loaded_by(code: str) -> set[str]:
    """The modules a fresh interpreter has loaded after running `code`."""
    program = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stdout.splitlines()[-1]))


def test_the_sdk_and_its_commands_load_nothing_heavy_and_no_other_part() -> None:
    loaded = modules_loaded_by(
        "import compute_swarm.sdk.client, compute_swarm.sdk.buyer_cli, compute_swarm.sdk.sweep_cli"
    )
    heavy = {"torch", "transformers", "fastapi", "sqlalchemy", "PySide6", "llama_cpp"} & {
        name.split(".")[0] for name in loaded
    }
    assert not heavy
    # A package's __init__ loads with its modules: compute_swarm.engine comes with engine.jobs.
    parents = {rule.rsplit(".", 1)[0] for rule in ALLOWED_IMPORTS["sdk"]}
    others = {name for name in loaded if not allowed(name, "sdk") and name not in parents}
    assert not others


def test_the_coordinator_service_loads_no_torch() -> None:
    loaded = modules_loaded_by("import compute_swarm.coordinator.app, compute_swarm.coordinator.cli")
    assert not {"torch", "transformers", "peft", "llama_cpp"} & {name.split(".")[0] for name in loaded}


def test_the_built_wheel_installs_no_top_level_name_but_compute_swarm(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(tmp_path), str(REPOSITORY)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (wheel,) = tmp_path.glob("compute_swarm-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"compute_swarm"}
    # The parts' data travel with them: the demo data, the coordinator's migrations and web page.
    for needed in (
        "compute_swarm/engine/data/demo_chat.jsonl",
        "compute_swarm/coordinator/store/migrations/env.py",
        "compute_swarm/coordinator/transport/web/static/app.js",
        "compute_swarm/coordinator/API.md",
    ):
        assert needed in names


HUB_KERNELS_CHECK = """
import transformers.integrations.hub_kernels
import kernels
import compute_swarm.kernels.attention as ours
assert hasattr(kernels, "get_kernel"), kernels.__file__  # Hugging Face's, not a folder of ours
print(kernels.__file__)
print(ours.__file__)
"""


def test_hugging_face_kernels_and_ours_live_side_by_side_here_and_in_engine_children() -> None:
    import kernels
    import transformers.integrations.hub_kernels  # noqa: F401 (transformers imports it at model load)

    import compute_swarm.kernels.attention
    from compute_swarm.engine import child_process

    assert hasattr(kernels, "get_kernel")
    assert Path(compute_swarm.kernels.attention.__file__).is_relative_to(PACKAGE)
    # The engine's children get the folder that holds compute_swarm first on PYTHONPATH: that folder
    # is the repository root here, and nothing in it may shadow another project's package.
    result = subprocess.run(
        [sys.executable, "-c", HUB_KERNELS_CHECK],
        env=child_process.environment(),
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    hugging_face_file, our_file = result.stdout.split()
    assert not Path(hugging_face_file).is_relative_to(REPOSITORY / "kernels")
    assert Path(our_file).is_relative_to(PACKAGE)


def test_a_lora_job_in_a_worker_child_trains_through_our_attention(
    tiny_model_directory: Path, chat_dataset: Path, tmp_path: Path
) -> None:
    pytest.importorskip("triton", reason="triton is not installed")
    from compute_swarm.engine.jobs import LoraJobSpec
    from compute_swarm.engine.records import Completed, Started
    from compute_swarm.engine.runner import JobRunner
    from compute_swarm.kernels.attention import SETTING

    spec = LoraJobSpec(
        base_model=str(tiny_model_directory),
        dataset=str(chat_dataset),
        max_steps=1,
        batch_size=2,
        max_sequence_length=48,
        dropout=0.0,
    )
    # Our Triton kernel, run by Triton's interpreter on this CPU (on a GPU it would compile).
    runner = JobRunner(spec, tmp_path / "adapter", environment={SETTING: "triton", "TRITON_INTERPRET": "1"})
    runner.start()
    records = list(runner.records())
    started = [record for record in records if isinstance(record, Started)]
    assert started and started[0].attention == "triton", records
    assert isinstance(records[-1], Completed), records[-1]
    assert (Path(records[-1].output_dir) / "adapter_model.safetensors").is_file()
