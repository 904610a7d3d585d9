"""A downloaded app's first start joins the swarm its download names (desktop.first_run)."""

from __future__ import annotations

import os

from compute_swarm.desktop import first_run
from compute_swarm.desktop.settings import SettingsStore
from compute_swarm.invitation import JOIN_FILE, Invitation, tagged_file_name, to_json

INSTALLER = "compute-swarm-0.2.0-windows-x86_64-setup.exe"


def test_the_join_file_beside_the_app_comes_first(tmp_path):
    app, downloads = tmp_path / "app", tmp_path / "Downloads"
    app.mkdir()
    downloads.mkdir()
    (app / JOIN_FILE).write_text(to_json(Invitation("http://10.0.0.5:8000", "swarm-invite-beside")))
    (downloads / tagged_file_name(INSTALLER, Invitation("http://elsewhere:8000"))).write_bytes(b"MZ")
    found = first_run.find_invitation(app, downloads)
    assert found == Invitation("http://10.0.0.5:8000", "swarm-invite-beside")


def test_else_the_newest_tagged_download_and_unreadable_ones_are_passed_over(tmp_path):
    downloads = tmp_path / "Downloads"
    downloads.mkdir()
    older = downloads / tagged_file_name(INSTALLER, Invitation("http://old:8000"))
    newer = downloads / tagged_file_name(INSTALLER, Invitation("https://swarm.example.com", "swarm-invite-x"))
    broken = downloads / "compute-swarm-0.2.0-windows-x86_64-setup.join-bm90IGpzb24.exe"  # "not json"
    for age, path in ((300, older), (200, newer), (100, broken)):
        path.write_bytes(b"MZ")
        os.utime(path, (1_700_000_000 - age, 1_700_000_000 - age))
    assert first_run.find_invitation(None, downloads) == Invitation(
        "https://swarm.example.com", "swarm-invite-x"
    )
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / JOIN_FILE).write_text("{not json")  # logged and passed over
    assert first_run.find_invitation(tmp_path / "app", downloads).coordinator == "https://swarm.example.com"
    assert first_run.find_invitation(None, tmp_path / "missing") is None


def test_the_first_start_saves_the_invited_swarm_as_the_settings(tmp_path):
    store = SettingsStore(tmp_path / "config" / "settings.json")
    app = tmp_path / "app"
    app.mkdir()
    assert first_run.join_offered_swarm(store, app_folder=app, downloads=None) is None
    assert not store.path.exists()
    (app / JOIN_FILE).write_text(to_json(Invitation("http://10.0.0.5:8000/", "swarm-invite-beside")))
    assert first_run.join_offered_swarm(store, app_folder=app, downloads=None) is not None
    settings = store.load().settings
    assert settings.coordinator == "http://10.0.0.5:8000"
    assert settings.invite_code == "swarm-invite-beside"
