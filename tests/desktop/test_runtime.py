"""The engine runtime a packaged app fetches: from a package index served here (PyPI's JSON and HTML
simple APIs) or a folder, every file checked against the lock; resumed, cancelled, repaired and
switched only once complete."""

from __future__ import annotations

import hashlib
import itertools
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from compute_swarm.desktop.runtime import builds, wheels
from compute_swarm.desktop.runtime.fetch import CURRENT, Progress, Runtimes
from compute_swarm.desktop.runtime.pins import LockError, read_lock
from compute_swarm.engine.devices import CpuInfo, DeviceInventory, GpuInfo
from compute_swarm.engine.package_index import Cancelled, Pin, SourceError
from tests.desktop.wheel_index import TAGS, Index, make_wheel, pin_of


@pytest.fixture
def published(tmp_path):
    """An index with two distributions: a small one and a 3 MB one (several download chunks)."""
    folder = tmp_path / "published"
    folder.mkdir()
    small = make_wheel(folder, "tiny_tokens", "1.0", {"tiny_tokens/__init__.py": b"VOCABULARY = 7\n"})
    big = make_wheel(
        folder,
        "heavy_engine",
        "2.0",
        {
            "heavy_engine/__init__.py": b"from heavy_engine.weights import SIZE\n",
            "heavy_engine/weights.py": b"SIZE = 3\n",
            # Random bytes: the wheel cannot compress them, so its download takes several chunks.
            "heavy_engine-2.0.data/purelib/heavy_engine/blob.bin": hashlib.sha256(b"seed").digest() * 100_000,
        },
    )
    index = Index(folder)
    yield index, [pin_of(small), pin_of(big)], folder
    index.close()


def runtimes(tmp_path: Path, pins, sources, build="cpu") -> Runtimes:
    return Runtimes(tmp_path / "runtime", build, pins, sources, tags=TAGS)


def imports_from(site_packages: Path, code: str) -> str:
    return subprocess.run(
        [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(site_packages)!r}); {code}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def test_a_first_fetch_installs_the_locked_wheels_and_reports_its_progress(tmp_path, published):
    index, pins, _ = published
    seen: list[Progress] = []
    runtime = runtimes(tmp_path, pins, [index.url])
    assert not runtime.ready() and runtime.in_use() is None

    folder = runtime.fetch(seen.append)

    assert runtime.ready() and folder == runtime.folder
    assert (
        imports_from(
            runtime.site_packages(),
            "import heavy_engine, tiny_tokens; print(heavy_engine.SIZE, tiny_tokens.VOCABULARY)",
        )
        == "3 7"
    )
    # The .data/purelib file lands in site-packages; nothing of the wheel's own layout is left over.
    assert (runtime.site_packages() / "heavy_engine" / "blob.bin").stat().st_size == 3_200_000
    assert not list(runtime.site_packages().glob("*.data"))
    downloading = [progress for progress in seen if progress.stage == "downloading"]
    assert downloading and downloading[-1].total_bytes >= 3_200_000
    assert all(later.done_bytes >= earlier.done_bytes for earlier, later in itertools.pairwise(downloading))
    assert seen[-1].stage == "ready"
    assert not (tmp_path / "runtime" / "downloads").exists() or not list(
        (tmp_path / "runtime" / "downloads").iterdir()
    )


def test_an_html_index_and_a_folder_serve_as_well_as_the_json_api(tmp_path, published):
    _, pins, folder = published
    html = Index(folder, html=True)
    try:
        assert runtimes(tmp_path / "html", pins, [html.url]).fetch(lambda progress: None).is_dir()
    finally:
        html.close()
    assert runtimes(tmp_path / "folder", pins, [str(folder)]).fetch(lambda progress: None).is_dir()


def test_an_interrupted_download_resumes_where_it_stopped(tmp_path, published):
    index, pins, _ = published
    runtime = runtimes(tmp_path, pins, [index.url])
    index.cut_after_bytes = 1_000_000
    with pytest.raises(SourceError):
        runtime.fetch(lambda progress: None)
    assert runtime.in_use() is None
    index.cut_after_bytes = None

    runtime.fetch(lambda progress: None)

    assert runtime.ready()
    ranges = [wanted for path, wanted in index.requests if path.endswith("heavy_engine-2.0-py3-none-any.whl")]
    assert ranges[0] is None and ranges[-1] is not None and int(ranges[-1][6:-1]) >= 1_000_000, ranges


def test_a_cancelled_fetch_keeps_what_it_has_and_the_next_one_finishes(tmp_path, published):
    index, pins, _ = published
    runtime = runtimes(tmp_path, pins, [index.url])
    cancel = threading.Event()

    def cancel_once_downloading(progress: Progress) -> None:
        if progress.stage == "downloading" and progress.done_bytes > 0:
            cancel.set()

    with pytest.raises(Cancelled):
        runtime.fetch(cancel_once_downloading, cancel)
    assert runtime.in_use() is None and list((tmp_path / "runtime" / "downloads").glob("*.part"))

    runtime.fetch(lambda progress: None)
    assert runtime.ready()


