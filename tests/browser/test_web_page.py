"""The web page as buyers and ops use it: real headless Chromium against a real coordinator and a real
node on loopback, which fine-tunes SmolLM2 and then chats with the result."""

from __future__ import annotations

import json
import re
import secrets
import tarfile
from pathlib import Path

import pytest

from tests.conftest import CHAT_ROWS
from tests.swarm_processes import Coordinator, Node, wait_for

pytest.importorskip("llama_cpp")
expect = pytest.importorskip("playwright.sync_api").expect

ADMIN_TOKEN = secrets.token_urlsafe(32)
DATASET = "".join(json.dumps(row) + "\n" for row in CHAT_ROWS)
# Line 3 is not JSON and line 5 has nothing to learn from.
BAD_DATASET = "\n".join(
    [
        json.dumps(CHAT_ROWS[0]),
        json.dumps(CHAT_ROWS[1]),
        "{not json",
        json.dumps(CHAT_ROWS[2]),
        json.dumps({"messages": [{"role": "user", "content": "hello?"}]}),
    ]
)


def start_swarm(directory: Path, node_name: str) -> tuple[Coordinator, Node]:
    """A coordinator open to sign-ups (20 credits each) with an ops page, and one real node."""
    coordinator = Coordinator(
        directory / "coordinator",
        environment={
            "SWARM_ALLOW_SIGNUP": "true",
            "SWARM_SIGNUP_CREDITS_MICRO": "20000000",
            "SWARM_ADMIN_TOKEN": ADMIN_TOKEN,
        },
    ).start()
    node = Node(coordinator, directory / "node", name=node_name).start()
    try:
        wait_for(lambda: coordinator.health()["nodes_connected"] == 1, 60, "the node to connect")
    except AssertionError:
        node.kill()
        coordinator.kill()
        raise
    return coordinator, node


@pytest.fixture(scope="module")
def swarm(tmp_path_factory, demo_model_directory):
    coordinator, node = start_swarm(tmp_path_factory.mktemp("web-swarm"), "web-node")
    yield coordinator
    node.kill()
    coordinator.kill()


def sign_up(page, url: str, name: str) -> str:
    page.goto(url)
    assert page.url.startswith(f"{url}/sign-in")
    page.fill("#name", name)
    page.get_by_role("button", name="Create an account").click()
    page.wait_for_selector("#new-key")
    api_key = page.text_content("#new-key").strip()
    assert api_key.startswith("swarm-buyer-")
    return api_key


def drop_file(page, name: str, text: str) -> None:
    """Drop a file on the drop zone as a person drags one from their desktop."""
    page.evaluate(
        """([name, text]) => {
            const transfer = new DataTransfer();
            transfer.items.add(new File([text], name, { type: "application/jsonl" }));
            const zone = document.getElementById("drop");
            zone.dispatchEvent(new DragEvent("dragover", { dataTransfer: transfer, bubbles: true, cancelable: true }));
            zone.dispatchEvent(new DragEvent("drop", { dataTransfer: transfer, bubbles: true, cancelable: true }));
        }""",
        [name, text],
    )


