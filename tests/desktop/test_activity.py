"""The seller's activity as the OS reports it: idle time and a full-screen game, read from a real X server
(Xvfb) that the tests drive the way a window manager and a mouse would."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from compute_swarm.desktop import activity

XVFB = shutil.which("Xvfb")
REPOSITORY_ROOT = Path(__file__).resolve().parents[2]
XVFB_START_SECONDS = 15.0

needs_xvfb = pytest.mark.skipif(
    XVFB is None or not sys.platform.startswith("linux"),
    reason="desktop: Xvfb is not installed (Debian package xvfb), so no real X server to read",
)


@pytest.fixture(autouse=True)
def no_session(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts as a headless process."""
    for variable in ("DISPLAY", "WAYLAND_DISPLAY", "XDG_SESSION_TYPE"):
        monkeypatch.delenv(variable, raising=False)


@pytest.fixture
def reader() -> Iterator[activity.ActivityReader]:
    """A reader of the test's own: no X connection or failed display is kept from an earlier test."""
    reader = activity.ActivityReader()
    yield reader
    reader.close()


@contextlib.contextmanager
def xvfb_server() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A fresh Xvfb. It picks a free display number itself (-displayfd), so parallel runs never clash,
    and -noreset keeps it from resetting, and refusing connections meanwhile, whenever the last client
    disconnects (as each test's does)."""
    assert XVFB is not None
    read_end, write_end = os.pipe()
    process = subprocess.Popen(
        [XVFB, "-displayfd", str(write_end), "-nolisten", "tcp", "-noreset", "-screen", "0", "640x480x24"],
        pass_fds=(write_end,),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    os.close(write_end)
    try:
        ready, _, _ = select.select([read_end], [], [], XVFB_START_SECONDS)
        number = os.read(read_end, 64).decode().strip() if ready else ""
        if not number:
            process.kill()
            _, error_output = process.communicate()
            pytest.fail(f"Xvfb did not start: {error_output.decode(errors='replace')[-2000:]}")
        socket_path = Path(f"/tmp/.X11-unix/X{number}")
        deadline = time.monotonic() + XVFB_START_SECONDS
        while not socket_path.exists():
            assert time.monotonic() < deadline, f"Xvfb never made {socket_path}"
            time.sleep(0.01)
        yield f":{number}", process
    finally:
        os.close(read_end)
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stderr is not None:
            process.stderr.close()


@pytest.fixture(scope="module")
def xvfb_display() -> Iterator[str]:
    if XVFB is None or not sys.platform.startswith("linux"):
        pytest.skip("desktop: Xvfb is not installed (Debian package xvfb)")
    with xvfb_server() as (display_name, _):
        yield display_name


class WindowManager:
    """Sets the EWMH properties a real window manager would, over its own Xlib connection."""

    def __init__(self, display_name: str) -> None:
        self.x11 = ctypes.CDLL("libX11.so.6")
        x11 = self.x11
        x11.XOpenDisplay.argtypes = (ctypes.c_char_p,)
        x11.XOpenDisplay.restype = ctypes.c_void_p
        x11.XDefaultRootWindow.argtypes = (ctypes.c_void_p,)
        x11.XDefaultRootWindow.restype = ctypes.c_ulong
        x11.XInternAtom.argtypes = (ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int)
        x11.XInternAtom.restype = ctypes.c_ulong
        x11.XCreateSimpleWindow.argtypes = (ctypes.c_void_p, ctypes.c_ulong) + (ctypes.c_int,) * 2
        x11.XCreateSimpleWindow.argtypes += (ctypes.c_uint,) * 3 + (ctypes.c_ulong,) * 2
        x11.XCreateSimpleWindow.restype = ctypes.c_ulong
        x11.XChangeProperty.argtypes = (
            ctypes.c_void_p,
            ctypes.c_ulong,
            ctypes.c_ulong,
            ctypes.c_ulong,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_int,
        )
        x11.XDeleteProperty.argtypes = (ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong)
        x11.XDestroyWindow.argtypes = (ctypes.c_void_p, ctypes.c_ulong)
        x11.XSync.argtypes = (ctypes.c_void_p, ctypes.c_int)
        x11.XCloseDisplay.argtypes = (ctypes.c_void_p,)
        self.display = x11.XOpenDisplay(display_name.encode())
        assert self.display, f"cannot open {display_name}"
        self.root = x11.XDefaultRootWindow(self.display)

    def atom(self, name: str) -> int:
        return self.x11.XInternAtom(self.display, name.encode(), 0)

    def sync(self) -> None:
        # XSync, not just XFlush: the module reads on another connection, and only a round trip
        # guarantees the server has applied these requests before that read arrives.
        self.x11.XSync(self.display, 0)

    def create_window(self) -> int:
        window = self.x11.XCreateSimpleWindow(self.display, self.root, 0, 0, 100, 100, 0, 0, 0)
        self.sync()
        return window

    def set_text(self, window: int, property_name: str, type_name: str, text: bytes) -> None:
        data = ctypes.create_string_buffer(text, len(text))
        property_atom, type_atom = self.atom(property_name), self.atom(type_name)
        self.x11.XChangeProperty(self.display, window, property_atom, type_atom, 8, 0, data, len(text))
        self.sync()

    def set_longs(self, window: int, property_name: str, type_name: str, values: list[int]) -> None:
        data = (ctypes.c_ulong * max(1, len(values)))(*values)  # format 32 travels as C longs
        property_atom, type_atom = self.atom(property_name), self.atom(type_name)
        self.x11.XChangeProperty(self.display, window, property_atom, type_atom, 32, 0, data, len(values))
        self.sync()

    def set_fullscreen(self, window: int, fullscreen: bool) -> None:
        states = [self.atom("_NET_WM_STATE_FULLSCREEN")] if fullscreen else []
        self.set_longs(window, "_NET_WM_STATE", "ATOM", states)

    def activate(self, window: int) -> None:
        self.set_longs(self.root, "_NET_ACTIVE_WINDOW", "WINDOW", [window])

    def destroy(self, window: int) -> None:
        self.x11.XDestroyWindow(self.display, window)
        self.sync()

    def close(self) -> None:
        self.x11.XDeleteProperty(self.display, self.root, self.atom("_NET_ACTIVE_WINDOW"))
        self.sync()
        self.x11.XCloseDisplay(self.display)


@pytest.fixture
def window_manager(
    xvfb_display: str, monkeypatch: pytest.MonkeyPatch, reader: activity.ActivityReader
) -> Iterator[WindowManager]:
    monkeypatch.setenv("DISPLAY", xvfb_display)
    manager = WindowManager(xvfb_display)
    yield manager
    reader.close()
    manager.close()


@contextlib.contextmanager
def reader_process(script: str, display_name: str) -> Iterator[subprocess.Popen[str]]:
    """This module in a child process reading `display_name`, talking over stdin/stdout."""
    environment = {**os.environ, "DISPLAY": display_name, "PYTHONPATH": str(REPOSITORY_ROOT)}
    environment.pop("WAYLAND_DISPLAY", None)
    environment.pop("XDG_SESSION_TYPE", None)
    child = subprocess.Popen(
        [sys.executable, "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=environment,
        cwd=REPOSITORY_ROOT,
        text=True,
    )
    try:
        yield child
    finally:
        if child.poll() is None:
            child.kill()
        child.communicate()


def next_line(child: subprocess.Popen[str]) -> str:
    assert child.stdout is not None
    line = child.stdout.readline()
    if not line:
        child.wait(timeout=30)
        assert child.stderr is not None
        pytest.fail(f"the reader ended early (exit {child.returncode}): {child.stderr.read()[-2000:]}")
    return line.strip()


def finish(child: subprocess.Popen[str]) -> list[str]:
    """Lets the child go on past its stdin wait; its remaining output lines."""
    output, error_output = child.communicate("\n", timeout=30)
    assert child.returncode == 0, f"the reader ended with {child.returncode}: {error_output[-2000:]}"
    return output.splitlines()


def test_a_headless_process_reads_no_activity_and_returns_at_once() -> None:
    started = time.perf_counter()
    reading = activity.read_activity()
    assert reading == activity.Activity(user_idle_seconds=None, fullscreen_application=None)
    assert activity.user_idle_seconds() is None
    assert activity.fullscreen_application() is None
    assert time.perf_counter() - started < 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        reading.user_idle_seconds = 1.0  # type: ignore[misc]


def test_a_display_that_cannot_be_opened_reads_as_unknown(
    monkeypatch: pytest.MonkeyPatch, reader: activity.ActivityReader
) -> None:
    monkeypatch.setenv("DISPLAY", ":64999")  # no server there
    assert reader.read() == activity.Activity(None, None)
    assert reader.read() == activity.Activity(None, None)


@pytest.mark.parametrize("platform", ["win32", "darwin"])
def test_another_platforms_code_fails_quietly_where_its_libraries_are_missing(
    monkeypatch: pytest.MonkeyPatch, platform: str
) -> None:
    monkeypatch.setattr(sys, "platform", platform)
    assert activity.user_idle_seconds() is None
    assert activity.fullscreen_application() is None


def test_ioreg_output_gives_the_idle_time_in_seconds() -> None:
    sample = (
        "+-o Root  <class IORegistryEntry, id 0x100000100, retain 30>\n"
        "  +-o IOResources  <class IOResources, id 0x100000113, registered, matched, active, busy 0>\n"
        "    +-o IOHIDSystem  <class IOHIDSystem, id 0x100000474, registered, matched, active, busy 0>\n"
        "      | {\n"
        '      |   "IOClass" = "IOHIDSystem"\n'
        '      |   "HIDIdleTime" = 2500000000\n'
        '      |   "HIDParameters" = {"HIDClickTime"=500000000}\n'
        "      | }\n"
    )
    assert activity._parse_ioreg_idle_seconds(sample) == pytest.approx(2.5)
    assert activity._parse_ioreg_idle_seconds("+-o Root  <class IORegistryEntry>\n") is None


def test_windows_idle_time_survives_the_tick_counter_wrapping() -> None:
    assert activity._elapsed_tick_milliseconds(5_000, 2_000) == 3_000
    # Input 16 ms before the 32-bit counter wrapped, read 5 ms after it.
    assert activity._elapsed_tick_milliseconds(5, 0xFFFF_FFF0) == 21


@pytest.mark.desktop
@needs_xvfb
def test_idle_time_grows_while_no_one_touches_the_machine(
    xvfb_display: str, monkeypatch: pytest.MonkeyPatch, reader: activity.ActivityReader
) -> None:
    monkeypatch.setenv("DISPLAY", xvfb_display)
    first = reader.user_idle_seconds()
    assert first is not None
    assert 0.0 <= first < 600.0
    time.sleep(1.0)
    second = reader.user_idle_seconds()
    assert second is not None
    assert 0.8 <= second - first <= 5.0


@pytest.mark.desktop
@needs_xvfb
def test_moving_the_mouse_resets_the_idle_time(
    xvfb_display: str, monkeypatch: pytest.MonkeyPatch, reader: activity.ActivityReader
) -> None:
    try:
        xtest = ctypes.CDLL("libXtst.so.6")
    except OSError:
        pytest.skip("desktop: libXtst.so.6 is not installed (Debian package libxtst6) to fake input")
    x11 = ctypes.CDLL("libX11.so.6")
    x11.XOpenDisplay.argtypes = (ctypes.c_char_p,)
    x11.XOpenDisplay.restype = ctypes.c_void_p
    x11.XSync.argtypes = (ctypes.c_void_p, ctypes.c_int)
    x11.XCloseDisplay.argtypes = (ctypes.c_void_p,)
    xtest.XTestFakeMotionEvent.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int)
    xtest.XTestFakeMotionEvent.argtypes += (ctypes.c_ulong,)
    monkeypatch.setenv("DISPLAY", xvfb_display)
    time.sleep(0.6)
    before = reader.user_idle_seconds()
    assert before is not None and before >= 0.5
    mouse = x11.XOpenDisplay(xvfb_display.encode())
    try:
        xtest.XTestFakeMotionEvent(mouse, -1, 10 + int(before * 10) % 100, 20, 0)
        x11.XSync(mouse, 0)
    finally:
        x11.XCloseDisplay(mouse)
    after = reader.user_idle_seconds()
    assert after is not None and after < 0.4


@pytest.mark.desktop
@needs_xvfb
def test_no_focused_window_is_no_fullscreen_application(
    window_manager: WindowManager, reader: activity.ActivityReader
) -> None:
    assert reader.fullscreen_application() is None
    window = window_manager.create_window()
    window_manager.set_text(window, "_NET_WM_NAME", "UTF8_STRING", b"Text Editor")
    window_manager.activate(window)
    assert reader.fullscreen_application() is None  # focused, but not full screen
    assert reader.read().user_idle_seconds is not None


@pytest.mark.desktop
@needs_xvfb
def test_a_focused_fullscreen_game_is_named_until_it_leaves_full_screen(
    window_manager: WindowManager, reader: activity.ActivityReader
) -> None:
    game = window_manager.create_window()
    window_manager.set_text(game, "_NET_WM_NAME", "UTF8_STRING", b"Some Game")
    window_manager.set_fullscreen(game, True)
    window_manager.activate(game)
    assert reader.fullscreen_application() == "Some Game"
    assert reader.read().fullscreen_application == "Some Game"

    window_manager.set_fullscreen(game, False)
    assert reader.fullscreen_application() is None


@pytest.mark.desktop
@needs_xvfb
def test_a_fullscreen_window_is_named_from_either_name_property_or_generically(
    window_manager: WindowManager, reader: activity.ActivityReader
) -> None:
    old_game = window_manager.create_window()
    window_manager.set_text(old_game, "WM_NAME", "STRING", "Jeu d'été".encode("latin-1"))
    window_manager.set_fullscreen(old_game, True)
    window_manager.activate(old_game)
    assert reader.fullscreen_application() == "Jeu d'été"

    # _NET_WM_NAME, in UTF-8, wins over WM_NAME.
    window_manager.set_text(old_game, "_NET_WM_NAME", "UTF8_STRING", "Café Racer ゲーム".encode())
    assert reader.fullscreen_application() == "Café Racer ゲーム"

    nameless = window_manager.create_window()
    window_manager.set_fullscreen(nameless, True)
    window_manager.activate(nameless)
    assert reader.fullscreen_application() == activity.UNNAMED_FULLSCREEN_APPLICATION


CHILD_READING_A_VANISHED_WINDOW = """
import sys
from compute_swarm.desktop import activity
print(activity.fullscreen_application(), flush=True)
sys.stdin.readline()  # the parent focuses a real game meanwhile
print(activity.fullscreen_application(), flush=True)
"""


@pytest.mark.desktop
@needs_xvfb
def test_a_window_that_vanished_is_no_fullscreen_application_and_the_process_lives(
    window_manager: WindowManager, xvfb_display: str
) -> None:
    # Xlib's default error handler calls exit(): read in a child, so a regression fails this test
    # with a message instead of silently ending the whole run.
    closed = window_manager.create_window()
    window_manager.destroy(closed)
    window_manager.activate(closed)  # a window manager that has not caught up yet
    with reader_process(CHILD_READING_A_VANISHED_WINDOW, xvfb_display) as child:
        assert next_line(child) == "None"  # a BadWindow, swallowed
        game = window_manager.create_window()
        window_manager.set_text(game, "_NET_WM_NAME", "UTF8_STRING", b"Some Game")
        window_manager.set_fullscreen(game, True)
        window_manager.activate(game)
        assert finish(child) == ["Some Game"]  # the same connection still works


@pytest.mark.desktop
@needs_xvfb
def test_a_wayland_session_gives_no_idle_time_but_still_sees_x11_games(
    window_manager: WindowManager, monkeypatch: pytest.MonkeyPatch, reader: activity.ActivityReader
) -> None:
    monkeypatch.setenv("WAYLAND_DISPLAY", "wayland-0")  # DISPLAY is then Xwayland's
    game = window_manager.create_window()
    window_manager.set_text(game, "_NET_WM_NAME", "UTF8_STRING", b"Some Game")
    window_manager.set_fullscreen(game, True)
    window_manager.activate(game)
    assert reader.read() == activity.Activity(None, "Some Game")


CHILD_AFTER_SERVER_DIES = """
import sys
from compute_swarm.desktop import activity
print(activity.user_idle_seconds() is not None, flush=True)
sys.stdin.readline()  # the parent kills the X server meanwhile
print(activity.read_activity(), flush=True)
print(activity.read_activity(), flush=True)
"""


@pytest.mark.desktop
@needs_xvfb
def test_the_x_server_going_away_reads_as_unknown_instead_of_ending_the_process() -> None:
    # Xlib's default I/O error handler calls exit(), hence a child here too.
    unknown = repr(activity.Activity(None, None))
    with (
        xvfb_server() as (display_name, server),
        reader_process(CHILD_AFTER_SERVER_DIES, display_name) as child,
    ):
        assert next_line(child) == "True"
        server.terminate()
        server.wait(timeout=10)
        assert finish(child) == [unknown, unknown]
