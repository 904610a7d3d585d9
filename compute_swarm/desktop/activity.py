"""What the seller is doing at the keyboard, read from the OS: how long since the last keyboard or mouse
input, and which full-screen application (a game) is in the foreground, so the guards can step aside.

Everything goes through ctypes (no Qt, no extra dependencies) and never raises: where the OS cannot say,
the answer is None. The agent calls `read_activity` every few seconds from a worker thread, so each call
is a handful of cheap system calls; on X11 it is two to five round trips on one display connection that
an `ActivityReader` opens on first use and keeps until it is closed (a frozen X server blocks the calling
thread). `read_activity` and its two halves use one reader for the whole process.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import NamedTuple

logger = logging.getLogger(__name__)

# Said when a full-screen application is in front but it has no readable title.
UNNAMED_FULLSCREEN_APPLICATION = "a full-screen application"


@dataclass(frozen=True)
class Activity:
    user_idle_seconds: float | None  # None: this OS or session cannot tell
    fullscreen_application: str | None  # None: nothing full screen in front, or cannot tell


class ActivityReader:
    """Reads the seller's activity, keeping what it needs between readings: on X11 its own display
    connection, opened on first use, and when to try again a display that failed. `close()` lets the
    display go; a reader may read again after it (it opens the display anew)."""

    def __init__(self) -> None:
        self._connection: _X11Connection | None = None  # used and replaced only under _xlib.lock
        self._retry_key: tuple[int, str] | None = None  # the display that failed last ...
        self._retry_at = 0.0  # ... and when to try it again (time.monotonic)

    def read(self) -> Activity:
        return Activity(
            user_idle_seconds=self.user_idle_seconds(), fullscreen_application=self.fullscreen_application()
        )

    def user_idle_seconds(self) -> float | None:
        """Seconds since the last keyboard or mouse input in this desktop session, or None where unknown
        (a headless server, a Wayland session, a failure)."""
        try:
            if sys.platform == "win32":
                return _windows_idle_seconds()
            if sys.platform == "darwin":
                return _macos_idle_seconds()
            return self._x11_idle_seconds()
        except Exception:
            _debug_once("idle", "could not read the user's idle time", exc_info=True)
            return None

    def fullscreen_application(self) -> str | None:
        """The title of the full-screen application in the foreground, or None.

        macOS has no public API that tells whether another application is full screen, so there this is
        always None; the guards' list of processes on the GPU covers games there.
        """
        try:
            if sys.platform == "win32":
                return _windows_fullscreen_application()
            if sys.platform == "darwin":
                return None
            return self._x11_fullscreen_application()
        except Exception:
            _debug_once("fullscreen", "could not read the foreground application", exc_info=True)
            return None

    def close(self) -> None:
        """Close the X11 display connection and forget a display that failed."""
        with _xlib.lock:
            if self._connection is not None:
                _abandon(self._connection)
                self._connection = None
            self._retry_key = None

    def _x11_idle_seconds(self) -> float | None:
        if _in_wayland_session():
            # Xwayland only sees input aimed at X windows: typing in a native Wayland window would read
            # as idle, which is the one wrong answer that matters here.
            _debug_once("wayland idle", "a Wayland session gives no idle time to X11 clients")
            return None
        with _xlib.lock:
            connection = self._x11_connection()
            return connection.idle_seconds() if connection is not None else None

    def _x11_fullscreen_application(self) -> str | None:
        # Under Wayland this still sees full-screen X11 games through Xwayland (most games run there).
        with _xlib.lock:
            connection = self._x11_connection()
            return connection.fullscreen_application() if connection is not None else None

    def _x11_connection(self) -> _X11Connection | None:
        """The connection to $DISPLAY, opened on first use and kept (caller holds the lock)."""
        display_name = os.environ.get("DISPLAY", "")
        if not display_name:
            return None  # a headless server, or a Wayland session without Xwayland
        key = (os.getpid(), display_name)
        connection = self._connection
        if connection is not None:
            if connection.key == key and not connection.broken:
                return connection
            self._connection = None
            if connection.broken:
                self._retry_key, self._retry_at = connection.key, time.monotonic() + _X11_RETRY_SECONDS
            _abandon(connection)
        if self._retry_key == key and time.monotonic() < self._retry_at:
            return None
        libraries = _x11_libraries()
        if libraries is None:
            return None
        connection = _open_x11_connection(libraries, display_name, key)
        if connection is None:
            self._retry_key, self._retry_at = key, time.monotonic() + _X11_RETRY_SECONDS
            return None
        self._connection = connection
        self._retry_key = None
        return connection


# The reader behind the module's functions, shared by the whole process (the agent's guards use it).
_process_reader = ActivityReader()


def read_activity() -> Activity:
    return _process_reader.read()


def user_idle_seconds() -> float | None:
    """ActivityReader.user_idle_seconds, with the process's reader."""
    return _process_reader.user_idle_seconds()


