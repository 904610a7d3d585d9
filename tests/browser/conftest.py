"""Fixtures for the web page's browser tests: real headless Chromium driven through Playwright's sync API.

The browser is Debian's Chromium (`sh installers/debian-packages.sh`), or the one SWARM_CHROMIUM names;
never one that Playwright downloads (`playwright install` is not needed, and not to be run). Without
Chromium or the playwright package, the tests skip with what to install.

The sync API drives its event loop from the main thread, and while it is started asyncio takes that
loop for a running one there: `asyncio.run()` refuses to start. So the browser lives for this package's
tests only (package scope) and is gone before the other tests run; the servers under test run in
threads or subprocesses of their own.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

CHROMIUM = os.environ.get("SWARM_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",  # containers and CI runners have no user namespaces for Chromium's sandbox
    "--disable-gpu",
    # Nothing leaves the machine: no safe-browsing lists, variations or component downloads, and no
    # name resolves but the loopback one (left alone, Chromium looks up accounts.google.com).
    "--disable-background-networking",
    "--disable-component-update",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost",
]
DESKTOP_VIEWPORT = {"width": 1280, "height": 860}
PHONE_VIEWPORT = {"width": 390, "height": 844}

_BROWSER_TESTS = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    browser = pytest.mark.browser
    for item in items:
        if _BROWSER_TESTS in item.path.resolve().parents:
            item.add_marker(browser)


@pytest.fixture(scope="package")
def browser() -> Iterator[Browser]:
    """Headless Chromium, launched once for the browser tests and closed after the last of them."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("browser: the playwright package is missing (pip install -e .[dev])")
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.skip(
            f"browser: no Chromium at {CHROMIUM} (sh installers/debian-packages.sh, or set SWARM_CHROMIUM)"
        )
    playwright = sync_playwright().start()
    try:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    except BaseException:
        playwright.stop()
        raise
    try:
        yield chromium
    finally:
        chromium.close()
        playwright.stop()
    # Stopped, the sync API hands the main thread back with no event loop marked as running.
    assert asyncio._get_running_loop() is None, "Playwright left an asyncio loop running"


def _new_page(browser: Browser, **context_options: Any) -> Iterator[Page]:
    context = browser.new_context(accept_downloads=True, **context_options)
    try:
        yield context.new_page()
    finally:
        context.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A page in a fresh context (own cookies and storage) with a desktop-sized viewport."""
    yield from _new_page(browser, viewport=DESKTOP_VIEWPORT)


@pytest.fixture
def phone_page(browser: Browser) -> Iterator[Page]:
    """A page in a fresh context that looks like a phone: small touch screen, 2x pixels, mobile layout."""
    yield from _new_page(
        browser, viewport=PHONE_VIEWPORT, device_scale_factor=2, is_mobile=True, has_touch=True
    )
