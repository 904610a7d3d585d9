"""Screenshots of every page of the web UI (`make screenshots`): real headless Chromium, a real
coordinator and a real node on loopback fine-tuning SmolLM2, at a laptop's size and a phone's.

    python -m tests.browser.screenshot_pages OUTPUT_DIRECTORY [--sell-only]

The sellers' page offers the Linux package `make installer` left in dist/, where there is one.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from pathlib import Path

import httpx
from playwright.sync_api import expect, sync_playwright

from compute_swarm.coordinator.store.database import Database
from compute_swarm.engine.jobs import DEFAULT_MODEL
from compute_swarm.engine.models import prepared_model_directory
from tests.browser.conftest import CHROMIUM, CHROMIUM_ARGS, DESKTOP_VIEWPORT, PHONE_VIEWPORT
from tests.browser.test_web_page import ADMIN_TOKEN, BAD_DATASET, DATASET, drop_file, sign_up, start_swarm
from tests.coordinator.test_payouts import earning_node
from tests.swarm_processes import Coordinator, run_cli

REPOSITORY = Path(__file__).resolve().parents[2]
LINUX_BROWSER = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/131.0 Safari/537.36"


def ask_for_payouts(coordinator: Coordinator) -> None:
    """Three sellers with verified work ask to be paid; ops export the first one's request at once."""
    database = Database(f"sqlite:///{coordinator.data_dir / 'coordinator.sqlite3'}")
    try:
        sellers = [earning_node(coordinator, database, credits)[1] for credits in (64_000, 31_500, 25_000)]
    finally:
        database.close()
    sellers[0].request_payout("payments@pixel-forge.example", amount_micro=60_000 * 10**6)
    exported = httpx.post(
        f"{coordinator.url}/api/ops/payouts/export",
        json={"currency": "EUR", "rate": "0.00046"},
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        timeout=10,
    )
    exported.raise_for_status()
    sellers[1].request_payout("IBAN DE02 1203 0000 0000 2020 51")
    sellers[2].request_payout("wallet:0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed")


def sell_page_screenshots(output: Path, work: Path) -> None:
    """The sellers' page as a Linux visitor with an invite link sees it, at a laptop's size and a phone's."""
    coordinator = Coordinator(work / "sell", environment={"SWARM_NODE_ADMISSION": "invite"}).start()
    try:
        offered = coordinator.data_dir / "app-downloads"
        offered.mkdir()
        for package in (REPOSITORY / "dist").glob("compute-swarm-*.tar.gz"):
            os.link(package, offered / package.name)
        invite = run_cli("admin", "create-invite", "--data-dir", str(coordinator.data_dir))
        code = invite.stdout.strip().splitlines()[-1]
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            for name, options in (
                ("16-sell", {"viewport": DESKTOP_VIEWPORT}),
                ("17-phone-sell", {"viewport": PHONE_VIEWPORT, "device_scale_factor": 2, "is_mobile": True}),
            ):
                page = browser.new_context(user_agent=LINUX_BROWSER, **options).new_page()
                page.goto(f"{coordinator.url}/sell?invite={code}")
                path = output / f"web-{name}.png"
                page.screenshot(path=path, full_page=True)
                print(f"wrote {path}")
            browser.close()
    finally:
        coordinator.kill()