def fullscreen_application() -> str | None:
    """ActivityReader.fullscreen_application, with the process's reader."""
    return _process_reader.fullscreen_application()


_logged_once: set[str] = set()  # for the whole process: most of these conditions hold for the session


def _debug_once(key: str, message: str, *arguments: object, exc_info: bool = False) -> None:
    # Called every few seconds: a condition that holds for the session is worth one line, not one per poll.
    if key in _logged_once:
        return
    _logged_once.add(key)
    logger.debug(message, *arguments, exc_info=exc_info)


# --- Windows ----------------------------------------------------------------------------------------

# SHQueryUserNotificationState answers QUNS_BUSY (2) for a full-screen application or borderless game,
# QUNS_RUNNING_D3D_FULL_SCREEN (3) for exclusive Direct3D, QUNS_PRESENTATION_MODE (4) for presentations.
_WINDOWS_FULLSCREEN_STATES = frozenset({2, 3, 4})
_WINDOWS_TITLE_CHARACTERS = 512


class _LastInputInfo(ctypes.Structure):
    _fields_ = (("cbSize", ctypes.c_uint32), ("dwTime", ctypes.c_uint32))


def _elapsed_tick_milliseconds(now_ticks: int, then_ticks: int) -> int:
    """Milliseconds between two GetTickCount readings: the 32-bit counter wraps every 49.7 days."""
    return (now_ticks - then_ticks) & 0xFFFFFFFF


@functools.cache
def _windows_libraries() -> tuple[ctypes.CDLL, ctypes.CDLL, ctypes.CDLL]:
    user32 = ctypes.WinDLL("user32")
    kernel32 = ctypes.WinDLL("kernel32")
    shell32 = ctypes.WinDLL("shell32")
    user32.GetLastInputInfo.argtypes = (ctypes.POINTER(_LastInputInfo),)
    user32.GetLastInputInfo.restype = ctypes.c_int
    kernel32.GetTickCount.argtypes = ()
    kernel32.GetTickCount.restype = ctypes.c_uint32
    shell32.SHQueryUserNotificationState.argtypes = (ctypes.POINTER(ctypes.c_int),)
    shell32.SHQueryUserNotificationState.restype = ctypes.c_long  # HRESULT
    user32.GetForegroundWindow.argtypes = ()
    user32.GetForegroundWindow.restype = ctypes.c_void_p
    user32.GetWindowTextW.argtypes = (ctypes.c_void_p, ctypes.POINTER(ctypes.c_wchar), ctypes.c_int)
    user32.GetWindowTextW.restype = ctypes.c_int
    return user32, kernel32, shell32


def _windows_idle_seconds() -> float | None:
    # Input is counted per session: an agent run as a service (session 0) would see no one's input.
    user32, kernel32, _ = _windows_libraries()
    last_input = _LastInputInfo(ctypes.sizeof(_LastInputInfo), 0)
    if not user32.GetLastInputInfo(ctypes.byref(last_input)):
        return None
    return _elapsed_tick_milliseconds(kernel32.GetTickCount(), last_input.dwTime) / 1000.0


