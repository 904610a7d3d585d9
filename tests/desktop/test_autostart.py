"""Start-at-login entries: the files and registry values each OS reads, built, written, found and removed
under a throwaway home directory (the registry is a stand-in with winreg's interface)."""

from __future__ import annotations

import os
import plistlib
import subprocess
import sys
from pathlib import Path

import pytest

from compute_swarm.desktop import autostart

REPOSITORY_ROOT = Path(__file__).resolve().parents[2]

AWKWARD_COMMAND = [
    "/opt/my apps/compute swarm",
    "tray",
    '--label=say "hi" to $USER and `whoami`',
    "C:\\back\\slash",
    "100% busy; done?",
    "",
    "tab\there",
]


@pytest.fixture
def home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    home_directory = tmp_path / "home"
    home_directory.mkdir()
    monkeypatch.setenv("HOME", str(home_directory))
    monkeypatch.setenv("USERPROFILE", str(home_directory))  # what Path.home() reads on Windows
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    return home_directory


@pytest.fixture
def on_linux(monkeypatch: pytest.MonkeyPatch, home: Path) -> Path:
    monkeypatch.setattr(sys, "platform", "linux")
    config_home = home / "xdg-config"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(config_home))
    return config_home


def parse_exec_value(raw_value: str) -> list[str]:
    """Undo an Exec value the way the Desktop Entry spec tells a launcher to: string escapes first, then
    the argument quoting, then the doubled percent signs. Written apart from the module on purpose."""
    string_escapes = {"s": " ", "n": "\n", "t": "\t", "r": "\r", "\\": "\\"}
    value = ""
    position = 0
    while position < len(raw_value):
        character = raw_value[position]
        if character == "\\":
            value += string_escapes[raw_value[position + 1]]
            position += 2
        else:
            value += character
            position += 1

    arguments: list[str] = []
    current: str | None = None
    in_quotes = False
    position = 0
    while position < len(value):
        character = value[position]
        if in_quotes:
            if character == "\\":
                assert value[position + 1] in '"`$\\', f"stray backslash in {value!r}"
                current += value[position + 1]
                position += 2
                continue
            if character == '"':
                in_quotes = False
            else:
                current += character
        elif character == " ":
            if current is not None:
                arguments.append(current)
                current = None
        elif character == '"':
            assert current is None, "a quote must open a whole argument"
            current = ""
            in_quotes = True
        else:
            assert character not in " \t\n\"'\\><~|&;$*?#()`", f"unquoted reserved {character!r} in {value!r}"
            current = (current or "") + character
        position += 1
    assert not in_quotes, f"unterminated quote in {value!r}"
    if current is not None:
        arguments.append(current)

    for argument in arguments:
        assert "%" not in argument.replace("%%", ""), f"field code or lone % in {argument!r}"
    return [argument.replace("%%", "%") for argument in arguments]


def desktop_entry_keys(text: str) -> dict[str, str]:
    lines = text.splitlines()
    assert lines[0] == "[Desktop Entry]"
    return dict(line.split("=", 1) for line in lines[1:] if line)


# --- XDG (Linux and the other free desktops) ----------------------------------------------------------


def test_linux_round_trip_writes_finds_and_removes_the_entry(on_linux: Path) -> None:
    command = ["/usr/bin/compute-swarm", "tray", "--minimized"]
    assert not autostart.is_enabled()
    assert autostart.disable() is False

    written = autostart.enable(command)

    assert written == on_linux / "autostart" / "compute-swarm.desktop"
    assert autostart.is_enabled()
    keys = desktop_entry_keys(written.read_text(encoding="utf-8"))
    assert parse_exec_value(keys["Exec"]) == command
    assert list(written.parent.iterdir()) == [written], "no temporary file left behind"

    assert autostart.disable() is True
    assert not written.exists()
    assert not autostart.is_enabled()
    assert autostart.disable() is False


def test_enabling_again_replaces_the_command(on_linux: Path) -> None:
    autostart.enable(["/old/compute-swarm", "tray"])
    written = autostart.enable(["/new/compute-swarm", "tray", "--minimized"])
    keys = desktop_entry_keys(written.read_text(encoding="utf-8"))
    assert parse_exec_value(keys["Exec"]) == ["/new/compute-swarm", "tray", "--minimized"]


def test_enable_without_a_command_starts_this_installations_tray(on_linux: Path) -> None:
    written = autostart.enable()
    keys = desktop_entry_keys(written.read_text(encoding="utf-8"))
    assert parse_exec_value(keys["Exec"]) == autostart.tray_command()


@pytest.mark.parametrize("switch_off", ["Hidden=true", "X-GNOME-Autostart-enabled=false"])
def test_an_entry_switched_off_by_the_desktop_is_not_enabled(on_linux: Path, switch_off: str) -> None:
    written = autostart.enable(["/usr/bin/compute-swarm", "tray"])
    text = written.read_text(encoding="utf-8").replace("X-GNOME-Autostart-enabled=true\n", "")
    written.write_text(text + switch_off + "\n", encoding="utf-8")
    assert not autostart.is_enabled()
    assert autostart.disable() is True


