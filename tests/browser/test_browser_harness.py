"""The browser harness itself: Chromium loads a page from a local server, runs its script and screenshots it."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # the page fixture skips the tests where playwright is missing
    from playwright.sync_api import Page

PAGE = b"""<!doctype html>
<html><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>loading</title></head>
<body style="font: 24px sans-serif; background: #f4f1ea">
<h1 id="answer">waiting for the script</h1>
<script>
  const answer = [6, 7].reduce((a, b) => a * b);
  document.title = "harness " + answer;
  document.getElementById("answer").textContent = "six times seven is " + answer;
  document.body.dataset.size = innerWidth + "x" + innerHeight + "@" + devicePixelRatio;
</script>
</body></html>
"""


class _PageHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(PAGE)))
        self.end_headers()
        self.wfile.write(PAGE)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def page_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _PageHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_page_runs_its_script_and_screenshots(page: Page, page_url: str, tmp_path: Path) -> None:
    page.goto(page_url)
    assert page.locator("#answer").inner_text() == "six times seven is 42"
    assert page.title() == "harness 42"
    assert page.locator("body").get_attribute("data-size") == "1280x860@1"

    screenshot = page.screenshot(path=tmp_path / "harness.png", full_page=True)
    assert screenshot.startswith(b"\x89PNG\r\n\x1a\n")
    assert (tmp_path / "harness.png").stat().st_size > 1024


def test_phone_page_is_a_small_touch_screen(phone_page: Page, page_url: str) -> None:
    phone_page.goto(page_url)
    assert phone_page.locator("body").get_attribute("data-size") == "390x844@2"
    assert phone_page.evaluate("matchMedia('(pointer: coarse)').matches")