def _windows_fullscreen_application() -> str | None:
    user32, _, shell32 = _windows_libraries()
    state = ctypes.c_int(0)
    if shell32.SHQueryUserNotificationState(ctypes.byref(state)) != 0:  # S_OK
        return None
    if state.value not in _WINDOWS_FULLSCREEN_STATES:
        return None
    window = user32.GetForegroundWindow()
    title = ctypes.create_unicode_buffer(_WINDOWS_TITLE_CHARACTERS)
    if window and user32.GetWindowTextW(window, title, _WINDOWS_TITLE_CHARACTERS) > 0 and title.value.strip():
        return title.value.strip()
    return UNNAMED_FULLSCREEN_APPLICATION


# --- macOS ------------------------------------------------------------------------------------------

_IOKIT_PATH = "/System/Library/Frameworks/IOKit.framework/IOKit"
_CORE_FOUNDATION_PATH = "/System/Library/Frameworks/CoreFoundation.framework/CoreFoundation"
_CF_STRING_ENCODING_UTF8 = 0x08000100
_CF_NUMBER_SINT64_TYPE = 4
_IOREG_TIMEOUT_SECONDS = 2.0
_IOREG_IDLE_PATTERN = re.compile(r'"HIDIdleTime"\s*=\s*(\d+)')


class _HIDSystem(NamedTuple):
    iokit: ctypes.CDLL
    core_foundation: ctypes.CDLL
    service: int  # io_service_t of IOHIDSystem
    idle_time_key: int  # CFStringRef "HIDIdleTime"


@functools.cache
def _hid_system(process_id: int) -> _HIDSystem:
    # Keyed by process: Mach port rights do not survive a fork, so a child looks the service up again.
    iokit = ctypes.CDLL(_IOKIT_PATH)
    core_foundation = ctypes.CDLL(_CORE_FOUNDATION_PATH)
    iokit.IOServiceMatching.argtypes = (ctypes.c_char_p,)
    iokit.IOServiceMatching.restype = ctypes.c_void_p
    iokit.IOServiceGetMatchingService.argtypes = (ctypes.c_uint32, ctypes.c_void_p)
    iokit.IOServiceGetMatchingService.restype = ctypes.c_uint32
    iokit.IORegistryEntryCreateCFProperty.argtypes = (
        ctypes.c_uint32,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_uint32,
    )
    iokit.IORegistryEntryCreateCFProperty.restype = ctypes.c_void_p
    core_foundation.CFStringCreateWithCString.argtypes = (ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint32)
    core_foundation.CFStringCreateWithCString.restype = ctypes.c_void_p
    core_foundation.CFGetTypeID.argtypes = (ctypes.c_void_p,)
    core_foundation.CFGetTypeID.restype = ctypes.c_ulong
    core_foundation.CFNumberGetTypeID.argtypes = ()
    core_foundation.CFNumberGetTypeID.restype = ctypes.c_ulong
    core_foundation.CFNumberGetValue.argtypes = (ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p)
    core_foundation.CFNumberGetValue.restype = ctypes.c_bool
    core_foundation.CFRelease.argtypes = (ctypes.c_void_p,)
    core_foundation.CFRelease.restype = None
    # Port 0 (MACH_PORT_NULL) means the default main port; the call consumes the matching dictionary.
    service = iokit.IOServiceGetMatchingService(0, iokit.IOServiceMatching(b"IOHIDSystem"))
    key = core_foundation.CFStringCreateWithCString(None, b"HIDIdleTime", _CF_STRING_ENCODING_UTF8)
    if not service or not key:
        raise OSError("IOHIDSystem or its HIDIdleTime key is not available")
    return _HIDSystem(iokit, core_foundation, service, key)