@pytest.mark.parametrize("configured", ["relative/config", ""])
def test_a_relative_or_empty_xdg_config_home_is_ignored(
    monkeypatch: pytest.MonkeyPatch, home: Path, configured: str
) -> None:
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setenv("XDG_CONFIG_HOME", configured)
    monkeypatch.chdir(home)  # where a relative path would land if it were (wrongly) honoured

    written = autostart.enable(["/usr/bin/compute-swarm", "tray"])

    assert written == home / ".config" / "autostart" / "compute-swarm.desktop"
    assert written.is_file()
    assert not (home / "relative").exists()


def test_unset_xdg_config_home_means_dot_config(monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    monkeypatch.setattr(sys, "platform", "linux")
    assert (
        autostart.enable(["/usr/bin/compute-swarm"])
        == home / ".config" / "autostart" / "compute-swarm.desktop"
    )


def test_desktop_entry_is_a_valid_application_entry() -> None:
    keys = desktop_entry_keys(autostart.xdg_desktop_entry(["/usr/bin/compute-swarm", "tray", "--minimized"]))
    assert keys["Type"] == "Application"
    assert keys["Name"] == "compute-swarm"
    assert keys["Comment"]
    assert keys["Terminal"] == "false"
    assert keys["X-GNOME-Autostart-enabled"] == "true"
    assert keys["Exec"] == "/usr/bin/compute-swarm tray --minimized", "plain arguments stay unquoted"


def test_exec_quoting_gives_back_every_argument_unchanged() -> None:
    entry = autostart.xdg_desktop_entry(AWKWARD_COMMAND)
    keys = desktop_entry_keys(entry)
    assert len(entry.splitlines()) == len(keys) + 1, "a raw newline or tab would break the file"
    assert parse_exec_value(keys["Exec"]) == AWKWARD_COMMAND
    # The spec's own example: a literal $ inside quotes is written \\$ in the file.
    assert "\\\\$USER" in keys["Exec"]
    assert "100%% busy" in keys["Exec"]


def test_a_read_only_autostart_directory_is_reported_with_its_path(on_linux: Path) -> None:
    if not hasattr(os, "geteuid"):
        pytest.skip("directory permission bits do not stop writes on Windows")
    if os.geteuid() == 0:
        pytest.skip("root writes through directory permissions")
    autostart_directory = on_linux / "autostart"
    autostart_directory.mkdir(parents=True)
    autostart_directory.chmod(0o500)
    try:
        with pytest.raises(autostart.AutostartError) as raised:
            autostart.enable(["/usr/bin/compute-swarm", "tray"])
        assert str(autostart_directory / "compute-swarm.desktop") in str(raised.value)
        assert "ermission denied" in str(raised.value)
        assert list(autostart_directory.iterdir()) == []
    finally:
        autostart_directory.chmod(0o700)


# --- macOS ---------------------------------------------------------------------------------------------


def test_launch_agent_plist_round_trips_with_the_keys_launchd_reads() -> None:
    loaded = plistlib.loads(autostart.launch_agent_plist(AWKWARD_COMMAND))
    assert loaded == {
        "Label": "org.compute-swarm.tray",
        "ProgramArguments": AWKWARD_COMMAND,
        "RunAtLoad": True,
        "ProcessType": "Interactive",
        "KeepAlive": False,
    }


def test_macos_writes_the_launch_agent_in_the_users_library(
    monkeypatch: pytest.MonkeyPatch, home: Path
) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    command = ["/Applications/compute-swarm.app/Contents/MacOS/compute-swarm", "tray", "--minimized"]

    written = autostart.enable(command)

    assert written == home / "Library" / "LaunchAgents" / "org.compute-swarm.tray.plist"
    assert plistlib.loads(written.read_bytes())["ProgramArguments"] == command
    assert autostart.is_enabled()
    assert autostart.disable() is True
    assert not written.exists()
    assert not autostart.is_enabled()


# --- Windows -------------------------------------------------------------------------------------------


def test_windows_run_value_quotes_like_the_c_runtime_parses() -> None:
    assert (
        autostart.windows_run_value(
            ["C:\\Program Files\\compute-swarm\\compute-swarm.exe", "tray", "--minimized"]
        )
        == '"C:\\Program Files\\compute-swarm\\compute-swarm.exe" tray --minimized'
    )
    assert autostart.windows_run_value(["app.exe", 'say "hi"', ""]) == 'app.exe "say \\"hi\\"" ""'


class FakeRegistry:
    """winreg's calls that autostart makes, over a dict of {key path: {value name: (data, type)}}."""

    HKEY_CURRENT_USER = "HKEY_CURRENT_USER"
    KEY_SET_VALUE = 2
    KEY_QUERY_VALUE = 1
    REG_SZ = 1
    REG_BINARY = 3

    def __init__(self) -> None:
        self.keys: dict[str, dict[str, tuple[object, int]]] = {}

    def CreateKeyEx(self, root: str, path: str, reserved: int, access: int) -> _ContextHandle:
        self.keys.setdefault(path, {})
        return _ContextHandle(path)

    def OpenKey(self, root: str, path: str, reserved: int, access: int) -> _ContextHandle:
        if path not in self.keys:
            raise FileNotFoundError(2, "The system cannot find the file specified")
        return _ContextHandle(path)

    def SetValueEx(self, key: _ContextHandle, name: str, reserved: int, kind: int, data: object) -> None:
        self.keys[key.path][name] = (data, kind)

    def QueryValueEx(self, key: _ContextHandle, name: str) -> tuple[object, int]:
        if name not in self.keys[key.path]:
            raise FileNotFoundError(2, "The system cannot find the file specified")
        return self.keys[key.path][name]

    def DeleteValue(self, key: _ContextHandle, name: str) -> None:
        if name not in self.keys[key.path]:
            raise FileNotFoundError(2, "The system cannot find the file specified")
        del self.keys[key.path][name]


class _ContextHandle:
    def __init__(self, path: str) -> None:
        self.path = path

    def __enter__(self) -> _ContextHandle:
        return self

    def __exit__(self, *exception: object) -> None:
        return None


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> FakeRegistry:
    fake = FakeRegistry()
    monkeypatch.setitem(sys.modules, "winreg", fake)
    monkeypatch.setattr(sys, "platform", "win32")
    return fake


def test_windows_round_trip_through_the_run_key(registry: FakeRegistry) -> None:
    command = ["C:\\Program Files\\compute-swarm\\compute-swarm.exe", "tray", "--minimized"]
    assert not autostart.is_enabled()

    written = autostart.enable(command)

    assert written == "HKEY_CURRENT_USER\\Software\\Microsoft\\Windows\\CurrentVersion\\Run\\compute-swarm"
    run_values = registry.keys["Software\\Microsoft\\Windows\\CurrentVersion\\Run"]
    assert run_values["compute-swarm"] == (autostart.windows_run_value(command), registry.REG_SZ)
    assert autostart.is_enabled()
    assert autostart.disable() is True
    assert not autostart.is_enabled()
    assert autostart.disable() is False


def test_windows_task_manager_switch_is_honoured_and_cleared_by_enable(registry: FakeRegistry) -> None:
    autostart.enable(["C:\\compute-swarm.exe", "tray"])
    approved_path = "Software\\Microsoft\\Windows\\CurrentVersion\\Explorer\\StartupApproved\\Run"
    registry.keys[approved_path] = {"compute-swarm": (bytes([3]) + bytes(11), registry.REG_BINARY)}
    assert not autostart.is_enabled(), "switched off in Task Manager"

    autostart.enable(["C:\\compute-swarm.exe", "tray"])

    assert "compute-swarm" not in registry.keys[approved_path]
    assert autostart.is_enabled()


# --- what gets started ---------------------------------------------------------------------------------


def test_frozen_build_starts_itself(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "compute-swarm"))
    assert autostart.tray_command() == [str(tmp_path / "compute-swarm"), "tray", "--minimized"]