def test_a_damaged_runtime_is_repaired_by_fetching_only_what_is_damaged(tmp_path, published):
    index, pins, _ = published
    runtime = runtimes(tmp_path, pins, [index.url])
    runtime.fetch(lambda progress: None)
    (runtime.site_packages() / "tiny_tokens" / "__init__.py").write_text("VOCABULARY = 'tampered'\n")
    index.requests.clear()

    runtime.fetch(lambda progress: None)

    assert index.downloads() == ["tiny_tokens-1.0-py3-none-any.whl"]
    assert imports_from(runtime.site_packages(), "import tiny_tokens; print(tiny_tokens.VOCABULARY)") == "7"


def test_a_new_lock_is_fetched_beside_the_old_runtime_which_stays_in_use_until_it_is_complete(
    tmp_path, published
):
    index, pins, folder = published
    old = runtimes(tmp_path, pins, [index.url])
    old.fetch(lambda progress: None)
    newer = make_wheel(folder, "tiny_tokens", "1.1", {"tiny_tokens/__init__.py": b"VOCABULARY = 11\n"})
    new_pins = [pin_of(newer), pins[1]]
    new = runtimes(tmp_path, new_pins, [index.url])
    assert new.folder != old.folder and new.in_use() == old.folder and not new.ready()

    index.cut_after_bytes = 10
    index.requests.clear()
    with pytest.raises(SourceError):
        new.fetch(lambda progress: None)
    assert new.in_use() == old.folder, "an unfinished fetch leaves the runtime in use as it was"
    index.cut_after_bytes = None

    new.fetch(lambda progress: None)

    assert new.ready() and not old.folder.exists()
    assert (tmp_path / "runtime" / CURRENT).read_text() == new.folder.name
    assert "heavy_engine-2.0-py3-none-any.whl" not in index.downloads(), (
        "an unchanged distribution is carried over"
    )
    assert (
        imports_from(
            new.site_packages(),
            "import heavy_engine, tiny_tokens; print(tiny_tokens.VOCABULARY, heavy_engine.SIZE)",
        )
        == "11 3"
    )


def test_a_file_the_lock_does_not_accept_is_refused_and_removed(tmp_path, published):
    index, pins, folder = published
    # The index offers the file, with its true hash, but the lock pins another file of that version.
    forged = Pin(pins[0].name, pins[0].version, frozenset({"0" * 64}))
    with pytest.raises(SourceError, match=r"has no wheel of tiny-tokens==1\.0"):
        runtimes(tmp_path, [forged], [index.url]).fetch(lambda progress: None)
    # A folder lists no hashes: the download itself is checked, and removed.
    with pytest.raises(SourceError, match="which the lock does not accept"):
        runtimes(tmp_path / "folder", [forged], [str(folder)]).fetch(lambda progress: None)
    assert not list((tmp_path / "folder").rglob("tiny_tokens*.whl*"))


def test_a_wheel_whose_paths_leave_the_runtime_is_refused(tmp_path):
    wheel = make_wheel(tmp_path, "sneaky", "1.0", {"../outside.py": b"x = 1\n"})
    with pytest.raises(wheels.WheelError, match="would leave the runtime"):
        wheels.install(wheel, tmp_path / "site")
    assert not (tmp_path / "outside.py").exists()


def test_the_lock_is_read_for_this_machine(tmp_path):
    lock = tmp_path / "node.txt"
    lock.write_text(
        "# This file was autogenerated by uv via the following command:\n"
        "accelerate==1.15.0 ; python_full_version < '3.11' \\\n"
        f"    --hash=sha256:{'a' * 64}\n"
        "    # via peft\n"
        "accelerate==1.16.0 ; python_full_version >= '3.11' \\\n"
        f"    --hash=sha256:{'b' * 64} \\\n"
        f"    --hash=sha256:{'c' * 64}\n"
        "triton==3.7.1 ; sys_platform == 'linux' \\\n"
        f"    --hash=sha256:{'d' * 64}\n"
    )
    linux = {"python_full_version": "3.11.7", "sys_platform": "linux"}
    assert [str(pin) for pin in read_lock(lock, environment=linux)] == ["accelerate==1.16.0", "triton==3.7.1"]
    windows = {"python_full_version": "3.10.4", "sys_platform": "win32"}
    (pin,) = read_lock(lock, environment=windows)
    assert (str(pin), pin.hashes) == ("accelerate==1.15.0", frozenset({"a" * 64}))

    lock.write_text("numpy==2.0\n")
    with pytest.raises(LockError, match="numpy has no --hash"):
        read_lock(lock)