def _iokit_idle_seconds() -> float | None:
    system = _hid_system(os.getpid())
    value = system.iokit.IORegistryEntryCreateCFProperty(system.service, system.idle_time_key, None, 0)
    if not value:
        return None
    try:
        if system.core_foundation.CFGetTypeID(value) != system.core_foundation.CFNumberGetTypeID():
            return None
        nanoseconds = ctypes.c_int64(0)
        if not system.core_foundation.CFNumberGetValue(
            value, _CF_NUMBER_SINT64_TYPE, ctypes.byref(nanoseconds)
        ):
            return None
        return max(0.0, nanoseconds.value / 1e9)
    finally:
        system.core_foundation.CFRelease(value)


def _parse_ioreg_idle_seconds(output: str) -> float | None:
    """The first HIDIdleTime (nanoseconds) in `ioreg -c IOHIDSystem` output, in seconds."""
    match = _IOREG_IDLE_PATTERN.search(output)
    return int(match.group(1)) / 1e9 if match else None


def _ioreg_idle_seconds() -> float | None:
    completed = subprocess.run(
        ("ioreg", "-c", "IOHIDSystem", "-d", "4"),
        capture_output=True,
        text=True,
        timeout=_IOREG_TIMEOUT_SECONDS,
        check=False,
    )
    return _parse_ioreg_idle_seconds(completed.stdout) if completed.returncode == 0 else None


def _macos_idle_seconds() -> float | None:
    # IOKit in-process costs microseconds; ioreg costs a process spawn (milliseconds) and is only the
    # fallback for a macOS where the IOKit lookup fails.
    try:
        seconds = _iokit_idle_seconds()
    except Exception:
        _debug_once("iokit", "IOKit gave no HIDIdleTime; using ioreg", exc_info=True)
        seconds = None
    return seconds if seconds is not None else _ioreg_idle_seconds()


# --- X11 --------------------------------------------------------------------------------------------

_X11_RETRY_SECONDS = 30.0  # after a display cannot be opened, or its server went away
_XA_ATOM = 4
_XA_STRING = 31
_XA_WINDOW = 33
_XA_WM_NAME = 39
_X_SUCCESS = 0
_WINDOW_STATE_MAX_ATOMS = 64
_WINDOW_NAME_MAX_LONGS = 256  # 1 KiB of title

_X_ERROR_HANDLER = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
_X_IO_ERROR_HANDLER = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)
_X_IO_ERROR_EXIT_HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)


class _ScreenSaverInfo(ctypes.Structure):
    # XScreenSaverInfo from <X11/extensions/scrnsaver.h>; times in milliseconds.
    _fields_ = (
        ("window", ctypes.c_ulong),
        ("state", ctypes.c_int),
        ("kind", ctypes.c_int),
        ("til_or_since", ctypes.c_ulong),
        ("idle", ctypes.c_ulong),
        ("event_mask", ctypes.c_ulong),
    )


class _X11Libraries(NamedTuple):
    x11: ctypes.CDLL
    screensaver: ctypes.CDLL | None  # libXss; without it only the full-screen check works


