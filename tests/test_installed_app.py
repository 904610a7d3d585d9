"""The seller's path with the packaged app, end to end (marker `installer`; `.ci/run` runs it after the
README's test command, `make test-installer` alone): build the Linux package, offer it on a local
coordinator's sell page, download it there with an invite link, install it into a fresh home with no
repository and no .venv on any path, start it under Xvfb and press *Start earning* (xdotool); it joins
the swarm its download names, fetches its engine runtime, and a real fine-tune completes on it with its
earnings credited, and it answers a chat through llama.cpp from the runtime. Prints the seller's first
minutes: the runtime's fetch and the first job."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import httpx
import openai
import pytest

from compute_swarm.engine.jobs import DEMO_CHAT_DATASET
from compute_swarm.sdk.client import SwarmClient
from tests.swarm_processes import Coordinator, run_cli

pytestmark = [pytest.mark.installer, pytest.mark.slow]

REPOSITORY = Path(__file__).resolve().parent.parent
PYPI = "https://pypi.org/simple"
LINUX_BROWSER = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/131.0 Safari/537.36"
WINDOW_MARGIN = 16  # the window's layout margin (desktop/tray/window.py): the button sits inside it


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


def test_the_downloaded_app_joins_fetches_its_engine_and_earns_from_a_real_fine_tune(
    tmp_path: Path, display: str
) -> None:
    if shutil.which("xdotool") is None:
        pytest.skip("installer: needs xdotool (installers/debian-packages.sh installs it)")
    started = time.monotonic()
    subprocess.run(["sh", "installers/build-app.sh"], cwd=REPOSITORY, check=True, timeout=1200)
    (package,) = sorted((REPOSITORY / "dist").glob("compute-swarm-*-linux-*.tar.gz"))
    built_seconds = time.monotonic() - started
    offered = tmp_path / "app-downloads"
    offered.mkdir()
    shutil.copy(package, offered / package.name)
    # llama-cpp-python's wheel, built by build-app.sh: the runtime fetches it from the coordinator.
    shutil.copytree(REPOSITORY / "dist" / "wheels", offered / "wheels")

    coordinator = Coordinator(
        tmp_path / "coordinator",
        environment={"SWARM_NODE_ADMISSION": "invite", "SWARM_APP_DOWNLOADS_DIR": str(offered)},
    ).start()
    process = None
    try:
        invite = run_cli("admin", "create-invite", "--data-dir", str(coordinator.data_dir), "--uses", "1")
        assert invite.returncode == 0, invite.stderr
        code = invite.stdout.strip().splitlines()[-1]
        # The seller opens the invite link and presses the download button for their system.
        page = httpx.get(
            f"{coordinator.url}/sell", params={"invite": code}, headers={"User-Agent": LINUX_BROWSER}
        )
        assert f'href="/sell/download/linux?invite={code}" download>Download for Linux</a>' in page.text
        download = tmp_path / "Downloads" / package.name
        download.parent.mkdir()
        with httpx.stream(
            "GET", f"{coordinator.url}/sell/download/linux", params={"invite": code}
        ) as response:
            assert response.status_code == 200
            with download.open("wb") as file:
                for chunk in response.iter_bytes():
                    file.write(chunk)
        with tarfile.open(download) as archive:
            archive.extractall(tmp_path / "unpacked", filter="tar")
        (unpacked,) = (tmp_path / "unpacked").iterdir()

        home = tmp_path / "home"
        home.mkdir()
        # Nothing of this machine's Python: no repository, no virtual environment, no user site.
        environment = {
            "HOME": str(home),
            "PATH": "/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "SWARM_TOKEN_STORE": "file",
            # Where this machine finds its wheels (download.pytorch.org is out of reach here).
            "SWARM_RUNTIME_SOURCES": " ".join(
                [*wheel_folders(), "https://download.pytorch.org/whl/cpu", PYPI]
            ),
            **{
                name: os.environ[name]
                for name in ("SSL_CERT_FILE", "HTTPS_PROXY", "https_proxy")
                if name in os.environ
            },
        }
        subprocess.run(["sh", str(unpacked / "install.sh")], env=environment, check=True, timeout=300)
        app = home / ".local/share/compute-swarm/app/compute-swarm-app"
        assert app.is_file() and (home / ".local/share/applications/compute-swarm.desktop").is_file()

        log_path = tmp_path / "app.log"
        log = log_path.open("w")
        launched = time.monotonic()
        process = subprocess.Popen(
            [str(app), "-v", "tray"],
            env={**environment, "QT_QPA_PLATFORM": "xcb", "DISPLAY": display},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        press_start_earning(display)
        settings = json.loads((home / ".config/compute-swarm/settings.json").read_text())
        assert settings["coordinator"] == coordinator.url, "the app joins the swarm its download names"
        runtime_ready = wait_for(
            lambda: "the engine runtime" in log_path.read_text() and "is ready" in log_path.read_text(),
            600, process, log_path, "the engine runtime",
        )  # fmt: skip
        wait_for(lambda: coordinator.health()["nodes_connected"] == 1, 120, process, log_path, "the node")
        connected = time.monotonic()
        buyer_key = coordinator.create_buyer("buyer")
        buyer = SwarmClient(coordinator.url, buyer_key)
        dataset = buyer.upload_file(DEMO_CHAT_DATASET)
        job = buyer.submit_lora(
            {"base_model": "smollm2-135m-instruct", "dataset": dataset["id"], "max_steps": 3,
             "batch_size": 2, "max_sequence_length": 96, "learning_rate": 1e-3, "eval_fraction": 0.0}
        )  # fmt: skip
        wait_for(lambda: buyer.job(job["id"])["state"] == "completed", 600, process, log_path, "the job")
        finished = time.monotonic()
        assert node_credit_micro(coordinator) > 0, "the seller's earnings are credited"
        # Inference too: llama.cpp came with the runtime, and the node serves chat.
        chat = openai.OpenAI(base_url=f"{coordinator.url}/v1", api_key=buyer_key, max_retries=0, timeout=300)
        answer = chat.chat.completions.create(
            model="smollm2-135m-instruct", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8
        )
        assert answer.choices[0].message.content and answer.usage.completion_tokens > 0
        chatted = time.monotonic()
    finally:
        if process is not None:
            os.killpg(process.pid, 15)
            process.wait(60)
        coordinator.kill()
    runtime = next((home / ".local/share/compute-swarm/runtime").glob("cpu-*"))
    print(
        f"\nthe seller's first minutes: package built in {built_seconds:.0f} s, {package.stat().st_size / 2**20:.0f} MB; "
        f"engine runtime fetched {runtime_ready - launched:.0f} s after launch "
        f"({sum(path.stat().st_size for path in runtime.rglob('*') if path.is_file()) / 2**30:.1f} GiB); "
        f"connected after {connected - launched:.0f} s; first job done {finished - connected:.0f} s after submission; "
        f"first chat answered in {chatted - finished:.0f} s"
    )


@pytest.fixture
def display(tmp_path: Path):
    """An X server of the test's own; yields its DISPLAY."""
    if shutil.which("Xvfb") is None:
        pytest.skip("installer: needs Xvfb (installers/debian-packages.sh installs it)")
    read, write = os.pipe()
    server = subprocess.Popen(
        ["Xvfb", "-displayfd", str(write), "-screen", "0", "1280x1024x24", "-nolisten", "tcp"],
        pass_fds=(write,),
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "xvfb.log").open("w"),
    )
    os.close(write)
    with os.fdopen(read) as numbers:
        number = numbers.readline().strip()
    try:
        assert number, f"Xvfb did not start: {(tmp_path / 'xvfb.log').read_text()}"
        yield f":{number}"
    finally:
        server.terminate()
        server.wait(30)


def press_start_earning(display: str) -> None:
    """Click the window's one big button, as a seller does: top right, inside the layout's margin."""
    environment = {"DISPLAY": display, "PATH": "/usr/bin:/bin"}

    def xdotool(*arguments: str) -> str:
        done = subprocess.run(
            ["xdotool", *arguments], env=environment, capture_output=True, text=True, timeout=120, check=True
        )
        return done.stdout

    window = xdotool("search", "--sync", "--onlyvisible", "--name", "^compute-swarm$").split()[0]
    time.sleep(2)  # the first paint
    geometry = dict(
        line.split("=", 1)
        for line in xdotool("getwindowgeometry", "--shell", window).splitlines()
        if "=" in line
    )
    x = int(geometry["X"]) + int(geometry["WIDTH"]) - WINDOW_MARGIN - 50
    y = int(geometry["Y"]) + WINDOW_MARGIN + 16
    xdotool("mousemove", "--sync", str(x), str(y), "click", "1")


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
