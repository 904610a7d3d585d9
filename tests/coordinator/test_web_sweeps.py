"""The sweep pages, driven as a browser drives them: the launch form read into a sweep spec (values,
lists, ranges), each problem shown by its field with what was typed kept, the live quote, the trials
queued and held, ownership, and cancelling. A coordinator in-process (TestClient) on a fresh data dir;
tests/browser/test_sweep_page.py runs the pages in Chromium with a real node."""

from __future__ import annotations

import html
import re

import pytest
from fastapi.testclient import TestClient

from compute_swarm.coordinator.app import create_app
from compute_swarm.coordinator.transport.web.sweep_pages import default_values, sweep_spec
from tests.coordinator.test_web import (
    ORIGIN,
    SIGNUP_CREDITS,
    as_other_browser,
    browser_headers,
    field_error,
    settings_for,
    sign_up,
    upload_dataset,
)


@pytest.fixture
def client(tmp_path):
    with TestClient(create_app(settings_for(tmp_path)), base_url=ORIGIN, follow_redirects=False) as client:
        yield client


@pytest.fixture
def buyer(client):
    """A signed-in buyer with a dataset: (csrf, file_id)."""
    api_key, csrf = sign_up(client)
    return csrf, upload_dataset(client, api_key)


def sweep_form(csrf: str, file_id: str, **fields: str) -> dict[str, str]:
    """The launch form as the page sends it: the defaults, a dataset, a quick sweep of two trials."""
    form = default_values() | {"csrf_token": csrf, "dataset": file_id, "learning_rate": "0.001, 0.0001"}
    form |= {"rank": "4", "max_steps": "3", "batch_size": "2", "max_sequence_length": "96"}
    form.update(fields)
    return {name: value for name, value in form.items() if value is not None}


def input_value(page: str, field: str) -> str | None:
    found = re.search(rf'<input id="{field}" name="{field}" value="([^"]*)"', page)
    return found.group(1) if found else None


# ---- reading the form (pure)


def test_one_value_is_every_trials_and_several_are_swept():
    spec, errors = sweep_spec(default_values() | {"dataset": "file_x", "learning_rate": "3e-4, 0.001,"})
    assert errors == {}
    assert spec["parameters"] == {"learning_rate": {"values": [3e-4, 0.001]}, "rank": {"values": [4, 8]}}
    assert spec["base"] == {
        "base_model": "smollm2-135m-instruct",
        "dataset": "file_x",
        "max_steps": 30,
        "alpha": 16,
        "batch_size": 4,
        "gradient_accumulation_steps": 1,
        "dropout": 0.05,
        "warmup_steps": 0,
        "weight_decay": 0,
        "seed": 0,
        "max_sequence_length": 512,
    }
    assert type(spec["base"]["max_steps"]) is int and type(spec["base"]["alpha"]) is float
    assert (spec["strategy"], spec["median_stopping"], spec["evaluations_per_trial"]) == (
        "grid",
        {"enabled": True},
        4,
    )
    assert "trials" not in spec and "max_total_price_micro" not in spec


def test_random_search_takes_ranges_a_count_and_caps_in_credits():
    values = default_values() | {
        "dataset": "file_x",
        "strategy": "random",
        "trials": "12",
        "learning_rate": "0.00001:0.001:log",
        "rank": " 4 : 32 ",
        "seed": "7",
        "early_stopping": "",
        "max_total_price": "2.5",
        "max_price_per_trial": "0.25",
    }
    spec, errors = sweep_spec(values)
    assert errors == {}
    assert spec["parameters"] == {
        "learning_rate": {"low": 1e-5, "high": 1e-3, "log": True},
        "rank": {"low": 4.0, "high": 32.0, "log": False},
    }
    assert (spec["strategy"], spec["trials"], spec["seed"]) == ("random", 12, 7)
    assert spec["median_stopping"] == {"enabled": False}
    assert (spec["max_total_price_micro"], spec["max_price_per_trial_micro"]) == (2_500_000, 250_000)