def main() -> int:
    arguments = [argument for argument in sys.argv[1:] if not argument.startswith("--")]
    output = Path(arguments[0] if arguments else "screenshots")
    output.mkdir(parents=True, exist_ok=True)
    if "--sell-only" in sys.argv:
        sell_page_screenshots(output, Path(tempfile.mkdtemp(prefix="web-screenshots-")))
        return 0
    prepared_model_directory(DEFAULT_MODEL)
    work = Path(tempfile.mkdtemp(prefix="web-screenshots-"))
    coordinator, node = start_swarm(work, "gaming-pc")
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_context(viewport=DESKTOP_VIEWPORT).new_page()
            phone = browser.new_context(
                viewport=PHONE_VIEWPORT, device_scale_factor=2, is_mobile=True, has_touch=True
            ).new_page()

            def shoot(target, name: str) -> None:
                path = output / f"web-{name}.png"
                target.screenshot(path=path, full_page=True)
                print(f"wrote {path}")

            page.goto(coordinator.url)
            shoot(page, "01-sign-in")
            sign_up(page, coordinator.url, "ada-labs")
            shoot(page, "02-new-key")
            page.goto(f"{coordinator.url}/files")
            page.set_input_files(
                "#file-input",
                {"name": "sums.jsonl", "mimeType": "application/jsonl", "buffer": BAD_DATASET.encode()},
            )
            page.wait_for_selector("#upload-errors:not([hidden])")
            shoot(page, "03-files-bad-upload")
            drop_file(page, "pirate-sums.jsonl", DATASET)
            page.wait_for_selector("#files tr[data-file]")
            shoot(page, "04-files")
            page.get_by_role("link", name="Fine-tune on it").click()
            page.click("summary")
            page.fill("#max_steps", "12")
            page.fill("#batch_size", "2")
            page.fill("#max_sequence_length", "96")
            page.fill("#suffix", "pirate")
            with page.expect_response("**/api/jobs/quote"):
                page.fill("#max_steps", "12")
            expect(page.locator("#quote-price")).to_have_text(re.compile(r"\d"))
            shoot(page, "05-new-job")
            page.click("#launch-button")
            page.wait_for_selector("#chart path.train", timeout=240_000)
            page.wait_for_timeout(4000)
            shoot(page, "06-job-running")
            page.goto(f"{coordinator.url}/jobs")
            shoot(page, "07-jobs")
            page.go_back()
            page.wait_for_selector("#download-peft", timeout=300_000)
            shoot(page, "08-job-completed")
            job_url = page.url
            page.click("#chat-link")
            page.fill("#prompt", "What is 3 plus 4?")
            page.press("#prompt", "Enter")
            page.wait_for_selector("#messages li.assistant:not(.streaming)", timeout=120_000)
            shoot(page, "09-playground")
            page.goto(f"{coordinator.url}/account")
            shoot(page, "10-account")

            # A sweep: priced as the form is filled, followed trial by trial, then done.
            page.get_by_role("link", name="Sweeps", exact=True).click()
            page.fill("#learning_rate", "0.001, 0.00001")
            page.fill("#rank", "4, 8")
            page.fill("#max_steps", "8")
            page.click("#advanced summary")
            page.fill("#batch_size", "2")
            page.fill("#max_sequence_length", "96")
            with page.expect_response("**/sweeps/quote"):
                page.fill("#max_total_price", "1")
            expect(page.locator("#quote-price")).to_have_text(re.compile(r"\d"))
            shoot(page, "18-sweeps-new")
            page.click("#launch-button")
            page.wait_for_selector("#chart circle.trial-dot", timeout=240_000)
            page.wait_for_timeout(4000)
            shoot(page, "19-sweep-running")
            expect(page.locator("#sweep-state")).to_have_text("completed", timeout=600_000)
            page.wait_for_timeout(1000)
            shoot(page, "20-sweep-completed")
            page.get_by_role("link", name="Sweeps", exact=True).click()
            shoot(page, "21-sweeps")

            # Sellers asking to be paid: one batch exported already, two requests since.
            ask_for_payouts(coordinator)
            ops = browser.new_context(viewport=DESKTOP_VIEWPORT).new_page()
            ops.goto(f"{coordinator.url}/ops")
            ops.fill("#admin_token", ADMIN_TOKEN)
            ops.get_by_role("button", name="Sign in").click()
            ops.wait_for_selector("#nodes tr[data-node]")
            ops.wait_for_selector("#payout-queue tr[data-payout]")
            shoot(ops, "11-ops")

            # The same buyer on a phone (signed in with the key the account page does not show again).
            phone.goto(coordinator.url)
            phone.fill("#name", "phone-buyer")
            phone.get_by_role("button", name="Create an account").click()
            phone.wait_for_selector("#new-key")
            for name, path in [
                ("12-phone-jobs", "/jobs"),
                ("13-phone-new-job", "/jobs/new"),
                ("14-phone-account", "/account"),
                ("22-phone-sweeps", "/sweeps"),
            ]:
                phone.goto(f"{coordinator.url}{path}")
                shoot(phone, name)
            # Another buyer's job is not there for this one (the same check as the API's).
            phone.goto(job_url)
            shoot(phone, "15-phone-someone-elses-job")
            browser.close()
    finally:
        node.kill()
        coordinator.kill()
    sell_page_screenshots(output, work)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
