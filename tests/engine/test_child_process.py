"""Engine children import the parent's compute_swarm and, in a packaged app, its fetched runtime,
which comes after their own packages."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from compute_swarm.engine import child_process


def test_a_child_imports_from_the_runtime_the_parent_took_after_its_own_packages(tmp_path: Path) -> None:
    runtime = tmp_path / "runtime" / "site-packages"
    (runtime / "runtime_only").mkdir(parents=True)
    (runtime / "runtime_only" / "__init__.py").write_text("WHERE = 'runtime'\n")
    # A package the parent has too: its own copy must win, as a packaged app's bundle does.
    (runtime / "pydantic").mkdir()
    (runtime / "pydantic" / "__init__.py").write_text("raise ImportError('the runtime shadowed the app')\n")
    (runtime / "show_child.py").write_text(
        textwrap.dedent(
            """
            import sys
            import pydantic, runtime_only
            print(runtime_only.WHERE, pydantic.VERSION, sys.argv[1:])
            """
        )
    )
    parent = textwrap.dedent(
        f"""
        import subprocess
        from pathlib import Path
        from compute_swarm.engine import child_process
        child_process.use_runtime(Path({str(runtime)!r}))
        import runtime_only  # the parent itself takes it too
        completed = subprocess.run(
            child_process.command("show_child", "--flag", "value"),
            env=child_process.environment(), capture_output=True, text=True, check=False,
        )
        print(completed.stdout.strip() or completed.stderr)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", parent],
        env=child_process.environment(),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    where, version, arguments = result.stdout.strip().split(" ", 2)
    assert (where, arguments) == ("runtime", "['--flag', 'value']"), result.stdout
    assert version[0].isdigit(), "the child's pydantic is its own, not the runtime's"


def test_a_frozen_app_is_its_childrens_interpreter(monkeypatch) -> None:
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    assert child_process.command("compute_swarm.engine.worker") == [
        sys.executable,
        child_process.FROZEN_CHILD_FLAG,
        "compute_swarm.engine.worker",
    ]