@pytest.mark.parametrize(
    ("fields", "field", "problem"),
    [
        ({"learning_rate": "0.001, fast"}, "learning_rate", "'fast' is not a number"),
        ({"rank": "4, 8.5"}, "rank", "8.5 is not a whole number"),
        ({"learning_rate": "0.00001:0.001"}, "learning_rate", "a range is for random search"),
        ({"strategy": "random", "trials": "4", "learning_rate": "0.001:0.0001"}, "learning_rate", "low end"),
        ({"strategy": "random", "trials": "4", "learning_rate": "0:0.001:log"}, "learning_rate", "above 0"),
        ({"strategy": "random", "trials": "4", "learning_rate": "1:2:linear"}, "learning_rate", "low:high:log"),
        ({"max_steps": ""}, "max_steps", "required"),
        ({"strategy": "random", "trials": ""}, "trials", "how many trials to draw"),
        ({"trials": "65"}, "trials", "from 1 to 64"),
        ({"max_sequence_length": "long"}, "max_sequence_length", "a whole number"),
        ({"max_total_price": "five"}, "max_total_price", "an amount of credits"),
        ({"max_price_per_trial": "0"}, "max_price_per_trial", "more than 0"),
        ({"dataset": ""}, "dataset", "choose a dataset"),
        ({"learning_rate": "0.001", "rank": "4"}, "form", "nothing is swept"),
    ],
)  # fmt: skip
def test_a_form_that_cannot_be_read_names_the_field(fields, field, problem):
    _spec, errors = sweep_spec(default_values() | {"dataset": "file_x"} | fields)
    assert problem in errors[field], errors


# ---- launching through the page


def test_a_good_form_queues_the_trials_and_shows_the_sweep(client, buyer):
    csrf, file_id = buyer
    answer = client.post("/sweeps", data=sweep_form(csrf, file_id), headers={"Origin": ORIGIN})
    assert answer.status_code == 303, answer.text
    sweep_id = answer.headers["location"].removeprefix("/sweeps/")
    assert sweep_id.startswith("sweep_")

    sweep = client.get(f"/api/sweeps/{sweep_id}").json()
    # In the order the values were typed.
    assert [(row["learning_rate"], row["state"]) for row in sweep["trials"]] == [
        (0.001, "queued"),
        (0.0001, "queued"),
    ]
    jobs = {job["id"]: job for job in client.get("/api/jobs").json()}
    for row in sweep["trials"]:
        spec = jobs[row["job_id"]]["spec"]
        assert (spec["rank"], spec["max_steps"], spec["batch_size"], spec["max_sequence_length"]) == (
            4,
            3,
            2,
            96,
        )
    assert client.get("/api/balance").json() == {
        "available_micro": SIGNUP_CREDITS - sweep["held_micro"],
        "escrow_micro": sweep["held_micro"],
    }

    page = client.get(answer.headers["location"])
    assert page.status_code == 200
    assert 'id="sweep-state">running<' in page.text
    assert page.text.count('<tr data-job="job_') == 2
    assert '<td class="number">0.0001</td>' in page.text and '<td class="number">0.001</td>' in page.text
    assert 'id="cancel-form"' in page.text and 'id="cancel-form" hidden' not in page.text
    assert "once a trial completes" in page.text
    listed = client.get("/sweeps").text
    assert f'<tr data-sweep="{sweep_id}">' in listed and "0/2" in listed


@pytest.mark.parametrize(
    ("fields", "field", "problem"),
    [
        ({"learning_rate": "0.5, 2"}, "learning_rate", "less than or equal to 1 (trial 2: learning_rate=2)"),
        ({"rank": "0"}, "rank", "greater than or equal to 1"),
        ({"max_total_price": "0.000001"}, "max_total_price", "the 2 trials cost"),
        ({"max_price_per_trial": "0.000001"}, "max_price_per_trial", "each trial costs more than this cap"),
        (
            {"max_price_per_trial": "0.0012", "learning_rate": "0.001", "max_steps": "2, 3"},
            "max_price_per_trial",
            "trial 2 costs more",
        ),
        (
            {"max_price_per_trial": "0.0012", "max_steps": "2, 3"},
            "max_price_per_trial",
            "trials 2, 4 cost more",
        ),
        ({"learning_rate": "0.001, nope"}, "learning_rate", "'nope' is not a number"),
    ],
)
def test_a_refused_form_shows_the_problem_by_its_field_and_keeps_what_was_typed(
    client, buyer, fields, field, problem
):
    csrf, file_id = buyer
    form = sweep_form(csrf, file_id, **fields, alpha="12", evaluations_per_trial="2")
    answer = client.post("/sweeps", data=form, headers={"Origin": ORIGIN})

    assert answer.status_code == 422
    assert problem in html.unescape(field_error(answer.text, field)), answer.text
    assert f'aria-describedby="{field}-error"' in answer.text
    for kept in ("learning_rate", "rank", "alpha", "evaluations_per_trial", "max_total_price"):
        assert input_value(answer.text, kept) == form[kept], kept
    assert f'<option value="{file_id}" selected>' in answer.text
    assert '<details id="advanced">' in answer.text  # nothing there needs attention
    assert client.get("/api/sweeps").json() == [] and client.get("/api/jobs").json() == []
    assert client.get("/api/balance").json()["escrow_micro"] == 0


