"""The seller's settings file: round trip, defaults, and unusable files kept aside rather than lost."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from compute_swarm.desktop.guards import GuardSettings
from compute_swarm.desktop.settings import (
    SETTINGS_VERSION,
    Settings,
    SettingsError,
    SettingsStore,
    default_config_directory,
    normalize_invite_code,
    normalize_runtime_source,
)
from compute_swarm.desktop.transfer import TransferSettings


def test_settings_round_trip_with_a_version(tmp_path: Path) -> None:
    store = SettingsStore(tmp_path / "config" / "settings.json")
    assert store.load().settings == Settings()
    settings = Settings(
        coordinator="HTTP://Swarm.Example:80/",
        earning=True,
        guards=GuardSettings(temperature_limit_celsius=75, only_when_idle=True, idle_minutes=3),
    )
    store.save(settings)
    loaded = store.load()
    assert loaded.problem is None
    assert loaded.settings == settings
    assert loaded.settings.coordinator == "http://swarm.example"
    assert json.loads(store.path.read_text())["version"] == SETTINGS_VERSION


def test_an_invalid_file_is_kept_aside_and_the_defaults_used(tmp_path: Path) -> None:
    store = SettingsStore(tmp_path / "settings.json")
    store.path.write_text('{"version": 1, "guards": {"temperature_limit_celsius": "hot"}}')
    loaded = store.load()
    assert loaded.settings == Settings()
    assert "guards.temperature_limit_celsius" in loaded.problem
    kept = list(tmp_path.glob("settings.json.invalid-*"))
    assert len(kept) == 1 and "hot" in kept[0].read_text()
    assert str(kept[0]) in loaded.problem

    store.path.write_text("not json{")
    assert "defaults are in use" in store.load().problem


def test_a_file_from_a_newer_version_is_refused_not_overwritten(tmp_path: Path) -> None:
    store = SettingsStore(tmp_path / "settings.json")
    store.path.write_text(json.dumps({"version": SETTINGS_VERSION + 1, "coordinator": "http://x"}))
    with pytest.raises(SettingsError, match="newer compute-swarm"):
        store.load()
    assert json.loads(store.path.read_text())["version"] == SETTINGS_VERSION + 1


def test_defaults_come_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SWARM_COORDINATOR", "https://coordinator.example/")
    monkeypatch.setenv("SWARM_CONFIG_DIR", str(tmp_path))
    assert Settings().coordinator == "https://coordinator.example"
    assert default_config_directory() == tmp_path
    with pytest.raises(ValueError, match="not an http"):
        Settings(coordinator="ftp://nope")


def test_the_headless_node_takes_the_settings_guards_and_sharing_with_its_flags(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import argparse

    from compute_swarm.desktop.cli import node_settings, register_commands

    monkeypatch.setenv("SWARM_CONFIG_DIR", str(tmp_path))
    SettingsStore(tmp_path / "settings.json").save(
        Settings(
            guards=GuardSettings(temperature_limit_celsius=70),
            sharing=TransferSettings(upload_limit_kib_per_second=512),
        )
    )
    parser = argparse.ArgumentParser()
    register_commands(parser.add_subparsers())

    def guards(*flags: str) -> GuardSettings:
        return node_settings(parser.parse_args(["node", *flags]))[0]

    def sharing(*flags: str) -> TransferSettings:
        return node_settings(parser.parse_args(["node", *flags]))[1]

    assert sharing() == TransferSettings(upload_limit_kib_per_second=512)
    changed_sharing = sharing("--upload-limit", "100", "--cache-gib", "20", "--transfer-port", "7000")
    assert (changed_sharing.upload_bytes_per_second, changed_sharing.cache_bytes, changed_sharing.port) == (
        100 * 1024,
        20 * 2**30,
        7000,
    )
    assert not sharing("--no-sharing").enabled
    with pytest.raises(ValueError, match="port"):
        sharing("--transfer-port", "70000")
    with pytest.raises(ValueError, match="upload_limit"):
        sharing("--upload-limit", "-1")

    assert guards() == GuardSettings(temperature_limit_celsius=70)
    changed = guards("--max-temperature", "80", "--ignore-games", "--only-when-idle", "5", "--hours", "22-8")
    assert changed.temperature_limit_celsius == 80
    assert not changed.pause_for_games and not changed.pause_when_full_screen
    assert changed.only_when_idle and changed.idle_minutes == 5
    assert (changed.schedule_enabled, changed.schedule_start_hour, changed.schedule_end_hour) == (True, 22, 8)
    with pytest.raises(ValueError, match="START-END"):
        guards("--hours", "night")
    with pytest.raises(ValueError, match="schedule_start_hour"):
        guards("--hours", "25-3")
    with pytest.raises(ValueError, match="temperature_limit_celsius"):
        guards("--max-temperature", "500")


def test_an_invite_code_is_kept_trimmed_and_a_bad_one_refused_with_a_reason(tmp_path: Path) -> None:
    store = SettingsStore(tmp_path / "settings.json")
    store.save(Settings(invite_code="  swarm-invite-abc_123\n"))
    assert store.load().settings.invite_code == "swarm-invite-abc_123"
    for typed, said in (
        ("", "type the invite code"),
        ("x" * 101, "at most 100 characters, this is 101"),
        ("swarm-invite-abc 123", "no spaces"),
    ):
        with pytest.raises(ValueError, match=said):
            normalize_invite_code(typed)
    # A file from before invite codes (version 1) reads as it was.
    store.path.write_text(json.dumps({"version": 1, "coordinator": "http://x", "earning": True}))
    loaded = store.load()
    assert loaded.problem is None and loaded.settings.earning and loaded.settings.invite_code is None


def test_runtime_sources_are_index_urls_or_full_folder_paths(tmp_path: Path) -> None:
    store = SettingsStore(tmp_path / "settings.json")
    store.save(Settings(runtime_sources=(" https://mirror.example/simple/ ", "/srv/wheels")))
    assert store.load().settings.runtime_sources == ("https://mirror.example/simple", "/srv/wheels")
    for typed, said in (
        ("mirror.example/simple", "package index URL"),
        ("https://mirror example/simple", "is not a URL"),
    ):
        with pytest.raises(ValueError, match=said):
            normalize_runtime_source(typed)
    # A version 2 file (before runtime sources) reads as it was: the build's own indexes.
    store.path.write_text(json.dumps({"version": 2, "coordinator": "http://x", "invite_code": "abc"}))
    loaded = store.load()
    assert loaded.problem is None and loaded.settings.runtime_sources == ()


def test_runtime_sources_default_to_the_environments(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SWARM_RUNTIME_SOURCES", " https://mirror.example/simple/  not-a-source /srv/wheels ")
    assert Settings().runtime_sources == ("https://mirror.example/simple", "/srv/wheels")
    # Sources the settings name come first; the environment is only the default.
    assert Settings(runtime_sources=("/opt/wheels",)).runtime_sources == ("/opt/wheels",)
