"""The web page in Firefox: Debian's Firefox ESR, headless, against a real coordinator on loopback.

Playwright's Firefox is a patched build it downloads, so this drives Debian's own `firefox-esr`
(`sh installers/debian-packages.sh`, or SWARM_FIREFOX names one) through Marionette, Firefox's built-in
remote protocol, with Mozilla's pure-Python client (`marionette_driver`, in `pip install -e .[dev]`).
No geckodriver, nothing downloaded. The browser gets a fresh profile whose prefs keep it off the network
(no updates, telemetry, safe-browsing lists, remote settings, captive-portal or connectivity checks,
prefetching), and every host name it looks up resolves to 127.0.0.1 without asking DNS: it talks to the
coordinator on loopback and to nothing else.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import CHAT_ROWS
from tests.swarm_processes import Coordinator, wait_for

try:
    with warnings.catch_warnings():  # mozinfo and mozrunner use APIs Python deprecates: not ours
        warnings.simplefilter("ignore", DeprecationWarning)
        from marionette_driver import errors
        from marionette_driver.by import By
        from marionette_driver.marionette import Marionette
except ImportError as error:
    pytest.skip(
        f"firefox: the marionette_driver package is missing (pip install -e .[dev]): {error}",
        allow_module_level=True,
    )

FIREFOX = os.environ.get("SWARM_FIREFOX", "/usr/bin/firefox-esr")
DESKTOP = (1280, 860)
PHONE = (390, 844)
# A fresh profile's user.js. Marionette's recommended prefs (remote.prefs.recommended) already point
# most services at dummy hosts; these say it again, and turn off what they leave on.
PREFS: dict[str, bool | int | str] = {
    "marionette.port": 0,  # any free port; Firefox writes it to <profile>/MarionetteActivePort
    "remote.prefs.recommended": True,
    "app.update.enabled": False,
    "app.update.auto": False,
    "app.update.disabledForTesting": True,
    "app.normandy.enabled": False,
    "app.normandy.api_url": "",
    "app.shield.optoutstudies.enabled": False,
    "datareporting.policy.dataSubmissionEnabled": False,
    "datareporting.healthreport.uploadEnabled": False,
    "datareporting.usage.uploadEnabled": False,
    "toolkit.telemetry.enabled": False,
    "toolkit.telemetry.unified": False,
    "toolkit.telemetry.archive.enabled": False,
    "toolkit.telemetry.server": "",
    "network.captive-portal-service.enabled": False,
    "network.connectivity-service.enabled": False,
    "network.dns.disablePrefetch": True,
    "network.prefetch-next": False,
    "network.predictor.enabled": False,
    "network.http.speculative-parallel-limit": 0,
    "network.trr.mode": 5,  # no DNS over HTTPS
    "network.proxy.type": 0,  # direct: no system proxy (http_proxy and the like), no auto-config
    # Every name resolves to loopback, no DNS asked (as --host-resolver-rules does for Chromium in
    # conftest.py): what the prefs here miss connects to 127.0.0.1 and fails there.
    "network.dns.forceResolve": "127.0.0.1",
    "browser.safebrowsing.malware.enabled": False,
    "browser.safebrowsing.phishing.enabled": False,
    "browser.safebrowsing.blockedURIs.enabled": False,
    "browser.safebrowsing.downloads.enabled": False,
    "browser.safebrowsing.downloads.remote.enabled": False,
    "browser.safebrowsing.provider.google4.updateURL": "",
    "browser.safebrowsing.provider.mozilla.updateURL": "",
    "privacy.trackingprotection.enabled": False,
    # Remote settings (firefox.settings.services.mozilla.com): release builds read this pref only
    # with MOZ_REMOTE_SETTINGS_DEVTOOLS set, as the fixture does.
    "services.settings.server": "data:,#remote-settings-disabled",
    "extensions.update.enabled": False,
    "extensions.getAddons.cache.enabled": False,
    "extensions.systemAddon.update.enabled": False,
    "media.gmp-manager.updateEnabled": False,
    "browser.region.network.url": "",
    "browser.region.update.enabled": False,
    "browser.search.update": False,
    "geo.provider.network.url": "",
    "dom.push.connection.enabled": False,
    "identity.fxaccounts.enabled": False,
    "browser.discovery.enabled": False,
    "browser.topsites.contile.enabled": False,
    "browser.newtabpage.enabled": False,
    "browser.newtabpage.activity-stream.feeds.system.topstories": False,
    "browser.newtabpage.activity-stream.feeds.section.topstories": False,
    "browser.translations.enable": False,
    "browser.shell.checkDefaultBrowser": False,
    "browser.startup.homepage_override.mstone": "ignore",
    "browser.startup.page": 0,
    "browser.aboutwelcome.enabled": False,
    "signon.rememberSignons": False,
    "toolkit.startup.max_resumed_crashes": -1,
}
ROWS = CHAT_ROWS[:6]


def _user_js(prefs: dict[str, bool | int | str]) -> str:
    return "".join(f"user_pref({json.dumps(name)}, {json.dumps(value)});\n" for name, value in prefs.items())


@pytest.fixture
def firefox(tmp_path: Path) -> Iterator[Marionette]:
    """Headless Firefox ESR in a throwaway profile, with a Marionette session open on it."""
    if not (os.path.isfile(FIREFOX) and os.access(FIREFOX, os.X_OK)):
        pytest.skip(
            f"firefox: no Firefox at {FIREFOX} (sh installers/debian-packages.sh, or set SWARM_FIREFOX)"
        )
    profile = tmp_path / "firefox-profile"
    profile.mkdir()
    (profile / "user.js").write_text(_user_js(PREFS))
    log_path = tmp_path / "firefox.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                FIREFOX,
                "--headless",
                "--marionette",
                "--no-remote",
                # Lets this client run script in the browser's own window: to lift its 450 px
                # minimum width for the phone-sized check, and to read the browser console.
                "-remote-allow-system-access",
                "--profile",
                str(profile),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "MOZ_CRASHREPORTER_DISABLE": "1", "MOZ_REMOTE_SETTINGS_DEVTOOLS": "1"},
            start_new_session=True,  # its content processes too, to kill as one group
        )
    client = None
    try:
        port_file = profile / "MarionetteActivePort"

        def port() -> int | None:
            assert process.poll() is None, f"Firefox exited ({process.returncode}): {log_path.read_text()}"
            text = port_file.read_text().strip() if port_file.exists() else ""
            return int(text) if text.isdigit() else None

        client = Marionette(
            host="127.0.0.1", port=wait_for(port, 30, "Firefox's Marionette port"), socket_timeout=30
        )
        client.start_session({"strictFileInteractability": False}, timeout=30)
        client.timeout.page_load = 15
        client.timeout.script = 10
        yield client
    finally:
        if client is not None:
            with contextlib.suppress(OSError, errors.MarionetteException):
                client._request_in_app_shutdown()  # Marionette:Quit, as the browser's own menu quits
            client.session = None  # gone with the browser: nothing left to delete
            client.cleanup_ran = True
            if client.client is not None:
                client.client.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # whatever is left of its group
        process.wait(10)
        shutil.rmtree(profile, ignore_errors=True)


def element(browser: Marionette, selector: str, timeout: float = 15):
    """The first element that matches, once there is one."""
    found = wait_for(
        lambda: browser.find_elements(By.CSS_SELECTOR, selector), timeout, selector, interval=0.1
    )
    return found[0]


def page_errors(browser: Marionette, origin: str) -> list[str]:
    """Errors the coordinator's pages put in the browser console (script errors, CSP violations)."""
    with browser.using_context(browser.CONTEXT_CHROME):
        return browser.execute_script(
            """
            const [origin] = arguments;
            return Services.console.getMessageArray()
              .filter((m) => m instanceof Ci.nsIScriptError && !(m.flags & Ci.nsIScriptError.warningFlag))
              .filter((m) => (m.sourceName || "").startsWith(origin) || m.category.includes("CSP"))
              .map((m) => `${m.category}: ${m.errorMessage} (${m.sourceName}:${m.lineNumber})`);
            """,
            script_args=[origin],
        )