@pytest.mark.parametrize(
    ("platform", "script_name"), [("linux", "compute-swarm"), ("win32", "compute-swarm.exe")]
)
def test_installed_console_script_is_preferred(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, platform: str, script_name: str
) -> None:
    monkeypatch.delattr(sys, "frozen", raising=False)
    monkeypatch.setattr(sys, "platform", platform)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    (tmp_path / script_name).touch()
    assert autostart.tray_command() == [str(tmp_path / script_name), "tray", "--minimized"]


def test_without_the_console_script_the_module_form_is_used_and_runs_the_cli(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    real_python = sys.executable
    monkeypatch.delattr(sys, "frozen", raising=False)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    assert autostart.tray_command() == [
        str(tmp_path / "python"),
        "-m",
        "compute_swarm.cli",
        "tray",
        "--minimized",
    ]

    completed = subprocess.run(
        [real_python, "-m", "compute_swarm.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=REPOSITORY_ROOT,
    )
    assert completed.returncode == 0, completed.stderr
    assert "compute-swarm" in completed.stdout


def test_imports_without_qt() -> None:
    program = (
        "import sys; sys.modules['PySide6'] = None\n"
        "import compute_swarm.desktop.autostart\n"
        "assert not any(name.startswith('PySide6') and sys.modules[name] for name in sys.modules)\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", program],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPOSITORY_ROOT,
    )
    assert completed.returncode == 0, completed.stderr