def test_a_new_buyer_fine_tunes_downloads_and_chats_on_the_page(swarm, page, tmp_path):
    url = swarm.url
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    api_key = sign_up(page, url, "web-buyer")

    # The session cookie is out of reach of scripts and of other sites' forms; the key is in no URL.
    cookie = next(cookie for cookie in page.context.cookies() if cookie["name"] == "swarm_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Lax"

    # A bad dataset is refused before it is uploaded, naming its lines.
    page.get_by_role("link", name="Upload a dataset").click()
    page.set_input_files(
        "#file-input", {"name": "bad.jsonl", "mimeType": "application/jsonl", "buffer": BAD_DATASET.encode()}
    )
    errors = page.wait_for_selector("#upload-errors:not([hidden])")
    assert "line 3 is not valid JSON" in errors.text_content()
    assert "line 5 has no assistant message" in errors.text_content()

    # A good one, dropped on the page, is uploaded and listed.
    drop_file(page, "pirate-sums.jsonl", DATASET)
    page.wait_for_selector("#files tr[data-file]")
    assert f"{len(CHAT_ROWS)} examples" in page.text_content("#upload-name")
    assert "pirate-sums.jsonl" in page.text_content("#files")

    # Launch: the price and the balance show before anything is held.
    page.get_by_role("link", name="Fine-tune on it").click()
    expect(page.locator("#quote-price")).to_have_text(re.compile(r"\d"))
    assert page.text_content("#quote-balance").strip() == "20"
    page.fill("#max_steps", "many")
    page.wait_for_selector("#max_steps-error")
    assert page.text_content("#max_steps-error") == "a whole number"
    # A number the coordinator refuses comes back from the server, next to its field, values kept.
    page.fill("#max_steps", "0")
    page.click("#launch-button")
    page.wait_for_selector("#max_steps-error")
    assert "greater than or equal to 1" in page.text_content("#max_steps-error")
    assert page.input_value("#max_steps") == "0"
    page.fill("#max_steps", "8")
    page.click("summary")
    page.fill("#batch_size", "2")
    page.fill("#max_sequence_length", "96")
    page.fill("#suffix", "pirate")
    expect(page.locator("#quote-price")).to_have_text(re.compile(r"\d"))
    page.click("#launch-button")
    page.wait_for_url(re.compile(r".*/jobs/job_\w+$"))
    job_id = page.url.rsplit("/", 1)[1]

    # The chart follows the node step by step, then the finished page offers the adapter.
    page.wait_for_selector("#chart path.train", timeout=240_000)
    first_path = page.get_attribute("#chart path.train", "d")
    expect(page.locator("#chart path.train")).not_to_have_attribute("d", first_path, timeout=240_000)
    page.wait_for_selector("#download-peft", timeout=300_000)
    assert page.text_content("#job-state") == "completed"
    assert page.locator("#attempts tbody tr").count() == 1
    assert page.locator("#chart path.train").count() == 1

    with page.expect_download() as download:
        page.click("#download-peft")
    peft = tmp_path / "adapter.tar"
    download.value.save_as(peft)
    with tarfile.open(peft) as archive:
        names = archive.getnames()
    assert any(name.endswith("adapter_config.json") for name in names), names
    with page.expect_download() as download:
        page.click("#download-gguf")
    gguf = tmp_path / "adapter.gguf"
    download.value.save_as(gguf)
    assert gguf.read_bytes()[:4] == b"GGUF"

    # Chat with the fine-tuned model, streamed.
    page.click("#chat-link")
    page.wait_for_selector("#model")
    assert page.input_value("#model").startswith("ft:smollm2-135m-instruct:pirate:")
    page.fill("#prompt", "What is 3 plus 4?")
    page.press("#prompt", "Enter")
    page.wait_for_selector("#messages li.assistant:not(.streaming)", timeout=120_000)
    assert page.text_content("#messages li.assistant").strip()
    assert re.search(r"\d+ prompt \+ \d+ answer tokens", page.text_content("#chat-usage"))

    # The account shows what was held and charged.
    page.get_by_role("link", name="Account", exact=True).click()
    ledger = page.text_content("#ledger")
    assert "escrow" in ledger and job_id in ledger

    assert not any(api_key in address for address in requested)


def test_the_page_fits_a_phone(swarm, phone_page):
    sign_up(phone_page, swarm.url, "phone-buyer")
    phone_page.goto(f"{swarm.url}/jobs")
    width = phone_page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, f"the jobs page is {width} px wide on a 390 px phone"


def test_ops_see_the_node_and_the_jobs_and_revoke_the_node(swarm, page):
    """Runs last here: it revokes the swarm's node."""
    page.goto(f"{swarm.url}/ops")
    assert "/ops/sign-in" in page.url
    page.fill("#admin_token", "not-the-token")
    page.get_by_role("button", name="Sign in").click()
    assert "this is not the admin token" in page.text_content("#admin_token-error")
    page.fill("#admin_token", ADMIN_TOKEN)
    page.get_by_role("button", name="Sign in").click()
    row = page.wait_for_selector("#nodes tr[data-node]")
    assert "web-node" in row.text_content()
    assert re.search(r"idle|busy|paused", row.text_content())
    assert page.text_content("#nodes-connected") == "1"
    assert int(page.text_content("#jobs-by-state .bar:has(.state-completed) .count")) >= 1

    # Revoking the node disconnects it at once and marks it in the table.
    page.on("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Revoke").click()
    expect(page.locator("#nodes tr[data-node] .state")).to_have_text("revoked")
    wait_for(lambda: swarm.health()["nodes_connected"] == 0, 15, "the revoked node to be disconnected")