def set_window_size(browser: Marionette, width: int, height: int) -> None:
    with browser.using_context(browser.CONTEXT_CHROME):
        browser.execute_script("document.documentElement.style.minWidth = '0px'")  # the browser's own 450 px
    browser.set_window_rect(width=width, height=height)


def test_a_buyer_signs_up_uploads_and_gets_a_price_in_firefox(firefox: Marionette, tmp_path: Path) -> None:
    coordinator = Coordinator(
        tmp_path / "coordinator",
        environment={"SWARM_ALLOW_SIGNUP": "true", "SWARM_SIGNUP_CREDITS_MICRO": "20000000"},
    ).start()
    try:
        url = coordinator.url
        set_window_size(firefox, *DESKTOP)

        # Sign up: the key is shown once, the session is an HttpOnly cookie.
        firefox.navigate(url)
        assert firefox.get_url().startswith(f"{url}/sign-in"), firefox.get_url()
        element(firefox, "#name").send_keys("firefox-buyer")
        firefox.find_element(By.XPATH, "//button[normalize-space()='Create an account']").click()
        api_key = element(firefox, "#new-key").text.strip()
        assert api_key.startswith("swarm-buyer-"), api_key
        cookie = next(cookie for cookie in firefox.get_cookies() if cookie["name"] == "swarm_session")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Lax", cookie

        # Upload a dataset through the file input (as "choose one" does): checked, hashed, uploaded.
        dataset = tmp_path / "sums.jsonl"
        dataset.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
        firefox.navigate(f"{url}/files")
        element(firefox, "#file-input").send_keys(str(dataset))
        row = element(firefox, "#files tr[data-file]")
        file_id = row.get_attribute("data-file")
        assert file_id.startswith("file_"), file_id
        assert "sums.jsonl" in row.text
        assert f"{len(ROWS)} examples" in element(firefox, "#upload-name").text

        # The launch form asks the JSON API (session cookie, CSRF header) for the price.
        firefox.navigate(f"{url}/jobs/new?dataset={file_id}")
        price = element(firefox, "#quote-price")
        wait_for(lambda: re.search(r"\d", price.text), 15, "the price on the launch form")
        assert element(firefox, "#quote-balance").text.strip() == "20"

        # A phone-wide window: nothing sticks out sideways.
        set_window_size(firefox, *PHONE)
        firefox.navigate(f"{url}/jobs")
        inner, scroll = firefox.execute_script(
            "return [window.innerWidth, document.documentElement.scrollWidth]"
        )
        assert inner == PHONE[0], f"the window is {inner} px wide, not {PHONE[0]}"
        assert scroll <= PHONE[0], f"the jobs page is {scroll} px wide in a {PHONE[0]} px Firefox"

        assert page_errors(firefox, url) == []
    finally:
        coordinator.kill()
