"""The sweep pages as a buyer uses them: real headless Chromium against a real coordinator and a real
node on loopback fine-tuning SmolLM2. The buyer launches a small sweep from the form (its mistakes
shown by their fields, nothing typed lost), follows the trials live, downloads the best trial's
adapter, chats with it, and finds the chat on the account page; another sweep is cancelled."""

from __future__ import annotations

import re

import pytest

from tests.browser.test_web_page import DATASET, drop_file, sign_up, start_swarm
from tests.swarm_processes import wait_for

pytest.importorskip("llama_cpp")
expect = pytest.importorskip("playwright.sync_api").expect

SWEEP_ID = re.compile(r".*/sweeps/(sweep_\w+)$")


@pytest.fixture(scope="module")
def swarm(tmp_path_factory, demo_model_directory):
    coordinator, node = start_swarm(tmp_path_factory.mktemp("sweep-swarm"), "sweep-node")
    yield coordinator
    node.kill()
    coordinator.kill()


def buyer_with_a_dataset(page, url: str, name: str) -> None:
    sign_up(page, url, name)
    page.goto(f"{url}/files")
    drop_file(page, "pirate-sums.jsonl", DATASET)
    page.wait_for_selector("#files tr[data-file]")


def fill_small_sweep(page, learning_rates: str) -> None:
    """Two trials of a few short steps: quick on a CPU, and far apart in what they learn."""
    page.fill("#learning_rate", learning_rates)
    page.fill("#rank", "4")
    page.fill("#max_steps", "4")
    if not page.is_visible("#batch_size"):
        page.click("#advanced summary")
    page.fill("#batch_size", "2")
    page.fill("#max_sequence_length", "96")
    page.fill("#evaluations_per_trial", "2")


def test_a_buyer_launches_a_sweep_follows_it_and_chats_with_the_best_trial(swarm, page, tmp_path):
    url = swarm.url
    buyer_with_a_dataset(page, url, "sweeper")
    page.get_by_role("link", name="Sweeps", exact=True).click()
    expect(page.locator("#sweeps tr.empty")).to_contain_text("No sweeps yet")
    # The defaults make a sweep: its price shows before anything is held.
    expect(page.locator("#quote-price")).to_have_text(re.compile(r"\d"))
    expect(page.locator("#quote-trials")).to_have_text(re.compile(r"for 4 trials"))

    # Mistakes are named next to their fields as they are typed.
    page.fill("#learning_rate", "0.001, fast")
    expect(page.locator("#learning_rate-error")).to_have_text("'fast' is not a number")
    expect(page.locator("#quote-price")).to_have_text("–")
    page.fill("#learning_rate", "0.00001:0.001:log")
    expect(page.locator("#learning_rate-error")).to_contain_text("a range is for random search")
    page.check('input[name="strategy"][value="random"]')
    expect(page.locator("#learning_rate-error")).to_have_count(0)
    assert page.input_value("#trials") == "8"  # random search needs a count: one is offered
    expect(page.locator("#quote-trials")).to_have_text(re.compile(r"for 8 trials"))
    page.check('input[name="strategy"][value="grid"]')
    page.fill("#trials", "")

    # A cap below the price: said by the cap as typed, and again by the coordinator on launch, with
    # everything typed kept.
    fill_small_sweep(page, "0.001, 0.000001")
    page.fill("#max_total_price", "0.000001")
    expect(page.locator("#max_total_price-error")).to_contain_text("more than this cap")
    page.click("#launch-button")
    page.wait_for_selector("#max_total_price-error")
    assert "the 2 trials cost" in page.text_content("#max_total_price-error")
    assert page.input_value("#learning_rate") == "0.001, 0.000001"
    assert page.input_value("#max_sequence_length") == "96"
    assert page.input_value("#max_total_price") == "0.000001"
    page.fill("#max_total_price", "")
    expect(page.locator("#max_total_price-error")).to_have_count(0)
    page.click("#launch-button")
    page.wait_for_url(SWEEP_ID)
    sweep_id = SWEEP_ID.match(page.url).group(1)

    # The trials follow the node: each one's held-out loss lands on the chart, then the best is offered.
    expect(page.locator("#trials tbody tr")).to_have_count(2)
    page.wait_for_selector("#chart circle.trial-dot", timeout=240_000)
    # The first trial to finish is the best so far, offered while the other still runs.
    page.wait_for_selector("#chat-link", timeout=300_000)
    expect(page.locator("#sweep-state")).to_have_text("completed", timeout=300_000)
    expect(page.locator("#cancel-form")).to_be_hidden()
    expect(page.locator("#chart circle.trial-dot")).to_have_count(2)
    expect(page.locator("#chart circle.trial-best")).to_have_count(1)
    # The fast learning rate learned: its trial is the best, marked in the table and the chart.
    assert "learning_rate=0.001" in page.text_content("#best")
    best_row = page.locator("#trials tr.best")
    expect(best_row).to_have_count(1)
    assert "0.001" in best_row.text_content() and "completed" in best_row.text_content()
    assert page.text_content("#sweep-done") == "2 of 2"
    assert float(page.text_content("#sweep-cost")) > 0
    assert page.text_content("#sweep-held") == "0"

    with page.expect_download() as download:
        page.click("#download-gguf")
    gguf = tmp_path / "best.gguf"
    download.value.save_as(gguf)
    assert gguf.read_bytes()[:4] == b"GGUF"

    # Chat with the best trial's model, then find the request, its tokens and its charge on the account.
    page.click("#chat-link")
    page.wait_for_selector("#model")
    model = page.input_value("#model")
    assert model.startswith("ft:smollm2-135m-instruct:trial"), model
    page.fill("#prompt", "What is 3 plus 4?")
    page.press("#prompt", "Enter")
    page.wait_for_selector("#messages li.assistant:not(.streaming)", timeout=120_000)
    page.get_by_role("link", name="Account", exact=True).click()
    [row] = page.locator("#requests tbody tr").all()
    cells = row.locator("td").all_text_contents()
    assert cells[1] == model and "completed" in cells[2]
    assert int(cells[3]) > 0 and int(cells[4]) > 0 and float(cells[5]) > 0
    total = page.text_content("#requests-total")
    assert re.search(
        rf"1 request in all: {cells[3]} prompt \+ {cells[4]} answer tokens, {cells[5]} credits", total
    )

    # The list shows the sweep done, with its best loss and cost.
    page.get_by_role("link", name="Sweeps", exact=True).click()
    listed = page.locator(f'#sweeps tr[data-sweep="{sweep_id}"]')
    expect(listed).to_contain_text("2/2")
    expect(listed).to_contain_text("completed")
    expect(listed.locator("td.number").first).to_have_text(re.compile(r"^\d+\.\d{4}"))


