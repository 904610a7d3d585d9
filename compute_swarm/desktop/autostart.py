"""Start the seller's tray app when the seller logs in: a Run registry value on Windows, a LaunchAgent on
macOS, an XDG autostart entry elsewhere. The file contents are built by pure functions; the rest only
writes, reads or removes the one entry this app owns.

No Qt here: the tray's settings call this, and so can the headless CLI or an installer.
"""

from __future__ import annotations

import contextlib
import os
import plistlib
import subprocess
import sys
import tempfile
from pathlib import Path

APPLICATION_NAME = "compute-swarm"
LAUNCH_AGENT_LABEL = "org.compute-swarm.tray"
DESKTOP_ENTRY_FILE = "compute-swarm.desktop"
WINDOWS_RUN_KEY = r"Software\Microsoft\Windows\CurrentVersion\Run"
# Task Manager's and Settings' "Startup apps" switch: a value here whose first byte is odd turns the
# Run value of the same name off without removing it.
WINDOWS_STARTUP_APPROVED_KEY = r"Software\Microsoft\Windows\CurrentVersion\Explorer\StartupApproved\Run"
WINDOWS_VALUE_NAME = APPLICATION_NAME
TRAY_ARGUMENTS = ["tray", "--minimized"]

# Desktop Entry spec, "The Exec key": an argument holding any of these must be double-quoted.
_EXEC_RESERVED_CHARACTERS = frozenset(" \t\n\"'\\><~|&;$*?#()`")
# ... and inside the double quotes these four take a backslash.
_EXEC_QUOTED_ESCAPES = frozenset('"`$\\')


class AutostartError(Exception):
    """The autostart entry could not be written, read or removed; the message names the file or
    registry key and the reason."""


# --- what starts the tray -----------------------------------------------------------------------------


def tray_command() -> list[str]:
    """The command line that starts this installation's tray, minimized to the tray."""
    if not sys.executable:
        # An embedding host that does not say which interpreter runs it: nothing sensible to start.
        raise AutostartError("cannot tell which program runs compute-swarm (sys.executable is empty)")
    if getattr(sys, "frozen", False):
        # A PyInstaller build: the executable is the app itself, with the CLI's subcommands.
        return [sys.executable, *TRAY_ARGUMENTS]
    console_script = Path(sys.executable).parent / (
        f"{APPLICATION_NAME}.exe" if sys.platform == "win32" else APPLICATION_NAME
    )
    if console_script.exists():
        return [str(console_script), *TRAY_ARGUMENTS]
    # Run from a source checkout without the console script installed.
    return [sys.executable, "-m", "compute_swarm.cli", *TRAY_ARGUMENTS]


# --- pure builders ----------------------------------------------------------------------------------


def _quote_exec_argument(argument: str) -> str:
    # Percent signs start field codes (%f, %u, ...) wherever they stand, quoted or not.
    argument = argument.replace("%", "%%")
    if argument and not any(character in _EXEC_RESERVED_CHARACTERS for character in argument):
        return argument
    escaped = "".join(
        "\\" + character if character in _EXEC_QUOTED_ESCAPES else character for character in argument
    )
    return f'"{escaped}"'


def _escape_string_value(value: str) -> str:
    # The Exec value is also a `string` value, whose own escapes are undone before the quoting above:
    # so a backslash from quoting is written twice, and a newline cannot stand raw in the file.
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


def xdg_desktop_entry(command: list[str]) -> str:
    """The autostart .desktop file that runs `command` at login (Desktop Entry Specification 1.5)."""
    if not command:
        raise ValueError("the autostart command is empty")
    exec_line = _escape_string_value(" ".join(_quote_exec_argument(argument) for argument in command))
    return (
        "[Desktop Entry]\n"
        "Type=Application\n"
        "Version=1.5\n"
        f"Name={APPLICATION_NAME}\n"
        "Comment=Earn credits from your idle GPU; the tray shows its temperature, work and earnings\n"
        f"Exec={exec_line}\n"
        "Terminal=false\n"
        "X-GNOME-Autostart-enabled=true\n"
    )


def launch_agent_plist(command: list[str]) -> bytes:
    """The LaunchAgent property list that runs `command` once at login."""
    if not command:
        raise ValueError("the autostart command is empty")
    return plistlib.dumps(
        {
            "Label": LAUNCH_AGENT_LABEL,
            "ProgramArguments": list(command),
            "RunAtLoad": True,
            # Interactive: a GUI app the user sees, so launchd does not throttle it as background work.
            "ProcessType": "Interactive",
            # Quitting the tray must stay quit; launchd would otherwise restart it.
            "KeepAlive": False,
        },
        fmt=plistlib.FMT_XML,
    )


def windows_run_value(command: list[str]) -> str:
    """The Run registry value's data: `command` as one Windows command line."""
    if not command:
        raise ValueError("the autostart command is empty")
    return subprocess.list2cmdline(command)


# --- locations ----------------------------------------------------------------------------------------


def xdg_config_home() -> Path:
    """$XDG_CONFIG_HOME, or ~/.config where it is unset, empty or relative (the Base Directory spec
    says a relative path there is invalid and must be ignored)."""
    configured = os.environ.get("XDG_CONFIG_HOME", "")
    if configured and os.path.isabs(configured):
        return Path(configured)
    return Path.home() / ".config"


def xdg_autostart_path() -> Path:
    return xdg_config_home() / "autostart" / DESKTOP_ENTRY_FILE


def launch_agent_path() -> Path:
    return Path.home() / "Library" / "LaunchAgents" / f"{LAUNCH_AGENT_LABEL}.plist"


def windows_run_location() -> str:
    return rf"HKEY_CURRENT_USER\{WINDOWS_RUN_KEY}\{WINDOWS_VALUE_NAME}"