def _load_x11_libraries() -> _X11Libraries:
    x11 = ctypes.CDLL("libX11.so.6")
    x11.XOpenDisplay.argtypes = (ctypes.c_char_p,)
    x11.XOpenDisplay.restype = ctypes.c_void_p
    x11.XCloseDisplay.argtypes = (ctypes.c_void_p,)
    x11.XCloseDisplay.restype = ctypes.c_int
    x11.XDefaultRootWindow.argtypes = (ctypes.c_void_p,)
    x11.XDefaultRootWindow.restype = ctypes.c_ulong
    x11.XInternAtoms.argtypes = (
        ctypes.c_void_p,
        ctypes.POINTER(ctypes.c_char_p),
        ctypes.c_int,
        ctypes.c_int,
        ctypes.POINTER(ctypes.c_ulong),
    )
    x11.XInternAtoms.restype = ctypes.c_int
    x11.XGetWindowProperty.argtypes = (
        ctypes.c_void_p,  # display
        ctypes.c_ulong,  # window
        ctypes.c_ulong,  # property
        ctypes.c_long,  # offset, in 32-bit units
        ctypes.c_long,  # length, in 32-bit units
        ctypes.c_int,  # delete
        ctypes.c_ulong,  # requested type
        ctypes.POINTER(ctypes.c_ulong),  # actual type
        ctypes.POINTER(ctypes.c_int),  # actual format
        ctypes.POINTER(ctypes.c_ulong),  # item count
        ctypes.POINTER(ctypes.c_ulong),  # bytes after
        ctypes.POINTER(ctypes.POINTER(ctypes.c_ubyte)),  # data, freed with XFree
    )
    x11.XGetWindowProperty.restype = ctypes.c_int
    x11.XFree.argtypes = (ctypes.c_void_p,)
    x11.XFree.restype = ctypes.c_int
    x11.XSetErrorHandler.argtypes = (_X_ERROR_HANDLER,)
    x11.XSetErrorHandler.restype = ctypes.c_void_p
    x11.XSetIOErrorHandler.argtypes = (_X_IO_ERROR_HANDLER,)
    x11.XSetIOErrorHandler.restype = ctypes.c_void_p
    if hasattr(x11, "XSetIOErrorExitHandler"):  # libX11 1.7 (2020) and later
        x11.XSetIOErrorExitHandler.argtypes = (ctypes.c_void_p, _X_IO_ERROR_EXIT_HANDLER, ctypes.c_void_p)
        x11.XSetIOErrorExitHandler.restype = None
    try:
        screensaver: ctypes.CDLL | None = ctypes.CDLL("libXss.so.1")
    except OSError:
        _debug_once("libXss", "libXss.so.1 is not installed: no idle time on X11")
        screensaver = None
    else:
        screensaver.XScreenSaverQueryExtension.argtypes = (
            ctypes.c_void_p,
            ctypes.POINTER(ctypes.c_int),
            ctypes.POINTER(ctypes.c_int),
        )
        screensaver.XScreenSaverQueryExtension.restype = ctypes.c_int
        screensaver.XScreenSaverQueryInfo.argtypes = (
            ctypes.c_void_p,
            ctypes.c_ulong,
            ctypes.POINTER(_ScreenSaverInfo),
        )
        screensaver.XScreenSaverQueryInfo.restype = ctypes.c_int
    return _X11Libraries(x11, screensaver)


class _Property(NamedTuple):
    type: int  # an atom
    format: int  # 8, 16 or 32 bits an item
    data: bytes | tuple[int, ...]  # bytes for format 8, C longs for format 32