def test_the_locks_this_repository_ships_are_readable():
    repository = Path(__file__).resolve().parents[2]
    pins = read_lock(repository / "requirements" / "node.txt")
    assert {"transformers", "peft", "safetensors"} <= {pin.name for pin in pins}
    # Each shipped torch lock names a build the chooser picks: macOS's is "mps".
    from compute_swarm.desktop.runtime import this_machine

    on_a_mac = this_machine.available_builds(repository / "requirements", "Darwin")
    choice = builds.choose(
        inventory(), on_a_mac, cuda_driver_version=None, driver_version=None, system="Darwin"
    )
    assert choice.build in on_a_mac


NVIDIA = GpuInfo(
    index=0,
    vendor="nvidia",
    name="RTX 4070",
    backend="cuda",
    memory_total_bytes=12 << 30,
    memory_free_bytes=11 << 30,
)
AMD = GpuInfo(
    index=0,
    vendor="amd",
    name="RX 7800 XT",
    backend="rocm",
    memory_total_bytes=16 << 30,
    memory_free_bytes=15 << 30,
)
CPU_ONLY = CpuInfo(name="x86", logical_cores=8, memory_total_bytes=16 << 30, memory_available_bytes=8 << 30)


def inventory(*gpus: GpuInfo) -> DeviceInventory:
    return DeviceInventory(gpus=gpus, cpu=CPU_ONLY, backends=("cpu",))


@pytest.mark.parametrize(
    ("gpus", "driver", "system", "available", "build", "words"),
    [
        ((NVIDIA,), (12, 9), "Linux", {"cpu", "cu126", "cu128", "cu130"}, "cu128", "CUDA 12.8 build"),
        ((NVIDIA,), (13, 0), "Windows", {"cpu", "cu126", "cu130"}, "cu130", "CUDA up to 13.0"),
        ((NVIDIA,), (12, 2), "Linux", {"cpu", "cu126", "cu128"}, "cpu", "update the driver"),
        ((NVIDIA,), (12, 8), "Linux", {"cpu"}, "cpu", "no lock for a CUDA build"),
        ((AMD,), None, "Linux", {"cpu", "rocm6.3", "rocm6.4"}, "rocm6.4", "ROCm build"),
        ((AMD,), None, "Windows", {"cpu", "rocm6.4"}, "cpu", "ROCm builds for Linux only"),
        ((), None, "Darwin", {"cpu", "mps"}, "mps", "Apple GPU"),
        ((), None, "Linux", {"cpu", "cu128"}, "cpu", "no GPU"),
    ],
)
def test_the_build_fits_the_gpu_and_its_driver(gpus, driver, system, available, build, words):
    choice = builds.choose(
        inventory(*gpus),
        available,
        cuda_driver_version=driver,
        driver_version="570.1",
        system=system,
        machine="arm64",
    )
    assert choice.build == build and words in choice.reason, choice


def test_the_runtime_takes_the_apps_llama_cpp_lock_and_the_coordinators_wheels(tmp_path):
    from compute_swarm.desktop.runtime import this_machine

    locks = tmp_path / "requirements"
    locks.mkdir()
    (locks / "node.txt").write_text(f"numpy==2.3.0 \\\n    --hash=sha256:{'a' * 64}\n")
    (locks / "torch-cpu-linux.txt").write_text(f"torch==2.13.0+cpu \\\n    --hash=sha256:{'b' * 64}\n")
    (locks / "torch-cu128-linux.txt").write_text(f"torch==2.13.0+cu128 \\\n    --hash=sha256:{'c' * 64}\n")

    def runtime(gpus=()):
        return this_machine.engine_runtime(
            ("/srv/wheels",),
            coordinator="https://swarm.example.com",
            root=tmp_path / "runtime",
            locks=locks,
            inventory=inventory(*gpus),
        )[0]

    # An app built where llama.cpp could not be (no wheel, no lock): no inference, the rest as before.
    assert {pin.name for pin in runtime().pins} == {"numpy", "torch"}
    # The wheel build-app.sh built, pinned by its hash, fetched from the coordinator (last: a mirror
    # the settings name may carry it too).
    (locks / "llama-cpp-cpu-linux.txt").write_text(
        f"llama-cpp-python==0.3.36 \\\n    --hash=sha256:{'d' * 64}\n"
    )
    cpu = runtime()
    assert {pin.name for pin in cpu.pins} == {"numpy", "torch", "llama-cpp-python"}
    assert list(cpu.sources) == ["/srv/wheels", "https://swarm.example.com/sell/wheels"]
    assert this_machine.llama_lock(locks, "cu128", "Linux") == locks / "llama-cpp-cpu-linux.txt"
    assert this_machine.llama_lock(locks, "cpu", "Windows") is None