# --- the facade: dispatch on the platform at call time ---------------------------------------------


def enable(command: list[str] | None = None) -> Path | str:
    """Start `command` (the tray, by default) at every login; returns the file or registry value
    written. Replaces an entry this app wrote before. Raises AutostartError when it cannot write."""
    command = tray_command() if command is None else list(command)
    if sys.platform == "win32":
        return _enable_windows(command)
    if sys.platform == "darwin":
        path = launch_agent_path()
        _write_atomically(path, launch_agent_plist(command))
        return path
    path = xdg_autostart_path()
    _write_atomically(path, xdg_desktop_entry(command).encode("utf-8"))
    return path


def disable() -> bool:
    """Stop starting at login. True if an entry was removed, False if there was none."""
    if sys.platform == "win32":
        return _disable_windows()
    return _remove_file(launch_agent_path() if sys.platform == "darwin" else xdg_autostart_path())


def is_enabled() -> bool:
    """Whether the tray will start at the next login, as far as this app's own entry says."""
    if sys.platform == "win32":
        return _is_enabled_windows()
    if sys.platform == "darwin":
        return launch_agent_path().is_file()
    return _is_enabled_xdg(xdg_autostart_path())


# --- files --------------------------------------------------------------------------------------------


def _write_atomically(path: Path, content: bytes) -> None:
    # A temporary file beside the target, then a rename: a crash or a full disk leaves the old entry or
    # the new one, never half a file that the session manager would choke on at login.
    temporary_name: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(descriptor, "wb") as temporary_file:
            temporary_file.write(content)
            temporary_file.flush()
            os.fsync(temporary_file.fileno())
        # mkstemp makes the file 0600; autostart entries are ordinarily world-readable, like the rest
        # of ~/.config.
        os.chmod(temporary_name, 0o644)
        os.replace(temporary_name, path)
        temporary_name = None
    except OSError as error:
        raise AutostartError(f"could not write {path}: {error.strerror or error}") from error
    finally:
        if temporary_name is not None:
            # The directory refused the write; a leftover, if any, is a hidden .tmp file.
            with contextlib.suppress(OSError):
                os.unlink(temporary_name)


def _remove_file(path: Path) -> bool:
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    except OSError as error:
        raise AutostartError(f"could not remove {path}: {error.strerror or error}") from error
    return True


def _is_enabled_xdg(path: Path) -> bool:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return False
    except OSError as error:
        raise AutostartError(f"could not read {path}: {error.strerror or error}") from error
    entry = _desktop_entry_group(text)
    # Hidden=true is the spec's way to switch an entry off; GNOME's own switch writes the second key.
    return entry.get("Hidden") != "true" and entry.get("X-GNOME-Autostart-enabled") != "false"


def _desktop_entry_group(text: str) -> dict[str, str]:
    """The keys of the [Desktop Entry] group (unlocalized, raw values): enough to read switches."""
    keys: dict[str, str] = {}
    in_entry_group = False
    for raw_line in text.splitlines():
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            in_entry_group = line == "[Desktop Entry]"
            continue
        if in_entry_group and "=" in line:
            key, value = line.split("=", 1)
            keys.setdefault(key.strip(), value.strip())
    return keys


# --- the Windows registry (winreg exists only there, so it is imported inside) ----------------------


def _enable_windows(command: list[str]) -> str:
    import winreg

    value = windows_run_value(command)
    try:
        with winreg.CreateKeyEx(winreg.HKEY_CURRENT_USER, WINDOWS_RUN_KEY, 0, winreg.KEY_SET_VALUE) as key:
            winreg.SetValueEx(key, WINDOWS_VALUE_NAME, 0, winreg.REG_SZ, value)
    except OSError as error:
        raise AutostartError(
            f"could not write {windows_run_location()}: {error.strerror or error}"
        ) from error
    # A seller who once switched us off in Task Manager and now asks to start at login again: without
    # this the new Run value would stay switched off. Windows treats a missing entry as switched on.
    _delete_registry_value(WINDOWS_STARTUP_APPROVED_KEY)
    return windows_run_location()


def _disable_windows() -> bool:
    removed = _delete_registry_value(WINDOWS_RUN_KEY)
    _delete_registry_value(WINDOWS_STARTUP_APPROVED_KEY)
    return removed


def _is_enabled_windows() -> bool:
    import winreg

    try:
        with winreg.OpenKey(winreg.HKEY_CURRENT_USER, WINDOWS_RUN_KEY, 0, winreg.KEY_QUERY_VALUE) as key:
            winreg.QueryValueEx(key, WINDOWS_VALUE_NAME)
    except FileNotFoundError:
        return False
    except OSError as error:
        raise AutostartError(f"could not read {windows_run_location()}: {error.strerror or error}") from error
    try:
        with winreg.OpenKey(
            winreg.HKEY_CURRENT_USER, WINDOWS_STARTUP_APPROVED_KEY, 0, winreg.KEY_QUERY_VALUE
        ) as key:
            approval, _ = winreg.QueryValueEx(key, WINDOWS_VALUE_NAME)
    except OSError:
        return True  # no switch recorded: Windows runs the value
    return not (isinstance(approval, bytes) and approval and approval[0] & 1)


def _delete_registry_value(key_path: str) -> bool:
    import winreg

    try:
        with winreg.OpenKey(winreg.HKEY_CURRENT_USER, key_path, 0, winreg.KEY_SET_VALUE) as key:
            winreg.DeleteValue(key, WINDOWS_VALUE_NAME)
    except FileNotFoundError:
        return False
    except OSError as error:
        raise AutostartError(
            rf"could not remove HKEY_CURRENT_USER\{key_path}\{WINDOWS_VALUE_NAME}: {error.strerror or error}"
        ) from error
    return True