def test_cancelling_a_sweep_gives_back_what_its_open_trials_held(swarm, page):
    buyer_with_a_dataset(page, swarm.url, "canceller")
    # From the dataset's row, to the form with it chosen.
    page.get_by_role("link", name="Sweep on it").click()
    page.wait_for_url(re.compile(r".*/sweeps\?dataset=file_\w+#new-sweep$"))
    assert page.input_value("#dataset") == page.url.split("dataset=")[1].split("#")[0]
    fill_small_sweep(page, "0.001, 0.0003, 0.0001")
    page.fill("#max_steps", "400")  # long enough to be running when it is cancelled
    expect(page.locator("#quote-trials")).to_have_text(re.compile(r"for 3 trials"))
    page.click("#launch-button")
    page.wait_for_url(SWEEP_ID)
    expect(page.locator("#trials tbody tr").first.locator(".state")).to_have_text("running", timeout=120_000)

    page.on("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Cancel open trials").click()
    page.wait_for_load_state()
    expect(page.locator("#trials tbody .state")).to_have_text(["cancelled"] * 3)
    expect(page.locator("#sweep-state")).to_have_text("cancelled")
    expect(page.locator("#cancel-form")).to_be_hidden()
    assert page.text_content("#sweep-held") == "0"
    # Nothing came of it, so there is no best trial to offer.
    expect(page.locator("#best")).to_contain_text("once a trial completes")
    wait_for(lambda: swarm.health()["nodes_connected"] == 1, 30, "the node to stay connected")


def test_the_sweep_pages_fit_a_phone(swarm, phone_page):
    buyer_with_a_dataset(phone_page, swarm.url, "phone-sweeper")
    phone_page.goto(f"{swarm.url}/sweeps")
    expect(phone_page.locator("#quote-price")).to_have_text(re.compile(r"\d"))
    width = phone_page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, f"the sweeps page is {width} px wide on a 390 px phone"
