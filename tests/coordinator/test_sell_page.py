"""The sellers' page: the app for the visitor's OS, each download made to join this swarm (its address,
and the invite of an invite link), and the agent versions the coordinator takes and offers."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from compute_swarm import invitation
from compute_swarm.coordinator.app import create_app
from compute_swarm.coordinator.service import admission
from compute_swarm.coordinator.settings import Settings

ORIGIN = "http://127.0.0.1:8000"
WINDOWS = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/131.0 Safari/537.36"
LINUX = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/131.0 Safari/537.36"
MAC = "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 Version/18.1 Safari/605.1.15"


def linux_package(folder: Path, version: str) -> Path:
    """A package shaped as installers/linux/package.sh makes it: <name>/compute-swarm-app/..."""
    name = f"compute-swarm-{version}-linux-x86_64"
    path = folder / f"{name}.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        for member, text in (
            (f"{name}/install.sh", "#!/bin/sh\n"),
            (f"{name}/compute-swarm-app/compute-swarm-app", "the app " * 1000),
        ):
            entry = tarfile.TarInfo(member)
            entry.size = len(text)
            archive.addfile(entry, io.BytesIO(text.encode()))
    return path


@pytest.fixture
def downloads(tmp_path) -> Path:
    folder = tmp_path / "downloads"
    folder.mkdir()
    linux_package(folder, "0.1.0")
    linux_package(folder, "0.2.0")  # the newest is offered
    (folder / "compute-swarm-0.2.0-windows-x86_64-setup.exe").write_bytes(b"MZ" + b"\0" * 5000)
    (folder / "notes.txt").write_text("not a package")
    return folder


def client_for(tmp_path: Path, downloads: Path, **settings) -> TestClient:
    app = create_app(Settings(data_dir=tmp_path / "coordinator", app_downloads_dir=downloads, **settings))
    return TestClient(app, base_url=ORIGIN, follow_redirects=False)


def new_invite(client: TestClient, uses: int = 1) -> str:
    services = client.app.state.services
    with services.database.transaction() as session:
        return admission.create_invite(session, uses, None)


def test_the_page_offers_the_app_for_the_visitors_system_and_the_others_beside(tmp_path, downloads):
    with client_for(tmp_path, downloads, node_admission="open") as client:
        page = client.get("/sell", headers={"User-Agent": WINDOWS})
        assert page.status_code == 200
        assert 'href="/sell/download/windows" download>Download for Windows</a>' in page.text
        assert 'href="/sell/download/linux" download>Linux</a>' in page.text
        assert "You keep <strong>90%</strong>" in page.text
        on_linux = client.get("/sell", headers={"User-Agent": LINUX})
        assert "Download for Linux</a>" in on_linux.text and "version 0.2.0" in on_linux.text
        on_mac = client.get("/sell", headers={"User-Agent": MAC})
        assert "There is no app for macOS here yet." in on_mac.text
        assert client.get("/sell/download/macos").status_code == 404


def test_a_linux_download_carries_the_coordinator_and_unpacks_whole(tmp_path, downloads):
    with client_for(tmp_path, downloads, node_admission="open") as client:
        response = client.get("/sell/download/linux")
        assert response.status_code == 200
        assert response.headers["content-disposition"] == (
            'attachment; filename="compute-swarm-0.2.0-linux-x86_64.tar.gz"'
        )
        assert int(response.headers["content-length"]) == len(response.content)
        with tarfile.open(fileobj=io.BytesIO(response.content), mode="r:gz") as archive:
            names = archive.getnames()
            join = archive.extractfile("compute-swarm-0.2.0-linux-x86_64/compute-swarm-app/join.json")
            assert join is not None
            assert invitation.from_json(join.read()) == invitation.Invitation(ORIGIN)
        assert "compute-swarm-0.2.0-linux-x86_64/compute-swarm-app/compute-swarm-app" in names
        assert "compute-swarm-0.2.0-linux-x86_64/install.sh" in names
        # The package itself is untouched: its bytes follow the added member.
        original = (downloads / "compute-swarm-0.2.0-linux-x86_64.tar.gz").read_bytes()
        assert response.content.endswith(original)


def test_an_invite_link_puts_the_invite_in_the_download(tmp_path, downloads):
    with client_for(tmp_path, downloads, node_admission="invite") as client:
        without = client.get("/sell", headers={"User-Agent": WINDOWS})
        assert "This swarm lets computers join by invitation." in without.text
        code = new_invite(client)
        page = client.get(f"/sell?invite={code}", headers={"User-Agent": WINDOWS})
        assert "Your invitation is in this download" in page.text
        assert f'href="/sell/download/windows?invite={code}"' in page.text
        response = client.get(f"/sell/download/windows?invite={code}")
        assert response.status_code == 200
        file_name = response.headers["content-disposition"].split('filename="')[1].rstrip('"')
        assert file_name.startswith("compute-swarm-0.2.0-windows-x86_64-setup.join-")
        assert invitation.from_file_name(file_name) == invitation.Invitation(ORIGIN, code)
        assert response.content == (downloads / "compute-swarm-0.2.0-windows-x86_64-setup.exe").read_bytes()
        # Looking at the page or downloading spends nothing: the app spends the invite on registering.
        with client.app.state.services.database.transaction() as session:
            assert admission.invite_usable(session, code)
        for bad in ("swarm-invite-unknown", "<script>", "x" * 101):
            refused = client.get("/sell/download/linux", params={"invite": bad})
            assert refused.status_code in (403, 422), bad
            assert "invite" in refused.text
        assert "unknown, used up or expired" in client.get("/sell?invite=swarm-invite-unknown").text


def test_the_public_origin_is_the_address_a_download_carries(tmp_path, downloads):
    settings = {"node_admission": "open", "public_origin": "https://swarm.example.com"}
    with client_for(tmp_path, downloads, **settings) as client:
        response = client.get("/sell/download/windows")
        file_name = response.headers["content-disposition"].split('filename="')[1].rstrip('"')
        assert invitation.from_file_name(file_name).coordinator == "https://swarm.example.com"


def test_without_packages_the_page_says_so(tmp_path):
    with client_for(tmp_path, tmp_path / "nothing-here", node_admission="approval") as client:
        page = client.get("/sell", headers={"User-Agent": LINUX})
        assert "does not offer the app for download yet" in page.text
        assert "approve each new computer" in page.text


def test_agent_versions_in_the_settings_must_be_versions(tmp_path):
    with pytest.raises(ValidationError, match="minimum_agent_version must be a version"):
        Settings(data_dir=tmp_path, minimum_agent_version="latest")
    settings = Settings(data_dir=tmp_path, latest_agent_version="0.3.0", minimum_agent_version="0.2")
    assert settings.offered_agent_version == "0.3.0"
    assert Settings(data_dir=tmp_path).offered_agent_version  # this coordinator's own version


def test_invitations_round_trip_through_json_and_file_names():
    offered = invitation.Invitation("https://swarm.example.com", "swarm-invite-abc_DEF-123")
    assert invitation.from_json(invitation.to_json(offered)) == offered
    name = invitation.tagged_file_name("compute-swarm-0.2.0-macos-arm64.dmg", offered)
    assert name.endswith(".dmg") and invitation.from_file_name(name) == offered
    # A second download of the same name, as browsers save it.
    again = name.replace(".dmg", " (1).dmg")
    assert invitation.from_file_name(again) == offered
    assert invitation.from_file_name("compute-swarm-0.2.0-macos-arm64.dmg") is None
    for text in (
        "[]",
        json.dumps({"coordinator": "ftp://host"}),
        json.dumps({"coordinator": "http://host", "extra": 1}),
        json.dumps({"coordinator": "http://host", "invite_code": "has space"}),
        json.dumps({"coordinator": "http://host/?next=evil"}),
        "{" * 5000,
    ):
        with pytest.raises(invitation.InvitationError):
            invitation.from_json(text)
    with pytest.raises(invitation.InvitationError):
        invitation.from_file_name("compute-swarm-0.2.0-windows-x86_64-setup.join-AAAAAAAAAAAA.exe")


def test_the_wheels_the_app_needs_are_served_as_a_package_index(tmp_path, downloads):
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    from compute_swarm.engine.package_index import Pin, list_files

    wheels = downloads / "wheels"
    wheels.mkdir()
    wheel = wheels / "llama_cpp_python-0.3.36-cp311-cp311-linux_x86_64.whl"
    wheel.write_bytes(b"PK\x03\x04 a wheel")
    (wheels / "notes.txt").write_text("not a wheel")
    (downloads / "secret.whl").write_bytes(b"outside the wheels folder")
    with client_for(tmp_path, downloads, node_admission="open") as client:
        # The engine runtime's fetcher reads it as it reads PyPI (TestClient is an httpx.Client).
        pin = Pin(canonicalize_name("llama-cpp-python"), Version("0.3.36"), frozenset({"0" * 64}))
        (candidate,) = list_files(client, f"{ORIGIN}/sell/wheels", pin)
        assert candidate.filename == wheel.name
        assert client.get(candidate.location).content == wheel.read_bytes()
        for path in (
            "/sell/wheels/numpy/",
            "/sell/wheels/llama-cpp-python/notes.txt",
            "/sell/wheels/llama-cpp-python/..%2Fsecret.whl",
            "/sell/wheels/..%2F/",
        ):
            assert client.get(path).status_code == 404, path