class _X11Connection:
    """One Xlib display of an ActivityReader's own, used only under `_xlib.lock`."""

    _ATOM_NAMES = (
        b"_NET_ACTIVE_WINDOW",
        b"_NET_WM_STATE",
        b"_NET_WM_STATE_FULLSCREEN",
        b"_NET_WM_NAME",
        b"UTF8_STRING",
    )

    def __init__(self, libraries: _X11Libraries, display: int, key: tuple[int, str]) -> None:
        self.libraries = libraries
        self.display = display
        self.key = key  # (process id, DISPLAY) it was opened for
        self.broken = False  # set by the I/O error handler: the server went away
        self.root_window = libraries.x11.XDefaultRootWindow(display)
        # Interned (created if need be) in one round trip, so a window manager started later still
        # matches; atoms live as long as the server.
        names = (ctypes.c_char_p * len(self._ATOM_NAMES))(*self._ATOM_NAMES)
        atoms = (ctypes.c_ulong * len(self._ATOM_NAMES))()
        if not libraries.x11.XInternAtoms(display, names, len(self._ATOM_NAMES), 0, atoms):
            raise OSError("XInternAtoms failed")
        (
            self.active_window_atom,
            self.window_state_atom,
            self.fullscreen_state_atom,
            self.window_name_atom,
            self.utf8_string_atom,
        ) = atoms
        event_base, error_base = ctypes.c_int(0), ctypes.c_int(0)
        self.screensaver_info: _ScreenSaverInfo | None = None
        if libraries.screensaver is not None and libraries.screensaver.XScreenSaverQueryExtension(
            display, ctypes.byref(event_base), ctypes.byref(error_base)
        ):
            self.screensaver_info = _ScreenSaverInfo()

    def idle_seconds(self) -> float | None:
        if self.screensaver_info is None or self.libraries.screensaver is None:
            return None
        status = self.libraries.screensaver.XScreenSaverQueryInfo(
            self.display, self.root_window, ctypes.byref(self.screensaver_info)
        )
        if not status or self.broken:
            return None
        return self.screensaver_info.idle / 1000.0

    def fullscreen_application(self) -> str | None:
        active = self.window_property(self.root_window, self.active_window_atom, _XA_WINDOW, 1)
        if active is None or active.format != 32 or not active.data or not active.data[0]:
            return None  # no window manager, or nothing focused
        window = active.data[0]
        # The window can vanish between these requests: that is a BadWindow the error handler
        # swallows, and the failed request reads as "not full screen".
        state = self.window_property(window, self.window_state_atom, _XA_ATOM, _WINDOW_STATE_MAX_ATOMS)
        if state is None or state.format != 32 or self.fullscreen_state_atom not in state.data:
            return None
        return self.window_name(window) or UNNAMED_FULLSCREEN_APPLICATION

    def window_name(self, window: int) -> str | None:
        for name_atom, requested_type in ((self.window_name_atom, self.utf8_string_atom), (_XA_WM_NAME, 0)):
            name = self.window_property(window, name_atom, requested_type, _WINDOW_NAME_MAX_LONGS)
            if name is None or name.format != 8 or not isinstance(name.data, bytes):
                continue
            # WM_NAME may be STRING (Latin-1) or, rarely, COMPOUND_TEXT, read here as UTF-8 at best.
            encoding = "latin-1" if name.type == _XA_STRING else "utf-8"
            text = name.data.decode(encoding, errors="replace").strip("\x00").strip()
            if text:
                return text
        return None

    def window_property(
        self, window: int, property_atom: int, requested_type: int, max_longs: int
    ) -> _Property | None:
        """A property of a window, None if it is absent, of another type, or the request failed.
        `requested_type` 0 (AnyPropertyType) takes any type."""
        actual_type, actual_format = ctypes.c_ulong(0), ctypes.c_int(0)
        item_count, bytes_after = ctypes.c_ulong(0), ctypes.c_ulong(0)
        data = ctypes.POINTER(ctypes.c_ubyte)()
        status = self.libraries.x11.XGetWindowProperty(
            self.display,
            window,
            property_atom,
            0,
            max_longs,
            0,
            requested_type,
            ctypes.byref(actual_type),
            ctypes.byref(actual_format),
            ctypes.byref(item_count),
            ctypes.byref(bytes_after),
            ctypes.byref(data),
        )
        try:
            if status != _X_SUCCESS or self.broken or not data or actual_type.value == 0:
                return None
            if requested_type and actual_type.value != requested_type:
                return None
            if actual_format.value == 8:
                return _Property(actual_type.value, 8, ctypes.string_at(data, item_count.value))
            if actual_format.value == 32:  # Xlib hands 32-bit items over as C longs
                items = ctypes.cast(data, ctypes.POINTER(ctypes.c_ulong))[: item_count.value]
                return _Property(actual_type.value, 32, tuple(items))
            return None
        finally:
            if data:
                self.libraries.x11.XFree(data)