def test_a_sweep_beyond_the_balance_is_refused_on_the_form(tmp_path):
    with TestClient(
        create_app(settings_for(tmp_path, signup_credits_micro=1)), base_url=ORIGIN, follow_redirects=False
    ) as client:
        api_key, csrf = sign_up(client)
        file_id = upload_dataset(client, api_key)
        quote = client.post("/sweeps/quote", data=sweep_form(csrf, file_id), headers=browser_headers(csrf))
        assert quote.json()["affordable"] is False
        answer = client.post("/sweeps", data=sweep_form(csrf, file_id), headers={"Origin": ORIGIN})
        assert answer.status_code == 422
        assert 'class="form-error" role="alert"' in answer.text and "Account page" in answer.text


def test_the_quote_prices_the_form_as_the_launch_holds_it(client, buyer):
    csrf, file_id = buyer
    form = sweep_form(csrf, file_id, learning_rate="0.001, 0.0003, 0.0001")
    quote = client.post("/sweeps/quote", data=form, headers=browser_headers(csrf))
    assert quote.status_code == 200, quote.text
    body = quote.json()
    assert body["fields"] == {} and body["form"] is None
    assert body["trials"] == 3 and body["affordable"] is True
    assert body["available_micro"] == SIGNUP_CREDITS
    # The API prices the spec the same, and the launch holds what both said; the quote held nothing.
    spec, _errors = sweep_spec(form)
    by_api = client.post("/api/sweeps/quote", json={"spec": spec}, headers=browser_headers(csrf)).json()
    assert by_api["price_micro"] == body["price_micro"] and len(by_api["trial_prices_micro"]) == 3
    assert by_api["within_caps"] is True
    assert client.get("/api/balance").json()["escrow_micro"] == 0
    client.post("/sweeps", data=form, headers={"Origin": ORIGIN})
    assert client.get("/api/balance").json()["escrow_micro"] == body["price_micro"]

    # A form with problems is answered with them, and no price.
    bad = client.post(
        "/sweeps/quote", data={**form, "rank": "x", "max_steps": ""}, headers=browser_headers(csrf)
    ).json()
    assert set(bad["fields"]) == {"rank", "max_steps"} and "price_micro" not in bad
    capped = client.post(
        "/sweeps/quote", data={**form, "max_total_price": "0.000001"}, headers=browser_headers(csrf)
    ).json()
    assert "the 3 trials cost" in capped["fields"]["max_total_price"]
    assert capped["price_micro"] == body["price_micro"]  # shown beside the cap it passes


def test_the_quote_and_the_form_need_the_session_token_and_our_origin(client, buyer):
    csrf, file_id = buyer
    form = sweep_form(csrf, file_id)
    for headers in (browser_headers(None), browser_headers("x" * 43), browser_headers(csrf, origin=None)):
        assert (
            client.post("/sweeps/quote", data={**form, "csrf_token": ""}, headers=headers).status_code == 403
        )
    refused = client.post("/sweeps", data={**form, "csrf_token": "x" * 43}, headers={"Origin": ORIGIN})
    assert refused.status_code == 403 and "text/html" in refused.headers["content-type"]
    assert client.get("/api/sweeps").json() == []


def test_another_buyer_sees_none_of_a_sweep_and_its_owner_cancels_it(client, buyer):
    csrf, file_id = buyer
    location = client.post("/sweeps", data=sweep_form(csrf, file_id), headers={"Origin": ORIGIN}).headers[
        "location"
    ]
    owner = as_other_browser(client)
    _key, other_csrf = sign_up(client, "someone else")
    assert client.get(location).status_code == 404
    refused = client.post(f"{location}/cancel", data={"csrf_token": other_csrf}, headers={"Origin": ORIGIN})
    assert refused.status_code == 404
    assert location.removeprefix("/sweeps/") not in client.get("/sweeps").text

    client.cookies = owner
    cancelled = client.post(f"{location}/cancel", data={"csrf_token": csrf}, headers={"Origin": ORIGIN})
    assert cancelled.status_code == 303 and cancelled.headers["location"] == location
    page = client.get(location).text
    assert page.count(">cancelled</span></td>") == 2
    assert 'id="sweep-state">cancelled<' in page and 'id="cancel-form"' in page
    assert re.search(r'id="cancel-form"[^>]* hidden>', page)
    assert client.get("/api/balance").json() == {"available_micro": SIGNUP_CREDITS, "escrow_micro": 0}
