"""The seller's path with the packaged app, end to end (marker `installer`; `.ci/run` runs it after the
README's test command, `make test-installer` alone): build the Linux package, install it into a fresh
home with no repository and no .venv on any path, start it under Xvfb already set to earn (as after a
press of *Start earning*), let it fetch its engine runtime, and see a real fine-tune complete on it and
its earnings credited. Prints the seller's first minutes: the runtime's fetch and the first job."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import httpx
import pytest

from compute_swarm.engine.jobs import DEMO_CHAT_DATASET
from compute_swarm.sdk.client import SwarmClient
from tests.swarm_processes import Coordinator

pytestmark = [pytest.mark.installer, pytest.mark.slow]

REPOSITORY = Path(__file__).resolve().parent.parent
PYPI = "https://pypi.org/simple"


def wheel_folders() -> list[str]:
    """Folders of wheels pip is configured to find here (this machine's CPU build of torch lies in one:
    download.pytorch.org cannot be reached from it)."""
    result = subprocess.run(
        ["pip", "config", "list"], capture_output=True, text=True, check=False, timeout=60
    )
    folders = []
    for line in result.stdout.splitlines():
        name, _, value = line.partition("=")
        if name.endswith("find-links"):
            folders += [folder for folder in value.strip("'\"").split() if Path(folder).is_dir()]
    return list(dict.fromkeys(folders))


def test_the_installed_app_fetches_its_engine_and_earns_from_a_real_fine_tune(tmp_path: Path) -> None:
    if shutil.which("xvfb-run") is None:
        pytest.skip("installer: needs Xvfb (Debian's xvfb) to start the app in a real window")
    started = time.monotonic()
    subprocess.run(["sh", "installers/build-app.sh"], cwd=REPOSITORY, check=True, timeout=1200)
    (package,) = sorted((REPOSITORY / "dist").glob("compute-swarm-*-linux-*.tar.gz"))
    built_seconds = time.monotonic() - started
    with tarfile.open(package) as archive:
        archive.extractall(tmp_path / "download", filter="tar")
    (unpacked,) = (tmp_path / "download").iterdir()
    home = tmp_path / "home"
    home.mkdir()
    # Nothing of this machine's Python: no repository, no virtual environment, no user site.
    environment = {
        "HOME": str(home),
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "SWARM_TOKEN_STORE": "file",
        **{
            name: os.environ[name]
            for name in ("SSL_CERT_FILE", "HTTPS_PROXY", "https_proxy")
            if name in os.environ
        },
    }
    subprocess.run(["sh", str(unpacked / "install.sh")], env=environment, check=True, timeout=300)
    app = home / ".local/share/compute-swarm/app/compute-swarm-app"
    assert app.is_file() and (home / ".local/share/applications/compute-swarm.desktop").is_file()

    coordinator = Coordinator(tmp_path / "coordinator").start()
    try:
        settings = home / ".config" / "compute-swarm" / "settings.json"
        settings.parent.mkdir(parents=True)
        settings.write_text(
            json.dumps(
                {
                    "version": 3,
                    "coordinator": coordinator.url,
                    "earning": True,  # as the seller left it: the app starts earning at once
                    "autostart": False,
                    "runtime_sources": [*wheel_folders(), "https://download.pytorch.org/whl/cpu", PYPI],
                }
            )
        )
        log = (tmp_path / "app.log").open("w")
        launched = time.monotonic()
        process = subprocess.Popen(
            ["xvfb-run", "-a", "-s", "-screen 0 1280x1024x24", str(app), "-v", "tray"],
            env={**environment, "QT_QPA_PLATFORM": "xcb"},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            runtime_ready = wait_for(
                lambda: "the engine runtime" in (tmp_path / "app.log").read_text()
                and "is ready" in (tmp_path / "app.log").read_text(),
                600, process, tmp_path / "app.log", "the engine runtime",
            )  # fmt: skip
            wait_for(
                lambda: coordinator.health()["nodes_connected"] == 1,
                120,
                process,
                tmp_path / "app.log",
                "the node",
            )
            connected = time.monotonic()
            buyer = SwarmClient(coordinator.url, coordinator.create_buyer("buyer"))
            dataset = buyer.upload_file(DEMO_CHAT_DATASET)
            job = buyer.submit_lora(
                {"base_model": "smollm2-135m-instruct", "dataset": dataset["id"], "max_steps": 3,
                 "batch_size": 2, "max_sequence_length": 96, "learning_rate": 1e-3, "eval_fraction": 0.0}
            )  # fmt: skip
            wait_for(
                lambda: buyer.job(job["id"])["state"] == "completed",
                600,
                process,
                tmp_path / "app.log",
                "the job",
            )
            finished = time.monotonic()
            assert node_credit_micro(coordinator) > 0, "the seller's earnings are credited"
        finally:
            os.killpg(process.pid, 15)
            process.wait(60)
            log.close()
    finally:
        coordinator.kill()
    runtime = next((home / ".local/share/compute-swarm/runtime").glob("cpu-*"))
    print(
        f"\nthe seller's first minutes: package built in {built_seconds:.0f} s, {package.stat().st_size / 2**20:.0f} MB; "
        f"engine runtime fetched {runtime_ready - launched:.0f} s after launch "
        f"({sum(path.stat().st_size for path in runtime.rglob('*') if path.is_file()) / 2**30:.1f} GiB); "
        f"connected after {connected - launched:.0f} s; first job done {finished - connected:.0f} s after submission"
    )


def wait_for(condition, seconds: float, process: subprocess.Popen, log: Path, what: str) -> float:
    deadline = time.monotonic() + seconds
    while True:
        try:
            if condition():
                return time.monotonic()
        except (OSError, httpx.HTTPError):
            pass
        if process.poll() is not None:
            pytest.fail(
                f"the app exited ({process.returncode}) waiting for {what}:\n{log.read_text()[-4000:]}"
            )
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {seconds:.0f} s:\n{log.read_text()[-4000:]}")
        time.sleep(1)


def node_credit_micro(coordinator: Coordinator) -> int:
    from compute_swarm.coordinator.store import ledger
    from compute_swarm.coordinator.store.database import Database
    from compute_swarm.coordinator.store.tables import Node

    database = Database(f"sqlite:///{coordinator.data_dir / 'coordinator.sqlite3'}")
    try:
        with database.reading() as session:
            (node,) = session.query(Node).all()
            return ledger.balances(session, ledger.node_accounts(node.id))
    finally:
        database.close()