class _XlibProcess:
    """What Xlib keeps for the whole process: the libraries, the error handlers, and the displays the
    readers have open. One lock for every reader: Xlib is not set up for threads (XInitThreads)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.libraries: _X11Libraries | None = None
        self.libraries_failed = False
        self.own_displays: set[int] = set()  # the Displays the readers have open, a forked parent's too
        self.connections: dict[int, _X11Connection] = {}  # those set up, by Display
        self.previous_error_handler: int | None = None
        self.previous_io_error_handler: int | None = None
        self.handlers: tuple[object, ...] = ()  # ctypes callbacks, kept alive for Xlib


_xlib = _XlibProcess()


def _on_x_error(display: int | None, event: int | None) -> int:
    if display in _xlib.own_displays:
        # X's default handler prints and calls exit(). Ours are routine (a window closed between two
        # requests), and the failing call's own status already tells the caller.
        return 0
    if _xlib.previous_error_handler:
        return _X_ERROR_HANDLER(_xlib.previous_error_handler)(display, event)
    return 0


def _on_x_io_error(display: int | None) -> int:
    if display in _xlib.own_displays:
        connection = _xlib.connections.get(display)
        if connection is not None:
            connection.broken = True
        # Returning hands over to the display's exit handler: ours returns too, so Xlib marks the
        # display dead instead of exiting the process (before libX11 1.7 it exits; nothing stops that).
        return 0
    if _xlib.previous_io_error_handler:
        return _X_IO_ERROR_HANDLER(_xlib.previous_io_error_handler)(display)
    return 0


def _on_x_io_error_exit(display: int | None, user_data: int | None) -> None:
    return None


def _x11_libraries() -> _X11Libraries | None:
    """Loads libX11 and installs the error handlers, once per process (caller holds the lock)."""
    if _xlib.libraries is None and not _xlib.libraries_failed:
        try:
            libraries = _load_x11_libraries()
        except (OSError, AttributeError):
            _xlib.libraries_failed = True
            _debug_once("libX11", "libX11.so.6 is not usable: no X11 activity", exc_info=True)
            return None
        handlers = (
            _X_ERROR_HANDLER(_on_x_error),
            _X_IO_ERROR_HANDLER(_on_x_io_error),
            _X_IO_ERROR_EXIT_HANDLER(_on_x_io_error_exit),
        )
        _xlib.handlers = handlers
        # The handlers are process-wide in Xlib: errors on displays that are not ours go on to
        # whichever handlers were there before. A library that installs its own later takes ours over.
        _xlib.previous_error_handler = libraries.x11.XSetErrorHandler(handlers[0])
        _xlib.previous_io_error_handler = libraries.x11.XSetIOErrorHandler(handlers[1])
        _xlib.libraries = libraries
    return _xlib.libraries


def _abandon(connection: _X11Connection) -> None:
    # A forked child must not write on its parent's socket: its copy is left to the OS. Closing a
    # display whose server went away is safe, the error handlers above keep Xlib from exiting.
    if connection.key[0] == os.getpid():
        connection.libraries.x11.XCloseDisplay(connection.display)
        _xlib.own_displays.discard(connection.display)
        _xlib.connections.pop(connection.display, None)


def _open_x11_connection(
    libraries: _X11Libraries, display_name: str, key: tuple[int, str]
) -> _X11Connection | None:
    """A new connection to the display, None where it cannot be opened (caller holds the lock)."""
    display = libraries.x11.XOpenDisplay(display_name.encode())
    if not display:
        _debug_once(f"open {display_name}", "cannot open X display %r", display_name)
        return None
    _xlib.own_displays.add(display)  # before its first request: an X error on it must not exit()
    if hasattr(libraries.x11, "XSetIOErrorExitHandler"):
        libraries.x11.XSetIOErrorExitHandler(display, _xlib.handlers[2], None)
    try:
        connection = _X11Connection(libraries, display, key)
    except OSError:
        _debug_once(f"setup {display_name}", "X display %r answered oddly", display_name, exc_info=True)
        libraries.x11.XCloseDisplay(display)
        _xlib.own_displays.discard(display)
        return None
    _xlib.connections[display] = connection
    return connection


def _in_wayland_session() -> bool:
    return bool(os.environ.get("WAYLAND_DISPLAY")) or os.environ.get("XDG_SESSION_TYPE") == "wayland"
