"""The shape of the code, for before-and-after figures of a refactor (issue 17).

    python bench/code_shape.py [--repo DIR]

Prints the 10 longest functions, the 10 largest files, every place in the coordinator that writes a
job's `state` (an assignment to `.state`, a `Job(state=...)` or an `update(Job).values(state=...)`),
and, where the `duplicates` command is on PATH, how many pairs of places share six or more lines.
Run it in two checkouts to compare them.
"""

from __future__ import annotations

import argparse
import ast
import shutil
import subprocess
from pathlib import Path

PARTS = ("coordinator", "sdk", "desktop", "engine", "kernels")


def python_files(root: Path) -> list[Path]:
    # Before the parts moved into one namespace (compute_swarm/) they sat at the root.
    package = root / "compute_swarm"
    folders = [package] if package.is_dir() else [root / part for part in PARTS]
    return sorted(
        path for folder in folders for path in folder.rglob("*.py") if "migrations" not in path.parts
    )


def longest_functions(root: Path, files: list[Path], count: int = 10) -> list[tuple[int, str]]:
    functions = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                functions.append((length, f"{path.relative_to(root)}:{node.lineno} {node.name}"))
    return sorted(functions, reverse=True)[:count]


def largest_files(root: Path, files: list[Path], count: int = 10) -> list[tuple[int, str]]:
    sizes = [(len(path.read_text().splitlines()), str(path.relative_to(root))) for path in files]
    return sorted(sizes, reverse=True)[:count]


def state_writes(root: Path, files: list[Path]) -> list[str]:
    """Where coordinator code sets a job's state."""
    places = []
    for path in files:
        if "coordinator" not in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Assign):
                targets = node.targets
            elif isinstance(node, ast.AnnAssign | ast.AugAssign):
                targets = [node.target]
            for target in targets:
                for element in target.elts if isinstance(target, ast.Tuple) else [target]:
                    # A job row goes by these names; an inference request's state is another matter.
                    if (
                        isinstance(element, ast.Attribute)
                        and element.attr == "state"
                        and ast.unparse(element.value) in ("job", "check", "trial")
                    ):
                        places.append(f"{path.relative_to(root)}:{node.lineno} {ast.unparse(element)} =")
            if isinstance(node, ast.Call) and any(keyword.arg == "state" for keyword in node.keywords):
                name = ast.unparse(node.func)
                if name == "Job" or (name.endswith(".values") and "update(Job)" in ast.unparse(node)):
                    places.append(f"{path.relative_to(root)}:{node.lineno} {name}(state=...)")
    return places


def duplicate_pairs(root: Path) -> str:
    if shutil.which("duplicates") is None:
        return "the duplicates command is not on PATH"
    output = subprocess.run(
        ["duplicates", "--repo", str(root), "--most", "200", "--seconds", "120"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return output.splitlines()[0] if output else "no output"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parent.parent)
    root = parser.parse_args().repo.resolve()
    files = python_files(root)
    commit = subprocess.run(
        ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    print(f"# {root} at {commit or 'an unknown commit'}: {len(files)} Python files")
    print("\n## the 10 longest functions (lines)")
    for length, where in longest_functions(root, files):
        print(f"{length:5}  {where}")
    print("\n## the 10 largest files (lines)")
    for length, where in largest_files(root, files):
        print(f"{length:5}  {where}")
    writes = state_writes(root, files)
    print(f"\n## places that write a job's state: {len(writes)}")
    for where in writes:
        print(f"       {where}")
    print(f"\n## duplicates: {duplicate_pairs(root)}")


if __name__ == "__main__":
    main()
