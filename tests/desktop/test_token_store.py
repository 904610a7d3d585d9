"""The node's token store: a private file, or the OS keyring when it works."""

from __future__ import annotations

import json
import logging
import os
import stat
import sys
from pathlib import Path

import pytest

from compute_swarm.desktop import token_store


def test_token_store_round_trip_in_a_private_file(tmp_path: Path) -> None:
    credentials = token_store.Credentials("HTTPS://Swarm.Example:443/", "node_1", "swarm-node-secret")
    token_store.save(credentials, tmp_path)

    path = tmp_path / token_store.CREDENTIALS_FILE
    if sys.platform != "win32":
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = token_store.load("https://swarm.example", tmp_path)
    assert loaded == token_store.Credentials("https://swarm.example", "node_1", "swarm-node-secret")
    assert "swarm-node-secret" not in repr(loaded)
    assert token_store.load("https://other.example", tmp_path) is None

    assert token_store.forget("https://swarm.example/", tmp_path)
    assert token_store.load("https://swarm.example", tmp_path) is None
    assert not path.exists()


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX file modes")
def test_token_store_restricts_a_file_others_could_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    token_store.save(token_store.Credentials("http://localhost:8000", "node_1", "token"), tmp_path)
    path = tmp_path / token_store.CREDENTIALS_FILE
    os.chmod(path, 0o644)
    with caplog.at_level(logging.WARNING):
        assert token_store.load("http://localhost:8000", tmp_path) is not None
    assert "readable by other users" in caplog.text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_token_store_falls_back_to_the_file_when_the_keyring_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import keyring
    from keyring.backend import KeyringBackend
    from keyring.errors import KeyringError

    class BrokenKeyring(KeyringBackend):
        priority = 5

        def get_password(self, service: str, username: str) -> str | None:
            raise KeyringError("locked")

        def set_password(self, service: str, username: str, password: str) -> None:
            raise KeyringError("locked")

        def delete_password(self, service: str, username: str) -> None:
            raise KeyringError("locked")

    class MemoryKeyring(KeyringBackend):
        priority = 5

        def __init__(self) -> None:
            self.secrets: dict[tuple[str, str], str] = {}

        def get_password(self, service: str, username: str) -> str | None:
            return self.secrets.get((service, username))

        def set_password(self, service: str, username: str, password: str) -> None:
            self.secrets[service, username] = password

        def delete_password(self, service: str, username: str) -> None:
            self.secrets.pop((service, username))

    monkeypatch.delenv(token_store.STORE_ENVIRONMENT_VARIABLE)
    previous = keyring.get_keyring()
    credentials = token_store.Credentials("http://localhost:8000", "node_1", "token")
    try:
        keyring.set_keyring(BrokenKeyring())
        token_store.save(credentials, tmp_path)
        assert (tmp_path / token_store.CREDENTIALS_FILE).exists()
        assert token_store.load("http://localhost:8000", tmp_path) == credentials

        # A working keyring takes the token over, and the plaintext copy goes.
        memory = MemoryKeyring()
        keyring.set_keyring(memory)
        token_store.save(credentials, tmp_path)
        assert not (tmp_path / token_store.CREDENTIALS_FILE).exists()
        assert (
            json.loads(memory.secrets[token_store.KEYRING_SERVICE, "http://localhost:8000"])["token"]
            == "token"
        )
        assert token_store.load("http://localhost:8000", tmp_path) == credentials
        assert token_store.forget("http://localhost:8000", tmp_path)
        assert not memory.secrets
    finally:
        keyring.set_keyring(previous)
